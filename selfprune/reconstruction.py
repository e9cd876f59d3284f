"""Refit the projections that consume pruned units, so a pruned layer reproduces the dense layer's output.

Removing query heads removes columns of ``o_proj``; removing MLP channels removes columns of ``down_proj``.
FLAP only folds the removed columns' mean contribution into a bias. ``lstsq`` instead refits the kept columns
and a bias by ridge least squares on calibration inputs (OSSCAR, Tyr-the-Pruner, GRAIL; SlimGPT reaches the
same optimum column by column): with ``G = E[[x; 1][x; 1]^T]`` over the projection's calibration inputs, ``K``
the kept columns plus the constant, and ``[W, b]`` the dense projection,

    [W_K, b'] = ([W, b] G[:, K] + lambda P) (G[K, K] + lambda I)^-1,   lambda = ridge x mean(diag G[K, K])

so ``W_K x_K + b'`` is the best affine estimate of the dense output ``W x + b`` from the kept inputs, with a
ridge that pulls towards FLAP's solution ``P = [W_K, b + W_S E[x_S]]`` (the kept dense columns and the bias
compensation) rather than towards zero, so that where the ridge dominates, the refit keeps FLAP's value.

Statistics come from one layer-major pass (``CalibrationStream``): the calibration samples enter layer 0, and
each layer's inputs are the previous layer's outputs, either the dense layer's (one-shot: every layer is fit
on the dense model's activations) or the pruned and refit layer's (``sequential``: layer i is fit on what the
already pruned layers 0..i-1 really feed it, as SlimGPT and OSSCAR do). Only one layer's second moments are
held at a time during ``Pruner.build``; a search, which refits hundreds of candidates, keeps every layer's
(``GramCache``: in memory, or one file per layer in a folder for models whose moments do not fit).
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import SelfpruneError
from .offload import execution_device, onloaded

RECONSTRUCTIONS = ("bias", "lstsq")
DEFAULT_RECONSTRUCTION = "bias"
#: Ridge strength as a fraction of the mean diagonal of G[K, K] (bench/results/reconstruct.md, the sweep).
DEFAULT_RIDGE = 1e-5
#: Refits kept for reuse in a search (a layer's refit depends only on how many of its units survive).
DEFAULT_REFIT_CACHE_BYTES = 512 * 2**20


def check_reconstruction(method: str, sequential: bool = False, ridge: float = DEFAULT_RIDGE) -> str:
    if method not in RECONSTRUCTIONS:
        raise SelfpruneError(f"unknown reconstruction {method!r}: use one of {', '.join(RECONSTRUCTIONS)}")
    if sequential and method != "lstsq":
        raise SelfpruneError("sequential calibration only changes a least-squares refit: pass --reconstruct lstsq "
                             "with --sequential")
    if not (0 <= ridge < 1e3) or ridge != ridge:
        raise SelfpruneError(f"ridge {ridge} must be >= 0 and below 1000 (a fraction of the mean input second "
                             "moment), e.g. 1e-5")
    return method


class Gram:
    """Running sum of ``[x; 1][x; 1]^T`` over tokens, in float64, on the device the inputs come from."""

    def __init__(self, width: int):
        self.width = width
        self.matrix: torch.Tensor | None = None
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, self.width).to(torch.float64)
        if self.matrix is None:
            self.matrix = torch.zeros(self.width + 1, self.width + 1, dtype=torch.float64, device=x.device)
        m, w = self.matrix, self.width
        x = x.to(m.device)
        m[:w, :w].addmm_(x.T, x)
        total = x.sum(0)
        m[:w, w] += total
        m[w, :w] += total
        m[w, w] += x.shape[0]
        self.count += x.shape[0]

    def second_moment(self) -> torch.Tensor:
        """``E[[x; 1][x; 1]^T]`` on the CPU."""
        if self.matrix is None or not self.count:
            raise SelfpruneError("no calibration tokens reached this projection: check the calibration data")
        return (self.matrix / self.count).cpu()


@dataclass
class LayerMoments:
    """One layer's second moments of the ``o_proj`` and ``down_proj`` inputs (``E[[x; 1][x; 1]^T]``)."""

    o: torch.Tensor
    down: torch.Tensor
    tokens: int

    @property
    def nbytes(self) -> int:
        return self.o.numel() * 8 + self.down.numel() * 8


def _dense_target(linear: nn.Linear) -> torch.Tensor:
    """``[W, b]`` in float64 on the CPU (a zero column where the projection has no bias)."""
    w = linear.weight.detach().to(device="cpu", dtype=torch.float64)
    b = (linear.bias.detach().to(device="cpu", dtype=torch.float64) if linear.bias is not None
         else torch.zeros(w.shape[0], dtype=torch.float64))
    return torch.cat([w, b[:, None]], 1)


