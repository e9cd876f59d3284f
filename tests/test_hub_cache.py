"""Hub ids when the hub cannot be reached: a model already in the local Hugging Face cache still runs, an id
that is not there fails at once with one line, and no request goes out either way.

Each case runs the real CLI in a fresh interpreter (the hub decision is made once per process) against a real
cache folder in huggingface_hub's layout and a real loopback HTTP server set as ``HF_ENDPOINT``, which counts
every request it is sent.
"""
from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import byte_tokenizer, tiny_model

REPO = Path(__file__).resolve().parents[1]
CACHED_ID = "someorg/tiny-cached"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> Path:
    """A cache folder holding ``someorg/tiny-cached`` as ``hf download`` leaves it: refs/main names the commit
    and snapshots/<commit>/ holds the files (copies here, where the hub's cache links into blobs/)."""
    cache = tmp_path_factory.mktemp("hub")
    repo = cache / ("models--" + CACHED_ID.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    tiny_model("llama-gqa", vocab_size=257).save_pretrained(snapshot)
    byte_tokenizer().save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return cache


@pytest.fixture
def counting_hub():
    """A loopback "hub" that answers 404 to everything and records each request path."""
    requests: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            requests.append(f"{self.command} {self.path}")
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD = do_POST = _answer

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        server.server_close()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _hub_env(cache: Path, endpoint: str, home: Path) -> dict:
    """The environment of a user whose hub is ``endpoint``: no offline switches set, only the cache given."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
                                                            "TRANSFORMERS_OFFLINE", "HF_HOME")}
    return env | {"HF_HUB_CACHE": str(cache), "HF_ENDPOINT": endpoint, "HOME": str(home),
                  "PYTHONPATH": str(REPO)}


def _cli(argv: list[str], env: dict, unreachable: bool) -> subprocess.CompletedProcess:
    """``selfprune argv`` in a fresh interpreter; ``unreachable`` sets the once-per-process hub decision
    (a loopback server would otherwise be found reachable)."""
    script = ("import sys\nimport selfprune.data as data\n"
              + ("data._HUB_STATE['reachable'] = False\n" if unreachable else "")
              + f"from selfprune.cli import main\nsys.exit(main({argv!r}))\n")
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)


def test_a_cached_hub_model_runs_while_the_hub_is_unreachable(hub_cache, counting_hub, data_dir, tmp_path):
    endpoint, requests = counting_hub
    out = tmp_path / "ppl.json"
    done = _cli(["ppl", "--model", CACHED_ID, "--dataset", "wikitext2", "--max-windows", "2", "--seq-len", "32",
                 "--device", "cpu", "--data-dir", str(data_dir), "--out", str(out)],
                _hub_env(hub_cache, endpoint, tmp_path), unreachable=True)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["ppl"] > 1 and result["model"] == CACHED_ID
    assert requests == []  # the local cache alone answered: no request to the hub, not even a HEAD


def test_an_unknown_hub_id_fails_at_once_while_the_hub_is_unreachable(hub_cache, counting_hub, tmp_path):
    endpoint, requests = counting_hub
    out = tmp_path / "run"
    done = _cli(["search", "--model", "someorg/not-in-the-cache", "--target", "0.3", "--operator", "uniform",
                 "--out", str(out)], _hub_env(hub_cache, endpoint, tmp_path), unreachable=True)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "someorg/not-in-the-cache" in lines[0] and "Traceback" not in done.stderr
    assert requests == [] and not out.exists()


def test_the_hub_probe_asks_the_users_endpoint(counting_hub, monkeypatch):
    """HF_ENDPOINT (a mirror) is what is probed: a listening endpoint is reachable, a closed port is not, and
    then huggingface_hub is put offline (restored after this test, which runs inside the test process)."""
    from huggingface_hub import constants

    from selfprune import data

    endpoint, _ = counting_hub
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for url, reachable in ((endpoint, True), (f"http://127.0.0.1:{_closed_port()}", False)):
        monkeypatch.setenv("HF_ENDPOINT", url)
        monkeypatch.setattr(data, "_HUB_STATE", {})
        assert data.hub_reachable() is reachable
        assert constants.HF_HUB_OFFLINE is not reachable
