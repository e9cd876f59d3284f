"""Importance scores and bias compensation against computations made here from the dense model alone.

Every reference is built from the dense weights and from projection inputs captured by this file's own
forward hooks on the dense model (same calibration tokens as the pruner), never from selfprune's statistics.
"""
from __future__ import annotations

import pytest
import torch

from conftest import byte_tokenizer, dense_projection_inputs, tiny_model
from selfprune.accounting import plan_layer
from selfprune.adapters import get_adapter
from selfprune.calibration import CalibrationConfig
from selfprune.data import calibration_batch, load_text
from selfprune.pruning import Pruner

CALIB = CalibrationConfig(source="c4", num_samples=8, seq_len=32, seed=0)


@pytest.fixture(scope="module")
def byte_tok():
    return byte_tokenizer()


def calibration_ids(tokenizer, config: CalibrationConfig = CALIB) -> torch.Tensor:
    return calibration_batch(tokenizer, load_text(config.source, config.split), config.num_samples,
                             config.seq_len, config.seed)


def biased_llama():
    """A tiny LLaMA whose o_proj and down_proj already carry biases (compensation must add to them)."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      attention_bias=True, mlp_bias=True, max_position_embeddings=128)
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("family", ["llama-gqa", "qwen3"])
def test_flap_scores_match_independent_computation(family, byte_tok):
    """FLAP: variance (ddof=1) x squared column norm; o_proj's metric squared, then summed per head."""
    model = tiny_model(family, vocab_size=1000)
    inputs = dense_projection_inputs(model, calibration_ids(byte_tok))
    pruner = Pruner(model, byte_tok, "flap", CALIB, progress=False)
    old = Pruner(model, byte_tok, "flap_unsquared", pruner.calibration, progress=False)
    adapter = get_adapter(model)
    for layer, x, scores, old_scores in zip(adapter.layers(), inputs, pruner.scores, old.scores):
        w_o = adapter.attention_linears(layer).o.weight.detach().double()
        w_down = adapter.mlp_linears(layer).down.weight.detach().double()
        o_metric = x["o"].var(0, unbiased=True) * (w_o ** 2).sum(0)
        down_metric = x["down"].var(0, unbiased=True) * (w_down ** 2).sum(0)
        per_head = o_metric.reshape(adapter.num_heads, adapter.head_dim)
        torch.testing.assert_close(scores.heads, (per_head ** 2).sum(1), rtol=1e-4, atol=0)
        torch.testing.assert_close(scores.channels, down_metric, rtol=1e-4, atol=0)
        torch.testing.assert_close(old_scores.heads, per_head.sum(1), rtol=1e-4, atol=0)
        torch.testing.assert_close(old_scores.channels, down_metric, rtol=1e-4, atol=0)


def test_wanda_sp_scores_match_independent_computation(byte_tok):
    """Wanda-sp: mean over output rows of |W[:, j]| times ||X_j||; a head is the sum of its columns."""
    model = tiny_model("qwen2", vocab_size=1000)
    inputs = dense_projection_inputs(model, calibration_ids(byte_tok))
    pruner = Pruner(model, byte_tok, "wanda_sp", CALIB, progress=False)
    adapter = get_adapter(model)
    for layer, x, scores in zip(adapter.layers(), inputs, pruner.scores):
        w_o = adapter.attention_linears(layer).o.weight.detach().double()
        w_down = adapter.mlp_linears(layer).down.weight.detach().double()
        o_metric = w_o.abs().mean(0) * x["o"].pow(2).sum(0).sqrt()
        expected_heads = o_metric.reshape(adapter.num_heads, adapter.head_dim).sum(1)
        torch.testing.assert_close(scores.heads, expected_heads, rtol=1e-4, atol=0)
        torch.testing.assert_close(scores.channels, w_down.abs().mean(0) * x["down"].norm(dim=0), rtol=1e-4, atol=0)


