"""Values, the same in the CLI and the Python API: settings are checked where they are made (config dataclasses),
rates are real numbers in [0, 1), and a path is named for what it is when it is not what was asked for."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest

from conftest import byte_tokenizer, save_tiny_model, tiny_model
from selfprune.calibration import CalibrationConfig
from selfprune.cli import main
from selfprune.errors import SelfpruneError
from selfprune.pruning import Pruner, prune
from selfprune.search.runner import RunSettings

NOT_WHOLE = (0, -3, 1.5, "8", True, None, math.nan, [4])


@pytest.mark.parametrize("field", ["num_samples", "seq_len", "batch_size", "chunk_samples"])
@pytest.mark.parametrize("value", NOT_WHOLE, ids=repr)
def test_calibration_config_counts_are_positive_whole_numbers(field, value):
    with pytest.raises(SelfpruneError, match=f"{field}= .* must be a positive whole number"):
        CalibrationConfig(**{field: value})


@pytest.mark.parametrize("field,value", [("seed", 1.5), ("seed", "0"), ("seed", True), ("source", ""),
                                         ("source", 3), ("split", None), ("data_dir", 5)])
def test_calibration_config_other_fields(field, value):
    with pytest.raises(SelfpruneError, match=f"{field}="):
        CalibrationConfig(**{field: value})


def test_calibration_config_normalizes_what_it_accepts(tmp_path):
    config = CalibrationConfig(num_samples=np.int64(4), seq_len=16.0, source=tmp_path / "t.txt", data_dir=tmp_path)
    assert config.num_samples == 4 and type(config.num_samples) is int and config.seq_len == 16
    assert config.source == str(tmp_path / "t.txt") and config.data_dir == str(tmp_path)


@pytest.mark.parametrize("field", ["budget", "population", "max_stale_iterations"])
@pytest.mark.parametrize("value", NOT_WHOLE, ids=repr)
def test_run_settings_counts(field, value):
    settings = {"budget": 10} | {field: value}
    with pytest.raises(SelfpruneError, match=f"{field}= .* must be a positive whole number"):
        RunSettings(**settings)


BAD_RATES = [("0.2", "not numbers"), (["0.2"] * 4, "not a number"), ([True] * 4, "not a number"),
             ([0.2, math.nan, 0.2, 0.2], "outside"), ([0.2, math.inf, 0.2, 0.2], "outside"),
             ([0.2] * 3, "4 decoder layers"), (1.0, "outside"), ([0.2, None, 0.2, 0.2], "not a number"),
             (None, "not numbers")]


@pytest.fixture(scope="module")
def pruner():
    tokenizer = byte_tokenizer()
    model = tiny_model("llama-gqa", vocab_size=len(tokenizer))
    return Pruner(model, tokenizer, "magnitude", progress=False)


@pytest.mark.parametrize("rates,message", BAD_RATES, ids=[repr(r) for r, _ in BAD_RATES])
def test_bad_rates_are_refused_by_build(pruner, rates, message):
    with pytest.raises(SelfpruneError, match=message):
        pruner.build(rates)


def test_rates_as_one_number_or_numpy_values(pruner):
    by_scalar = pruner.build(0.25)[1]
    by_list = pruner.build(np.full(4, 0.25, dtype=np.float32))[1]
    assert by_scalar.achieved_rate == by_list.achieved_rate > 0.2
    pruned, report = prune(tiny_model("llama-gqa", vocab_size=257), np.float64(0.25), criterion="magnitude",
                           progress=False)
    assert report.achieved_rate == by_scalar.achieved_rate


def test_save_pruned_without_a_tokenizer_is_refused(pruner, tmp_path):
    from selfprune.pruned_format import save_pruned

    with pytest.raises(SelfpruneError, match="needs the model's tokenizer"):
        save_pruned(pruner.build(0.2)[0], None, tmp_path / "p")
    assert not (tmp_path / "p").exists()


# -- paths: named for what they are ------------------------------------------------------------------------
def _cli(argv, capsys):
    capsys.readouterr()   # what came before (saving the tiny model) is not the command's
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err.strip()


@pytest.fixture()
def paths(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00\x81" * 10)
    (tmp_path / "file").write_text("[0.1]")
    return {"missing": (tmp_path / "missing.json", "does not exist"), "folder": (tmp_path / "folder", "is a folder"),
            "device": (os.devnull, "not a regular file"), "empty": (tmp_path / "empty.txt", "is empty")}


@pytest.mark.parametrize("case", ["missing", "folder", "device", "empty"])
def test_a_rates_file_that_is_not_a_file(case, paths, tmp_path, capsys):
    model = save_tiny_model(tmp_path / "m")
    path, phrase = paths[case]
    code, err = _cli(["prune", "--model", str(model), "--rates", str(path), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and phrase in err and "rates file" in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("case", ["missing", "folder", "device", "empty", "binary"])
def test_a_dataset_path_that_is_not_a_text_file(case, paths, tmp_path, capsys):
    model = save_tiny_model(tmp_path / "m")
    path, phrase = paths.get(case, (tmp_path / "binary.txt", "not UTF-8"))
    code, err = _cli(["ppl", "--model", str(model), "--dataset", str(path), "--max-windows", "1", "--seq-len", "8"],
                     capsys)
    assert code == 2 and len(err.splitlines()) == 1 and phrase in err and "data file" in err, err


def test_a_data_dir_that_is_a_file(tmp_path, capsys):
    model = save_tiny_model(tmp_path / "m")
    (tmp_path / "file").write_text("x")
    code, err = _cli(["ppl", "--model", str(model), "--data-dir", str(tmp_path / "file"), "--max-windows", "1"], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "is a file, not a folder" in err, err


@pytest.mark.parametrize("case", ["missing", "folder", "device", "empty", "comments only"])
def test_a_tensor_types_file_that_is_not_one(case, paths, tmp_path, capsys):
    model = save_tiny_model(tmp_path / "m")
    (tmp_path / "comments.txt").write_text("# nothing but a comment\n\n")
    path, phrase = paths.get(case, (tmp_path / "comments.txt", "holds no pattern=type line"))
    out = tmp_path / "o.gguf"
    code, err = _cli(["export", "--model", str(model), "--outtype", "q4_0", "--tensor-types", str(path),
                      "--out", str(out)], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and phrase in err and "tensor types file" in err, err
    assert not out.exists()
