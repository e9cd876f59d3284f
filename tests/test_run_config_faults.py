"""A saved run's config.json edited or damaged before --resume: every key, through wrong types and out-of-range
values, is refused with one line naming the file and the key (exit code 2), and the run folder is left as it was.
The same rules refuse the same values on the command line and in the Python API (one validator)."""
from __future__ import annotations

import copy
import json
import math

import pytest

from conftest import save_tiny_model
from selfprune.cli import main
from selfprune.errors import SelfpruneError
from selfprune.search.config_rules import validate_run_config

#: per key path: values that must be refused (wrong type, out of range, impossible)
MUTATIONS = {
    "target": ["0.2", None, -0.1, 0, 1, 1.5, math.nan, True, [0.2]],
    "bounds": [None, "0,0.8", [0.5], [0.8, 0.1], [0.0, 1.0], [-0.1, 0.8], ["a", 0.8]],
    "budget": [0, -1, 2.5, "10", None, True],
    "population": [0, "30", 1.5, None],
    "crossovers": [-1, "10", 0.5],
    "mutations": [-1, None],
    "seed": ["0", 1.5, None],
    "criterion": ["flapp", 3, None],
    "operator": ["genetic", None],
    "dtype": ["float64", None],
    "structure": ["mlp_last", 1],
    "gqa_policy": ["heads", None],
    "seed_population": ["uniform", ["uniform", "best"], None],
    "owl.lambdas": [[], [1.5], "0.08", [math.nan]],
    "owl.m": [0, -1, "5"],
    "evolution.step": [0, 1.2, "0.02"],
    "evolution.tournament": [0, 2.5],
    "fitness.windows": [0, -3, "6", 1.5, None],
    "fitness.seq_len": [0, "128"],
    "fitness.batch_size": [0, None],
    "fitness.kind": ["loss", None],
    "calibration.num_samples": [0, -1, "64", 2.5, None],
    "calibration.seq_len": [0, "128"],
    "calibration.seed": ["0", 0.5],
    "calibration.source": ["", 3, None],
    "reconstruction.method": ["svd", None],
    "reconstruction.ridge": [-1, "1e-5", math.inf],
    "workers": [0, "2"],
    "candidates": ["copied"],
    "rescore.top": [-1, "5"],
    "rescore.windows": [0],
    "recover.tokens": [-5, "1000"],
}


def _set(config: dict, path: str, value) -> None:
    *parents, last = path.split(".")
    for key in parents:
        config = config[key]
    config[last] = value


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("runcfg")
    model = save_tiny_model(root / "tiny")
    run_dir = root / "run"
    code = main(["search", "--model", str(model), "--target", "0.2", "--operator", "uniform", "--fitness-windows", "1",
                 "--seq-len", "16", "--calib-samples", "2", "--calib-seq-len", "16", "--data-dir", str(data_dir),
                 "--no-progress", "--no-save-model", "--out", str(run_dir)])
    assert code == 0
    return run_dir


def test_the_saved_config_obeys_the_rules(run):
    validate_run_config(json.loads((run / "config.json").read_text()), "config.json")


@pytest.mark.parametrize("key", list(MUTATIONS))
def test_each_key_wrong_on_resume_is_one_line_and_nothing_changes(key, run, capsys):
    original = (run / "config.json").read_bytes()
    config = json.loads(original)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    try:
        for value in MUTATIONS[key]:
            edited = copy.deepcopy(config)
            _set(edited, key, value)
            (run / "config.json").write_text(json.dumps(edited))
            capsys.readouterr()
            code = main(["search", "--resume", str(run), "--no-progress"])
            err = capsys.readouterr().err.strip()
            assert code == 2, (key, value, err)
            assert len(err.splitlines()) == 1 and "Traceback" not in err, (key, value, err)
            assert "config.json" in err and key.split(".")[-1] in err, (key, value, err)
            now = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != "config.json"}
            assert now == {k: v for k, v in before.items() if k != "config.json"}, (key, value)
    finally:
        (run / "config.json").write_bytes(original)


def test_the_api_refuses_what_the_cli_refuses(run):
    from selfprune.search.launch import start

    config = json.loads((run / "config.json").read_text())
    config["fitness"]["windows"] = 0
    with pytest.raises(SelfpruneError, match="fitness.windows is 0"):
        start(config, run.parent / "api-run", overwrite=False)
    assert not (run.parent / "api-run").exists()
    with pytest.raises(SystemExit) as exited:   # argparse: the same rule, at the option
        main(["search", "--model", config["model"], "--target", "0.2", "--operator", "uniform",
              "--fitness-windows", "0", "--out", str(run.parent / "cli-run")])
    assert exited.value.code == 2 and not (run.parent / "cli-run").exists()


def test_a_torn_journal_is_counted_alike_by_report_and_resume(tmp_path, data_dir):
    """A journal torn inside its last record: the report counts the finished evaluations before it, the resume
    keeps exactly those (their records unchanged) and evaluates the rest of the budget."""
    model = save_tiny_model(tmp_path / "tiny")
    run = tmp_path / "run"
    common = ["--fitness-windows", "1", "--seq-len", "16", "--calib-samples", "2", "--calib-seq-len", "16",
              "--data-dir", str(data_dir), "--no-progress", "--no-save-model"]
    assert main(["search", "--model", str(model), "--target", "0.3", "--operator", "random", "--budget", "4",
                 "--out", str(run), *common]) == 0
    lines = (run / "journal.jsonl").read_bytes().splitlines(keepends=True)
    assert len(lines) == 4
    (run / "journal.jsonl").write_bytes(b"".join(lines[:3]) + lines[3][: len(lines[3]) // 2])
    (run / "summary.json").unlink()   # the run was killed before it finished
    assert main(["report", str(run), "--out", str(tmp_path / "report")]) == 0
    assert "3 of budget 4" in (tmp_path / "report" / "report.md").read_text()
    assert main(["search", "--resume", str(run), "--no-progress", "--no-save-model"]) == 0
    resumed = (run / "journal.jsonl").read_bytes().splitlines(keepends=True)
    assert resumed[:3] == lines[:3] and len(resumed) == 4
    assert json.loads((run / "summary.json").read_text())["evaluations"] == 4
