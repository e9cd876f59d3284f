"""One streamed calibration pass, layer by layer, that keeps only per-channel statistics.

The inputs of the first decoder layer are captured once (with every keyword argument transformers passes
it: position embeddings, masks, ...), then each layer runs on them where it lives and its outputs become the
next layer's inputs. Hooks accumulate, per input channel of the projections the criteria need, the sum and
the sum of squares in float64: memory is independent of the number of calibration tokens, and a model
larger than one device only needs one layer at a time.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .adapters import ModelAdapter
from .data import calibration_batch, load_text


@dataclass
class CalibrationConfig:
    """Everything that decides the statistics; recorded with every pruned model and search run."""

    source: str = "c4"          # c4 | wikitext2 | ptb | path to .txt / .jsonl
    split: str = "validation"
    num_samples: int = 128
    seq_len: int = 128
    seed: int = 0
    batch_size: int = 8
    data_dir: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ChannelStats:
    """Running first and second moments of one projection's input channels."""

    total: torch.Tensor
    total_sq: torch.Tensor
    count: int = 0

    @classmethod
    def zeros(cls, width: int) -> "ChannelStats":
        return cls(torch.zeros(width, dtype=torch.float64), torch.zeros(width, dtype=torch.float64))

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        self.total += x.sum(0).cpu()
        self.total_sq += x.pow(2).sum(0).cpu()
        self.count += x.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.total / max(self.count, 1)

    @property
    def norm(self) -> torch.Tensor:
        """L2 norm of each channel over all tokens (Wanda's ||X_j||)."""
        return self.total_sq.sqrt()

    @property
    def variance(self) -> torch.Tensor:
        """Sample variance of each channel over tokens (FLAP's fluctuation)."""
        n = max(self.count, 2)
        return ((self.total_sq - self.total.pow(2) / n) / (n - 1)).clamp_min(0)


@dataclass
class LayerStats:
    attn_in: ChannelStats   # input of q/k/v (after the input norm)
    o_in: ChannelStats      # input of o_proj (concatenated heads)
    mlp_in: ChannelStats    # input of gate/up
    down_in: ChannelStats   # input of down_proj (MLP channels)


@dataclass
class CalibrationResult:
    layers: list[LayerStats]
    config: CalibrationConfig
    tokens: int
    origin: str = ""
    extra: dict = field(default_factory=dict)


class _StopForward(Exception):
    pass


def _capture_layer_inputs(adapter: ModelAdapter, input_ids: torch.Tensor, batch_size: int):
    """Run the embeddings (and whatever precedes the layers) and keep, per batch, layer 0's positional inputs
    and every layer's keyword inputs. Layers are skipped (passed through) meanwhile; each keeps its own
    keywords because families with sliding-window and global layers (Gemma 2 / 3) give each kind its own
    attention mask and rotary table."""
    layers = list(adapter.layers())
    captured: list[tuple[tuple, list[dict]]] = []

    def make_hook(index):
        def hook(_module, args, kwargs):
            if index == 0:
                captured.append((args, []))
            captured[-1][1].append(kwargs)
            if index == len(layers) - 1:
                raise _StopForward   # the final norm and LM head are not needed
        return hook

    def passthrough(hidden_states=None, *args, **kwargs):
        return hidden_states

    own_forwards = [layer.__dict__.get("forward") for layer in layers]   # e.g. accelerate's device hooks
    handles = [layer.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    for layer in layers:
        layer.forward = passthrough
    device = next(adapter.model.parameters()).device
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            try:
                adapter.model(input_ids[start : start + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
        for layer, own in zip(layers, own_forwards):
            del layer.forward
            if own is not None:
                layer.forward = own
    return captured


def _layer_device(layer: nn.Module) -> torch.device:
    return next(layer.parameters()).device


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    return value


@torch.no_grad()
def calibrate(model, tokenizer, adapter: ModelAdapter, config: CalibrationConfig, progress: bool = True) -> CalibrationResult:
    """Collect per-channel input statistics of every decoder layer on the calibration text."""
    from tqdm.auto import tqdm

    source = load_text(config.source, config.split, config.data_dir)
    input_ids = calibration_batch(tokenizer, source, config.num_samples, config.seq_len, config.seed)
    batches = _capture_layer_inputs(adapter, input_ids, config.batch_size)
    hidden_states = [args[0] if args else per_layer[0].pop("hidden_states") for args, per_layer in batches]
    for _args, per_layer in batches:
        for kwargs in per_layer:
            kwargs.pop("hidden_states", None)

    results: list[LayerStats] = []
    for layer_index, layer in enumerate(tqdm(adapter.layers(), desc="calibrating layers", disable=not progress,
                                             leave=False)):
        attn, mlp = adapter.attention_linears(layer), adapter.mlp_linears(layer)
        stats = LayerStats(
            ChannelStats.zeros(attn.q.in_features), ChannelStats.zeros(attn.o.in_features),
            ChannelStats.zeros(mlp.gate.in_features), ChannelStats.zeros(mlp.down.in_features),
        )
        hooks = [
            module.register_forward_pre_hook(lambda _m, args, s=s: s.update(args[0]))
            for module, s in ((adapter.attention_input(layer), stats.attn_in), (attn.o, stats.o_in),
                              (adapter.mlp_input(layer), stats.mlp_in), (mlp.down, stats.down_in))
        ]
        device = _layer_device(layer)
        try:
            for i, (hidden, (_args, per_layer)) in enumerate(zip(hidden_states, batches)):
                kwargs = {k: _to(v, device) for k, v in per_layer[layer_index].items()}
                out = layer(hidden.to(device), **kwargs)
                hidden_states[i] = out[0] if isinstance(out, tuple) else out
        finally:
            for handle in hooks:
                handle.remove()
        results.append(stats)
    return CalibrationResult(results, config, tokens=int(input_ids.numel()), origin=source.origin)
