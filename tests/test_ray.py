"""The search scores candidates on Ray actors: a real local Ray cluster on loopback (2 CPUs), a tiny random
model saved to a folder the workers load, real faults (a SIGKILLed actor, a candidate that raises, a SIGKILLed
driver). Every run must give the journal and best of the same search run in one process."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import save_tiny_model
from selfprune.io import read_jsonl

REPO = Path(__file__).resolve().parents[1]
BUDGET = 12
KEPT = ("index", "iteration", "slot", "operator", "rates", "fitness")


@pytest.fixture(scope="module")
def ray_address():
    """One local Ray cluster for the module; the searches in this process join it, subprocesses by address."""
    import ray

    context = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield context.address_info["address"]
    ray.shutdown()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("dense") / "tiny-llama")


def _search_args(model_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["search", "--model", str(model_dir), "--target", "0.3", "--criterion", "flap", "--device", "cpu",
            "--calib-samples", "4", "--calib-seq-len", "32", "--fitness-windows", "2", "--seq-len", "32",
            "--batch-size", "2", "--operator", "evolution", "--budget", str(BUDGET), "--population", "4",
            "--offspring", "4", "--seed", "3", "--no-progress", "--no-save-model", "--out", str(out), *extra]


def _run(argv: list[str]) -> int:
    from selfprune.cli import main

    return main(argv)


def _journal(run: Path) -> list[dict]:
    """The journal in index order, without timings (records arrive in any order with several workers)."""
    records = sorted(read_jsonl(run / "journal.jsonl"), key=lambda r: r["index"])
    return [{k: r[k] for k in KEPT} for r in records]


def _best(run: Path) -> tuple:
    summary = json.loads((run / "summary.json").read_text())
    return summary["best_index"], summary["best_fitness"], summary["best_rates"], summary["evaluations"]


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory) -> Path:
    """The search in this process (``--workers 1``, no Ray)."""
    run = tmp_path_factory.mktemp("reference") / "run"
    assert _run(_search_args(model_dir, run)) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["evaluation"]["mode"] == "in-process" and summary["evaluations"] == BUDGET
    assert all(math.isfinite(r["fitness"]) for r in _journal(run))
    return run


def test_two_workers_give_the_in_process_run(reference, model_dir, ray_address, tmp_path):
    run = tmp_path / "run"
    assert _run(_search_args(model_dir, run, "--workers", "2")) == 0
    assert _journal(run) == _journal(reference)
    assert _best(run) == _best(reference)
    evaluation = json.loads((run / "summary.json").read_text())["evaluation"]
    assert evaluation["mode"] == "ray" and evaluation["workers"] == 2 and evaluation["worker_threads"] == 1
    assert evaluation["retries"] == 0 and evaluation["failed"] == 0 and evaluation["candidates"] == "sliced"
    peaks = evaluation["peak_rss_mb"]
    assert peaks["driver"] > 0 and len(peaks["workers"]) == 2 and all(p > 0 for p in peaks["workers"])
    assert json.loads((run / "config.json").read_text())["workers"] == 2


@pytest.fixture(scope="module")
def faulted_run(reference, model_dir, ray_address, tmp_path_factory) -> Path:
    """Two workers; the one scoring candidate 5 is SIGKILLed mid-evaluation (once), candidate 7 always raises."""
    folder = tmp_path_factory.mktemp("faulted")
    marker, run = folder / "killed-at-5", folder / "run"
    os.environ["SELFPRUNE_WORKER_FAULT"] = f"kill:5:{marker},fail:7"
    try:
        assert _run(_search_args(model_dir, run, "--workers", "2")) == 0
    finally:
        del os.environ["SELFPRUNE_WORKER_FAULT"]
    assert marker.is_file()  # the kill happened
    return run


def test_an_actor_killed_mid_evaluation_loses_nothing(faulted_run, reference):
    records = read_jsonl(faulted_run / "journal.jsonl")
    assert sorted(r["index"] for r in records) == list(range(BUDGET))  # every evaluation, exactly once
    killed = next(r for r in records if r["index"] == 5)
    assert killed["retries"] == 1 and "failed" not in killed
    # the re-run scored what the in-process run scored, and so did everything before the failing candidate
    assert _journal(faulted_run)[:7] == _journal(reference)[:7]
    evaluation = json.loads((faulted_run / "summary.json").read_text())["evaluation"]
    assert evaluation["retries"] == 2  # candidate 5 once, candidate 7 once (then it failed)


def test_a_candidate_failing_twice_is_journaled_failed_and_the_search_goes_on(faulted_run):
    records = {r["index"]: r for r in read_jsonl(faulted_run / "journal.jsonl")}
    failed = records[7]
    assert failed["fitness"] == math.inf and failed["retries"] == 1
    assert "2 tries failed" in failed["failed"] and "test fault" in failed["failed"]
    assert [i for i, r in records.items() if r.get("failed")] == [7]
    summary = json.loads((faulted_run / "summary.json").read_text())
    assert summary["evaluations"] == BUDGET and summary["evaluation"]["failed"] == 1
    assert summary["best_index"] != 7 and math.isfinite(summary["best_fitness"])


def test_a_killed_driver_resumes_with_another_worker_count_to_the_uninterrupted_run(reference, model_dir,
                                                                                    ray_address, tmp_path):
    run, marker = tmp_path / "run", tmp_path / "hanging-at-6"
    env = {**os.environ, "PYTHONPATH": str(REPO), "SELFPRUNE_WORKER_FAULT": f"hang:6:{marker}"}
    proc = subprocess.Popen([sys.executable, "-m", "selfprune", *_search_args(
        model_dir, run, "--workers", "2", "--ray-address", ray_address)], env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        # candidate 6 hangs in one worker; the other worker finishes 7: the journal has a gap at 6
        while not (marker.exists() and 7 in {r["index"] for r in read_jsonl(run / "journal.jsonl")}):
            if proc.poll() is not None:
                pytest.fail(f"the search exited {proc.returncode} early: {proc.stderr.read()[-3000:]}")
            assert time.time() < deadline, "the search never reached candidate 7"
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    indices = {r["index"] for r in read_jsonl(run / "journal.jsonl")}
    assert 6 not in indices and 7 in indices and len(indices) < BUDGET

    # resumed in this process (no Ray): fills the gap, continues, and ends where the uninterrupted run did
    assert _run(["search", "--resume", str(run), "--workers", "1", "--ray-address", "none", "--no-progress",
                 "--no-save-model"]) == 0
    assert _journal(run) == _journal(reference)
    assert len(read_jsonl(run / "journal.jsonl")) == BUDGET  # nothing evaluated twice
    assert _best(run) == _best(reference)
    config = json.loads((run / "config.json").read_text())
    assert config["workers"] == 1 and config["ray_address"] is None
    assert json.loads((run / "summary.json").read_text())["evaluation"]["mode"] == "in-process"


def test_workers_without_ray_is_one_line_and_exit_2(model_dir, tmp_path):
    shim = tmp_path / "shim" / "ray"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('No module named ray (test shim)')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shim.parent), str(REPO)])}
    for extra, said in ((["--workers", "2"], "--workers 2 needs Ray: pip install 'selfprune[ray]'"),
                        (["--ray-address", "auto"], "--ray-address auto needs Ray: pip install 'selfprune[ray]'")):
        out = tmp_path / "out"
        done = subprocess.run([sys.executable, "-m", "selfprune", *_search_args(model_dir, out, *extra)], env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stderr[-2000:]
        assert said in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert not out.exists()
    # one worker never imports Ray: the search runs in this process
    out = tmp_path / "in-process"
    argv = _search_args(model_dir, out, "--workers", "1")
    argv[argv.index("--budget") + 1], argv[argv.index("--operator") + 1] = "1", "uniform"
    done = subprocess.run([sys.executable, "-m", "selfprune", *argv], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((out / "summary.json").read_text())["evaluation"]["mode"] == "in-process"
