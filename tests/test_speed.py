"""Speed measurement: FLOPs counted from the real layer shapes, the interleaved dense/pruned comparison, the CLI.

Tiny random Llamas keep this fast; no test asserts a timing threshold (this machine is shared and noisy).
"""
from __future__ import annotations

import json

import pytest
import torch

from conftest import byte_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from selfprune.errors import SelfpruneError
from selfprune.evaluation.speed import (compare_speed, flop_parts, flops_per_token, format_speed, measure_decode,
                                        measure_prefill, model_facts, parse_sweep, peak_memory)
from selfprune.pruning import prune

torch.set_num_threads(1)


def tiny_llama(head_dim=None, vocab=300, layers=3, tie=False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
                         max_position_embeddings=512, tie_word_embeddings=tie)
    return LlamaForCausalLM(config).eval()


def hand_count(hidden, head_dim, vocab, shapes, seq_len) -> int:
    """FLOPs per token written out from sizes: (query heads, kv heads, MLP width) per layer."""
    total = 2 * hidden * vocab  # lm_head
    for n_q, n_kv, width in shapes:
        total += 2 * hidden * n_q * head_dim          # q_proj
        total += 2 * 2 * hidden * n_kv * head_dim     # k_proj, v_proj
        total += 2 * n_q * head_dim * hidden          # o_proj
        total += 3 * 2 * hidden * width               # gate, up, down
        total += 2 * 2 * n_q * head_dim * seq_len     # QK^T and AV
    return total


@pytest.mark.parametrize("head_dim,tie", [(None, False), (24, True)])
@pytest.mark.parametrize("seq_len", [1, 128])
def test_dense_flops_match_a_hand_count_from_the_config(head_dim, tie, seq_len):
    model = tiny_llama(head_dim=head_dim, tie=tie)
    c = model.config
    hd = head_dim or c.hidden_size // c.num_attention_heads
    shapes = [(c.num_attention_heads, c.num_key_value_heads, c.intermediate_size)] * c.num_hidden_layers
    assert flops_per_token(model, seq_len) == hand_count(c.hidden_size, hd, c.vocab_size, shapes, seq_len)
    parts = flop_parts(model, seq_len)
    assert parts["attention"] == 4 * c.num_attention_heads * hd * seq_len * c.num_hidden_layers
    assert parts["total"] == parts["linear"] + parts["attention"]


@pytest.mark.parametrize("rates,kwargs", [
    (0.5, {}),  # the default mlp_first structure: MLP channels only
    ([0.1, 0.5, 0.7], {"structure": "proportional", "gqa_policy": "group"}),  # heads, KV groups, MLP differ per layer
])
def test_pruned_flops_follow_each_layers_own_shape(rates, kwargs, tmp_path):
    dense = tiny_llama()
    pruned, report = prune(dense, rates, criterion="magnitude", progress=False, **kwargs)
    shapes = [(l.num_heads, l.num_kv_heads, l.intermediate_size) for l in report.layers]
    if kwargs:
        assert len(set(shapes)) == 3 and len({s[1] for s in shapes}) > 1  # really heterogeneous, KV heads too
    c = dense.config
    for seq_len in (1, 64):
        expected = hand_count(c.hidden_size, 16, c.vocab_size, shapes, seq_len)
        assert flops_per_token(pruned, seq_len) == expected < flops_per_token(dense, seq_len)
    assert model_facts(pruned)["layer_shapes"] == [list(s) for s in shapes]
    assert model_facts(pruned)["kv_cache_bytes_per_token"] == 2 * sum(s[1] for s in shapes) * 16 * 4

    # the same count after a save and a reload through the pruned-model format
    from selfprune.pruned_format import load_pruned, save_pruned

    save_pruned(pruned, byte_tokenizer(), tmp_path / "p")
    assert flops_per_token(load_pruned(tmp_path / "p"), 64) == flops_per_token(pruned, 64)


