"""Physical structured pruning from per-layer rates.

``Pruner`` calibrates and scores the dense model once; ``build(rates)`` then slices a pruned copy from
the cached rankings (no recalibration), sharing every untouched tensor (embeddings, norms, lm_head) with
the dense model, so a search can build hundreds of candidates for the cost of slicing.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .accounting import GQA_POLICIES, LayerGeometry, LayerPlan, describe_gqa_policy, plan_layer, validate_rates
from .adapters import ModelAdapter, get_adapter
from .adapters.base import AttentionLinears, MLPLinears
from .calibration import CalibrationConfig, CalibrationResult, calibrate
from .criteria import DEFAULT_BIAS_COMPENSATION, NEEDS_CALIBRATION, check_criterion, outlier_ratio, score_layer
from .errors import SelfpruneError
from .offload import is_dispatched, onloaded, standalone_copy, strip_dispatch
from .reconstruction import (DEFAULT_RECONSTRUCTION, DEFAULT_RIDGE, CalibrationStream, GramCache, LayerMoments,
                             check_reconstruction, refit_projection)

log = logging.getLogger(__name__)

#: The GQA policy that lost less perplexity on SmolLM2-135M (bench/results/core.md): remove whole KV groups.
DEFAULT_GQA_POLICY = "group"
#: How a layer's rate is split between heads and MLP channels (bench/results/core.md compares them).
STRUCTURES = ("mlp_first", "proportional", "standardized")
DEFAULT_STRUCTURE = "mlp_first"


@dataclass
class LayerReport:
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    requested_rate: float
    achieved_rate: float
    kept_query_heads: list[int]
    kept_kv_heads: list[int]
    kept_channels: list[int]
    o_proj_bias: bool
    down_proj_bias: bool

    def shape_spec(self) -> dict:
        """What the modeling file needs to rebuild the layer (the rest is provenance)."""
        return {k: v for k, v in asdict(self).items() if k not in ("requested_rate", "achieved_rate")} | {
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads}


@dataclass
class PruneReport:
    criterion: str
    gqa_policy: str
    structure: str
    bias_compensation: bool
    mlp_multiple: int
    layers: list[LayerReport]
    dense_layer_params: int
    pruned_layer_params: int
    dense_total_params: int
    pruned_total_params: int
    calibration: dict | None = None
    extra: dict = field(default_factory=dict)

    @property
    def requested_rate(self) -> float:
        return sum(l.requested_rate for l in self.layers) / len(self.layers)

    @property
    def achieved_rate(self) -> float:
        return 1 - self.pruned_layer_params / self.dense_layer_params

    def to_dict(self) -> dict:
        data = asdict(self)
        data["requested_rate"] = self.requested_rate
        data["achieved_rate"] = self.achieved_rate
        return data

    def summary(self) -> str:
        notes = f"; {self.extra['gqa_policy_effect']}" if self.extra.get("gqa_policy_effect") else ""
        refit = self.extra.get("reconstruction") or {}
        if refit.get("method") == "lstsq":
            mode = "sequential" if refit["sequential"] else "one-shot"
            notes += f"; o_proj / down_proj refit by least squares ({mode}, ridge {refit['ridge']:g})"
        return (
            f"{self.criterion}: removed {self.achieved_rate:.4%} of decoder-layer parameters "
            f"(requested {self.requested_rate:.4%}); parameters {self.dense_total_params:,} -> "
            f"{self.pruned_total_params:,} ({self.pruned_total_params / self.dense_total_params:.2%} of dense){notes}"
        )


@dataclass(frozen=True)
class LayerSelection:
    """One layer of a candidate: the units that survive and the FLAP bias its o_proj / down_proj gain. The
    sliced build and the masked evaluation (``selfprune.masking``) both read it, so they cannot drift apart."""

    kept_query_heads: list[int]
    kept_kv_heads: list[int]
    kept_channels: list[int]
    o_extra_bias: torch.Tensor | None      # float64 on the CPU; None when no head goes or compensation is off
    down_extra_bias: torch.Tensor | None   # likewise for the MLP channels
    o_bias: bool                           # whether the pruned o_proj / down_proj carry a bias
    down_bias: bool
    pruned_params: int
    #: ``reconstruct="lstsq"``: the refit (kept columns' weight, whole bias) replacing o_proj / down_proj's
    #: kept columns and bias; None where no unit goes (the dense weights stay) or the refit is off.
    o_refit: tuple[torch.Tensor, torch.Tensor | None] | None = None
    down_refit: tuple[torch.Tensor, torch.Tensor | None] | None = None


def _shallow_clone(module: nn.Module) -> nn.Module:
    """A new module object that shares its parameters but owns its child/parameter tables (and runs its own
    forward, not accelerate's hooked forward of the original)."""
    clone = strip_dispatch(copy.copy(module))
    clone._modules = module._modules.copy()
    clone._parameters = module._parameters.copy()
    clone._buffers = module._buffers.copy()
    return clone


def _sliced_linear(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None,
                   extra_bias: torch.Tensor | None = None,
                   refit: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> nn.Linear:
    weight = linear.weight.detach()
    if refit is not None:   # the kept columns' refit weight and the whole bias replace the dense ones
        bias = None if refit[1] is None else refit[1].to(device=weight.device, dtype=weight.dtype)
        weight = refit[0].to(device=weight.device, dtype=weight.dtype)
    else:
        if rows is not None:
            weight = weight.index_select(0, rows.to(weight.device))
        if cols is not None:
            weight = weight.index_select(1, cols.to(weight.device))
        bias = linear.bias.detach() if linear.bias is not None else None
        if bias is not None and rows is not None:
            bias = bias.index_select(0, rows.to(bias.device))
        if extra_bias is not None:
            extra = extra_bias.to(device=weight.device, dtype=weight.dtype)
            bias = extra if bias is None else bias + extra
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    new.weight = nn.Parameter(weight.contiguous(), requires_grad=linear.weight.requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(bias.contiguous(), requires_grad=linear.weight.requires_grad)
    return new


def _head_rows(heads: list[int], head_dim: int) -> torch.Tensor:
    return (torch.tensor(heads, dtype=torch.long)[:, None] * head_dim + torch.arange(head_dim)).flatten()


def _versions() -> dict:
    import transformers

    from . import __version__

    return {"selfprune": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


#: Calibration tokens per input column of the widest refit projection below which the least-squares refit is
#: known to overfit: Qwen2.5-0.5B (down_proj 4,864 wide) refit on 32 x 128 tokens (0.84 per column) reached
#: perplexity 1,793 where FLAP's bias alone gave 413 (30%, 8 windows); SmolLM2 on 128 x 128 (10.7 per column) gains.
MIN_REFIT_TOKENS_PER_COLUMN = 2


def warn_few_refit_tokens(tokens: int, adapter) -> bool:
    """Warn (and return True) when the calibration is too short for the refit's widest projection."""
    width = max(adapter.intermediate_size, adapter.num_heads * adapter.head_dim)
    if tokens >= MIN_REFIT_TOKENS_PER_COLUMN * width:
        return False
    import math

    samples = math.ceil(MIN_REFIT_TOKENS_PER_COLUMN * width / max(1, tokens))
    log.warning("the least-squares refit fits up to %d input columns from %d calibration tokens (fewer than %d per "
                "column): it may overfit the calibration text; use %dx the calibration samples (--calib-samples) "
                "or a larger --ridge", width, tokens, MIN_REFIT_TOKENS_PER_COLUMN, samples)
    return True


class Pruner:
    """Calibrate and score a dense model once; build pruned models for any per-layer rates.

    ``reconstruct``: ``bias`` keeps the kept weights and (with ``bias_compensation``) folds the removed units'
    mean into a bias (FLAP); ``lstsq`` refits o_proj's and down_proj's kept columns and a bias by ridge least
    squares (``selfprune.reconstruction``; the bias is left out only when ``bias_compensation`` is False), on
    the dense model's calibration activations, or with ``sequential`` on the activations of the layers before
    it already pruned and refit. ``ridge`` is lambda as a fraction of the mean input second moment.
    """

    def __init__(self, model, tokenizer=None, criterion: str = "flap",
                 calibration: CalibrationConfig | CalibrationResult | None = None,
                 gqa_policy: str = DEFAULT_GQA_POLICY, mlp_multiple: int = 1,
                 bias_compensation: bool | None = None, progress: bool = True, structure: str = DEFAULT_STRUCTURE,
                 scores: list | None = None, reconstruct: str = DEFAULT_RECONSTRUCTION, sequential: bool = False,
                 ridge: float = DEFAULT_RIDGE, moments: GramCache | None = None):
        self.model = model
        self.reconstruct = check_reconstruction(reconstruct, sequential, ridge)
        self.sequential, self.ridge = sequential, float(ridge)
        #: Every layer's second moments when kept (``cache_moments``: a search refits many candidates)
        self.moments: GramCache | None = moments
        self.refit_seconds = 0.0   # time spent refitting, all builds together (a search reports it per candidate)
        if structure not in STRUCTURES:
            raise SelfpruneError(f"unknown structure {structure!r}: use one of {', '.join(STRUCTURES)}")
        self.structure = structure
        self.adapter: ModelAdapter = get_adapter(model)
        self.criterion = check_criterion(criterion)
        if gqa_policy not in GQA_POLICIES:
            raise SelfpruneError(f"unknown GQA policy {gqa_policy!r}: use one of {', '.join(GQA_POLICIES)}")
        if mlp_multiple < 1 or mlp_multiple > self.adapter.intermediate_size:
            raise SelfpruneError(f"mlp_multiple {mlp_multiple} must be between 1 and the MLP width {self.adapter.intermediate_size}")
        self.gqa_policy = gqa_policy
        self.mlp_multiple = mlp_multiple
        self.bias_compensation = DEFAULT_BIAS_COMPENSATION[criterion] if bias_compensation is None else bias_compensation
        #: the refit fits a bias unless compensation was switched off explicitly
        self.refit_intercept = bias_compensation is not False
        self.progress = progress
        self.tokenizer = tokenizer
        self.calibration: CalibrationResult | None = None
        if isinstance(calibration, CalibrationResult):
            self.calibration = calibration
        elif NEEDS_CALIBRATION[criterion] or self.bias_compensation or self.reconstruct == "lstsq":
            if tokenizer is None:
                raise SelfpruneError(f"criterion {criterion} needs calibration data: pass the tokenizer")
            self.calibration = calibrate(model, tokenizer, self.adapter, calibration or CalibrationConfig(), progress)
        self.geometries = [self._geometry(layer) for layer in self.adapter.layers()]
        if self.reconstruct == "lstsq" and self.calibration is not None:
            warn_few_refit_tokens(self.calibration.tokens, self.adapter)
        if scores is not None:   # computed by another process (see ``state``): never scored twice
            if len(scores) != self.num_layers:
                raise SelfpruneError(f"{len(scores)} layer scores for a model of {self.num_layers} layers: the "
                                     "scores come from another model")
            self.scores = list(scores)
        else:
            stats = self.calibration.layers if self.calibration else [None] * self.num_layers
            self.scores = [score_layer(criterion, self.adapter, layer, s)
                           for layer, s in zip(self.adapter.layers(), stats)]

    def state(self) -> dict:
        """Everything but the model that ``build`` needs: the calibration statistics and importance scores
        (small: a few vectors per layer) and, for a least-squares refit, every layer's second moments (a
        ``GramCache``: in memory, or a folder of files). ``Pruner.from_state(model, state)`` in another process
        (a search worker) builds the same candidates without calibrating or scoring again."""
        if self.reconstruct == "lstsq" and self.moments is None:
            self.cache_moments()   # a worker refits from them; it never sees the calibration text
        return {"criterion": self.criterion, "gqa_policy": self.gqa_policy, "mlp_multiple": self.mlp_multiple,
                "bias_compensation": self.bias_compensation, "structure": self.structure,
                "calibration": self.calibration, "scores": self.scores, "reconstruct": self.reconstruct,
                "sequential": self.sequential, "ridge": self.ridge, "refit_intercept": self.refit_intercept,
                "moments": self.moments}

    @classmethod
    def from_state(cls, model, state: dict, tokenizer=None, progress: bool = False) -> "Pruner":
        compensation = state["bias_compensation"]
        if state.get("reconstruct") == "lstsq":   # the refit's intercept follows how compensation was asked for
            if not state.get("refit_intercept", True):
                compensation = False   # switched off explicitly: no intercept
            elif not compensation:
                compensation = None    # the criterion's default (off, e.g. wanda_sp), which still fits one
        return cls(model, tokenizer, state["criterion"], state["calibration"], state["gqa_policy"],
                   state["mlp_multiple"], compensation, progress, state["structure"],
                   scores=state["scores"], reconstruct=state.get("reconstruct", "bias"),
                   sequential=state.get("sequential", False), ridge=state.get("ridge", DEFAULT_RIDGE),
                   moments=state.get("moments"))

    def cache_moments(self, directory: str | None = None) -> GramCache:
        """Take every layer's second moments on the dense activations once (a search refits hundreds of
        candidates from them); ``directory`` keeps them on disk, one file per layer, instead of in memory."""
        if self.sequential:
            raise SelfpruneError("sequential refits depend on the candidate (each layer is fit on the pruned "
                                 "layers before it), so their moments cannot be cached: use the one-shot refit")
        if self.moments is None:
            self.moments = GramCache.collect(self, directory, self.progress)
        return self.moments

    # -- sizes ------------------------------------------------------------------------------------
    def _geometry(self, layer) -> LayerGeometry:
        a = self.adapter
        attn, mlp = a.attention_linears(layer), a.mlp_linears(layer)
        n_q, n_kv, width = a.layer_shape(layer)
        if (n_q, n_kv, width) != (a.num_heads, a.num_kv_heads, a.intermediate_size):
            raise SelfpruneError("the model is already pruned: prune the dense model instead")
        return LayerGeometry(a.hidden_size, a.head_dim, n_q, n_kv, width, attn.q.bias is not None,
                             attn.o.bias is not None, mlp.gate.bias is not None)

    @property
    def num_layers(self) -> int:
        return self.adapter.num_layers

    @property
    def layer_params(self) -> list[int]:
        return [g.dense_params for g in self.geometries]

    def plan(self, rates) -> list[LayerPlan]:
        rates = validate_rates(rates, self.num_layers)
        return [plan_layer(g, r, self.gqa_policy, self.mlp_multiple, self._attention_share(i, r))
                for i, (g, r) in enumerate(zip(self.geometries, rates))]

    def _attention_share(self, layer_index: int, rate: float) -> float | None:
        """Fraction of query heads the layer should lose, by ``structure``.

        ``mlp_first``: none, unless the MLP alone cannot reach the rate (the exact planner then adds heads);
        ``proportional``: the rate itself; ``standardized``: FLAP's adaptive structure, where head and channel
        scores are standardized within their module, pooled, and removed from the lowest up (each weighted by
        its parameter count) until the rate is reached. As in FLAP (CASIA-IVA-Lab/FLAP, lib/prune.py,
        prune_flap, structure "AL-AM"), ``flap`` standardizes the squared o_proj metric per column and
        averages it per head (``standarlization(attn_metric).reshape(len(layers), -1, 128).mean(dim=2)``).
        """
        if self.structure == "mlp_first":
            return 0.0
        if self.structure == "proportional" or rate == 0:
            return None
        geom, scores = self.geometries[layer_index], self.scores[layer_index]
        if scores.head_columns is not None:
            z_heads = _standardize(scores.head_columns).view(geom.num_heads, -1).mean(1)
        else:
            z_heads = _standardize(scores.heads)
        z_channels = _standardize(scores.channels)
        g = geom.group_size
        if self.gqa_policy == "group" or g == 1:   # a head takes its share of the key-value group with it
            head_cost = (geom.dense_params - geom.params(geom.num_heads - g, geom.num_kv_heads - 1, geom.intermediate)) / g
        else:                                       # only its query and output rows go
            head_cost = geom.dense_params - geom.params(geom.num_heads - 1, geom.num_kv_heads, geom.intermediate)
        z = torch.cat([z_heads, z_channels])
        cost = torch.cat([torch.full_like(z_heads, head_cost), torch.full_like(z_channels, geom.channel_params())])
        order = torch.argsort(z)
        reached = torch.cumsum(cost[order], 0) >= rate * geom.dense_params
        cut = int(reached.nonzero()[0]) + 1 if reached.any() else len(order)
        return int((order[:cut] < len(z_heads)).sum()) / geom.num_heads

    def achieved(self, rates) -> list[float]:
        """Fractions actually removed per layer once rates become whole heads and channels."""
        return [p.achieved for p in self.plan(rates)]

    def outlier_ratios(self, m: float = 5.0) -> list[float]:
        if self.calibration is None:
            raise SelfpruneError("outlier ratios need calibration statistics: use a calibrated criterion (flap, wanda_sp)")
        return [outlier_ratio(self.adapter, layer, s, m) for layer, s in zip(self.adapter.layers(), self.calibration.layers)]

    # -- selection --------------------------------------------------------------------------------
    def kept_units(self, layer_index: int, plan: LayerPlan) -> tuple[list[int], list[int], list[int]]:
        """Indices of the query heads, KV heads and MLP channels that survive (highest scores kept)."""
        geom, scores = self.geometries[layer_index], self.scores[layer_index]
        g = geom.group_size
        head_scores = scores.heads.view(geom.num_kv_heads, g)
        if plan.num_kv_heads < geom.num_kv_heads:   # whole groups go, with their query heads
            group_scores = head_scores.sum(1)
            kept_kv = sorted(torch.argsort(group_scores, descending=True)[: plan.num_kv_heads].tolist())
            kept_q = [kv * g + j for kv in kept_kv for j in range(g)]
        else:                                        # the same number of query heads leaves every group
            per_group = plan.num_heads // geom.num_kv_heads
            kept_kv = list(range(geom.num_kv_heads))
            kept_q = []
            for kv in kept_kv:
                best = torch.argsort(head_scores[kv], descending=True)[:per_group]
                kept_q += sorted((kv * g + best).tolist())
        kept_channels = sorted(torch.argsort(scores.channels, descending=True)[: plan.width].tolist())
        return kept_q, kept_kv, kept_channels

    def _compensation(self, stats_mean: torch.Tensor, weight: torch.Tensor, kept_cols: torch.Tensor) -> torch.Tensor:
        """FLAP's bias: the removed input channels' mean contribution, W[:, S] @ mean(X_S)."""
        removed = torch.ones(weight.shape[1], dtype=torch.bool)
        removed[kept_cols] = False
        w = weight.detach().cpu()[:, removed].to(torch.float64)   # only the removed columns are widened
        return w @ stats_mean[removed]

    def layer_selection(self, layer_index: int, plan: LayerPlan,
                        moments: LayerMoments | None = None) -> LayerSelection:
        """The kept units and compensation biases (or refits) of one layer for ``plan`` (see
        ``LayerSelection``). A refit reads ``moments`` when given (``build`` takes them layer by layer), else
        the cached ones (``cache_moments``, taken on first use)."""
        kept_q, kept_kv, kept_ch = self.kept_units(layer_index, plan)
        layer = self.adapter.layers()[layer_index]
        if self.reconstruct == "lstsq":
            return self._refit_selection(layer_index, layer, kept_q, kept_kv, kept_ch, moments)
        geom = self.geometries[layer_index]
        attn, mlp = self.adapter.attention_linears(layer), self.adapter.mlp_linears(layer)
        o_extra = down_extra = None
        if self.bias_compensation:
            stats = self.calibration.layers[layer_index]
            with onloaded(layer):  # an offloaded layer's weights are read in (a no-op for a loaded one)
                if len(kept_q) < geom.num_heads:
                    o_extra = self._compensation(stats.o_in.mean, attn.o.weight, _head_rows(kept_q, geom.head_dim))
                if len(kept_ch) < geom.intermediate:
                    down_extra = self._compensation(stats.down_in.mean, mlp.down.weight,
                                                    torch.tensor(kept_ch, dtype=torch.long))
        o_bias = attn.o.bias is not None or o_extra is not None
        down_bias = mlp.down.bias is not None or down_extra is not None
        pruned = geom.params(len(kept_q), len(kept_kv), len(kept_ch), o_bias, down_bias)
        return LayerSelection(kept_q, kept_kv, kept_ch, o_extra, down_extra, o_bias, down_bias, pruned)

    def _refit_selection(self, layer_index: int, layer, kept_q, kept_kv, kept_ch,
                         moments: LayerMoments | None) -> LayerSelection:
        geom = self.geometries[layer_index]
        attn, mlp = self.adapter.attention_linears(layer), self.adapter.mlp_linears(layer)
        cache = None
        if moments is None:
            cache = self.cache_moments()
        refits, start = {}, time.perf_counter()
        with onloaded(layer):
            for which, linear, kept, removed in (
                    ("o", attn.o, _head_rows(kept_q, geom.head_dim), len(kept_q) < geom.num_heads),
                    ("down", mlp.down, torch.tensor(kept_ch, dtype=torch.long), len(kept_ch) < geom.intermediate)):
                if not removed:   # nothing to compensate: the dense projection stays as it is
                    refits[which] = None
                elif cache is not None:
                    refits[which] = cache.refit(layer_index, which, linear, kept, self.ridge, self.refit_intercept)
                else:
                    refits[which] = refit_projection(linear, getattr(moments, which), kept, self.ridge,
                                                     self.refit_intercept)
        self.refit_seconds += time.perf_counter() - start
        o_bias = attn.o.bias is not None or (refits["o"] is not None and refits["o"][1] is not None)
        down_bias = mlp.down.bias is not None or (refits["down"] is not None and refits["down"][1] is not None)
        pruned = geom.params(len(kept_q), len(kept_kv), len(kept_ch), o_bias, down_bias)
        return LayerSelection(kept_q, kept_kv, kept_ch, None, None, o_bias, down_bias, pruned,
                              refits["o"], refits["down"])

    def select(self, rates) -> list[LayerSelection]:
        """Every layer's ``LayerSelection`` for ``rates``."""
        return [self.layer_selection(i, plan) for i, plan in enumerate(self.plan(rates))]

    def achieved_rate(self, selections: list[LayerSelection]) -> float:
        """Fraction of decoder-layer parameters removed (as ``PruneReport.achieved_rate``, compensation
        biases included)."""
        return 1 - sum(s.pruned_params for s in selections) / sum(self.layer_params)

    # -- building ---------------------------------------------------------------------------------
    @torch.no_grad()
    def build(self, rates, device: torch.device | str | None = None) -> tuple[nn.Module, PruneReport]:
        """A pruned copy of the model for ``rates`` (the dense model is left untouched).

        By default the copy shares every untouched tensor with the dense model. A model that accelerate
        placed (``device_map``, weights possibly offloaded to CPU or disk) is read one layer at a time and
        its copy is a plain model that owns its weights, on ``device`` (default CPU), so it runs, saves and
        reloads without the dense model's hooks; ``device`` asks for such a copy of any model.
        """
        plans = self.plan(rates)
        a = self.adapter
        hd = a.head_dim
        if device is None and is_dispatched(self.model):
            device = "cpu"
        target = None if device is None else torch.device(device)
        copied: dict = {}   # standalone_copy's memo: tied and shared tensors are copied once
        new_layers, reports, pruned_params = [], [], []
        stream = None   # a refit without cached moments takes them here, one layer at a time
        if self.reconstruct == "lstsq" and (self.sequential or self.moments is None):
            stream = CalibrationStream.for_pruner(self)
        for i, (layer, plan) in enumerate(zip(self._onloaded_layers(target), plans)):
            moments = dense_outputs = None
            if stream is not None:   # the dense layer on the stream: its moments, and its outputs
                moments, dense_outputs = stream.moments(layer, i)
            selection = self.layer_selection(i, plan, moments)
            kept_q, kept_kv, kept_ch = selection.kept_query_heads, selection.kept_kv_heads, selection.kept_channels
            o_extra, down_extra = selection.o_extra_bias, selection.down_extra_bias
            q_rows, kv_rows = _head_rows(kept_q, hd), _head_rows(kept_kv, hd)
            ch = torch.tensor(kept_ch, dtype=torch.long)
            attn, mlp = a.attention_linears(layer), a.mlp_linears(layer)
            geom = self.geometries[i]
            new_layer = _shallow_clone(layer)
            new_attn, new_mlp = _shallow_clone(a.attention(layer)), _shallow_clone(a.mlp(layer))
            a.set_attention_linears(new_attn, AttentionLinears(
                _sliced_linear(attn.q, rows=q_rows), _sliced_linear(attn.k, rows=kv_rows),
                _sliced_linear(attn.v, rows=kv_rows),
                _sliced_linear(attn.o, cols=q_rows, extra_bias=o_extra, refit=selection.o_refit)),
                len(kept_q), len(kept_kv))
            a.set_mlp_linears(new_mlp, MLPLinears(
                _sliced_linear(mlp.gate, rows=ch), _sliced_linear(mlp.up, rows=ch),
                _sliced_linear(mlp.down, cols=ch, extra_bias=down_extra, refit=selection.down_refit)))
            new_layer.self_attn, new_layer.mlp = new_attn, new_mlp
            new_layers.append(new_layer if target is None else standalone_copy(new_layer, target, copied))
            if stream is not None:   # sequential: the next layer is fit on what this pruned layer gives it
                stream.advance(stream.run(new_layers[-1], i) if self.sequential else dense_outputs)
            o_bias, down_bias, pruned = selection.o_bias, selection.down_bias, selection.pruned_params
            pruned_params.append(pruned)
            reports.append(LayerReport(len(kept_q), len(kept_kv), len(kept_ch), plan.requested,
                                       1 - pruned / geom.dense_params, kept_q, kept_kv, kept_ch,
                                       o_bias and not geom.o_bias, down_bias and not geom.mlp_bias))
        model = self._assemble(new_layers)
        if target is not None:   # embeddings, final norm and LM head, loaded one module at a time
            model = standalone_copy(model, target, copied | {id(layer): (layer, layer) for layer in new_layers})
        report = PruneReport(
            self.criterion, self.gqa_policy, self.structure, self.bias_compensation, self.mlp_multiple, reports,
            sum(self.layer_params), sum(pruned_params), _count(self.model), _count(model),
            self.calibration.config.to_dict() | {"tokens": self.calibration.tokens, "origin": self.calibration.origin}
            | self.calibration.extra if self.calibration else None,
            extra={"gqa_policy_effect": describe_gqa_policy(self.geometries[0], self.gqa_policy),
                   "reconstruction": self.reconstruction_settings()},
        )
        model.config.selfprune = {
            "format_version": 1,
            "family": a.model_type,
            "layers": [r.shape_spec() for r in reports],
            "criterion": self.criterion,
            "gqa_policy": self.gqa_policy,
            "structure": self.structure,
            "bias_compensation": self.bias_compensation,
            "mlp_multiple": self.mlp_multiple,
            "reconstruction": self.reconstruction_settings(),
            "requested_rates": [r.requested_rate for r in reports],
            "achieved_rates": [r.achieved_rate for r in reports],
            "calibration": report.calibration,
            "versions": _versions(),
        }
        model.selfprune_report = report  # save_pruned writes it when the caller passes no report
        return model, report

    def reconstruction_settings(self) -> dict:
        """What decides the refit, recorded with every pruned model."""
        if self.reconstruct != "lstsq":
            return {"method": self.reconstruct, "bias_compensation": self.bias_compensation}
        return {"method": "lstsq", "ridge": self.ridge, "sequential": self.sequential,
                "intercept": self.refit_intercept, "projections": ["o_proj", "down_proj"]}

    def _onloaded_layers(self, device: torch.device | None):
        """The decoder layers in order, each one's offloaded weights loaded (onto ``device``) while the caller
        works on it: a model offloaded to disk is read once, one layer at a time."""
        for layer in self.adapter.layers():
            with onloaded(layer, device):
                yield layer

    def _assemble(self, new_layers: list[nn.Module]) -> nn.Module:
        model = _shallow_clone(self.model)
        decoder = _shallow_clone(self.adapter.decoder())
        decoder.layers = nn.ModuleList(new_layers)
        model.model = decoder
        model.config = copy.deepcopy(self.model.config)
        decoder.config = model.config
        return model


def _standardize(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean()) / (x.std() + 1e-12) if x.numel() > 1 else torch.zeros_like(x)


def _count(model: nn.Module) -> int:
    """Parameters counted once each (tied embeddings count once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def prune(model, rates, criterion: str = "flap", tokenizer=None, calibration: CalibrationConfig | None = None,
          gqa_policy: str = DEFAULT_GQA_POLICY, mlp_multiple: int = 1, bias_compensation: bool | None = None,
          progress: bool = True, structure: str = DEFAULT_STRUCTURE, reconstruct: str = DEFAULT_RECONSTRUCTION,
          sequential: bool = False, ridge: float = DEFAULT_RIDGE):
    """Prune ``model`` with one rate per decoder layer (or one float for all); returns ``(pruned, report)``.
    ``reconstruct="lstsq"`` refits the projections that lose inputs (see ``Pruner``)."""
    adapter = get_adapter(model)
    if isinstance(rates, (int, float)):
        rates = [float(rates)] * adapter.num_layers
    pruner = Pruner(model, tokenizer, criterion, calibration, gqa_policy, mlp_multiple, bias_compensation, progress,
                    structure, reconstruct=reconstruct, sequential=sequential, ridge=ridge)
    return pruner.build(rates)
