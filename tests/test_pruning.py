"""The pruning engine on tiny random-weight models of every supported family."""
from __future__ import annotations

import functools
import random

import pytest
import torch

from conftest import FAMILIES, byte_tokenizer, tiny_model
from selfprune.accounting import GQA_POLICIES, LayerGeometry, plan_layer
from selfprune.adapters import get_adapter
from selfprune.calibration import CalibrationConfig
from selfprune.data import calibration_batch, load_text
from selfprune.errors import SelfpruneError
from selfprune.pruning import STRUCTURES, Pruner

CALIB = CalibrationConfig(source="c4", num_samples=8, seq_len=32, seed=0)


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@functools.lru_cache(maxsize=None)
def calibrated(family: str):
    """A tiny dense model, one calibration shared by every pruner built on it, and the mean input of each
    layer's o_proj / down_proj over the calibration tokens, captured by this file's own hooks."""
    model, tok = tiny_model(family, vocab_size=1000), byte_tokenizer()
    calibration = Pruner(model, tok, "flap", CALIB, progress=False).calibration
    ids = calibration_batch(tok, load_text(CALIB.source, CALIB.split), CALIB.num_samples, CALIB.seq_len, CALIB.seed)
    adapter = get_adapter(model)
    sums = [{"o": [], "down": []} for _ in adapter.layers()]
    handles = [linear.register_forward_pre_hook(
                   lambda _m, args, rows=store[key]: rows.append(args[0].reshape(-1, args[0].shape[-1]).double()))
               for store, layer in zip(sums, adapter.layers())
               for key, linear in (("o", adapter.attention_linears(layer).o), ("down", adapter.mlp_linears(layer).down))]
    with torch.no_grad():
        model(ids, use_cache=False)
    for handle in handles:
        handle.remove()
    means = [{key: torch.cat(rows).mean(0).float() for key, rows in store.items()} for store in sums]
    return model, calibration, means


