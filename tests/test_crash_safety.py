"""Crash safety end to end: torn journals resume to the uninterrupted result, a SIGKILL during a save or a
run-folder replace never loses the old output, damaged weights are one clear error, and the pruned format
keeps config.json small while both loaders still work."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import byte_tokenizer, save_tiny_model, tiny_model
from selfprune.errors import SelfpruneError
from selfprune.io import read_jsonl
from selfprune.search import EvolutionOperator, Proposal, RunSettings, SearchProblem, SearchRunner, SearchSpace

REPO = Path(__file__).resolve().parents[1]
TIMING = ("seconds", "elapsed", "forward_seconds")
SUMMARY_TIMING = ("wall_seconds", "eval_seconds", "seconds_per_eval")


# -- torn JSONL tails ------------------------------------------------------------------------------------
def _search(run_dir: Path, budget: int) -> dict:
    """A cheap deterministic search: fitness is a weighted quadratic of the rates."""
    space = SearchSpace([100, 120, 140], 0.3)
    optimum = np.array(space.repair([0.1, 0.5, 0.3]).rates)
    problem = SearchProblem(space.layer_params,
                            lambda r: {"fitness": float(np.sum(space.weights * (np.asarray(r) - optimum) ** 2))})
    runner = SearchRunner(run_dir, space, problem, EvolutionOperator(space, 1, 2),
                          RunSettings(budget=budget, population=3, seed=5),
                          seeds=[Proposal(space.uniform(), "seed:uniform")], progress=False, log=lambda _: None)
    return runner.run()


def _journal(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_jsonl(run_dir / "journal.jsonl")]


def _summary(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    return {k: v for k, v in summary.items() if k not in SUMMARY_TIMING}


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


@pytest.fixture()
def fast_dir(tmp_path):
    """A folder on tmpfs where there is one: the replay is the same, fsync costs nothing."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="selfprune-test-", dir=shm))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_a_torn_last_record_at_every_byte_resumes_to_the_uninterrupted_run(fast_dir):
    tmp_path = fast_dir
    full, partial = 7, 4
    _search(tmp_path / "straight", full)
    expected_journal, expected_summary = _journal(tmp_path / "straight"), _summary(tmp_path / "straight")
    assert len(expected_journal) == full

    _search(tmp_path / "partial", partial)
    journal = _lines(tmp_path / "partial" / "journal.jsonl")
    proposals = _lines(tmp_path / "partial" / "proposals.jsonl")
    last_iteration = json.loads(proposals[-1])["iteration"]
    assert len(journal) == partial and last_iteration > 0

    # Crash states a kill can leave: (a) mid-write of the last journal record; (b) mid-write of the last
    # proposals record, which is written (fsynced) before any evaluation of its iteration.
    before_batch = [line for line in journal if json.loads(line)["iteration"] < last_iteration]
    cases = []
    for cut in range(len(journal[-1])):
        cases.append(("journal.jsonl", b"".join(journal[:-1]) + journal[-1][:cut], b"".join(proposals)))
    for cut in range(len(proposals[-1])):
        cases.append(("proposals.jsonl", b"".join(before_batch), b"".join(proposals[:-1]) + proposals[-1][:cut]))
    assert len(cases) > 500

    for torn_name, journal_bytes, proposals_bytes in cases:
        run = tmp_path / "case"
        shutil.rmtree(run, ignore_errors=True)
        run.mkdir()
        (run / "journal.jsonl").write_bytes(journal_bytes)
        (run / "proposals.jsonl").write_bytes(proposals_bytes)
        torn = (journal_bytes if torn_name == "journal.jsonl" else proposals_bytes).rsplit(b"\n", 1)[-1]
        summary = _search(run, full)
        assert _journal(run) == expected_journal, (torn_name, len(torn))
        assert _summary(run) == expected_summary == {k: v for k, v in summary.items() if k not in SUMMARY_TIMING}
        side = run / f"{torn_name}.torn"
        if torn and not torn.endswith(b"}"):  # a fragment that is not a whole record is kept aside
            assert side.read_bytes() == torn + b"\n"
        for name in ("journal.jsonl", "proposals.jsonl"):
            assert (run / name).read_bytes().endswith(b"\n")


