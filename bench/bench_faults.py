"""Issue 33 benchmark: the fault-injection tables of the test suite, run once more to count them.

Every case is run through the command line in this process and held to the invariant of its class: a damaged
input ends with exit code 2, one line naming the file (or the key) and nothing written; an output is replaced with
--overwrite, a killed writer's leftovers are removed by the next run, and a second writer of the same file is
refused while the first one's file stays as it was. The tables are the tests' own (tests/test_damaged_models.py,
tests/test_run_config_faults.py, tests/test_outputs.py), so the counts are of what CI checks.

    python bench/bench_faults.py      # -> results/faults.json, results/faults.md
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import DATA_DIR, REPO, RESULTS, versions

sys.path.insert(0, str(REPO / "tests"))

from conftest import save_tiny_model  # noqa: E402
from test_damaged_models import CONFIG_DAMAGE, TRUNCATED_FILES, _commands, truncation_offsets  # noqa: E402
from test_outputs import NAMES  # noqa: E402
from test_outputs import _commands as output_commands  # noqa: E402
from test_run_config_faults import MUTATIONS, _set  # noqa: E402

from selfprune.cli import main  # noqa: E402
from selfprune.io import atomic_write_json, atomic_write_text, run_lock  # noqa: E402


def run_cli(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
    return code, err.getvalue().strip()


def refused_cleanly(argv: list[str], needles: list[str], out_dir: Path) -> bool:
    code, err = run_cli(argv)
    return (code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
            and all(n in err for n in needles) and not any(out_dir.iterdir()))


class Tally:
    def __init__(self):
        self.classes: dict[str, dict] = {}

    def add(self, name: str, clean: bool, case: str) -> None:
        entry = self.classes.setdefault(name, {"cases": 0, "clean": 0, "not_clean": []})
        entry["cases"] += 1
        entry["clean"] += int(clean)
        if not clean:
            entry["not_clean"].append(case)


def damaged_models(root: Path, tally: Tally) -> None:
    base = save_tiny_model(root / "base")
    config = json.loads((base / "config.json").read_text())
    assert main(["export", "--model", str(base), "--outtype", "f16", "--out", str(root / "good.gguf")]) == 0
    out = root / "out"
    out.mkdir()
    for name, change in CONFIG_DAMAGE.items():
        folder = root / name.replace(" ", "-")
        shutil.copytree(base, folder)
        (folder / "config.json").write_text(json.dumps({k: v for k, v in (config | change).items() if v is not None}))
        for command, argv in _commands(str(folder), base, str(out / "o"), DATA_DIR).items():
            tally.add("model config: wrong type, out of range, inconsistent, missing", refused_cleanly(
                argv, ["config.json", next(iter(change))], out), f"{name} / {command}")
    for name in TRUNCATED_FILES:
        source = root / "good.gguf" if name.endswith(".gguf") else base / name
        data = source.read_bytes()
        for offset in truncation_offsets(data, name.endswith(".json")):
            case = Path(tempfile.mkdtemp(dir=root))
            model = case / name if name.endswith(".gguf") else case / "model"
            if not name.endswith(".gguf"):
                shutil.copytree(base, model)
            (model if name.endswith(".gguf") else model / name).write_bytes(data[:offset])
            for command, argv in _commands(str(model), base, str(out / "o"), DATA_DIR).items():
                tally.add("model files cut short", refused_cleanly(argv, [name], out),
                          f"{name} at {offset} / {command}")
    (root / "random.gguf").write_bytes(os.urandom(8192))
    for command, argv in _commands(str(root / "random.gguf"), base, str(out / "o"), DATA_DIR).items():
        tally.add("model files of random bytes", refused_cleanly(argv, ["random.gguf"], out), command)


def run_configs(root: Path, tally: Tally) -> None:
    model = save_tiny_model(root / "tiny")
    run = root / "run"
    code, err = run_cli(["search", "--model", str(model), "--target", "0.2", "--operator", "uniform",
                         "--fitness-windows", "1", "--seq-len", "16", "--calib-samples", "2", "--calib-seq-len", "16",
                         "--data-dir", DATA_DIR, "--no-progress", "--no-save-model", "--out", str(run)])
    assert code == 0, err
    original = (run / "config.json").read_bytes()
    config = json.loads(original)
    others = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != "config.json"}
    for key, values in MUTATIONS.items():
        for value in values:
            edited = copy.deepcopy(config)
            _set(edited, key, value)
            (run / "config.json").write_text(json.dumps(edited))
            code, err = run_cli(["search", "--resume", str(run), "--no-progress"])
            unchanged = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != "config.json"}
            clean = (code == 2 and len(err.splitlines()) == 1 and "config.json" in err
                     and key.split(".")[-1] in err and unchanged == others)
            tally.add("run config edited before --resume", clean, f"{key} = {value!r}")
    (run / "config.json").write_bytes(original)


def outputs(root: Path, tally: Tally) -> None:
    model = save_tiny_model(root / "tiny-out")
    for command, name in NAMES.items():
        folder = root / f"out-{command}"
        folder.mkdir()
        out = folder / name
        argv = output_commands(model, Path(DATA_DIR))[command] + [str(out)]
        first = run_cli(argv)[0] == 0 and out.is_file()
        code, err = run_cli(argv)
        tally.add("outputs: refused without --overwrite", first and code == 2 and "already exists" in err, command)
        stale = folder / f".{name}.999.partial"
        stale.write_bytes(b"x" * 100)
        os.utime(out, (1, 1))
        replaced = run_cli(argv + ["--overwrite"])[0] == 0 and out.stat().st_mtime > 1 and not stale.exists()
        tally.add("outputs: --overwrite replaces, a killed writer's files removed", replaced, command)
        os.utime(out, (1, 1))
        with run_lock(out, command="bench_faults"):
            done = subprocess.run([sys.executable, "-m", "selfprune", *argv, "--overwrite"], capture_output=True,
                                  text=True, timeout=300, env=os.environ | {"PYTHONPATH": str(REPO)})
        lines = done.stderr.strip().splitlines()
        tally.add("outputs: a second writer at the same time refused", done.returncode == 2 and len(lines) == 1
                  and "in use by" in lines[0] and out.stat().st_mtime == 1, command)


def render(data: dict) -> str:
    lines = ["# Fault injection: damaged inputs and contended outputs", "",
             "Generated by `bench/bench_faults.py` from `faults.json`: the test suite's fault tables "
             "(tests/test_damaged_models.py, tests/test_run_config_faults.py, tests/test_outputs.py) run through "
             "the command line. Clean: exit code 2 with one line naming the file or key and nothing written (damaged "
             "input), or the output's own invariant.", "",
             "| class | cases | clean |", "|---|---|---|"]
    for name, entry in data["classes"].items():
        lines.append(f"| {name} | {entry['cases']} | {entry['clean']} |")
    total = sum(e["cases"] for e in data["classes"].values())
    clean = sum(e["clean"] for e in data["classes"].values())
    lines += ["", f"{total} cases in {len(data['classes'])} classes, {clean} clean."]
    return "\n".join(lines)


def main_() -> None:
    tally = Tally()
    root = Path(tempfile.mkdtemp(prefix="selfprune-faults-"))
    try:
        damaged_models(root, tally)
        run_configs(root, tally)
        outputs(root, tally)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    data = {"classes": tally.classes, "versions": versions()}
    atomic_write_json(RESULTS / "faults.json", data)
    atomic_write_text(RESULTS / "faults.md", render(data) + "\n")
    print(render(data))


if __name__ == "__main__":
    main_()