@torch.no_grad()
def masked_dense_logits(model, report, means, ids, compensate: bool) -> torch.Tensor:
    """The DENSE model's logits with each removed head's / MLP channel's input to o_proj / down_proj replaced
    by its calibration mean (compensation) or by zero (none): the function the pruned model must compute."""
    adapter = get_adapter(model)
    hd = adapter.head_dim
    handles = []
    for layer, rep, mean in zip(adapter.layers(), report.layers, means):
        removed_o = torch.ones(adapter.num_heads, dtype=torch.bool)
        removed_o[rep.kept_query_heads] = False
        removed_down = torch.ones(adapter.intermediate_size, dtype=torch.bool)
        removed_down[rep.kept_channels] = False
        for linear, removed, key in ((adapter.attention_linears(layer).o, removed_o.repeat_interleave(hd), "o"),
                                     (adapter.mlp_linears(layer).down, removed_down, "down")):
            fill = mean[key][removed] if compensate else 0.0

            def replace(_module, args, removed=removed, fill=fill):
                x = args[0].clone()
                x[..., removed] = fill
                return (x,)

            handles.append(linear.register_forward_pre_hook(replace))
    try:
        return model(ids, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()


def relative_error(a, b):
    return float((a - b).norm() / b.norm())


MASKED_CASES = [(family, structure, policy, "flap")
                for family in sorted(FAMILIES) for structure in STRUCTURES for policy in GQA_POLICIES
                if not (family == "llama-mha" and policy == "query")    # MHA: both policies are the same
                and not (family == "gemma3-mqa" and policy == "group")]  # MQA + group: tests/test_families.py
MASKED_CASES += [(family, "proportional", "group", criterion)
                 for family in ("llama-gqa", "qwen3") for criterion in ("wanda_sp", "magnitude")]


@pytest.mark.parametrize("family,structure,policy,criterion", MASKED_CASES)
def test_pruned_logits_equal_masked_dense(family, structure, policy, criterion):
    """With and without bias compensation (the kept units are the same; only the biases differ)."""
    model, calibration, means = calibrated(family)
    rates = [0.1, 0.3, 0.5, 0.7]
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    references = {}
    for compensate in (True, False):
        pruner = Pruner(model, None, criterion, calibration, policy, bias_compensation=compensate, progress=False,
                        structure=structure)
        pruned, report = pruner.build(rates)
        adapter = get_adapter(pruned)
        assert any(adapter.layer_shape(l)[0] < adapter.num_heads for l in adapter.layers()), "some heads must go"
        assert any(adapter.layer_shape(l)[2] < adapter.intermediate_size for l in adapter.layers()), "channels too"
        for setting in (True, False):
            if setting not in references:
                references[setting] = masked_dense_logits(model, report, means, ids, setting)
        with torch.no_grad():
            got = pruned(ids, use_cache=False).logits
        assert relative_error(got, references[compensate]) < 1e-5, f"bias compensation {compensate}"
        # Compensation must be visible: the same units with the other setting give a clearly different function.
        assert relative_error(got, references[not compensate]) > 1e-3, f"bias compensation {compensate}"
        # Physically smaller, and the dense model is untouched.
        assert report.pruned_total_params < report.dense_total_params
        assert get_adapter(model).layer_shape(get_adapter(model).layers()[0]) == (
            adapter.num_heads, adapter.num_kv_heads, adapter.intermediate_size)


@pytest.mark.parametrize("family", ["llama-gqa", "qwen3"])
def test_generate_with_kv_cache_matches_full_forward(family, tokenizer):
    model = tiny_model(family)
    pruned, _ = Pruner(model, tokenizer, "flap", CALIB, structure="proportional", progress=False).build([0.5] * 4)
    prompt = torch.randint(0, 1000, (1, 8))
    out = pruned.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    # Greedy decoding with the cache must pick the argmax of a cache-free forward at every step.
    with torch.no_grad():
        logits = pruned(out[:, :-1], use_cache=False).logits
    assert torch.equal(logits[0, prompt.shape[1] - 1 :].argmax(-1), out[0, prompt.shape[1] :])


def test_gqa_policies_keep_groups_consistent(tokenizer):
    model = tiny_model("llama-gqa")  # 6 query heads, 2 KV heads: groups of 3
    for policy, expected_kv in (("query", 2), ("group", 1)):
        pruner = Pruner(model, tokenizer, "wanda_sp", CALIB, gqa_policy=policy, structure="proportional", progress=False)
        _, report = pruner.build([0.5] * 4)
        for layer in report.layers:
            assert layer.num_kv_heads == expected_kv
            assert layer.num_heads % layer.num_kv_heads == 0
            groups = [h // 3 for h in layer.kept_query_heads]
            if policy == "query":  # the same number of query heads in every group
                assert groups.count(0) == groups.count(1) == layer.num_heads // 2
            else:                  # whole groups: query heads of the kept KV heads only
                assert sorted(set(groups)) == layer.kept_kv_heads


def test_calibration_statistics_match_direct_computation(tokenizer):
    from selfprune.calibration import calibrate
    from selfprune.data import calibration_batch, load_text

    model = tiny_model("qwen2")
    adapter = get_adapter(model)
    result = calibrate(model, tokenizer, adapter, CALIB, progress=False)
    ids = calibration_batch(tokenizer, load_text("c4", "validation"), CALIB.num_samples, CALIB.seq_len, CALIB.seed)
    captured = []
    handle = adapter.mlp_linears(adapter.layers()[2]).down.register_forward_pre_hook(
        lambda _m, args: captured.append(args[0].reshape(-1, args[0].shape[-1]).double()))
    with torch.no_grad():
        model(ids)
    handle.remove()
    x = torch.cat(captured)
    stats = result.layers[2].down_in
    assert stats.count == ids.numel()
    assert torch.allclose(stats.mean, x.mean(0), atol=1e-6)
    assert torch.allclose(stats.variance, x.var(0), rtol=1e-5, atol=1e-8)
    assert torch.allclose(stats.norm, x.norm(dim=0), rtol=1e-6)


def test_lowest_scored_units_are_removed(tokenizer):
    model = tiny_model("llama-mha")
    pruner = Pruner(model, tokenizer, "flap", CALIB, structure="proportional", progress=False)
    _, report = pruner.build([0.5] * 4)
    for layer_scores, layer in zip(pruner.scores, report.layers):
        kept = set(layer.kept_channels)
        removed = [c for c in range(len(layer_scores.channels)) if c not in kept]
        assert layer_scores.channels[removed].max() <= layer_scores.channels[layer.kept_channels].min()


# -- accounting ---------------------------------------------------------------------------------
SMOL = LayerGeometry(hidden=576, head_dim=64, num_heads=9, num_kv_heads=3, intermediate=1536)


@pytest.mark.parametrize("structure_share", [None, 0.0])
def test_achieved_fraction_within_one_channel(structure_share):
    rng = random.Random(0)
    for _ in range(300):
        rate = rng.uniform(0, 0.74)
        for policy in ("query", "group"):
            plan = plan_layer(SMOL, rate, policy, attention_share=structure_share)
            removed = SMOL.dense_params - SMOL.params(plan.num_heads, plan.num_kv_heads, plan.width)
            assert abs(removed - rate * SMOL.dense_params) <= SMOL.channel_params() / 2
            assert plan.num_heads % plan.num_kv_heads == 0 and plan.num_heads >= plan.num_kv_heads


def test_mlp_multiple_rounds_widths():
    for rate in (0.1, 0.25, 0.4):
        plan = plan_layer(SMOL, rate, "query", mlp_multiple=64)
        assert plan.width % 64 == 0
        removed = SMOL.dense_params - SMOL.params(plan.num_heads, plan.num_kv_heads, plan.width)
        assert abs(removed - rate * SMOL.dense_params) <= 64 * SMOL.channel_params() / 2


def test_parameter_counts_match_the_pruned_modules(tokenizer):
    model = tiny_model("qwen2")  # q/k/v biases
    for structure in STRUCTURES:
        pruned, report = Pruner(model, tokenizer, "flap", CALIB, structure=structure, progress=False).build(
            [0.2, 0.4, 0.0, 0.6])
        adapter = get_adapter(pruned)
        actual = sum(p.numel() for layer in adapter.layers() for name, p in layer.named_parameters() if "norm" not in name)
        assert actual == report.pruned_layer_params
        assert report.pruned_total_params == sum(p.numel() for p in pruned.parameters())
        assert abs(report.achieved_rate - report.requested_rate) < 0.01


def test_mlp_first_keeps_heads_until_the_mlp_cannot_absorb():
    low = plan_layer(SMOL, 0.3, "query", attention_share=0.0)
    assert (low.num_heads, low.num_kv_heads) == (9, 3)
    high = plan_layer(SMOL, 0.78, "query", attention_share=0.0)
    assert high.num_heads < 9


def test_bad_rates_are_rejected(tokenizer):
    pruner = Pruner(tiny_model("llama-gqa"), tokenizer, "magnitude", progress=False)
    with pytest.raises(SelfpruneError, match="one rate per layer"):
        pruner.build([0.2] * 3)
    with pytest.raises(SelfpruneError, match=r"outside \[0, 1\)"):
        pruner.build([0.2, 0.2, 1.0, 0.2])


def test_unknown_architecture_names_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    with pytest.raises(SelfpruneError, match="llama, mistral, qwen2, qwen3"):
        get_adapter(model)
