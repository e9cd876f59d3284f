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


def _capture_first_layer_inputs(adapter: ModelAdapter, input_ids: torch.Tensor, batch_size: int):
    """Run the embeddings (and whatever precedes layer 0) and keep layer 0's positional and keyword inputs."""
    first = adapter.layers()[0]
    captured: list[tuple[tuple, dict]] = []

    def hook(_module, args, kwargs):
        captured.append((args, kwargs))
        raise _StopForward

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    device = next(adapter.model.parameters()).device
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            try:
                adapter.model(input_ids[start : start + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
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
    batches = _capture_first_layer_inputs(adapter, input_ids, config.batch_size)
    hidden_states = [args[0] if args else kwargs.pop("hidden_states") for args, kwargs in batches]
    layer_kwargs = [kwargs for _args, kwargs in batches]

    results: list[LayerStats] = []
    for layer in tqdm(adapter.layers(), desc="calibrating layers", disable=not progress, leave=False):
        attn, mlp = adapter.attention_linears(layer), adapter.mlp_linears(layer)
        stats = LayerStats(
            ChannelStats.zeros(attn.q.in_features), ChannelStats.zeros(attn.o.in_features),
            ChannelStats.zeros(mlp.gate.in_features), ChannelStats.zeros(mlp.down.in_features),
        )
        hooks = [
            module.register_forward_pre_hook(lambda _m, args, s=s: s.update(args[0]))
            for module, s in ((attn.q, stats.attn_in), (attn.o, stats.o_in), (mlp.gate, stats.mlp_in), (mlp.down, stats.down_in))
        ]
        device = _layer_device(layer)
        try:
            for i, (hidden, kwargs) in enumerate(zip(hidden_states, layer_kwargs)):
                kwargs = {k: _to(v, device) for k, v in kwargs.items()}
                out = layer(hidden.to(device), **kwargs)
                hidden_states[i] = out[0] if isinstance(out, tuple) else out
        finally:
            for handle in hooks:
                handle.remove()
        results.append(stats)
    return CalibrationResult(results, config, tokens=int(input_ids.numel()), origin=source.origin)
