"""The pruned-model format (save, reload through selfprune and through plain transformers) and the CLI's
handling of bad input."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import run_without_selfprune, tiny_model
from selfprune.calibration import CalibrationConfig
from selfprune.cli import main
from selfprune.pruned_format import MODELING_FILE, save_pruned
from selfprune.pruning import Pruner

CALIB = CalibrationConfig(source="c4", num_samples=8, seq_len=32)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    model = tiny_model("qwen3")
    pruned, report = Pruner(model, tokenizer, "flap", CALIB, structure="proportional", progress=False).build(
        [0.1, 0.6, 0.3, 0.7])
    out = tmp_path_factory.mktemp("fmt") / "pruned"
    save_pruned(pruned, tokenizer, out, {"report": report.to_dict()})
    return pruned, report, out


def test_saved_folder_records_every_layer(saved):
    pruned, report, out = saved
    config = json.loads((out / "config.json").read_text())
    assert (out / "model.safetensors").is_file() and (out / MODELING_FILE).is_file()
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_selfprune.SelfPrunedQwen3ForCausalLM"
    layers = config["selfprune"]["layers"]
    assert [l["num_attention_heads"] for l in layers] == [l.num_heads for l in report.layers]
    assert [l["intermediate_size"] for l in layers] == [l.intermediate_size for l in report.layers]
    indices = json.loads((out / "selfprune_indices.json").read_text())["layers"]
    assert [l["kept_channels"] for l in indices] == [l.kept_channels for l in report.layers]
    assert config["head_dim"] == 16
    assert set(config["selfprune"]["versions"]) >= {"selfprune", "torch", "transformers"}


def test_reload_through_selfprune_gives_identical_logits(saved):
    import selfprune

    pruned, _, out = saved
    reloaded, _tok = selfprune.load(out)
    ids = torch.randint(0, 1000, (2, 16))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, pruned(ids).logits)


def test_reload_through_transformers_without_selfprune(saved, tmp_path):
    """A user without selfprune installed: plain from_pretrained with trust_remote_code."""
    pruned, _, out = saved
    ids = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        expected = pruned(ids).logits
    torch.save({"ids": ids, "logits": expected}, tmp_path / "expected.pt")
    body = f"""
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)
data = torch.load({str(tmp_path / 'expected.pt')!r})
with torch.no_grad():
    got = model(data['ids']).logits
assert type(model).__name__ == 'SelfPrunedQwen3ForCausalLM', type(model)
assert torch.equal(got, data['logits']), (got - data['logits']).abs().max()
print('OK')
"""
    run_without_selfprune(body, tmp_path)


# -- CLI: one clear line, non-zero exit, nothing half-written ---------------------------------------
def run_cli(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.err.strip()


def test_missing_model_path(capsys, tmp_path):
    code, err = run_cli(capsys, "prune", "--model", str(tmp_path / "nope"), "--rate", "0.2", "--out", str(tmp_path / "o"))
    assert code == 2 and err.count("\n") == 0
    assert "does not exist" in err and "nope" in err
    assert not (tmp_path / "o").exists()


def test_folder_that_is_not_a_model(capsys, tmp_path):
    code, err = run_cli(capsys, "ppl", "--model", str(tmp_path))
    assert code == 2 and "not a model folder" in err


def test_unknown_architecture(capsys, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(tmp_path / "gpt2")
    code, err = run_cli(capsys, "ppl", "--model", str(tmp_path / "gpt2"))
    assert code == 2 and "unsupported architecture 'gpt2'" in err and "llama" in err


@pytest.mark.parametrize("rate", ["1.0", "-0.1", "1.5"])
def test_rate_outside_range(capsys, tmp_path, rate):
    code, err = run_cli(capsys, "prune", "--rate", rate, "--out", str(tmp_path / "o"))
    assert code == 2 and "argument --rate" in err and "\n" not in err


def test_both_or_neither_rate_options(capsys, tmp_path):
    code, err = run_cli(capsys, "prune", "--out", str(tmp_path / "o"))
    assert code == 2 and "exactly one of --rate" in err


def test_rates_file_not_json(capsys, tmp_path):
    bad = tmp_path / "rates.json"
    bad.write_text("[0.1, 0.2,")
    code, err = run_cli(capsys, "prune", "--rates", str(bad), "--out", str(tmp_path / "o"))
    assert code == 2 and "not valid JSON" in err


def test_rates_file_wrong_length(capsys, tmp_path, smol_dir):
    bad = tmp_path / "rates.json"
    bad.write_text(json.dumps([0.2] * 7))
    code, err = run_cli(capsys, "prune", "--model", smol_dir, "--rates", str(bad), "--out", str(tmp_path / "o"),
                        "--ppl-dataset", "none", "--criterion", "magnitude")
    assert code == 2 and "got 7 rates but the model has 30 decoder layers" in err
    assert not (tmp_path / "o").exists()


def test_unknown_criterion(capsys, tmp_path, smol_dir):
    code, err = run_cli(capsys, "prune", "--model", smol_dir, "--rate", "0.2", "--criterion", "sparsegpt",
                        "--out", str(tmp_path / "o"), "--ppl-dataset", "none")
    assert code == 2 and "invalid choice: 'sparsegpt'" in err and "flap" in err


def test_missing_data_file(capsys, tmp_path, smol_dir):
    (tmp_path / "data" / "wikitext2").mkdir(parents=True)
    code, err = run_cli(capsys, "ppl", "--model", smol_dir, "--data-dir", str(tmp_path / "data"))
    assert code == 2 and "missing data file" in err and "wiki.test.raw" in err


def test_output_directory_exists(capsys, tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("mine")
    code, err = run_cli(capsys, "prune", "--rate", "0.2", "--out", str(tmp_path / "o"))
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert (tmp_path / "o" / "keep.txt").read_text() == "mine"


def test_failed_save_leaves_nothing_behind(tmp_path, tokenizer):
    from selfprune.io import atomic_directory

    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "model.safetensors").write_text("partial")
            raise RuntimeError("killed mid-save")
    assert list(tmp_path.iterdir()) == []