def test_measure_prefill_and_decode_report_medians():
    model = tiny_llama()
    pre = measure_prefill(model, batch_size=2, seq_len=16, warmup=1, repeats=3)
    assert len(pre["times_s"]) == 3 and pre["median_s"] == sorted(pre["times_s"])[1]
    assert pre["tokens_per_s"] == pytest.approx(2 * 16 / pre["median_s"])
    dec = measure_decode(model, prompt_len=8, new_tokens=4, warmup=1, repeats=3)
    assert len(dec["times_s"]) == 3
    assert dec["ms_per_token"] == pytest.approx(1000 * sorted(dec["times_s"])[1] / 4)
    mem = peak_memory(model, 2, 16)
    params = sum(p.numel() * 4 for p in model.parameters())
    assert mem["parameter_and_buffer_bytes"] >= params and mem["peak_bytes"] >= mem["parameter_and_buffer_bytes"]
    assert mem["method"]


def test_compare_speed_measures_both_models_with_ratios():
    dense = tiny_llama()
    pruned, _ = prune(dense, 0.5, criterion="magnitude", progress=False)
    result = compare_speed(pruned, dense, sweep=[(1, 16), (2, 16)], decode_tokens=3, prompt_len=8, warmup=1, repeats=3)
    assert [(r["batch_size"], r["seq_len"]) for r in result["prefill"]] == [(1, 16), (2, 16)]
    for row in result["prefill"]:
        assert len(row["dense"]["times_s"]) == len(row["pruned"]["times_s"]) == 3
        assert row["time_ratio"] == pytest.approx(row["pruned"]["median_s"] / row["dense"]["median_s"])
        assert row["ideal_ratio"] == pytest.approx(flops_per_token(pruned, 16) / flops_per_token(dense, 16))
        assert 0 < row["ideal_ratio"] < 1
    dec = result["decode"]
    assert dec["time_ratio"] == pytest.approx(dec["pruned"]["ms_per_token"] / dec["dense"]["ms_per_token"])
    assert dec["ideal_ratio"] == pytest.approx(flops_per_token(pruned, dec["flops_context"])
                                               / flops_per_token(dense, dec["flops_context"]))
    assert result["parameter_ratio"] < 1
    assert result["models"]["pruned"]["parameters"] == sum(p.numel() for p in pruned.parameters())
    assert {"dense", "pruned", "peak_ratio"} <= set(result["memory"])
    assert result["device"] == "cpu" and result["threads"] == torch.get_num_threads() and result["torch"]
    json.dumps(result)  # everything is serializable for speed.json
    table = format_speed(result)
    assert "prefill 2x16 ms" in table and "ideal (FLOPs)" in table and "decode ms/token" in table


def test_bad_settings_are_one_line_errors():
    dense = tiny_llama()
    with pytest.raises(SelfpruneError, match="repeats"):
        compare_speed(dense, dense, repeats=0)
    with pytest.raises(SelfpruneError, match="vocabularies differ"):
        compare_speed(tiny_llama(vocab=301), dense, repeats=1)
    for text in ("1x", "8*128", "0x16"):
        with pytest.raises(SelfpruneError, match="--sweep"):
            parse_sweep(text)
    assert parse_sweep("1x128, 8X512") == [(1, 128), (8, 512)]


def test_speed_command_writes_json_and_prints_the_table(tmp_path, capsys):
    from selfprune.cli import main
    from selfprune.pruned_format import save_pruned

    tokenizer = byte_tokenizer()
    dense = tiny_llama(vocab=len(tokenizer))
    dense.save_pretrained(tmp_path / "dense")
    tokenizer.save_pretrained(tmp_path / "dense")
    pruned, _ = prune(dense, 0.4, criterion="magnitude", progress=False)
    save_pruned(pruned, tokenizer, tmp_path / "pruned")
    out = tmp_path / "speed.json"
    threads = torch.get_num_threads()
    code = main(["speed", "--model", str(tmp_path / "pruned"), "--baseline", str(tmp_path / "dense"),
                 "--sweep", "1x8,2x8", "--decode-tokens", "2", "--prompt-len", "4", "--repeats", "2",
                 "--warmup", "1", "--threads", "1", "--out", str(out)])
    torch.set_num_threads(threads)
    assert code == 0
    result = json.loads(out.read_text())
    assert result["threads"] == 1 and result["model"].endswith("pruned") and result["baseline"].endswith("dense")
    assert [r["seq_len"] for r in result["prefill"]] == [8, 8] and result["decode"]["new_tokens"] == 2
    assert "pruned/dense" in capsys.readouterr().out

    assert main(["speed", "--model", str(tmp_path / "pruned"), "--baseline", str(tmp_path / "dense"),
                 "--sweep", "8by128"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("selfprune speed: error:") and "--sweep" in err and "\n" not in err
