"""One streamed calibration pass, layer by layer, that keeps only per-channel statistics.

The calibration samples go through the model in chunks of at most ``chunk_samples``. For each chunk the
inputs of the first decoder layer are captured (with every keyword argument transformers passes it: position
embeddings, masks, ...), then each layer runs on them where it lives and its outputs become the next layer's
inputs; then the next chunk. Hooks accumulate, per input channel of the projections the criteria need, the
sum and the sum of squares in float64. The statistics are therefore independent of the number of calibration
tokens, the activations held at once are bounded by one chunk, and a model larger than one device (accelerate's
``device_map``, with CPU or disk offload) only needs one layer at a time, loaded once per chunk.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .adapters import ModelAdapter
from .data import calibration_batch, load_text
from .offload import execution_device, input_device, onloaded

#: Samples per chunk. A chunk's layer inputs take samples x seq_len x hidden values (64 x 128 x 8192 in bf16 is
#: 128 MiB for a 70B model); each further chunk reads an offloaded model's layers from CPU or disk once more.
#: 64 keeps both small: the default 128 samples are two chunks.
DEFAULT_CHUNK_SAMPLES = 64


@dataclass
class CalibrationConfig:
    """Everything that decides the statistics; recorded with every pruned model and search run.

    ``chunk_samples`` bounds memory only: it is rounded down to whole batches (at least one), so every batch
    is the same as in an unchunked pass and the statistics are bit-identical for any chunk size."""

    source: str = "c4"          # c4 | wikitext2 | ptb | path to .txt / .jsonl
    split: str = "validation"
    num_samples: int = 128
    seq_len: int = 128
    seed: int = 0
    batch_size: int = 8
    data_dir: str | None = None
    chunk_samples: int = DEFAULT_CHUNK_SAMPLES

    def __post_init__(self):
        """Checked where the settings are made, for the API as for the CLI (num_samples=0 once meant "every
        document")."""
        import os

        from .errors import SelfpruneError, check_whole, is_whole, option

        for name, flag in (("source", "--calib-dataset"), ("split", "--calib-split")):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                value = os.fspath(value)
                setattr(self, name, value)
            if not isinstance(value, str) or not value.strip():
                raise SelfpruneError(f"{option(name, flag)} {value!r} must be a dataset name (c4, wikitext2, ptb) "
                                     "or a .txt/.jsonl path" if name == "source" else
                                     f"{option(name, flag)} {value!r} must be a split name: validation or test")
        self.num_samples = check_whole(option("num_samples", "--calib-samples"), self.num_samples, example=128)
        self.seq_len = check_whole(option("seq_len", "--calib-seq-len"), self.seq_len, example=128)
        if not is_whole(self.seed):
            raise SelfpruneError(f"{option('seed', '--calib-seed')} {self.seed!r} must be a whole number: e.g. 0")
        self.seed = int(self.seed)
        self.batch_size = check_whole(option("batch_size"), self.batch_size, example=8)
        self.chunk_samples = check_whole(option("chunk_samples"), self.chunk_samples, example=DEFAULT_CHUNK_SAMPLES)
        if self.data_dir is not None:
            if not isinstance(self.data_dir, (str, os.PathLike)):
                raise SelfpruneError(f"{option('data_dir')} {self.data_dir!r} must be a folder path")
            self.data_dir = os.fspath(self.data_dir)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def samples_per_chunk(self) -> int:
        """``chunk_samples`` rounded down to a whole number of batches, at least one batch."""
        return max(self.batch_size, self.chunk_samples // self.batch_size * self.batch_size)


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
    #: How the pass ran: ``chunks``, ``peak_activation_bytes`` (see ``ActivationMeter``) and the process's
    #: peak memory (``process_peak_rss_bytes``, ``process_peak_cuda_bytes`` when CUDA was used).
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
    device = input_device(adapter.model)
    try:
        with onloaded(adapter.model.get_input_embeddings()):   # read from disk once, not once per batch
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


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    return value


def tensor_bytes(value, seen: set | None = None) -> int:
    """Bytes of the distinct tensor storages in ``value`` (tensors, and tuples, lists and dicts of them);
    ``seen`` carries the storages already counted, so a tensor shared by several layers counts once."""
    seen = set() if seen is None else seen
    if isinstance(value, torch.Tensor):
        storage = value.untyped_storage()
        key = (str(value.device), storage.data_ptr())
        if key in seen:
            return 0
        seen.add(key)
        return storage.nbytes()
    if isinstance(value, (tuple, list)):
        return sum(tensor_bytes(v, seen) for v in value)
    if isinstance(value, dict):
        return sum(tensor_bytes(v, seen) for v in value.values())
    return 0


class ActivationMeter:
    """The most bytes of activations calibration held at once: a chunk's layer inputs and keyword tensors
    (position embeddings, masks) plus the output of the batch being computed, counted storage by storage.
    Memory a layer uses inside its own forward call (one batch's) is not included; the process peaks are."""

    def __init__(self):
        self.peak = 0

    def observe(self, held: int) -> None:
        self.peak = max(self.peak, held)


def process_memory_peaks() -> dict:
    """The process's peak memory so far (so at least calibration's): resident set, and allocated memory per
    CUDA device when CUDA was used."""
    import sys

    peaks = {}
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peaks["process_peak_rss_bytes"] = int(rss if sys.platform == "darwin" else rss * 1024)   # Linux: KiB
    except ImportError:  # Windows
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peaks["process_peak_cuda_bytes"] = {f"cuda:{i}": int(torch.cuda.max_memory_allocated(i))
                                            for i in range(torch.cuda.device_count())}
    return peaks


def _layer_stats(adapter: ModelAdapter, layer: nn.Module) -> LayerStats:
    attn, mlp = adapter.attention_linears(layer), adapter.mlp_linears(layer)
    return LayerStats(ChannelStats.zeros(attn.q.in_features), ChannelStats.zeros(attn.o.in_features),
                      ChannelStats.zeros(mlp.gate.in_features), ChannelStats.zeros(mlp.down.in_features))


def _calibrate_chunk(adapter: ModelAdapter, stats: list[LayerStats], input_ids: torch.Tensor, batch_size: int,
                     meter: ActivationMeter, advance) -> None:
    """Take one chunk of samples through every layer, adding to ``stats``."""
    hidden_states, keywords = [], []   # per batch: the current layer's input; every layer's keyword inputs
    for args, per_layer in _capture_layer_inputs(adapter, input_ids, batch_size):
        hidden_states.append(args[0] if args else per_layer[0]["hidden_states"])
        for kwargs in per_layer:
            kwargs.pop("hidden_states", None)
        keywords.append(per_layer)
    keyword_bytes = tensor_bytes(keywords)
    hidden_bytes = [tensor_bytes(h) for h in hidden_states]
    meter.observe(keyword_bytes + sum(hidden_bytes))
    for layer_index, (layer, layer_stats) in enumerate(zip(adapter.layers(), stats)):
        attn, mlp = adapter.attention_linears(layer), adapter.mlp_linears(layer)
        hooks = [
            module.register_forward_pre_hook(lambda _m, args, s=s: s.update(args[0]))
            for module, s in ((adapter.attention_input(layer), layer_stats.attn_in), (attn.o, layer_stats.o_in),
                              (adapter.mlp_input(layer), layer_stats.mlp_in), (mlp.down, layer_stats.down_in))
        ]
        device = execution_device(layer)
        try:
            with onloaded(layer):   # an offloaded layer is read once per chunk, not once per batch
                for i, hidden in enumerate(hidden_states):
                    kwargs = {k: _to(v, device) for k, v in keywords[i][layer_index].items()}
                    out = layer(hidden.to(device), **kwargs)
                    out = out[0] if isinstance(out, tuple) else out
                    out_bytes = tensor_bytes(out)
                    meter.observe(keyword_bytes + sum(hidden_bytes) + out_bytes)
                    hidden_states[i], hidden_bytes[i] = out, out_bytes
        finally:
            for handle in hooks:
                handle.remove()
        advance()


@torch.no_grad()
def calibrate(model, tokenizer, adapter: ModelAdapter, config: CalibrationConfig, progress: bool = True) -> CalibrationResult:
    """Collect per-channel input statistics of every decoder layer on the calibration text."""
    from tqdm.auto import tqdm

    source = load_text(config.source, config.split, config.data_dir)
    input_ids = calibration_batch(tokenizer, source, config.num_samples, config.seq_len, config.seed)
    stats = [_layer_stats(adapter, layer) for layer in adapter.layers()]
    chunk = config.samples_per_chunk
    starts = range(0, input_ids.shape[0], chunk)
    meter = ActivationMeter()
    with tqdm(total=len(starts) * len(stats), desc="calibrating layers", disable=not progress, leave=False) as bar:
        for start in starts:
            _calibrate_chunk(adapter, stats, input_ids[start : start + chunk], config.batch_size, meter, bar.update)
    extra = {"chunks": len(starts), "peak_activation_bytes": meter.peak} | process_memory_peaks()
    return CalibrationResult(stats, config, tokens=int(input_ids.numel()), origin=source.origin, extra=extra)
