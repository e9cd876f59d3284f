"""Integration on the real SmolLM2-135M: the README's main job, perplexity and the reload paths."""
from __future__ import annotations

import json
import math

import pytest
import torch

from selfprune.cli import main

pytestmark = pytest.mark.integration


def test_perplexity_of_dense_smollm2_is_in_the_known_range(smol):
    from selfprune.evaluation.perplexity import perplexity

    model, tokenizer = smol
    result = perplexity(model, tokenizer, "wikitext2", "test", seq_len=128, max_windows=8, progress=False)
    # 62.2 on the first 80 windows in the prototype; the first 8 windows land in the same range.
    assert 30 < result["ppl"] < 90
    assert result["predicted_tokens"] == 8 * 127 and result["seq_len"] == 128 and result["split"] == "test"
    # Same as transformers' own loss on the same windows.
    from selfprune.data import load_text, token_windows

    ids = token_windows(tokenizer, load_text("wikitext2", "test"), 128, 8)
    with torch.no_grad():
        losses = [model(ids[i : i + 1], labels=ids[i : i + 1]).loss.item() for i in range(8)]
    assert math.isclose(result["nll"], sum(losses) / 8, rel_tol=1e-4)


def test_prune_command_end_to_end(tmp_path, capsys, smol_dir):
    out = tmp_path / "pruned"
    code = main(["prune", "--model", smol_dir, "--rate", "0.2", "--criterion", "flap", "--out", str(out),
                 "--calib-samples", "16", "--max-windows", "4"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "dense" in text and "pruned" in text and str(out) in text
    report = json.loads((out / "selfprune_report.json").read_text())
    dense_ppl = report["perplexity"]["dense"]["ppl"]
    pruned_ppl = report["perplexity"]["pruned"]["ppl"]
    assert dense_ppl < pruned_ppl < 4 * dense_ppl
    assert abs(report["report"]["achieved_rate"] - 0.2) < 0.002
    # The saved model reloads through plain transformers and gives the recorded perplexity.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from selfprune.evaluation.perplexity import perplexity

    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    again = perplexity(model, AutoTokenizer.from_pretrained(out), "wikitext2", "test", 128, 4, progress=False)
    assert math.isclose(again["ppl"], pruned_ppl, rel_tol=1e-5)
    prompt = AutoTokenizer.from_pretrained(out)("The capital of France is", return_tensors="pt").input_ids
    generated = model.generate(prompt, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == prompt.shape[1] + 5
