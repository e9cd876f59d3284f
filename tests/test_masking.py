"""Masked candidates (selfprune.masking): the dense weights with hooks compute what the sliced build computes.

On tiny random models of every family, both GQA policies where they differ, with and without FLAP bias
compensation, and with one layer losing its whole attention and one its whole MLP (plans the planner never
makes, forced here because the masks must still be right): masked logits equal the sliced model's, masked
fitness equals sliced fitness, and the dense model is bitwise unchanged afterwards.
"""
from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

from conftest import FAMILIES, byte_tokenizer, tiny_model
from selfprune.accounting import GQA_POLICIES
from selfprune.adapters import get_adapter
from selfprune.calibration import CalibrationConfig
from selfprune.errors import SelfpruneError
from selfprune.masking import masked_candidate
from selfprune.pruning import Pruner
from selfprune.search.fitness import Fitness, make_fitness

CALIB = CalibrationConfig(source="c4", num_samples=8, seq_len=32, seed=0)
RATES = [0.5, 0.3, 0.4, 0.6]
NO_ATTENTION_LAYER, NO_MLP_LAYER = 1, 2
CASES = [(family, policy) for family in sorted(FAMILIES) for policy in GQA_POLICIES
         if not (family == "llama-mha" and policy == "query")]   # MHA: both policies are the same
IDS = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
# Sliced and masked add the same numbers in a different order (a shorter dot product against the one with
# zeros, and the compensation folded into the bias before the matmul instead of after it), so fp32 logits
# agree to rounding, not bitwise: about 1e-6 here, 1e-5 at worst over four layers of logits up to ~7.
LOGITS_ATOL = 3e-5
FITNESS_REL = 1e-6
# Slicing a layer down to nothing makes zero-row nn.Linear modules, which torch warns about.
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")


@functools.lru_cache(maxsize=None)
def calibrated(family: str):
    """A tiny dense model and one calibration that every pruner on it shares."""
    model, tokenizer = tiny_model(family, vocab_size=1000), byte_tokenizer()
    return model, tokenizer, Pruner(model, tokenizer, "flap", CALIB, progress=False).calibration


def pruner_with_empty_layers(family: str, policy: str, compensate: bool) -> Pruner:
    """A pruner whose plans remove layer 1's whole attention and layer 2's whole MLP, the others as planned."""
    model, tokenizer, calibration = calibrated(family)
    pruner = Pruner(model, tokenizer, "flap", calibration, policy, bias_compensation=compensate,
                    structure="proportional", progress=False)
    planned = pruner.plan

    def plan(rates):
        plans = planned(rates)
        plans[NO_ATTENTION_LAYER] = dataclasses.replace(plans[NO_ATTENTION_LAYER], num_heads=0, num_kv_heads=0)
        plans[NO_MLP_LAYER] = dataclasses.replace(plans[NO_MLP_LAYER], width=0)
        return plans

    pruner.plan = plan
    return pruner


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(IDS, use_cache=False).logits