# -- SIGKILL during a save or a run-folder replace -------------------------------------------------------
def _cli(*args: str, fault: str | None = None, marker: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    env.pop("SELFPRUNE_FAULT", None)
    if fault:
        env["SELFPRUNE_FAULT"] = f"{fault}:{marker}"
    return subprocess.Popen([sys.executable, "-m", "selfprune", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _kill_at(fault: str, tmp_path: Path, *args: str) -> None:
    """Run the CLI until it reaches ``fault`` inside atomic_directory, then SIGKILL it."""
    marker = tmp_path / f"reached-{fault}"
    marker.unlink(missing_ok=True)
    proc = _cli(*args, fault=fault, marker=marker)
    deadline = time.time() + 300
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"exited {proc.returncode} before reaching {fault}: {proc.stderr.read()[-2000:]}")
        assert time.time() < deadline, f"never reached {fault}"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def _finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return out


def _stale(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("dense") / "tiny-llama")


def _widths(folder: Path) -> list[int]:
    config = json.loads((folder / "config.json").read_text())
    return [layer["intermediate_size"] for layer in config["selfprune"]["layers"]]


def test_kill_9_during_prune_overwrite_never_loses_the_model(tmp_path, dense_dir):
    import selfprune

    out = tmp_path / "pruned"
    model, tokenizer = selfprune.load(dense_dir)
    pruned, _ = selfprune.prune(model, 0.2, criterion="magnitude", progress=False)
    selfprune.save_pruned(pruned, tokenizer, out)
    old = _widths(out)
    prune = ("prune", "--model", str(dense_dir), "--criterion", "magnitude", "--ppl-dataset", "none",
             "--out", str(out), "--overwrite")
    # killed while the new folder is written, and between "old renamed aside" and "new renamed in"
    for fault in ("writing", "swapping"):
        _kill_at(fault, tmp_path, *prune, "--rate", "0.5")
        model, _ = selfprune.load(out)  # the old model, whole
        assert [layer.mlp.down_proj.in_features for layer in model.model.layers] == old == _widths(out)
    # the next run succeeds and leaves nothing stale behind
    _finish(_cli(*prune, "--rate", "0.5"))
    model, _ = selfprune.load(out)
    assert _widths(out) != old and [layer.mlp.down_proj.in_features for layer in model.model.layers] == _widths(out)
    assert _stale(tmp_path) == []


def test_kill_9_during_search_overwrite_keeps_the_old_run(tmp_path, dense_dir):
    from selfprune.io import restore_interrupted

    out = tmp_path / "run"
    search = ("search", "--model", str(dense_dir), "--operator", "uniform", "--target", "0.2", "--budget", "1",
              "--criterion", "magnitude", "--calib-samples", "2", "--calib-seq-len", "16", "--fitness-windows",
              "1", "--seq-len", "16", "--no-progress", "--no-save-model", "--out", str(out), "--overwrite")
    _finish(_cli(*search))
    journal = (out / "journal.jsonl").read_bytes()
    _kill_at("swapping", tmp_path, *search)  # old run renamed aside, new one not yet in
    assert not out.exists()
    assert restore_interrupted(out)  # what load calls on a missing folder
    assert (out / "journal.jsonl").read_bytes() == journal
    _finish(_cli(*search))
    assert len(read_jsonl(out / "journal.jsonl")) == 1 and _stale(tmp_path) == []


# -- damaged or missing weights ---------------------------------------------------------------------------
@pytest.fixture()
def pruned_copy(tmp_path, dense_dir) -> Path:
    from selfprune.pruned_format import save_pruned
    from selfprune.pruning import Pruner

    model = tiny_model("llama-gqa", vocab_size=257)
    pruned, _ = Pruner(model, None, "magnitude", progress=False).build([0.2, 0.4, 0.1, 0.3])
    return save_pruned(pruned, byte_tokenizer(), tmp_path / "pruned")


@pytest.mark.parametrize("which", ["dense", "pruned"])
@pytest.mark.parametrize("damage", ["truncated", "bad-header", "missing"])
def test_damaged_or_missing_weights_are_one_clear_error(tmp_path, dense_dir, pruned_copy, which, damage):
    import selfprune

    folder = pruned_copy if which == "pruned" else Path(shutil.copytree(dense_dir, tmp_path / "dense"))
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    if damage == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "bad-header":
        weights.write_bytes(data[:8] + b"\x00garbage" + data[16:])
    else:
        weights.unlink()
    with pytest.raises(SelfpruneError) as err:
        selfprune.load(folder)
    message = str(err.value)
    assert "\n" not in message and "model.safetensors" in message and str(folder) in message
    assert ("missing" if damage == "missing" else "damaged") in message or "no weights file" in message


# -- the pruned format ----------------------------------------------------------------------------------
def test_config_keeps_shapes_only_and_indices_go_to_a_side_file(tmp_path):
    import selfprune
    from selfprune.pruned_format import INDICES_FILE, REPORT_FILE, save_pruned
    from selfprune.pruning import Pruner

    model = tiny_model("qwen2", vocab_size=257)
    pruned, report = Pruner(model, None, "magnitude", structure="proportional", progress=False).build(
        [0.1, 0.6, 0.3, 0.7])
    out = save_pruned(pruned, byte_tokenizer(), tmp_path / "p")  # no metadata: the Python API's own call
    config = json.loads((out / "config.json").read_text())
    assert set(config["selfprune"]["layers"][0]) == {"num_attention_heads", "num_key_value_heads",
                                                     "intermediate_size", "o_proj_bias", "down_proj_bias"}
    assert "kept" not in (out / "config.json").read_text()
    indices = json.loads((out / INDICES_FILE).read_text())["layers"]
    assert [l["kept_channels"] for l in indices] == [l.kept_channels for l in report.layers]
    assert [l["kept_query_heads"] for l in indices] == [l.kept_query_heads for l in report.layers]
    saved_report = json.loads((out / REPORT_FILE).read_text())["report"]
    assert saved_report["achieved_rate"] == pytest.approx(report.achieved_rate)
    assert [l["kept_kv_heads"] for l in saved_report["layers"]] == [l.kept_kv_heads for l in report.layers]

    umask = os.umask(0o022)
    os.umask(umask)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {
        p.name: oct(0o666 & ~umask) for p in out.iterdir()}  # readable by others where the umask says so

    reloaded, _ = selfprune.load(out)
    assert [l["kept_channels"] for l in reloaded.config.selfprune["layers"]] == [l.kept_channels for l in report.layers]
    ids = torch.randint(0, 257, (1, 10))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, pruned(ids).logits)


def test_folders_with_indices_inside_config_still_load(tmp_path):
    import selfprune
    from selfprune.pruned_format import INDICES_FILE, save_pruned
    from selfprune.pruning import Pruner

    pruned, report = Pruner(tiny_model("llama-mha", vocab_size=257), None, "magnitude",
                            structure="proportional", progress=False).build([0.3, 0.5, 0.0, 0.6])
    out = save_pruned(pruned, byte_tokenizer(), tmp_path / "old-format")
    # rewrite the folder as format 1 wrote it: kept indices inside config.json, no side file
    config = json.loads((out / "config.json").read_text())
    indices = json.loads((out / INDICES_FILE).read_text())["layers"]
    config["selfprune"]["layers"] = [s | i for s, i in zip(config["selfprune"]["layers"], indices)]
    config["selfprune"]["format_version"] = 1
    del config["selfprune"]["indices_file"]
    (out / "config.json").write_text(json.dumps(config))
    (out / INDICES_FILE).unlink()
    reloaded, _ = selfprune.load(out)
    assert [l["kept_query_heads"] for l in reloaded.config.selfprune["layers"]] == [
        l.kept_query_heads for l in report.layers]
    ids = torch.randint(0, 257, (2, 8))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, pruned(ids).logits)


