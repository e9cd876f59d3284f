"""Least-squares reconstruction (``reconstruct="lstsq"``, selfprune.reconstruction) on tiny random models.

Every expected value here is computed by this file from activations it captures with its own forward hooks
on the projections that lose inputs (``self_attn.o_proj`` and ``mlp.down_proj``): the ridge refit is solved
again as a float64 least-squares problem on an augmented system, the output errors are measured against the
dense projection ``W x + b`` on the captured inputs, and pruned logits are compared with what the dense (or
in-memory) model gives.
"""
from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import byte_tokenizer, dense_projection_inputs, save_tiny_model, tiny_model, torch_threads
from selfprune.calibration import CalibrationConfig
from selfprune.data import calibration_batch, load_text
from selfprune.io import read_jsonl
from selfprune.masking import masked_candidate
from selfprune.models import load_model
from selfprune.pruned_format import load_pruned, save_pruned
from selfprune.pruning import Pruner

CALIB = CalibrationConfig(source="c4", num_samples=8, seq_len=32, seed=0)
RATES = [0.1, 0.3, 0.5, 0.7]
RIDGE = 1e-3   # passed explicitly, so the reference solves the same problem whatever the default
IDS = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
#: The refit is float32 in the model; the reference is float64 from activations captured in another forward.
REFIT_REL = 1e-6
# (family, structure, GQA policy): as MASKED_CASES in tests/test_pruning.py, MQA only under "query".
REFIT_CASES = [(family, structure, policy)
               for family in ("llama-gqa", "qwen2", "qwen3", "phi3", "gemma3", "gemma3-mqa")
               for structure in ("proportional", "mlp_first") for policy in ("group", "query")
               if not (family == "gemma3-mqa" and policy == "group")]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices on a shared 2-core machine: one torch thread is ~20x faster than two spinning."""
    with torch_threads(1):
        yield


# -- independent references -------------------------------------------------------------------------

def projections(layer) -> dict:
    """The two projections a pruned layer refits, by their module names in every family."""
    return {"o": layer.self_attn.o_proj, "down": layer.mlp.down_proj}


def calibration_ids(tokenizer) -> torch.Tensor:
    return calibration_batch(tokenizer, load_text(CALIB.source, CALIB.split), CALIB.num_samples, CALIB.seq_len,
                             CALIB.seed)


def dense_output(linear, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
    out = x @ linear.weight.detach().double().T
    if bias and linear.bias is not None:
        out = out + linear.bias.detach().double()
    return out


def ridge_refit(linear, x: torch.Tensor, kept: torch.Tensor, ridge: float, intercept: bool = True):
    """argmin over (W', b') of mean ||W' x_K + b' - (W x + b)||^2 + lam ||[W', b'] - P||^2 with
    lam = ridge * mean(E[z_k^2]) over the regressors z = [x_K, 1] and P FLAP's solution (the kept dense columns
    and the bias plus the removed columns' mean contribution), solved by least squares on the system augmented
    with sqrt(n lam) I. Without ``intercept``: z = x_K, target W x (the dense bias stays), P = W_K."""
    n = x.shape[0]
    design = x[:, kept]
    weight = linear.weight.detach().double()
    prior = weight[:, kept]
    if intercept:
        design = torch.cat([design, torch.ones(n, 1, dtype=x.dtype)], 1)
        removed = torch.ones(weight.shape[1], dtype=torch.bool)
        removed[kept] = False
        bias = linear.bias.detach().double() if linear.bias is not None else torch.zeros(weight.shape[0], dtype=x.dtype)
        prior = torch.cat([prior, (bias + weight[:, removed] @ x[:, removed].mean(0))[:, None]], 1)
    lam = ridge * float(design.pow(2).mean(0).mean())
    target = dense_output(linear, x, bias=intercept)
    k = design.shape[1]
    system = torch.cat([design, math.sqrt(n * lam) * torch.eye(k, dtype=x.dtype)])
    rhs = torch.cat([target, math.sqrt(n * lam) * prior.T])
    solution = torch.linalg.lstsq(system, rhs, driver="gelsd").solution.T
    if intercept:
        return solution[:, :-1], solution[:, -1]
    return solution, None


def output_error(weight, bias, x_kept: torch.Tensor, target: torch.Tensor) -> float:
    out = x_kept @ weight.detach().double().T
    if bias is not None:
        out = out + bias.detach().double()
    return float((out - target).pow(2).sum())


def kept_columns(report_layer, which: str, head_dim: int) -> torch.Tensor:
    if which == "o":
        heads = torch.tensor(report_layer.kept_query_heads, dtype=torch.long)
        return (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
    return torch.tensor(report_layer.kept_channels, dtype=torch.long)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def stacked(weight, bias) -> torch.Tensor:
    """[W, b] as one matrix (a zero column for no bias), to compare a refit as a whole."""
    weight = weight.detach().double()
    b = torch.zeros(weight.shape[0], dtype=torch.float64) if bias is None else bias.detach().double()
    return torch.cat([weight, b[:, None]], 1)


def head_dim_of(model) -> int:
    layer = model.model.layers[0]
    return layer.self_attn.o_proj.in_features // model.config.num_attention_heads


@torch.no_grad()
def logits(model, ids=IDS) -> torch.Tensor:
    return model(ids, use_cache=False).logits


@functools.lru_cache(maxsize=None)
def calibrated(family: str):
    """A tiny dense model, its calibration (shared by every pruner on it) and the o_proj / down_proj inputs
    of every layer on the calibration tokens, captured here."""
    model, tokenizer = tiny_model(family, vocab_size=1000), byte_tokenizer()
    calibration = Pruner(model, tokenizer, "flap", CALIB, progress=False).calibration
    return model, tokenizer, calibration, dense_projection_inputs(model, calibration_ids(tokenizer))


def pruner(family: str, structure: str = "proportional", policy: str = "group", **options) -> Pruner:
    model, tokenizer, calibration, _ = calibrated(family)
    return Pruner(model, tokenizer, "flap", calibration, policy, structure=structure, progress=False, **options)


# -- 1. the refit is the ridge solution and never worse than FLAP's bias ------------------------------------

@pytest.mark.parametrize("family,structure,policy", REFIT_CASES)
def test_refit_is_the_ridge_solution_and_beats_the_bias(family, structure, policy):
    model, _, _, inputs = calibrated(family)
    refit, report = pruner(family, structure, policy, reconstruct="lstsq", ridge=RIDGE).build(RATES)
    flap, flap_report = pruner(family, structure, policy, bias_compensation=True).build(RATES)
    hd = head_dim_of(model)
    refit_count = improved = 0
    for i, (dense_layer, layer, flap_layer) in enumerate(zip(model.model.layers, refit.model.layers,
                                                             flap.model.layers)):
        rep = report.layers[i]
        assert (rep.kept_query_heads, rep.kept_channels) == (flap_report.layers[i].kept_query_heads,
                                                              flap_report.layers[i].kept_channels)
        for which, dense_linear in projections(dense_layer).items():
            got, flap_linear = projections(layer)[which], projections(flap_layer)[which]
            kept = kept_columns(rep, which, hd)
            if len(kept) == dense_linear.in_features:   # no input lost: the dense projection, bit for bit
                assert torch.equal(got.weight, dense_linear.weight), (i, which)
                assert (got.bias is None) == (dense_linear.bias is None)
                assert got.bias is None or torch.equal(got.bias, dense_linear.bias)
                continue
            x = inputs[i][which]
            weight, bias = ridge_refit(dense_linear, x, kept, RIDGE)
            assert got.weight.shape == weight.shape and got.bias is not None
            assert relative(stacked(got.weight, got.bias), stacked(weight, bias)) < REFIT_REL, (i, which)
            target = dense_output(dense_linear, x)
            error = output_error(got.weight, got.bias, x[:, kept], target)
            flap_error = output_error(flap_linear.weight, flap_linear.bias, x[:, kept], target)
            assert error <= flap_error * (1 + 1e-6), (i, which, error, flap_error)
            refit_count += 1
            improved += error < flap_error * 0.99
    assert refit_count >= 4 and improved == refit_count, (refit_count, improved)


# -- 2. nothing removed, nothing refit --------------------------------------------------------------------

def test_projections_that_lose_no_input_stay_dense():
    model = calibrated("llama-gqa")[0]
    unpruned, report = pruner("llama-gqa", reconstruct="lstsq").build([0.0] * 4)
    assert all(layer.num_heads == model.config.num_attention_heads for layer in report.layers)
    for name, tensor in model.state_dict().items():
        assert torch.equal(unpruned.state_dict()[name], tensor), name
    assert torch.equal(logits(unpruned), logits(model))
    # mlp_first at a small rate: only MLP channels go, so o_proj is the dense one and down_proj is refit
    small, report = pruner("llama-gqa", "mlp_first", reconstruct="lstsq").build([0.1] * 4)
    for dense_layer, layer, rep in zip(model.model.layers, small.model.layers, report.layers):
        assert rep.num_heads == model.config.num_attention_heads and rep.intermediate_size < 128
        o, dense_o = layer.self_attn.o_proj, dense_layer.self_attn.o_proj
        assert torch.equal(o.weight, dense_o.weight) and o.bias is None and dense_o.bias is None
        down, dense_down = layer.mlp.down_proj, dense_layer.mlp.down_proj
        kept = torch.tensor(rep.kept_channels)
        assert down.bias is not None and not torch.equal(down.weight, dense_down.weight[:, kept])


# -- 3. sequential: layer i is fit on what the pruned layers before it give it ----------------------------

@torch.no_grad()
def capture_layer_calls(model, ids) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) every decoder layer of ``model`` is called with on ``ids``."""
    calls = [None] * len(model.model.layers)

    def make_hook(i):
        def hook(_module, args, kwargs):
            calls[i] = (args, dict(kwargs))
        return hook

    handles = [layer.register_forward_pre_hook(make_hook(i), with_kwargs=True)
               for i, layer in enumerate(model.model.layers)]
    try:
        model(ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return calls


@torch.no_grad()
def projection_inputs_of(layer, args, kwargs) -> dict:
    """Run ``layer`` on one captured call; the inputs its o_proj and down_proj receive (float64)."""
    captured = {}

    def make_hook(key):
        def hook(_module, args):
            captured[key] = args[0].reshape(-1, args[0].shape[-1]).double()
        return hook

    handles = [linear.register_forward_pre_hook(make_hook(key)) for key, linear in projections(layer).items()]
    try:
        layer(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def test_sequential_refit_is_fit_on_the_pruned_stream():
    model, tokenizer, _, dense_inputs = calibrated("llama-gqa")
    hd = head_dim_of(model)
    sequential, report = pruner("llama-gqa", reconstruct="lstsq", sequential=True, ridge=RIDGE).build([0.5] * 4)
    one_shot, one_shot_report = pruner("llama-gqa", reconstruct="lstsq", ridge=RIDGE).build([0.5] * 4)
    assert [r.kept_channels for r in report.layers] == [r.kept_channels for r in one_shot_report.layers]
    calls = capture_layer_calls(sequential, calibration_ids(tokenizer))
    for i, (dense_layer, layer, other) in enumerate(zip(model.model.layers, sequential.model.layers,
                                                        one_shot.model.layers)):
        inputs = projection_inputs_of(dense_layer, *calls[i])   # the DENSE layer on the pruned stream
        for which, dense_linear in projections(dense_layer).items():
            kept = kept_columns(report.layers[i], which, hd)
            assert len(kept) < dense_linear.in_features, "every layer loses heads and channels at these rates"
            got = stacked(projections(layer)[which].weight, projections(layer)[which].bias)
            expected = stacked(*ridge_refit(dense_linear, inputs[which], kept, RIDGE))
            assert relative(got, expected) < REFIT_REL, (i, which)
            one_shot_fit = stacked(projections(other)[which].weight, projections(other)[which].bias)
            if i == 0:   # layer 0's inputs are the embeddings either way
                assert torch.equal(got, one_shot_fit)
            else:        # later layers see the pruned stream: a different fit, and the one-shot one is not it
                assert relative(got, one_shot_fit) > 1e-3, (i, which)
                assert relative(one_shot_fit, stacked(*ridge_refit(dense_linear, dense_inputs[i][which], kept,
                                                                   RIDGE))) < REFIT_REL
    assert not torch.equal(logits(sequential), logits(one_shot))


# -- 4. a masked candidate computes the sliced refit ------------------------------------------------------

@pytest.mark.parametrize("family,policy", [("qwen2", "group"), ("gemma3", "query")])
def test_masked_candidate_equals_the_sliced_refit(family, policy):
    model = calibrated(family)[0]
    dense = logits(model)
    hooks_before = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    sliced, report = pruner(family, policy=policy, reconstruct="lstsq").build(RATES)   # moments on the stream
    expected = logits(sliced)
    masker = pruner(family, policy=policy, reconstruct="lstsq")                         # cached moments
    candidate = masked_candidate(masker, RATES)
    with candidate as masked:
        got = logits(masked)
    assert relative(got, expected) < 1e-5
    assert candidate.achieved_rate == report.achieved_rate
    with masked_candidate(pruner(family, policy=policy, bias_compensation=True), RATES) as flap:
        assert relative(logits(flap), expected) > 1e-3   # the refit is what the masks computed, not FLAP's bias
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == hooks_before
    assert torch.equal(logits(model), dense), "the dense model must be bitwise unchanged"


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_a_layer_without_heads_or_channels_outputs_the_refit_intercept():
    """Plans the planner never makes (layer 1 loses all its heads, layer 2 all its channels), forced as
    tests/test_masking.py does: the refit of no input is a constant, the ridge estimate of the mean output."""
    import dataclasses

    model, _, _, inputs = calibrated("llama-gqa")
    results = []
    for cached in (False, True):
        emptied = pruner("llama-gqa", reconstruct="lstsq", ridge=RIDGE)
        planned = emptied.plan

        def plan(rates, planned=planned):
            plans = planned(rates)
            plans[1] = dataclasses.replace(plans[1], num_heads=0, num_kv_heads=0)
            plans[2] = dataclasses.replace(plans[2], width=0)
            return plans

        emptied.plan = plan
        if cached:
            with masked_candidate(emptied, RATES) as masked:
                results.append(logits(masked))
            continue
        sliced, report = emptied.build(RATES)
        assert report.layers[1].num_heads == 0 and report.layers[2].kept_channels == []
        for i, which in ((1, "o"), (2, "down")):
            linear, dense_linear = projections(sliced.model.layers[i])[which], projections(model.model.layers[i])[which]
            assert linear.in_features == 0
            _, bias = ridge_refit(dense_linear, inputs[i][which], torch.tensor([], dtype=torch.long), RIDGE)
            assert relative(linear.bias, bias) < REFIT_REL
        results.append(logits(sliced))
    assert relative(results[1], results[0]) < 1e-5


def test_a_worker_rebuilds_the_same_refit_from_the_state():
    """``Pruner.state()`` travels to a search worker (pickled, as Ray sends it) with the moments; the worker's
    candidates must be the driver's, whether or not the refit fits an intercept."""
    import pickle

    model, tokenizer, calibration, _ = calibrated("qwen2")
    for criterion, compensation in (("flap", None), ("wanda_sp", None), ("flap", False), ("wanda_sp", True)):
        driver = Pruner(model, tokenizer, criterion, calibration, structure="proportional", progress=False,
                        reconstruct="lstsq", bias_compensation=compensation)
        worker = Pruner.from_state(model, pickle.loads(pickle.dumps(driver.state())))
        assert worker.moments is not None and worker.moments.layers[0].o.shape == (97, 97)
        expected, report = driver.build(RATES)
        got, _ = worker.build(RATES)
        intercept = compensation is not False
        assert (expected.model.layers[3].mlp.down_proj.bias is not None) == intercept, (criterion, compensation)
        assert expected.config.selfprune == got.config.selfprune, (criterion, compensation)
        for name, tensor in expected.state_dict().items():
            assert torch.equal(got.state_dict()[name], tensor), (criterion, compensation, name)


# -- 5. without an intercept the dense bias stays ----------------------------------------------------------

def biased_llama():
    """A tiny llama whose o_proj and down_proj carry biases (attention_bias, mlp_bias)."""
    return tiny_model("llama-gqa", vocab_size=1000, attention_bias=True, mlp_bias=True)


def test_no_intercept_keeps_the_dense_bias_and_beats_zeroing():
    model, tokenizer, calibration, inputs = calibrated("qwen2")   # o_proj and down_proj without bias
    hd = head_dim_of(model)
    pruned, report = pruner("qwen2", reconstruct="lstsq", bias_compensation=False, ridge=RIDGE).build(RATES)
    assert pruned.config.selfprune["reconstruction"]["intercept"] is False
    for i, (dense_layer, layer) in enumerate(zip(model.model.layers, pruned.model.layers)):
        for which, dense_linear in projections(dense_layer).items():
            got = projections(layer)[which]
            assert got.bias is None and not getattr(report.layers[i], f"{which}_proj_bias"), (i, which)
            kept = kept_columns(report.layers[i], which, hd)
            if len(kept) == dense_linear.in_features:   # nothing removed: the dense projection
                assert torch.equal(got.weight, dense_linear.weight), (i, which)
                continue
            x = inputs[i][which]
            weight, _ = ridge_refit(dense_linear, x, kept, RIDGE, intercept=False)
            assert relative(got.weight, weight) < REFIT_REL, (i, which)
            target = dense_output(dense_linear, x)
            zeroed = output_error(dense_linear.weight[:, kept], None, x[:, kept], target)
            assert output_error(got.weight, None, x[:, kept], target) < zeroed * 0.99, (i, which)
    # a default that is merely off (wanda_sp: no FLAP bias) still fits an intercept; only an explicit False drops it
    fitted, _ = Pruner(model, tokenizer, "wanda_sp", calibration, structure="proportional", progress=False,
                       reconstruct="lstsq").build(RATES)
    assert all(layer.mlp.down_proj.bias is not None for layer in fitted.model.layers)

    biased = biased_llama()
    with_bias = Pruner(biased, tokenizer, "flap", CALIB, bias_compensation=False, structure="proportional",
                       progress=False, reconstruct="lstsq")
    kept_bias, report = with_bias.build(RATES)
    intercept, _ = Pruner(biased, tokenizer, "flap", with_bias.calibration, structure="proportional",
                          progress=False, reconstruct="lstsq").build(RATES)
    refit = 0
    for dense_layer, layer, fitted_layer, rep in zip(biased.model.layers, kept_bias.model.layers,
                                                     intercept.model.layers, report.layers):
        for which, dense_linear in projections(dense_layer).items():
            assert torch.equal(projections(layer)[which].bias, dense_linear.bias), which
            if len(kept_columns(rep, which, 16)) < dense_linear.in_features:   # refit: a new intercept
                assert not torch.equal(projections(layer)[which].weight, projections(fitted_layer)[which].weight)
                assert relative(projections(fitted_layer)[which].bias, dense_linear.bias) > 1e-3, which
                refit += 1
    assert refit >= 6


# -- 6. offloaded to disk: the same refit, one layer at a time ------------------------------------------------

#: As tests/test_offload.py: the tiny model takes ~1.4 MB in float32; this budget holds the embeddings and one
#: layer, the rest goes to disk. Calibration in batches of 4 and chunks of 8 samples.
CPU_BUDGET = 900_000
OFFLOAD_CALIB = CalibrationConfig(source="c4", num_samples=16, seq_len=32, seed=0, batch_size=4, chunk_samples=8)


def test_offloaded_refit_equals_in_memory_and_reloads(tmp_path):
    folder = save_tiny_model(tmp_path / "tiny", "llama-gqa", vocab_size=1000)
    dense, tokenizer = load_model(str(folder))
    big, big_tokenizer = load_model(str(folder), device_map="auto", max_memory={"cpu": CPU_BUDGET},
                                    offload_dir=str(tmp_path / "offload"))
    assert {"cpu", "disk"} <= set(big.hf_device_map.values()), big.hf_device_map
    calibrations = [Pruner(m, tok, "flap", OFFLOAD_CALIB, progress=False).calibration
                    for m, tok in ((dense, tokenizer), (big, big_tokenizer))]
    results = {}
    for sequential in (False, True):
        built = [Pruner(m, tok, "flap", calibration, structure="proportional", progress=False, reconstruct="lstsq",
                        sequential=sequential).build(RATES)
                 for (m, tok), calibration in zip(((dense, tokenizer), (big, big_tokenizer)), calibrations)]
        (pruned, report), (pruned_big, report_big) = built
        assert report_big.to_dict()["layers"] == report.to_dict()["layers"]
        assert {p.device.type for p in pruned_big.parameters()} == {"cpu"}   # a plain model owning its weights
        for name, tensor in pruned.state_dict().items():
            assert torch.equal(pruned_big.state_dict()[name], tensor), (sequential, name)
        expected = logits(pruned)
        assert torch.equal(logits(pruned_big), expected)
        save_pruned(pruned_big, big_tokenizer, tmp_path / f"disk-{sequential}")
        reloaded = load_pruned(tmp_path / f"disk-{sequential}")
        assert torch.equal(logits(reloaded), expected)
        assert reloaded.config.selfprune["reconstruction"]["sequential"] is sequential
        results[sequential] = expected
    assert not torch.equal(results[False], results[True])
    # The dense model is untouched: still offloaded, still computing what the in-memory one does.
    assert "meta" in {p.device.type for p in big.parameters()}
    assert torch.equal(logits(big), logits(dense))


# -- 7. saved and reloaded ------------------------------------------------------------------------------------

def test_saved_refit_reloads_with_its_settings(tmp_path):
    model, tokenizer, _, _ = calibrated("qwen2")
    pruned, report = pruner("qwen2", reconstruct="lstsq", sequential=True, ridge=0.01).build(RATES)
    # qwen2's o_proj has no bias: a refit layer gains one (its intercept), the others stay without
    gained = [layer.self_attn.o_proj.bias is not None for layer in pruned.model.layers]
    assert gained == [rep.num_heads < model.config.num_attention_heads for rep in report.layers] and any(gained)
    save_pruned(pruned, tokenizer, tmp_path / "pruned")
    on_disk = json.loads((tmp_path / "pruned" / "config.json").read_text())["selfprune"]["reconstruction"]
    assert (on_disk["method"], on_disk["ridge"], on_disk["sequential"]) == ("lstsq", 0.01, True)
    reloaded = load_pruned(tmp_path / "pruned")
    assert reloaded.config.selfprune["reconstruction"] == on_disk
    for name, tensor in pruned.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    assert torch.equal(logits(reloaded), logits(pruned))


def test_cli_prune_refits_as_the_python_api(tmp_path, capsys):
    from selfprune.cli import main

    folder = save_tiny_model(tmp_path / "tiny", "qwen2", vocab_size=1000)
    assert main(["prune", "--model", str(folder), "--device", "cpu", "--rate", "0.5", "--structure", "proportional",
                 "--calib-samples", "8", "--calib-seq-len", "32", "--ppl-dataset", "none", "--reconstruct", "lstsq",
                 "--sequential", "--ridge", "0.01", "--out", str(tmp_path / "pruned")]) == 0
    model, tokenizer = load_model(str(folder))
    expected, _ = Pruner(model, tokenizer, "flap", CALIB, structure="proportional", progress=False,
                         reconstruct="lstsq", sequential=True, ridge=0.01).build([0.5] * 4)
    got = load_pruned(tmp_path / "pruned")
    assert got.config.selfprune["reconstruction"] == expected.config.selfprune["reconstruction"]
    assert torch.equal(logits(got), logits(expected))


def test_moments_kept_on_disk_give_the_same_refit(tmp_path):
    in_memory = pruner("phi3", reconstruct="lstsq")
    in_memory.cache_moments()
    on_disk = pruner("phi3", reconstruct="lstsq")
    on_disk.cache_moments(str(tmp_path / "moments"))
    assert sorted(p.name for p in (tmp_path / "moments").iterdir()) == [f"layer{i:03d}.safetensors" for i in range(4)]
    assert on_disk.moments.nbytes == 0 < in_memory.moments.nbytes   # nothing held in memory
    expected, _ = in_memory.build(RATES)
    got, _ = on_disk.build(RATES)
    for name, tensor in expected.state_dict().items():
        assert torch.equal(got.state_dict()[name], tensor), name


def test_pruners_sharing_moments_refit_their_own_kept_units():
    """Two criteria keep different channels at the same widths; one moments cache serves both (as the bench
    shares it): each must get the refit of its own kept columns, not the other's from the refit cache."""
    flap = pruner("llama-gqa", "mlp_first", reconstruct="lstsq", ridge=RIDGE)
    moments = flap.cache_moments()
    model, tokenizer, calibration, _ = calibrated("llama-gqa")
    wanda = Pruner(model, tokenizer, "wanda_sp", calibration, structure="mlp_first", progress=False,
                   reconstruct="lstsq", ridge=RIDGE)
    fresh, _ = wanda.build(RATES)                 # its own moments, taken on the stream
    flap.build(RATES)                             # fills the shared refit cache with FLAP's kept sets
    wanda.moments = moments
    shared, report = wanda.build(RATES)
    assert any(l.kept_channels != f.kept_channels for l, f in zip(report.layers, flap.build(RATES)[1].layers))
    for name, tensor in fresh.state_dict().items():
        assert torch.allclose(shared.state_dict()[name], tensor, rtol=1e-5, atol=1e-6), name


# -- 8. a search that refits its candidates -------------------------------------------------------------------

DATA_DIR = Path(os.environ.get("SELFPRUNE_DATA_DIR", "no-data-dir-set"))   # conftest.py sets it


@pytest.mark.skipif(not (DATA_DIR / "ptb").is_dir(), reason="needs the local ptb / c4 copies")
def test_search_with_refit_records_it_and_resumes_with_it(tmp_path, capsys):
    from selfprune.cli import main
    from selfprune.evaluation.perplexity import PerplexityEvaluator

    folder = save_tiny_model(tmp_path / "tiny", "llama-gqa", vocab_size=257)
    run = tmp_path / "run"
    common = ["--model", str(folder), "--target", "0.3", "--criterion", "flap", "--seq-len", "32",
              "--fitness-windows", "4", "--fitness-dataset", "ptb", "--calib-samples", "8", "--calib-seq-len", "32",
              "--data-dir", str(DATA_DIR), "--device", "cpu", "--no-progress"]
    assert main(["search", *common, "--operator", "random", "--budget", "3", "--reconstruct", "lstsq",
                 "--ridge", "0.01", "--out", str(run)]) == 0
    config = json.loads((run / "config.json").read_text())
    assert (config["reconstruction"]["method"], config["reconstruction"]["ridge"]) == ("lstsq", 0.01)
    journal = read_jsonl(run / "journal.jsonl")
    assert len(journal) == 3
    assert all(0 <= r["refit_seconds"] <= r["seconds"] for r in journal), journal
    summary = json.loads((run / "summary.json").read_text())
    assert summary["refit_seconds_per_eval"] == pytest.approx(np.mean([r["refit_seconds"] for r in journal]))
    assert summary["seconds_per_eval_without_refit"] == pytest.approx(
        np.mean([r["seconds"] - r["refit_seconds"] for r in journal]))
    assert summary["reconstruction"]["method"] == "lstsq" and summary["reconstruction"]["ridge"] == 0.01
    assert "without the" in capsys.readouterr().out   # the printed summary splits the refit off

    # The candidates were scored refit: a fresh lstsq build of the best rates (moments taken on its own
    # calibration stream, not the search's cache) has the recorded fitness; FLAP's bias would not.
    model, tokenizer = load_model(str(folder))
    c = config["calibration"]
    calibration = CalibrationConfig(source=c["source"], split=c["split"], num_samples=c["num_samples"],
                                    seq_len=c["seq_len"], seed=c["seed"], data_dir=config["data_dir"])
    evaluate = PerplexityEvaluator(tokenizer, "ptb", "validation", 32, 4, 8, str(DATA_DIR))
    best = min(journal, key=lambda r: (r["fitness"], r["index"]))
    options = dict(structure=config["structure"], gqa_policy=config["gqa_policy"], progress=False)
    refit, _ = Pruner(model, tokenizer, "flap", calibration, reconstruct="lstsq", ridge=0.01, **options).build(
        best["rates"])
    assert evaluate(refit)["ppl"] == pytest.approx(best["fitness"], rel=1e-4)
    flap, _ = Pruner(model, tokenizer, "flap", calibration, **options).build(best["rates"])
    assert abs(evaluate(flap)["ppl"] / best["fitness"] - 1) > 1e-3
    saved = load_pruned(run / "model")
    assert saved.config.selfprune["reconstruction"]["method"] == "lstsq"
    assert saved.config.selfprune["reconstruction"]["ridge"] == 0.01
    assert evaluate(saved)["ppl"] == pytest.approx(best["fitness"], rel=1e-4)

    # Killed after its second evaluation (the third's journal line, the summary and the model never written),
    # then resumed with a larger budget: the third candidate is scored again, refit, to the same fitness.
    lines = (run / "journal.jsonl").read_text().splitlines(keepends=True)
    (run / "journal.jsonl").write_text("".join(lines[:2]))
    (run / "summary.json").unlink()
    assert main(["search", "--resume", str(run), "--budget", "4", "--no-progress"]) == 0
    assert json.loads((run / "config.json").read_text())["reconstruction"] == config["reconstruction"]
    resumed = read_jsonl(run / "journal.jsonl")
    assert len(resumed) == 4 and resumed[:2] == journal[:2]
    assert resumed[2]["rates"] == journal[2]["rates"] and resumed[2]["fitness"] == journal[2]["fitness"]
    assert all("refit_seconds" in r for r in resumed)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["reconstruction"]["method"] == "lstsq" and summary["reconstruction"]["ridge"] == 0.01
    assert summary["evaluations"] == 4 and "refit_seconds_per_eval" in summary


def test_a_refit_on_too_few_calibration_tokens_is_warned(caplog):
    """Fewer than two calibration tokens per column of the widest refit projection: a warning naming the
    fix (more --calib-samples or a larger --ridge); enough tokens: none."""
    import logging

    from conftest import byte_tokenizer, tiny_model

    from selfprune.calibration import CalibrationConfig
    from selfprune.pruning import Pruner

    tokenizer = byte_tokenizer()
    model = tiny_model("llama-gqa", vocab_size=len(tokenizer), intermediate_size=256)
    with caplog.at_level(logging.WARNING, logger="selfprune.pruning"):
        Pruner(model, tokenizer, "flap", CalibrationConfig(num_samples=4, seq_len=32), reconstruct="lstsq",
               progress=False)
    assert "fits up to 256 input columns from 128 calibration tokens" in caplog.text
    assert "--calib-samples" in caplog.text and "--ridge" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="selfprune.pruning"):
        Pruner(model, tokenizer, "flap", CalibrationConfig(num_samples=16, seq_len=32), reconstruct="lstsq",
               progress=False)
        Pruner(model, tokenizer, "flap", CalibrationConfig(num_samples=4, seq_len=32), progress=False)   # no refit
    assert "overfit" not in caplog.text
