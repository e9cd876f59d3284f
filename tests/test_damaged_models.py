"""Damaged models, wherever a model is read: every command answers with one line naming the file and what is
wrong, exit code 2, and writes nothing. The damage is enumerated by class (config values of the wrong type, out
of range, inconsistent or missing; files cut short or of random bytes) and every command meets every class."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from conftest import save_tiny_model
from selfprune.cli import main

CONFIG_DAMAGE = {
    "count as text": {"num_attention_heads": "four"},
    "count as list": {"vocab_size": [257]},
    "negative count": {"num_hidden_layers": -1},
    "zero heads": {"num_attention_heads": 0},
    "fractional count": {"intermediate_size": 12.5},
    "boolean count": {"hidden_size": True},
    "kv heads not dividing": {"num_key_value_heads": 4},
    "missing key": {"hidden_size": None},
    "eps not a number": {"rms_norm_eps": "small"},
}


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    root = tmp_path_factory.mktemp("damaged")
    base = save_tiny_model(root / "base")
    config = json.loads((base / "config.json").read_text())
    cases = {}
    for name, change in CONFIG_DAMAGE.items():
        folder = root / name.replace(" ", "-")
        shutil.copytree(base, folder)
        edited = {k: v for k, v in (config | change).items() if v is not None}
        (folder / "config.json").write_text(json.dumps(edited))
        key = next(iter(change))
        cases[name] = (folder, ["config.json", key])
    folder = root / "not-json"
    shutil.copytree(base, folder)
    (folder / "config.json").write_text('{"model_type": "llama",')
    cases["config not JSON"] = (folder, ["config.json", "not valid JSON"])
    folder = root / "cut-weights"
    shutil.copytree(base, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    cases["weights cut short"] = (folder, ["model.safetensors", "truncated"])
    assert main(["export", "--model", str(base), "--outtype", "f16", "--out", str(root / "good.gguf")]) == 0
    data = (root / "good.gguf").read_bytes()
    (root / "cut.gguf").write_bytes(data[: len(data) // 2])
    cases["GGUF cut short"] = (root / "cut.gguf", ["cut.gguf", "cut short"])
    (root / "random.gguf").write_bytes(os.urandom(8192))
    cases["GGUF of random bytes"] = (root / "random.gguf", ["random.gguf", "not a GGUF file"])
    (root / "magic-only.gguf").write_bytes(b"GGUF" + os.urandom(8188))
    cases["GGUF with a random header"] = (root / "magic-only.gguf", ["magic-only.gguf", "damaged"])
    return base, cases


def _commands(model, base, out, data_dir):
    data = ["--data-dir", str(data_dir)]
    commands = {
        "prune": ["prune", "--model", model, "--rate", "0.2", "--max-windows", "1", "--out", out, *data],
        "search": ["search", "--model", model, "--target", "0.2", "--operator", "uniform", "--out", out, *data],
        "export": ["export", "--model", model, "--out", out + ".gguf"],
        "ppl": ["ppl", "--model", model, "--max-windows", "1", "--out", out + ".json", *data],
        "eval": ["eval", "--model", model, "--tasks", "piqa", "--limit", "2", "--out", out + ".json", *data],
        "speed": ["speed", "--model", model, "--baseline", str(base), "--out", out + ".json"],
        "recover": ["recover", "--model", model, "--tokens", "512", "--out", out, *data],
    }
    if model.endswith(".gguf"):
        commands["ppl llama.cpp"] = ["ppl", "--engine", "llama.cpp", "--model", model, "--max-windows", "1",
                                     "--out", out + ".json", *data]
        commands["speed llama.cpp"] = ["speed", "--engine", "llama.cpp", "--model", model, "--baseline", model,
                                       "--out", out + ".json"]
    return commands


def _expect_clean(argv, tmp_path, capsys, needles, every: bool = False) -> None:
    """Exit code 2, one line without a traceback naming ``needles`` (all of them, or any one), nothing written."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, (argv[0], code, err[-600:])
    assert (all if every else any)(n in err for n in needles), (argv[0], needles, err)
    assert not list(tmp_path.iterdir()), (argv[0], list(tmp_path.iterdir()))


@pytest.mark.parametrize("case", list(CONFIG_DAMAGE) + ["config not JSON", "weights cut short", "GGUF cut short",
                                                         "GGUF of random bytes", "GGUF with a random header"])
def test_every_command_names_the_damage(case, damaged, data_dir, tmp_path, capsys):
    base, cases = damaged
    model, expected = cases[case]
    for argv in _commands(str(model), base, str(tmp_path / "out"), data_dir).values():
        _expect_clean(argv, tmp_path, capsys, expected, every=True)


TRUNCATED_FILES = ("config.json", "model.safetensors", "good.gguf")


def truncation_offsets(data: bytes, is_json: bool) -> list[int]:
    """Cuts at the start, inside the header and inside the data (64 bytes short of the end: a GGUF's last
    tensor may end in alignment padding, whose loss damages nothing); for JSON only cuts that do not parse."""
    size = len(data)
    offsets = sorted({0, 1, 4, 8, 24, 100, size // 4, size // 2, size - 64} & set(range(size)))
    if is_json:
        def parses(offset):
            try:
                json.loads(data[:offset])
                return True
            except ValueError:
                return False
        offsets = [o for o in offsets if not parses(o)]
    return offsets


@pytest.mark.parametrize("name", TRUNCATED_FILES)
def test_every_file_cut_at_several_offsets(name, damaged, data_dir, tmp_path_factory, capsys):
    """Each file a model is read from, cut at the start, inside its header and inside its data: one line
    naming the file, for every command that reads it."""
    base, _ = damaged
    source = base.parent / "good.gguf" if name.endswith(".gguf") else base / name
    data = source.read_bytes()
    for offset in truncation_offsets(data, name.endswith(".json")):
        case = tmp_path_factory.mktemp(f"cut-{name}-{offset}")
        if name.endswith(".gguf"):
            model = case / name
        else:
            model = case / "model"
            shutil.copytree(base, model)
        (model if name.endswith(".gguf") else model / name).write_bytes(data[:offset])
        out = tmp_path_factory.mktemp("out")
        for command, argv in _commands(str(model), base, str(out / "o"), data_dir).items():
            _expect_clean(argv, out, capsys, [name])