def refit_projection(linear: nn.Linear, moment: torch.Tensor, kept: torch.Tensor, ridge: float = DEFAULT_RIDGE,
                     intercept: bool = True, target_moment: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The refit ``(W_K, b')`` of ``linear`` restricted to input columns ``kept`` (float64, CPU).

    ``moment`` is ``E[[x; 1][x; 1]^T]`` of the projection's inputs; ``target_moment`` may pass the cached
    ``[W, b] @ moment`` (it does not depend on ``kept``). Without ``intercept`` the dense bias is kept as it is
    and only ``W_K`` is fit to ``W x``.
    """
    width = moment.shape[0] - 1
    kept = kept.to(torch.long)
    full = _dense_target(linear)
    # The ridge pulls towards FLAP's solution (the kept dense columns, and the bias that adds the removed
    # columns' mean contribution), not towards zero. lambda scales with the mean second moment, which a few
    # massive-activation channels dominate; towards zero it shrank every ordinary channel's weights (Wanda-sp at
    # 20% on SmolLM2 reached perplexity 6.5e7 in development); towards FLAP, a direction the data do not settle
    # keeps FLAP's value.
    mean = moment[:width, width]
    prior = full[:, kept]
    if intercept:
        index = torch.cat([kept, torch.tensor([width])])
        cross = target_moment[:, index] if target_moment is not None else full @ moment[:, index]
        prior = torch.cat([prior, (full[:, width] + full[:, :width] @ mean - prior @ mean[kept])[:, None]], 1)
    else:
        index = kept
        full = full[:, :width]
        cross = full @ moment[:width, index]
    h = moment[index][:, index].clone()
    damp = ridge * float(h.diagonal().mean())
    if damp > 0:
        h.diagonal().add_(damp)
        cross = cross + damp * prior
    solution = _solve_spd(h, cross.T).T
    if intercept:
        return solution[:, :-1].contiguous(), solution[:, -1].contiguous()
    bias = linear.bias.detach().to(device="cpu", dtype=torch.float64) if linear.bias is not None else None
    return solution.contiguous(), bias


def _solve_spd(h: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``h^-1 rhs`` for a symmetric positive semi-definite ``h``: Cholesky, with jitter where the kept inputs
    are linearly dependent (a dead channel, ridge 0), and least squares as the last resort."""
    scale = float(h.diagonal().abs().mean()) or 1.0
    for jitter in (0.0, 1e-10, 1e-8, 1e-6):
        factor, info = torch.linalg.cholesky_ex(h + jitter * scale * torch.eye(len(h), dtype=h.dtype) if jitter else h)
        if int(info) == 0:
            return torch.cholesky_solve(rhs, factor)
    return torch.linalg.lstsq(h, rhs).solution


# -- the layer-major calibration stream -----------------------------------------------------------

class CalibrationStream:
    """The calibration samples' hidden states, one decoder layer at a time.

    The samples are held at the current layer's input (samples x seq-len x hidden values: 128 x 128 x 8192 in
    bf16 is 256 MiB for a 70B model), on the CPU between layers; every layer's keyword inputs (rotary tables,
    masks) are captured once from the model's own forward call.
    """

    def __init__(self, adapter, input_ids: torch.Tensor, batch_size: int):
        from .calibration import _capture_layer_inputs

        self.adapter = adapter
        self.hidden: list[torch.Tensor] = []
        self.keywords: list[list[dict]] = []
        for args, per_layer in _capture_layer_inputs(adapter, input_ids, batch_size):
            self.hidden.append((args[0] if args else per_layer[0]["hidden_states"]).cpu())
            for kwargs in per_layer:
                kwargs.pop("hidden_states", None)
            self.keywords.append(per_layer)
        self.tokens = int(input_ids.numel())

    @classmethod
    def for_pruner(cls, pruner) -> "CalibrationStream":
        from .data import calibration_batch, load_text

        if pruner.calibration is None or pruner.tokenizer is None:
            raise SelfpruneError("a least-squares refit needs the calibration text: build the Pruner with the "
                                 "tokenizer and a calibration config")
        config = pruner.calibration.config
        source = load_text(config.source, config.split, config.data_dir)
        input_ids = calibration_batch(pruner.tokenizer, source, config.num_samples, config.seq_len, config.seed)
        return cls(pruner.adapter, input_ids, config.batch_size)

    @torch.no_grad()
    def run(self, layer: nn.Module, layer_index: int) -> list[torch.Tensor]:
        """The layer's outputs for every batch (on the CPU); the stream itself does not move."""
        from .calibration import _to

        device = execution_device(layer)
        outputs = []
        with onloaded(layer):
            for hidden, keywords in zip(self.hidden, self.keywords):
                kwargs = {k: _to(v, device) for k, v in keywords[layer_index].items()}
                out = layer(hidden.to(device), **kwargs)
                outputs.append((out[0] if isinstance(out, tuple) else out).cpu())
        return outputs

    @torch.no_grad()
    def moments(self, layer: nn.Module, layer_index: int) -> tuple[LayerMoments, list[torch.Tensor]]:
        """Run the (dense) layer on the stream, taking the second moments of its o_proj and down_proj inputs;
        returns them with the layer's outputs."""
        attn, mlp = self.adapter.attention_linears(layer), self.adapter.mlp_linears(layer)
        grams = Gram(attn.o.in_features), Gram(mlp.down.in_features)
        hooks = [attn.o.register_forward_pre_hook(lambda _m, args, g=grams[0]: g.update(args[0])),
                 mlp.down.register_forward_pre_hook(lambda _m, args, g=grams[1]: g.update(args[0]))]
        try:
            outputs = self.run(layer, layer_index)
        finally:
            for handle in hooks:
                handle.remove()
        return LayerMoments(grams[0].second_moment(), grams[1].second_moment(), grams[0].count), outputs

    def advance(self, outputs: list[torch.Tensor]) -> None:
        self.hidden = outputs


# -- every layer's moments, for a search -----------------------------------------------------------

@dataclass
class GramCache:
    """Every layer's ``LayerMoments`` on the dense model's activations, computed once for a search.

    In memory by default; with ``directory`` each layer's moments are written to their own file and read back
    when a candidate is refit (LLaMA-2-7B: 32 x ~1 GB; 70B: 80 x ~6.6 GB), so memory holds one layer's.
    Refits are kept by (layer, projection, kept columns) up to ``cache_bytes``: a search's candidates repeat
    the same few widths per layer, and with the scores fixed a width is one kept set.
    """

    layers: list[LayerMoments | None]
    directory: str | None = None
    seconds: float = 0.0
    tokens: int = 0
    cache_bytes: int = DEFAULT_REFIT_CACHE_BYTES
    _targets: dict = field(default_factory=dict, repr=False)
    _refits: OrderedDict = field(default_factory=OrderedDict, repr=False)
    _refit_bytes: int = field(default=0, repr=False)

    @classmethod
    @torch.no_grad()
    def collect(cls, pruner, directory: str | None = None, progress: bool = False) -> "GramCache":
        from tqdm.auto import tqdm

        start = time.perf_counter()
        stream = CalibrationStream.for_pruner(pruner)
        layers: list[LayerMoments | None] = []
        if directory is not None:
            Path(directory).mkdir(parents=True, exist_ok=True)
        for i, layer in enumerate(tqdm(pruner.adapter.layers(), desc="second moments", disable=not progress,
                                       leave=False)):
            moments, outputs = stream.moments(layer, i)
            stream.advance(outputs)
            if directory is None:
                layers.append(moments)
            else:
                from safetensors.torch import save

                from .io import atomic_write_bytes

                data = save({"o": moments.o.contiguous(), "down": moments.down.contiguous(),
                             "tokens": torch.tensor(moments.tokens)})
                atomic_write_bytes(Path(directory) / f"layer{i:03d}.safetensors", data)
                layers.append(None)
        return cls(layers, directory, time.perf_counter() - start, stream.tokens)

    def moments(self, layer_index: int) -> LayerMoments:
        held = self.layers[layer_index]
        if held is not None:
            return held
        from safetensors.torch import load_file

        data = load_file(str(Path(self.directory) / f"layer{layer_index:03d}.safetensors"))
        return LayerMoments(data["o"], data["down"], int(data["tokens"]))

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.layers if m is not None)

    def refit(self, layer_index: int, which: str, linear: nn.Linear, kept: torch.Tensor, ridge: float,
              intercept: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        key = (layer_index, which, tuple(kept.tolist()), ridge, intercept)   # pruners may share the moments
        if key in self._refits:
            self._refits.move_to_end(key)
            return self._refits[key]
        moment = getattr(self.moments(layer_index), which)
        target = None
        if intercept and self.directory is None:   # [W, b] G does not depend on the kept set: once per projection
            target = self._targets.get((layer_index, which))   # (as large as W: not kept for on-disk moments)
            if target is None:
                target = self._targets[(layer_index, which)] = _dense_target(linear) @ moment
        weight, bias = refit_projection(linear, moment, kept, ridge, intercept, target)
        result = (weight.float(), None if bias is None else bias.float())
        self._refits[key] = result
        self._refit_bytes += _nbytes(result)
        while self._refit_bytes > self.cache_bytes:   # the least recently used go first
            self._refit_bytes -= _nbytes(self._refits.popitem(last=False)[1])
        return result

    def __getstate__(self):   # sent to search workers: the moments, not the per-process caches
        state = dict(self.__dict__)
        state["_targets"], state["_refits"], state["_refit_bytes"] = {}, OrderedDict(), 0
        return state


def _nbytes(refit: tuple[torch.Tensor, torch.Tensor | None]) -> int:
    return sum(t.numel() * t.element_size() for t in refit if t is not None)
