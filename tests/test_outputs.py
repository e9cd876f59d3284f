"""Every single-file output, as a class: `--overwrite` replaces it, what a killed writer left beside it is cleaned
up by the next run, and a second writer of the same file at the same time is refused in one line (exit 2) while
the first one's result stays whole. The commands: export, imatrix, ppl --out, eval --out, speed --out."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import save_tiny_model
from selfprune.cli import main
from selfprune.io import lock_path_for, run_lock

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("outputs") / "tiny")


def _commands(model: Path, data_dir: Path) -> dict[str, list[str]]:
    """Each command writing one file, with the option that names it last (the file is appended)."""
    data = ["--data-dir", str(data_dir)]
    return {
        "export": ["export", "--model", str(model), "--outtype", "f16", "--out"],
        "imatrix": ["imatrix", "--model", str(model), "--calib-samples", "2", "--calib-seq-len", "16", *data, "--out"],
        "ppl": ["ppl", "--model", str(model), "--max-windows", "2", "--seq-len", "16", *data, "--out"],
        "eval": ["eval", "--model", str(model), "--tasks", "piqa", "--limit", "2", *data, "--out"],
        "speed": ["speed", "--model", str(model), "--baseline", str(model), "--prompt-len", "8", "--decode-tokens", "1",
                  "--repeats", "1", "--warmup", "0", "--out"],
    }


NAMES = {"export": "out.gguf", "imatrix": "imatrix.gguf", "ppl": "ppl.json", "eval": "eval.json", "speed": "speed.json"}


def _run(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("command", list(NAMES))
def test_single_file_outputs_overwrite_clean_up_and_lock(command, tiny_dir, data_dir, tmp_path, capsys):
    out = tmp_path / NAMES[command]
    argv = _commands(tiny_dir, data_dir)[command] + [str(out)]
    assert _run(argv, capsys)[0] == 0 and out.is_file()

    # without --overwrite: refused, untouched
    before = out.read_bytes()
    code, err = _run(argv, capsys)
    assert code == 2 and "already exists" in err and "--overwrite" in err and len(err.splitlines()) == 1
    assert out.read_bytes() == before

    # a killed writer's temporary files beside the output are removed by the next run, which replaces it
    stale = [tmp_path / f".{out.name}.12345.f32.partial", tmp_path / f".{out.name}.abcd.tmp"]
    for path in stale:
        path.write_bytes(b"x" * 1000)
    unrelated = tmp_path / f".{out.name}.notes"
    unrelated.write_text("kept")
    os.utime(out, (1, 1))
    assert _run(argv + ["--overwrite"], capsys)[0] == 0
    assert out.stat().st_mtime > 1 and not any(p.exists() for p in stale) and unrelated.exists()
    if out.suffix == ".json":
        json.loads(out.read_text())
    assert not lock_path_for(out).exists()

    # another process writing the same file: refused at once in one line, nothing written
    os.utime(out, (1, 1))
    with run_lock(out, command="the test's first writer"):
        done = subprocess.run([sys.executable, "-m", "selfprune", *argv, "--overwrite"], capture_output=True,
                              text=True, timeout=300, env=os.environ | {"PYTHONPATH": str(REPO)})
    assert done.returncode == 2, done.stderr[-2000:]
    message = done.stderr.strip()
    assert len(message.splitlines()) == 1 and "in use by" in message and "first writer" in message
    assert out.stat().st_mtime == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}.") and p != unrelated] == []


def test_export_killed_at_random_points_then_rerun_gives_the_uninterrupted_file(tiny_dir, tmp_path):
    """SIGKILL at random moments of an export (model load, writing the f32 file, quantizing): the next run
    leaves no temporary file behind and writes the same bytes as a run never interrupted."""
    import random
    import signal
    import time

    env = os.environ | {"PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-m", "selfprune", "export", "--model", str(tiny_dir), "--outtype", "q8_0", "--overwrite"]
    reference = tmp_path / "reference.gguf"
    started = time.monotonic()
    assert subprocess.run(argv + ["--out", str(reference)], env=env, capture_output=True, timeout=300).returncode == 0
    duration = time.monotonic() - started
    out = tmp_path / "out" / "model.gguf"
    out.parent.mkdir()
    rng = random.Random(0)
    for _ in range(3):
        process = subprocess.Popen(argv + ["--out", str(out)], env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, 0.95) * duration)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        done = subprocess.run(argv + ["--out", str(out)], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-1500:]
        assert out.read_bytes() == reference.read_bytes()
        assert sorted(p.name for p in out.parent.iterdir()) == ["model.gguf"]