def test_reload_hint_recommends_the_bundled_code_and_warns_about_remote_code():
    from selfprune.pruned_format import reload_hint

    hint = reload_hint("out/m")
    assert "selfprune.load('out/m')" in hint and "trust_remote_code=True" in hint
    assert "modeling_selfprune.py" in hint and "trust" in hint.split("trust_remote_code=True")[1]


# -- one process per run folder ----------------------------------------------------------------------------
def test_a_run_folder_in_use_is_refused_naming_the_holder(tmp_path, dense_dir, capsys):
    """Two `search --resume` of one run, or an `--overwrite` of a run still going, used to both proceed and
    duplicate or delete evaluations; the second process now gets one line naming the first."""
    from selfprune.cli import main

    out = tmp_path / "run"
    search = ("search", "--model", str(dense_dir), "--operator", "random", "--target", "0.3", "--budget", "1",
              "--criterion", "magnitude", "--calib-samples", "2", "--calib-seq-len", "16", "--fitness-windows",
              "2", "--seq-len", "16", "--population", "2", "--offspring", "2", "--no-progress", "--no-save-model",
              "--out", str(out))
    _finish(_cli(*search))
    running = _cli("search", "--resume", str(out), "--budget", "100000", "--no-progress")
    try:
        deadline = time.time() + 300
        while len(read_jsonl(out / "journal.jsonl")) < 3:  # the resumed run is evaluating
            assert running.poll() is None, running.stderr.read()[-2000:]
            assert time.time() < deadline
            time.sleep(0.1)
        for argv in (["search", "--resume", str(out)], [*search, "--overwrite"]):
            assert main(argv) == 2
            err = capsys.readouterr().err.strip()
            assert f"is in use by pid {running.pid}" in err and "search --resume" in err and "\n" not in err
    finally:
        running.kill()
        running.wait(timeout=30)
    evaluations = [r["index"] for r in read_jsonl(out / "journal.jsonl")]
    assert evaluations == list(range(len(evaluations)))  # each evaluation once, none from the refused runs
