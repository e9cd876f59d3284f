"""Speed of a pruned model next to its dense baseline: prefill throughput, decode latency, memory, FLOPs.

Structured pruning only pays if the smaller matrices run faster, and the FLOPs ratio is the ceiling of
that gain, so every measured time ratio is printed beside the ideal ratio from the counted FLOPs. Both
models are measured in one process, interleaved repeat by repeat (dense, pruned, then pruned, dense, ...),
so a noisy neighbour or a clock change slows both alike instead of biasing one; each figure is the median
of the repeats after warm-up runs. CUDA timings synchronize the device around every timed call.

Inputs are random token ids: the cost of a forward pass does not depend on the weights or the text.
"""
from __future__ import annotations

import os
import statistics
import threading
import time

import torch

from ..errors import SelfpruneError

DEFAULT_SWEEP = ((1, 128), (8, 128))


# -- counting --------------------------------------------------------------------------------------------
def flop_parts(model, seq_len: int) -> dict:
    """Forward FLOPs per token, split into ``linear`` (every projection and lm_head) and ``attention``.

    Linear: 2 x in x out for every ``nn.Linear`` as it is now (so pruned layers count with their own
    widths). Attention: QK^T and softmax(QK^T)V each cost 2 x head_dim x ``seq_len`` per query head, with
    the layer's own number of query heads (GQA shares K/V but every query head still does its products).
    ``seq_len`` is the number of keys a token attends to; prefill kernels compute the full L x L score
    matrix under the causal mask, so pass L for a prefill of L tokens, the position for a decode step.
    Norms, rotary embeddings, activations and softmax are elementwise and left out, as in Kaplan et al.
    """
    from ..adapters import get_adapter

    if seq_len < 1:
        raise SelfpruneError(f"sequence length {seq_len} must be at least 1")
    adapter = get_adapter(model)
    linear = sum(2 * m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    query_heads = sum(adapter.layer_shape(layer)[0] for layer in adapter.layers())
    attention = 4 * query_heads * adapter.head_dim * seq_len
    return {"linear": linear, "attention": attention, "total": linear + attention}


def flops_per_token(model, seq_len: int) -> int:
    """Forward FLOPs per token at ``seq_len`` keys (see ``flop_parts``); exact for heterogeneous layers."""
    return flop_parts(model, seq_len)["total"]


def model_facts(model) -> dict:
    """Sizes that explain a speed difference: parameters, their bytes, and the KV cache per token."""
    from ..adapters import get_adapter

    adapter = get_adapter(model)
    params = sum(p.numel() for p in model.parameters())
    tensor_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    kv_heads = sum(adapter.layer_shape(layer)[1] for layer in adapter.layers())
    dtype = next(model.parameters()).dtype
    return {
        "parameters": params,
        "parameter_and_buffer_bytes": tensor_bytes,
        "kv_cache_bytes_per_token": 2 * kv_heads * adapter.head_dim * torch.finfo(dtype).bits // 8,
        "layer_shapes": [list(adapter.layer_shape(layer)) for layer in adapter.layers()],
        "dtype": str(dtype).removeprefix("torch."),
    }


# -- timing ----------------------------------------------------------------------------------------------
def _device_of(model) -> torch.device:
    from ..offload import input_device

    return input_device(model)  # a model placed with device_map may hold its first parameter on "meta"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> float:
    """Seconds of ``fn()``; on CUDA the queue is drained before and after, so the GPU work is counted."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _random_ids(model, batch_size: int, seq_len: int, device, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch_size, seq_len), generator=generator).to(device)


def _prefill_fn(model, batch_size: int, seq_len: int):
    ids = _random_ids(model, batch_size, seq_len, _device_of(model))

    @torch.inference_mode()
    def run():
        model(ids, use_cache=False)

    return run


def _decode_fn(model, prompt_len: int, new_tokens: int, batch_size: int = 1):
    """A function that prefills a prompt (untimed) and returns the seconds of ``new_tokens`` greedy steps.

    The loop is written out (not ``generate``) so exactly ``new_tokens`` steps run, each feeding one token
    and the KV cache, with no sampling or stopping logic in the timed part.
    """
    device = _device_of(model)
    ids = _random_ids(model, batch_size, prompt_len, device, seed=1)

    @torch.inference_mode()
    def run() -> float:
        out = model(ids, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        _sync(device)
        start = time.perf_counter()
        for _ in range(new_tokens):
            out = model(token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        _sync(device)
        return time.perf_counter() - start

    return run


def _check_counts(warmup: int, repeats: int) -> None:
    if warmup < 0:
        raise SelfpruneError(f"warm-up runs {warmup} must be 0 or more")
    if repeats < 1:
        raise SelfpruneError(f"repeats {repeats} must be at least 1: the median needs one timed run")


def _prefill_result(times: list[float], batch_size: int, seq_len: int) -> dict:
    median = statistics.median(times)
    return {"median_s": median, "tokens_per_s": batch_size * seq_len / median, "times_s": times}


def _decode_result(times: list[float], new_tokens: int) -> dict:
    median = statistics.median(times)
    return {"ms_per_token": 1000 * median / new_tokens, "tokens_per_s": new_tokens / median, "times_s": times}


def measure_prefill(model, batch_size: int, seq_len: int, warmup: int = 2, repeats: int = 5, device=None) -> dict:
    """Median seconds and tokens/s of one forward pass over ``batch_size`` x ``seq_len`` random tokens."""
    _check_counts(warmup, repeats)
    if device is not None:
        model.to(device)
    run = _prefill_fn(model, batch_size, seq_len)
    device = _device_of(model)
    for _ in range(warmup):
        run()
    times = [_timed(run, device) for _ in range(repeats)]
    return {"batch_size": batch_size, "seq_len": seq_len, **_prefill_result(times, batch_size, seq_len)}


def measure_decode(model, prompt_len: int = 128, new_tokens: int = 32, warmup: int = 1, repeats: int = 5,
                   device=None, batch_size: int = 1) -> dict:
    """Median milliseconds per generated token with the KV cache, after a ``prompt_len``-token prompt."""
    _check_counts(warmup, repeats)
    if new_tokens < 1:
        raise SelfpruneError(f"decode tokens {new_tokens} must be at least 1")
    if device is not None:
        model.to(device)
    run = _decode_fn(model, prompt_len, new_tokens, batch_size)
    for _ in range(warmup):
        run()
    times = [run() for _ in range(repeats)]
    return {"prompt_len": prompt_len, "new_tokens": new_tokens, "batch_size": batch_size,
            **_decode_result(times, new_tokens)}


def resident_bytes() -> int | None:
    """This process's resident memory now (Linux /proc only; None elsewhere)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


class _RssPeak:
    """Samples this process's resident memory every millisecond while a block runs (Linux /proc only)."""

    def __init__(self):
        self.start = self.peak = resident_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.wait(0.001):
            rss = resident_bytes()
            if rss is not None:
                self.peak = max(self.peak, rss)

    def __enter__(self):
        if self.start is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self.start is not None:
            self._thread.join()
            self.peak = max(self.peak, resident_bytes() or 0)


def _trim_heap() -> None:
    """Hand freed C-heap pages back to the OS (glibc), so the next pass's RSS growth is its own."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory(model, batch_size: int = 1, seq_len: int = 128, passes: int = 3) -> dict:
    """Peak memory of one forward pass of ``batch_size`` x ``seq_len`` tokens; ``method`` says how it was taken.

    CUDA: ``torch.cuda.max_memory_allocated`` (weights + activations, exact for PyTorch's allocator).
    CPU: there is no allocator counter, so it reports the exact parameter+buffer bytes plus the growth of
    the resident set sampled during the pass, after returning freed heap pages to the OS, median of
    ``passes`` (approximate: sampling can miss a short peak and the allocator may still reuse pages).
    """
    device = _device_of(model)
    run = _prefill_fn(model, batch_size, seq_len)
    tensors = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    result = {"batch_size": batch_size, "seq_len": seq_len, "parameter_and_buffer_bytes": tensors}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        run()
        torch.cuda.synchronize(device)
        return result | {"method": "torch.cuda.max_memory_allocated",
                         "peak_bytes": torch.cuda.max_memory_allocated(device)}
    growth = []
    for _ in range(max(1, passes)):
        _trim_heap()
        with _RssPeak() as rss:
            run()
        if rss.start is None:
            return result | {"method": "parameter+buffer bytes only (no /proc/self/statm)", "peak_bytes": tensors}
        growth.append(rss.peak - rss.start)
    median = int(statistics.median(growth))
    return result | {"method": "parameter+buffer bytes (exact) + RSS growth sampled during the pass (approximate)",
                     "rss_growth_bytes": median, "peak_bytes": tensors + median}


# -- dense vs pruned ----------------------------------------------------------------------------------------
def interleaved_times(runs: dict, warmup: int, repeats: int, measure=lambda fn: fn(),
                      tick=lambda: None) -> dict[str, list[float]]:
    """Warm each function up, then time them in alternating order per repeat (ABBA), cancelling drift.
    ``tick`` is called after every run (the progress bar)."""
    names = list(runs)
    for _ in range(warmup):
        for name in names:
            runs[name]()
            tick()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(measure(runs[name]))
            tick()
    return times


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def compare_speed(model, baseline, *, sweep=DEFAULT_SWEEP, decode_tokens: int = 32, prompt_len: int = 128,
                  warmup: int = 2, repeats: int = 5, memory: bool = True, progress: bool = False) -> dict:
    """Measure ``model`` (pruned) and ``baseline`` (dense) in one run; ratios are pruned / dense.

    ``sweep`` lists (batch size, sequence length) prefill settings; decode generates ``decode_tokens``
    after a ``prompt_len`` prompt (batch 1); ``decode_tokens=0`` skips it. Each time ratio comes with
    ``ideal_ratio`` = FLOPs(pruned) / FLOPs(dense) at that context length: the speed-up a kernel that
    scales perfectly with matrix size would give. Both models must already sit on the same device.
    ``progress`` shows a bar counting the timed and warm-up runs of both models.
    """
    _check_counts(warmup, repeats)
    sweep = [(int(b), int(s)) for b, s in sweep]
    if not sweep and decode_tokens < 1:
        raise SelfpruneError("nothing to measure: give at least one --sweep setting or --decode-tokens >= 1")
    if any(b < 1 or s < 1 for b, s in sweep):
        raise SelfpruneError(f"sweep {sweep} has a batch size or sequence length below 1: use e.g. 1x128,8x128")
    device = _device_of(model)
    if _device_of(baseline) != device:
        raise SelfpruneError(f"the pruned model is on {device} but the baseline on {_device_of(baseline)}: "
                             "load both on the same --device")
    if model.config.vocab_size != baseline.config.vocab_size:
        raise SelfpruneError(f"vocabularies differ ({model.config.vocab_size} vs {baseline.config.vocab_size}): "
                             "compare a pruned model with the dense model it was pruned from")
    models = {"dense": baseline, "pruned": model}
    result = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "warmup": warmup,
        "repeats": repeats,
        "statistic": "median",
        "order": "interleaved per repeat (dense, pruned / pruned, dense alternating)",
        "models": {name: model_facts(m) for name, m in models.items()},
        "prefill": [],
        "decode": None,
    }
    params = {name: f["parameters"] for name, f in result["models"].items()}
    result["parameter_ratio"] = params["pruned"] / params["dense"]
    from tqdm.auto import tqdm

    runs_total = len(models) * (len(sweep) * (warmup + repeats) + (max(1, warmup) + repeats if decode_tokens >= 1 else 0))
    bar = tqdm(total=runs_total, desc="speed", unit="run", disable=not progress, leave=False)
    for batch_size, seq_len in sweep:
        runs = {name: _prefill_fn(m, batch_size, seq_len) for name, m in models.items()}
        bar.set_postfix_str(f"prefill {batch_size}x{seq_len}", refresh=False)
        times = interleaved_times(runs, warmup, repeats, lambda fn: _timed(fn, device), lambda: bar.update(1))
        row = {"batch_size": batch_size, "seq_len": seq_len}
        row |= {name: _prefill_result(times[name], batch_size, seq_len) for name in models}
        flops = {name: flops_per_token(m, seq_len) for name, m in models.items()}
        row |= {"flops_per_token": flops, "time_ratio": _ratio(row["pruned"]["median_s"], row["dense"]["median_s"]),
                "ideal_ratio": flops["pruned"] / flops["dense"]}
        result["prefill"].append(row)
    if decode_tokens >= 1:
        runs = {name: _decode_fn(m, prompt_len, decode_tokens) for name, m in models.items()}
        bar.set_postfix_str(f"decode {decode_tokens} tokens", refresh=False)
        times = interleaved_times(runs, max(1, warmup), repeats, lambda fn: fn(), lambda: bar.update(1))
        context = prompt_len + (decode_tokens + 1) // 2  # the middle of the generated span
        flops = {name: flops_per_token(m, context) for name, m in models.items()}
        row = {"prompt_len": prompt_len, "new_tokens": decode_tokens, "batch_size": 1, "flops_context": context}
        row |= {name: _decode_result(times[name], decode_tokens) for name in models}
        row |= {"flops_per_token": flops,
                "time_ratio": _ratio(row["pruned"]["ms_per_token"], row["dense"]["ms_per_token"]),
                "ideal_ratio": flops["pruned"] / flops["dense"]}
        result["decode"] = row
    bar.close()
    if memory:
        batch_size, seq_len = max(sweep, key=lambda bs: bs[0] * bs[1]) if sweep else (1, prompt_len)
        mem = {name: peak_memory(m, batch_size, seq_len) for name, m in models.items()}
        result["memory"] = {"dense": mem["dense"], "pruned": mem["pruned"],
                            "peak_ratio": mem["pruned"]["peak_bytes"] / mem["dense"]["peak_bytes"]}
    return result


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


# -- presentation --------------------------------------------------------------------------------------------
def _human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def format_speed(result: dict) -> str:
    """A plain table: dense, pruned, measured pruned/dense and the ideal ratio from FLOPs."""
    rows = [("", "dense", "pruned", "pruned/dense", "ideal (FLOPs)")]
    d, p = result["models"]["dense"], result["models"]["pruned"]
    rows.append(("parameters", _human(d["parameters"]), _human(p["parameters"]), f"{result['parameter_ratio']:.3f}", ""))
    for row in result["prefill"]:
        label = f"prefill {row['batch_size']}x{row['seq_len']}"
        rows.append((f"{label} ms", f"{1000 * row['dense']['median_s']:.2f}", f"{1000 * row['pruned']['median_s']:.2f}",
                     f"{row['time_ratio']:.3f}", f"{row['ideal_ratio']:.3f}"))
        rows.append((f"{label} tok/s", f"{row['dense']['tokens_per_s']:.0f}", f"{row['pruned']['tokens_per_s']:.0f}",
                     "", ""))
        f = row["flops_per_token"]
        rows.append((f"{label} FLOPs/tok", _human(f["dense"]), _human(f["pruned"]), "", ""))
    if result.get("decode"):
        row = result["decode"]
        rows.append((f"decode ms/token ({row['prompt_len']}+{row['new_tokens']})", f"{row['dense']['ms_per_token']:.2f}",
                     f"{row['pruned']['ms_per_token']:.2f}", f"{row['time_ratio']:.3f}", f"{row['ideal_ratio']:.3f}"))
    if result.get("memory"):
        m = result["memory"]
        rows.append(("peak memory", _human(m["dense"]["peak_bytes"], "B"), _human(m["pruned"]["peak_bytes"], "B"),
                     f"{m['peak_ratio']:.3f}", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
             for r in rows]
    header = (f"{result['device']} ({result['device_name']}), torch {result['torch']}, {result['threads']} threads, "
              f"median of {result['repeats']} after {result['warmup']} warm-up, interleaved")
    notes = []
    if result.get("memory"):
        notes.append(f"memory: {result['memory']['dense']['method']}")
    return "\n".join([header, *lines, *notes])


# -- command line -------------------------------------------------------------------------------------------
def parse_sweep(text: str) -> list[tuple[int, int]]:
    """``"1x128,8x128"`` -> [(1, 128), (8, 128)]."""
    sweep = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        parts = item.lower().split("x")
        try:
            batch_size, seq_len = (int(v) for v in parts)
        except ValueError:
            raise SelfpruneError(f"--sweep entry {item!r} is not BATCHxSEQLEN: write e.g. --sweep 1x128,8x512") from None
        if batch_size < 1 or seq_len < 1:
            raise SelfpruneError(f"--sweep entry {item!r} needs a batch size and length of at least 1")
        sweep.append((batch_size, seq_len))
    return sweep