def hook_count(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize("family,policy", CASES)
def test_masked_logits_equal_sliced(family, policy):
    model = calibrated(family)[0]
    dense = logits(model)
    hooks_before = hook_count(model)
    adapter = get_adapter(model)
    for compensate in (True, False):
        pruner = pruner_with_empty_layers(family, policy, compensate)
        sliced, report = pruner.build(RATES)
        assert report.layers[NO_ATTENTION_LAYER].num_heads == 0 and report.layers[NO_MLP_LAYER].kept_channels == []
        assert any(0 < layer.num_heads < adapter.num_heads for layer in report.layers) or (
            family == "gemma3-mqa" and policy == "group"), "some layer must lose some but not all heads"
        expected = logits(sliced)
        empty_outputs = {}
        candidate = masked_candidate(pruner, RATES)
        with candidate as masked:
            assert masked is model
            o = adapter.attention_linears(adapter.layers()[NO_ATTENTION_LAYER]).o
            down = adapter.mlp_linears(adapter.layers()[NO_MLP_LAYER]).down
            handles = [linear.register_forward_hook(lambda _m, _a, out, key=key: empty_outputs.setdefault(key, out))
                       for key, linear in (("o", o), ("down", down))]   # after the masking hooks: sees their result
            got = logits(masked)
            for handle in handles:
                handle.remove()
        torch.testing.assert_close(got, expected, rtol=0, atol=LOGITS_ATOL)
        assert candidate.achieved_rate == report.achieved_rate
        # A layer without attention (MLP) outputs its bias plus, with compensation, W @ mean(input) over all columns.
        stats = pruner.calibration.layers
        for key, linear, mean in (("o", o, stats[NO_ATTENTION_LAYER].o_in.mean),
                                  ("down", down, stats[NO_MLP_LAYER].down_in.mean)):
            constant = torch.zeros(linear.out_features, dtype=torch.float64)
            if linear.bias is not None:
                constant += linear.bias.double()
            if compensate:
                constant += linear.weight.double() @ mean
            torch.testing.assert_close(empty_outputs[key], constant.float().expand_as(empty_outputs[key]),
                                       rtol=0, atol=1e-6)
    assert hook_count(model) == hooks_before
    assert torch.equal(logits(model), dense), "the dense model must be bitwise unchanged"


@pytest.mark.parametrize("family,policy", CASES)
def test_masked_fitness_equals_sliced(family, policy):
    model = calibrated(family)[0]
    dense = logits(model)
    for compensate in (True, False):
        pruner = pruner_with_empty_layers(family, policy, compensate)
        for kind in ("ppl", "kl"):
            scored = {mode: make_fitness(pruner, kind, seq_len=32, max_windows=4, batch_size=4,
                                         candidates=mode)(RATES)
                      for mode in ("sliced", "masked")}
            assert scored["masked"]["fitness"] == pytest.approx(scored["sliced"]["fitness"], rel=FITNESS_REL), kind
            assert scored["masked"]["achieved_rate"] == scored["sliced"]["achieved_rate"]
            assert scored["masked"]["tokens"] == scored["sliced"]["tokens"]
    assert torch.equal(logits(model), dense)


def test_an_exception_inside_removes_the_hooks():
    model = calibrated("qwen2")[0]
    dense, hooks_before = logits(model), hook_count(model)
    pruner = pruner_with_empty_layers("qwen2", "group", True)
    with pytest.raises(RuntimeError, match="inside"):
        with masked_candidate(pruner, RATES) as masked:
            assert hook_count(masked) > hooks_before
            assert not torch.equal(logits(masked), dense)
            raise RuntimeError("inside")
    assert hook_count(model) == hooks_before
    assert torch.equal(logits(model), dense)
    # The model is free again: a new masked candidate can start.
    with masked_candidate(pruner, RATES):
        pass


def test_one_masked_candidate_at_a_time_per_model():
    model = calibrated("qwen2")[0]
    hooks_before = hook_count(model)
    pruner = pruner_with_empty_layers("qwen2", "group", True)
    with masked_candidate(pruner, RATES) as masked:
        inside = logits(masked)
        with pytest.raises(SelfpruneError, match="one at a time"):
            with masked_candidate(pruner, [0.1] * 4):
                pass
        assert torch.equal(logits(masked), inside), "the refused candidate must leave the first one's masks"
    assert hook_count(model) == hooks_before


def test_candidates_option_is_checked_recorded_and_carried():
    pruner = pruner_with_empty_layers("llama-gqa", "group", True)
    with pytest.raises(SelfpruneError) as error:
        make_fitness(pruner, candidates="lazy")
    assert "candidates=" in str(error.value) and "--candidates" in error.value.cli_message()
    assert "sliced" in str(error.value) and "masked" in str(error.value)
    fitness = make_fitness(pruner, "kl", seq_len=32, max_windows=2, candidates="masked")
    assert fitness.settings["candidates"] == "masked"
    assert make_fitness(pruner, "kl", seq_len=32, max_windows=2).settings["candidates"] == "sliced"
    # Another process rebuilds the same fitness from data(), in the recorded mode or the one it asks for.
    assert Fitness.from_data(pruner, fitness.data()).candidates == "masked"
    sliced = Fitness.from_data(pruner, fitness.data(), candidates="sliced")
    assert sliced.candidates == "sliced" and sliced._dense_logprobs is fitness._dense_logprobs
    assert sliced(RATES)["fitness"] == pytest.approx(fitness(RATES)["fitness"], rel=FITNESS_REL)
    with pytest.raises(SelfpruneError, match="candidates="):
        Fitness.from_data(pruner, fitness.data(), candidates="lazy")
