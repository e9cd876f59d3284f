"""Importance of attention heads and MLP channels, computed once on the dense model.

Scores are per input column j of ``o_proj`` / ``down_proj`` (X is that projection's input over the
calibration tokens); an MLP channel is one column, a query head the sum over its head_dim columns.

- ``flap``: FLAP's WIFV, fluctuation (sample variance of X_j over tokens) times ||W[:, j]||^2. As in FLAP's
  reference code, the ``o_proj`` metric is squared before it is summed per head; the MLP metric is not.
  Comes with bias compensation (the removed channels' mean contribution folded into a bias).
- ``flap_unsquared``: the same metric summed per head without squaring (this package's scoring before it
  followed the reference; kept for comparison, see bench/results/core.md).
- ``wanda_sp``: |W[:, j]| averaged over output rows times ||X_j|| (input norm over calibration tokens).
- ``magnitude``: L2 norm of all weights that belong to the head / channel; needs no calibration.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .adapters import ModelAdapter
from .calibration import LayerStats
from .errors import SelfpruneError
from .offload import onloaded

CRITERIA = ("flap", "flap_unsquared", "wanda_sp", "magnitude")
NEEDS_CALIBRATION = {"flap": True, "flap_unsquared": True, "wanda_sp": True, "magnitude": False}
DEFAULT_BIAS_COMPENSATION = {"flap": True, "flap_unsquared": True, "wanda_sp": False, "magnitude": False}


def check_criterion(name: str) -> str:
    if name not in CRITERIA:
        raise SelfpruneError(f"unknown criterion {name!r}: use one of {', '.join(CRITERIA)}")
    return name


@dataclass
class LayerScores:
    heads: torch.Tensor     # one score per query head (higher = keep)
    channels: torch.Tensor  # one score per MLP channel
    #: The per-column o_proj metric the head scores are sums of, where the reference standardizes columns
    #: before averaging them per head (FLAP's adaptive structure); None: standardize the head scores.
    head_columns: torch.Tensor | None = None


def _wifv(weight: torch.Tensor, stats) -> torch.Tensor:
    """FLAP's weighted input feature variance of each input column.

    FLAP (CASIA-IVA-Lab/FLAP, lib/prune.py, ``metrics['WIFV']``) uses ``fluc_inp * W.pow(2).sum(0)``; its
    ``fluc_inp`` (lib/layerwrapper.py, ``BiasGPT.add_batch``) is a streamed variance over tokens; it differs from
    the exact sample variance used here by a constant factor (tokens per sample), which changes neither rankings
    nor standardized scores, and by skipping the first calibration sample's own spread.
    """
    return stats.variance * weight.detach().to(torch.float64).cpu().pow(2).sum(0)


@torch.no_grad()
def score_layer(criterion: str, adapter: ModelAdapter, layer, stats: LayerStats | None) -> LayerScores:
    """The layer's head and channel scores; an offloaded layer (accelerate's ``device_map``) is loaded for
    the duration, on its execution device."""
    with onloaded(layer):
        return _score_layer(criterion, adapter, layer, stats)


def _score_layer(criterion: str, adapter: ModelAdapter, layer, stats: LayerStats | None) -> LayerScores:
    attn, mlp = adapter.attention_linears(layer), adapter.mlp_linears(layer)
    hd = adapter.head_dim
    if criterion == "magnitude":
        q = attn.q.weight.detach().double().cpu().pow(2).sum(1)           # per output row
        o = attn.o.weight.detach().double().cpu().pow(2).sum(0)           # per input column
        heads = (q + o).view(-1, hd).sum(1).sqrt()
        channels = (mlp.gate.weight.detach().double().cpu().pow(2).sum(1)
                    + mlp.up.weight.detach().double().cpu().pow(2).sum(1)
                    + mlp.down.weight.detach().double().cpu().pow(2).sum(0)).sqrt()
        return LayerScores(heads, channels)
    if stats is None:
        raise AssertionError(f"{criterion} needs calibration statistics")
    if criterion == "wanda_sp":
        # FLAP's reference Wanda-sp (lib/prune.py, prune_wanda_sp): |W| * sqrt(scaler_row), mean over rows,
        # summed per head for o_proj.
        o_cols = attn.o.weight.detach().to(torch.float64).cpu().abs().mean(0) * stats.o_in.norm
        channels = mlp.down.weight.detach().to(torch.float64).cpu().abs().mean(0) * stats.down_in.norm
        return LayerScores(o_cols.view(-1, hd).sum(1), channels)
    channels = _wifv(mlp.down.weight, stats.down_in)
    if criterion == "flap_unsquared":
        return LayerScores(_wifv(attn.o.weight, stats.o_in).view(-1, hd).sum(1), channels)
    if criterion == "flap":
        # FLAP (CASIA-IVA-Lab/FLAP, lib/prune.py, prune_flap): for o_proj
        # ``W_metric = metrics[args.metrics](wrapped_layers, subset, name) ** 2``, then
        # ``W_metric.reshape(-1, 128).sum(dim=1)`` per head; down_proj's metric is used unsquared.
        o_cols = _wifv(attn.o.weight, stats.o_in).pow(2)
        return LayerScores(o_cols.view(-1, hd).sum(1), channels, head_columns=o_cols)
    raise AssertionError(criterion)


@torch.no_grad()
def outlier_ratio(adapter: ModelAdapter, layer, stats: LayerStats, m: float = 5.0) -> float:
    """OWL's layer outlier ratio: share of unstructured Wanda scores |W_ij| ||X_j|| above m x the layer mean."""
    with onloaded(layer):   # an offloaded layer's weights are read here, one layer at a time
        attn, mlp = adapter.attention_linears(layer), adapter.mlp_linears(layer)
        pairs = ((attn.q, stats.attn_in), (attn.k, stats.attn_in), (attn.v, stats.attn_in), (attn.o, stats.o_in),
                 (mlp.gate, stats.mlp_in), (mlp.up, stats.mlp_in), (mlp.down, stats.down_in))
        scores = [(lin.weight.detach().float().cpu().abs() * s.norm.float()).flatten() for lin, s in pairs]
    allscores = torch.cat(scores)
    return float((allscores > m * allscores.mean()).float().mean())