def test_flap_standardized_structure_follows_the_reference(byte_tok):
    """FLAP's adaptive structure: z-score the squared o_proj metric per column and the MLP metric per channel
    within the layer, average columns per head, pool, and remove the lowest until the rate's parameters go."""
    model = tiny_model("llama-mha", vocab_size=1000)
    inputs = dense_projection_inputs(model, calibration_ids(byte_tok))
    rates = [0.2, 0.35, 0.5, 0.65]
    pruner = Pruner(model, byte_tok, "flap", CALIB, structure="standardized", progress=False)
    _, report = pruner.build(rates)
    adapter = get_adapter(model)
    n_heads, hd, hidden = adapter.num_heads, adapter.head_dim, adapter.hidden_size
    removed_heads_seen = 0
    for layer, x, rate, layer_report, geom in zip(adapter.layers(), inputs, rates, report.layers, pruner.geometries):
        w_o = adapter.attention_linears(layer).o.weight.detach().double()
        w_down = adapter.mlp_linears(layer).down.weight.detach().double()
        o_metric = (x["o"].var(0) * (w_o ** 2).sum(0)) ** 2
        down_metric = x["down"].var(0) * (w_down ** 2).sum(0)
        z_heads = ((o_metric - o_metric.mean()) / o_metric.std()).reshape(n_heads, hd).mean(1)
        z_channels = (down_metric - down_metric.mean()) / down_metric.std()
        head_params, channel_params = 4 * hd * hidden, 3 * hidden   # MHA, no biases
        dense = n_heads * head_params + len(z_channels) * channel_params
        pooled = sorted([(float(z), head_params, "head") for z in z_heads]
                        + [(float(z), channel_params, "channel") for z in z_channels])
        removed, heads_to_remove = 0, 0
        for _z, cost, kind in pooled:
            if removed >= rate * dense:
                break
            removed += cost
            heads_to_remove += kind == "head"
        plan = plan_layer(geom, rate, "group", attention_share=heads_to_remove / n_heads)
        assert layer_report.num_heads == plan.num_heads
        removed_heads_seen += n_heads - plan.num_heads
    assert removed_heads_seen > 0, "the check needs layers where heads go"


@pytest.mark.parametrize("family", ["llama-gqa", "biased-llama"])
@pytest.mark.parametrize("compensate", [True, False])
def test_bias_compensation_equals_mean_input_replacement(family, compensate, byte_tok):
    """The pruned o_proj / down_proj map the kept inputs to what the dense projection gives when the removed
    inputs are replaced by their calibration mean (compensation) or by zero (none)."""
    model = biased_llama() if family == "biased-llama" else tiny_model(family, vocab_size=1000)
    inputs = dense_projection_inputs(model, calibration_ids(byte_tok))
    pruner = Pruner(model, byte_tok, "flap", CALIB, structure="proportional", bias_compensation=compensate,
                    progress=False)
    pruned, report = pruner.build([0.5] * pruner.num_layers)
    adapter, pruned_adapter = get_adapter(model), get_adapter(pruned)
    hd = adapter.head_dim
    for layer, pruned_layer, x, rep in zip(adapter.layers(), pruned_adapter.layers(), inputs, report.layers):
        kept_o = (torch.tensor(rep.kept_query_heads)[:, None] * hd + torch.arange(hd)).flatten()
        pairs = (("o", adapter.attention_linears(layer).o, pruned_adapter.attention_linears(pruned_layer).o, kept_o),
                 ("down", adapter.mlp_linears(layer).down, pruned_adapter.mlp_linears(pruned_layer).down,
                  torch.tensor(rep.kept_channels)))
        for key, dense_linear, pruned_linear, kept in pairs:
            assert len(kept) < dense_linear.in_features, f"layer must lose some {key}_proj inputs"
            assert (pruned_linear.bias is not None) == (compensate or dense_linear.bias is not None)
            tokens = x[key][::7][:40]
            removed = torch.ones(dense_linear.in_features, dtype=torch.bool)
            removed[kept] = False
            replaced = tokens.clone()
            replaced[:, removed] = x[key].mean(0)[removed] if compensate else 0.0
            weight = dense_linear.weight.detach().double()
            bias = dense_linear.bias.detach().double() if dense_linear.bias is not None else 0.0
            expected = replaced @ weight.T + bias
            with torch.no_grad():
                got = pruned_linear(tokens[:, kept].float()).double()
            assert float((got - expected).norm() / expected.norm()) < 1e-5, key
