"""Importance of attention heads and MLP channels, computed once on the dense model.

- ``wanda_sp``: |W[:, j]| averaged over output rows times ||X_j|| (input norm over calibration tokens),
  for the input columns j of ``o_proj`` / ``down_proj``; a head scores the sum of its head_dim columns.
- ``flap``: fluctuation, the sample variance of X_j over tokens, times ||W[:, j]||^2 (FLAP's WIFV);
  comes with bias compensation (the removed channels' mean contribution folded into a bias).
- ``magnitude``: L2 norm of all weights that belong to the head / channel; needs no calibration.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .adapters import ModelAdapter
from .calibration import LayerStats
from .errors import SelfpruneError

CRITERIA = ("flap", "wanda_sp", "magnitude")
NEEDS_CALIBRATION = {"flap": True, "wanda_sp": True, "magnitude": False}
DEFAULT_BIAS_COMPENSATION = {"flap": True, "wanda_sp": False, "magnitude": False}


def check_criterion(name: str) -> str:
    if name not in CRITERIA:
        raise SelfpruneError(f"unknown criterion {name!r}: use one of {', '.join(CRITERIA)}")
    return name


@dataclass
class LayerScores:
    heads: torch.Tensor     # one score per query head (higher = keep)
    channels: torch.Tensor  # one score per MLP channel


def _column_scores(criterion: str, weight: torch.Tensor, stats) -> torch.Tensor:
    w = weight.detach().to(torch.float64).cpu()
    if criterion == "wanda_sp":
        return w.abs().mean(0) * stats.norm
    if criterion == "flap":
        return stats.variance * w.pow(2).sum(0)
    raise AssertionError(criterion)


@torch.no_grad()
def score_layer(criterion: str, adapter: ModelAdapter, layer, stats: LayerStats | None) -> LayerScores:
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
    heads = _column_scores(criterion, attn.o.weight, stats.o_in).view(-1, hd).sum(1)
    channels = _column_scores(criterion, mlp.down.weight, stats.down_in)
    return LayerScores(heads, channels)


@torch.no_grad()
def outlier_ratio(adapter: ModelAdapter, layer, stats: LayerStats, m: float = 5.0) -> float:
    """OWL's layer outlier ratio: share of unstructured Wanda scores |W_ij| ||X_j|| above m x the layer mean."""
    attn, mlp = adapter.attention_linears(layer), adapter.mlp_linears(layer)
    pairs = ((attn.q, stats.attn_in), (attn.k, stats.attn_in), (attn.v, stats.attn_in), (attn.o, stats.o_in),
             (mlp.gate, stats.mlp_in), (mlp.up, stats.mlp_in), (mlp.down, stats.down_in))
    scores = [(lin.weight.detach().float().cpu().abs() * s.norm.float()).flatten() for lin, s in pairs]
    allscores = torch.cat(scores)
    return float((allscores > m * allscores.mean()).float().mean())
