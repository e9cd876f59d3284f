"""Exact parameter accounting: a layer's rate is the fraction of its attention+MLP parameters removed.

A rate is turned into whole units (query heads or key-value groups, and MLP channels) so that the
removed parameter count matches the request to within one MLP channel (one rounding step when widths
are rounded to a multiple). Attention takes the share closest to the rate itself; the MLP absorbs the rest.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import SelfpruneError

GQA_POLICIES = ("query", "group")


@dataclass(frozen=True)
class LayerGeometry:
    """Sizes of one dense decoder layer and which projections carry biases."""

    hidden: int
    head_dim: int
    num_heads: int
    num_kv_heads: int
    intermediate: int
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def params(self, n_q: int, n_kv: int, width: int, o_bias: bool | None = None, down_bias: bool | None = None) -> int:
        """Attention+MLP parameters of a layer with these widths (norms excluded: they are not pruned)."""
        hd, h = self.head_dim, self.hidden
        o_bias = self.o_bias if o_bias is None else o_bias
        down_bias = self.mlp_bias if down_bias is None else down_bias
        attn = (n_q + 2 * n_kv) * hd * h + (n_q + 2 * n_kv) * hd * self.qkv_bias + n_q * hd * h + h * o_bias
        mlp = 3 * width * h + 2 * width * self.mlp_bias + h * down_bias
        return attn + mlp

    @property
    def dense_params(self) -> int:
        return self.params(self.num_heads, self.num_kv_heads, self.intermediate)

    def channel_params(self) -> int:
        return 3 * self.hidden + 2 * self.mlp_bias

    def attention_options(self, policy: str) -> list[tuple[int, int]]:
        """Feasible (query heads, kv heads) after pruning; at least one head per kept group survives."""
        g, kv = self.group_size, self.num_kv_heads
        if policy == "group" or g == 1:  # MHA: a group is one head, so both policies coincide
            return [(k * g, k) for k in range(kv, 0, -1)]
        if policy == "query":
            return [((g - r) * kv, kv) for r in range(0, g)]
        raise SelfpruneError(f"unknown GQA policy {policy!r}: use one of {', '.join(GQA_POLICIES)}")


def describe_gqa_policy(geom: LayerGeometry, policy: str) -> str:
    """What ``policy`` can remove from attention with this geometry, for the report (MQA makes it matter)."""
    n, kv, g = geom.num_heads, geom.num_kv_heads, geom.group_size
    if g == 1:
        return f"{n} heads, each its own key-value head (MHA): both GQA policies remove whole heads"
    if policy == "query":
        return (f"gqa_policy 'query': all {kv} key-value head(s) stay; each layer loses the same number of query "
                f"heads from every group of {g}")
    if kv > 1:
        return f"gqa_policy 'group': whole key-value groups go, each with its {g} query heads"
    if any(n_q == 0 for n_q, _ in geom.attention_options(policy)):
        return (f"gqa_policy 'group' with one key-value head (MQA): a layer keeps all {n} query heads or loses its "
                "whole attention; gqa_policy 'query' removes query heads that share the key-value head")
    return ("gqa_policy 'group' with one key-value head (MQA): attention is never pruned (the only group is the "
            "whole attention), only MLP channels; gqa_policy 'query' removes query heads that share it")


@dataclass(frozen=True)
class LayerPlan:
    num_heads: int
    num_kv_heads: int
    width: int
    requested: float
    achieved: float


def plan_layer(geom: LayerGeometry, rate: float, policy: str, mlp_multiple: int = 1,
               attention_share: float | None = None) -> LayerPlan:
    """Choose whole heads and channels whose removed parameters match ``rate`` of the layer.

    ``attention_share`` is the fraction of query heads the attention should lose (default: ``rate``
    itself); among the exact choices the one closest to it wins.
    """
    wanted_attention = rate if attention_share is None else attention_share
    dense = geom.dense_params
    target_removed = rate * dense
    unit = geom.channel_params()
    widths = sorted({w for w in range(mlp_multiple, geom.intermediate + 1, mlp_multiple)} | {geom.intermediate})
    tolerance = unit * mlp_multiple / 2 + 1e-9
    best = None
    for n_q, n_kv in geom.attention_options(policy):
        attn_removed = geom.params(geom.num_heads, geom.num_kv_heads, 0) - geom.params(n_q, n_kv, 0)
        ideal_width = geom.intermediate - (target_removed - attn_removed) / unit
        width = min(widths, key=lambda w: abs(w - ideal_width))
        removed = dense - geom.params(n_q, n_kv, width)
        error = abs(removed - target_removed)
        attn_fraction = 1 - n_q / geom.num_heads
        # Exact first (within one rounding step of the MLP), then attention share closest to the wanted one.
        key = (error > tolerance, abs(attn_fraction - wanted_attention) if error <= tolerance else error)
        if best is None or key < best[0]:
            best = (key, LayerPlan(n_q, n_kv, width, rate, removed / dense))
    return best[1]


def validate_rates(rates, num_layers: int) -> list[float]:
    """Rates: one real number in [0, 1) per decoder layer, or one number for every layer. Strings, booleans,
    NaN and infinities are refused (``float("0.2")`` or ``float(True)`` would pass silently)."""
    from .errors import is_real

    if is_real(rates):
        rates = [rates] * num_layers
    if isinstance(rates, (str, bytes)) or not hasattr(rates, "__iter__"):
        raise SelfpruneError(f"rates {rates!r} are not numbers: give one fraction per decoder layer, e.g. "
                             f"[0.2] * {num_layers}, or one fraction for all")
    values = []
    for i, r in enumerate(rates):
        if not is_real(r):
            raise SelfpruneError(f"rate {r!r} for layer {i} is not a number: use a fraction such as 0.2")
        values.append(float(r))
    if len(values) != num_layers:
        raise SelfpruneError(
            f"got {len(values)} rates but the model has {num_layers} decoder layers: give exactly one rate per layer"
        )
    for i, r in enumerate(values):
        if not 0.0 <= r < 1.0 or r != r:
            raise SelfpruneError(f"rate {r} for layer {i} is outside [0, 1): use a fraction such as 0.2")
    return values
