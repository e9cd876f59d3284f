"""Evaluate a candidate on the dense weights, for models too large for a sliced copy next to the dense one.

``Pruner.build`` copies every sliced projection (about the kept fraction of the decoder's weights); here the
dense model computes everything and forward hooks make it compute the pruned function instead:

* the removed query heads' outputs are zeroed at the o_proj input, and the removed MLP channels at the
  down_proj input. That is all a pruned layer differs by: a removed query head reaches the residual stream
  only through its o_proj columns, and a key-value group removed under the ``group`` GQA policy takes its
  query heads with it, so its keys and values feed only outputs that are zeroed;
* the FLAP compensation bias the sliced build adds to o_proj / down_proj is added to their output;
* a least-squares refit (``reconstruct="lstsq"``) replaces o_proj's / down_proj's output with the refit
  projection of the kept inputs.

Both read ``Pruner.select`` (the same ``kept_units`` and compensation vectors as ``build``). The cost is
dense compute and no copy; the logits equal the sliced model's up to summation order.
"""
from __future__ import annotations

import weakref

import torch
from torch import nn

from .errors import SelfpruneError
from .pruning import LayerSelection, Pruner, _head_rows

#: Dense models with masks installed now: a second candidate on the same weights would mix two functions.
_MASKED_MODELS: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def _removed_mask(width: int, kept: torch.Tensor, device) -> torch.Tensor:
    removed = torch.ones(width, dtype=torch.bool)
    removed[kept] = False
    return removed.to(device)


def _home(linear: nn.Linear) -> torch.device:
    """Where the hooks' tensors live: with the weight, or on the CPU while an offloaded weight is on meta."""
    return torch.device("cpu") if linear.weight.device.type == "meta" else linear.weight.device


def _zero_inputs(removed: torch.Tensor):
    """A forward pre-hook zeroing the removed input features (masked_fill, not a product: an inf or NaN in
    a removed feature must vanish as it does when the feature is sliced away). ``.to`` is free on the same
    device and follows the activations where offloading moves them."""
    def hook(_module, args):
        x = args[0]
        return (x.masked_fill(removed.to(x.device), 0.0), *args[1:])
    return hook


def _refit_output(kept: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """A forward hook computing the refit projection of the kept inputs instead of the dense output."""
    def hook(_module, args, _output):
        x = args[0]
        b = None if bias is None else bias.to(x.device)
        return torch.nn.functional.linear(x.index_select(-1, kept.to(x.device)), weight.to(x.device), b)
    return hook


def _add_to_output(extra: torch.Tensor):
    def hook(_module, _args, output):
        return output + extra.to(output.device)
    return hook


class MaskedCandidate:
    """Context manager: inside it ``pruner.model`` computes the candidate ``rates`` give; on exit (also on an
    exception) every hook is removed and the dense model computes the dense function again.

    ``selections`` and ``achieved_rate`` describe the candidate as ``Pruner.build``'s report would."""

    def __init__(self, pruner: Pruner, rates):
        self.pruner = pruner
        self.selections: list[LayerSelection] = pruner.select(rates)
        self.achieved_rate = pruner.achieved_rate(self.selections)
        self._handles: list = []

    def __enter__(self) -> nn.Module:
        model = self.pruner.model
        if model in _MASKED_MODELS:
            raise SelfpruneError("this model is already evaluating a masked candidate: evaluate one at a time "
                                 "per dense model")
        _MASKED_MODELS.add(model)
        try:
            self._install()
        except BaseException:
            self._remove()
            raise
        return model

    def __exit__(self, *exc) -> None:
        self._remove()

    @torch.no_grad()
    def _install(self) -> None:
        a = self.pruner.adapter
        for layer, geom, selection in zip(a.layers(), self.pruner.geometries, self.selections):
            o, down = a.attention_linears(layer).o, a.mlp_linears(layer).down
            if len(selection.kept_query_heads) < geom.num_heads:
                kept = _head_rows(selection.kept_query_heads, geom.head_dim)
                self._mask(o, kept, selection.o_extra_bias, selection.o_refit)
            if len(selection.kept_channels) < geom.intermediate:
                kept = torch.tensor(selection.kept_channels, dtype=torch.long)
                self._mask(down, kept, selection.down_extra_bias, selection.down_refit)

    def _mask(self, linear: nn.Linear, kept: torch.Tensor, extra_bias: torch.Tensor | None, refit) -> None:
        home, dtype = _home(linear), linear.weight.dtype
        if refit is not None:   # cast as the sliced build casts the refit into the weight and bias
            weight = refit[0].to(device=home, dtype=dtype)
            bias = None if refit[1] is None else refit[1].to(device=home, dtype=dtype)
            self._handles.append(linear.register_forward_hook(_refit_output(kept.to(home), weight, bias)))
            return
        removed = _removed_mask(linear.in_features, kept, home)
        self._handles.append(linear.register_forward_pre_hook(_zero_inputs(removed)))
        if extra_bias is not None:   # cast as the sliced build casts it into the bias
            extra = extra_bias.to(device=_home(linear), dtype=linear.weight.dtype)
            self._handles.append(linear.register_forward_hook(_add_to_output(extra)))

    def _remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()
        _MASKED_MODELS.discard(self.pruner.model)


def masked_candidate(pruner: Pruner, rates) -> MaskedCandidate:
    """``with masked_candidate(pruner, rates) as model:`` evaluates the candidate on the dense weights."""
    return MaskedCandidate(pruner, rates)
