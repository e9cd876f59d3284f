"""Perplexity and speed computed by llama.cpp (llama-cpp-python) on GGUF files, dense and pruned alike.

Perplexity uses the same non-overlapping windows of token ids as the PyTorch evaluator
(``selfprune.data.token_windows`` with the model's Hugging Face tokenizer), so the two engines' numbers are
comparable to the last digit when the weights are the same; only the logits come from llama.cpp.

Speed follows ``selfprune.evaluation.speed``: dense and pruned files are loaded in one process and timed
interleaved repeat by repeat (ABBA), medians after warm-up, each time ratio beside the FLOPs ideal counted
from the file's own per-layer shapes. Prefill is one batch of ``prompt_len`` tokens; decode feeds
``decode_tokens`` single tokens after it, with the KV cache. Thread counts are switched on the same loaded
contexts, so every thread count sees the same memory layout.
"""
from __future__ import annotations

import ctypes
import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import SelfpruneError


# -- the file --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GGUFFacts:
    path: str
    file_bytes: int
    architecture: str
    hidden: int
    head_dim: int
    vocab_size: int
    heads: list[int]
    kv_heads: list[int]
    ffn: list[int]
    file_type: str

    def flops_per_token(self, context: int) -> dict:
        """Forward FLOPs per token (same convention as ``speed.flop_parts``): 2 x in x out per matrix
        (lm_head included) plus 4 x head_dim x ``context`` per query head for QK^T and attention x V."""
        h, hd = self.hidden, self.head_dim
        linear = 2 * self.vocab_size * h
        for q, kv, ff in zip(self.heads, self.kv_heads, self.ffn):
            linear += 2 * h * hd * (2 * q + 2 * kv) + 2 * 3 * h * ff
        attention = 4 * sum(self.heads) * hd * context
        return {"linear": linear, "attention": attention, "total": linear + attention}

    def to_dict(self) -> dict:
        return {"path": self.path, "file_bytes": self.file_bytes, "architecture": self.architecture,
                "file_type": self.file_type, "hidden": self.hidden, "head_dim": self.head_dim,
                "vocab_size": self.vocab_size, "heads": self.heads, "kv_heads": self.kv_heads, "ffn": self.ffn}


def gguf_facts(path: str | os.PathLike) -> GGUFFacts:
    """Shapes and size of a GGUF file, read from its metadata (no weights loaded)."""
    from gguf import LlamaFileType

    from ..export import check_gguf_file
    from ..models.gguf_metadata import read_metadata

    path = check_gguf_file(path)
    fields = read_metadata(path)

    def value(key, default=None):
        return fields[key][0] if key in fields else default

    arch = value("general.architecture")
    blocks = int(value(f"{arch}.block_count"))

    def per_layer(key, default=None):
        got = value(f"{arch}.{key}", default)
        return [int(v) for v in got] if isinstance(got, list) else [int(got)] * blocks

    heads = per_layer("attention.head_count")
    hidden = int(value(f"{arch}.embedding_length"))
    head_dim = int(value(f"{arch}.attention.key_length", hidden // max(heads[0], 1)))
    vocab = int(value(f"{arch}.vocab_size", len(value("tokenizer.ggml.tokens", []))))
    ftype = value("general.file_type")
    try:
        ftype_name = LlamaFileType(ftype).name if ftype is not None else "unknown"
    except ValueError:
        ftype_name = str(ftype)
    return GGUFFacts(str(path), path.stat().st_size, arch, hidden, head_dim, vocab, heads,
                     per_layer("attention.head_count_kv", heads), per_layer("feed_forward_length"), ftype_name)


def _import_llama_cpp():
    try:
        import llama_cpp
    except (ImportError, OSError) as exc:
        raise SelfpruneError(f"llama-cpp-python is not usable ({type(exc).__name__}): pip install llama-cpp-python") from None
    return llama_cpp


class LlamaCppModel:
    """One GGUF file loaded in llama.cpp, with the few calls the evaluation needs (logits, greedy, timing).

    ``kv_f32`` keeps the KV cache in f32 instead of llama.cpp's default f16 (for exact comparisons).
    """

    def __init__(self, path: str | os.PathLike, n_ctx: int = 512, threads: int | None = None, all_logits: bool = True,
                 use_mmap: bool = True, kv_f32: bool = False):
        from ..export import check_gguf_file

        llama_cpp = _import_llama_cpp()
        self.path = check_gguf_file(path)
        self.threads = threads
        try:
            self.llm = llama_cpp.Llama(model_path=str(self.path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                                       n_threads=threads, n_threads_batch=threads, logits_all=all_logits,
                                       n_gpu_layers=0, use_mmap=use_mmap, verbose=False,
                                       **({"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if kv_f32 else {}))
        except ValueError as exc:
            raise SelfpruneError(f"llama.cpp could not load {self.path} ({exc}): export it again with selfprune export") from None
        self.n_ctx = n_ctx

    @property
    def vocab_size(self) -> int:
        return self.llm.n_vocab()

    def set_threads(self, threads: int) -> None:
        _import_llama_cpp().llama_set_n_threads(self.llm.ctx, threads, threads)
        self.threads = threads

    def logits(self, ids) -> np.ndarray:
        """Logits (tokens x vocab, float32) for one sequence, from an empty KV cache."""
        ids = [int(t) for t in ids]
        if len(ids) > self.n_ctx:
            raise SelfpruneError(f"{len(ids)} tokens do not fit the context of {self.n_ctx}: raise n_ctx")
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def greedy(self, ids, new_tokens: int) -> list[int]:
        """``new_tokens`` argmax continuations of ``ids`` with the KV cache (no sampler involved)."""
        ids = [int(t) for t in ids]
        self.llm.reset()
        self.llm.eval(ids)
        out = []
        for _ in range(new_tokens):
            token = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            out.append(token)
            self.llm.eval([token])
        return out

    def close(self) -> None:
        self.llm.close()


# -- perplexity ------------------------------------------------------------------------------------------
class _LlamaCppTokenizer:
    """llama.cpp's own tokenizer behind the call ``token_windows`` makes (used when no HF tokenizer is given)."""

    def __init__(self, llm):
        self.llm = llm

    def __call__(self, text: str, return_tensors: str = "pt"):
        import torch

        ids = self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        return type("Encoded", (), {"input_ids": torch.tensor([ids], dtype=torch.long)})()


def tokenizer_for_gguf(path: str | os.PathLike, tokenizer_spec: str | None = None):
    """The Hugging Face tokenizer that gives the PyTorch evaluator's windows for a GGUF file, or None.

    ``tokenizer_spec`` (a model folder, hub id or 'default') is loaded when given; otherwise the default
    model's tokenizer when the file carries the default model's vocabulary; otherwise None (llama.cpp's own).
    """
    from transformers import AutoTokenizer

    from ..export.gguf_export import _gguf_tokens, default_model_gguf
    from ..models.loading import resolve_model_spec

    if tokenizer_spec is not None:
        return AutoTokenizer.from_pretrained(resolve_model_spec(tokenizer_spec))
    default = default_model_gguf()
    if default is not None and _gguf_tokens(Path(path)) == _gguf_tokens(default):
        return AutoTokenizer.from_pretrained(resolve_model_spec("default"))
    return None


def window_nll(logits: np.ndarray, ids) -> float:
    """Summed negative log-likelihood of ids[1:] given logits[:-1] (float64 log-softmax)."""
    x = logits[:-1].astype(np.float64)
    targets = np.asarray(ids[1:], dtype=np.int64)
    peak = x.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(x - peak).sum(axis=1)) + peak[:, 0]
    return float((log_norm - x[np.arange(len(targets)), targets]).sum())


def gguf_perplexity(path: str | os.PathLike, tokenizer=None, dataset: str = "wikitext2", split: str = "test",
                    seq_len: int = 128, max_windows: int | None = None, data_dir=None, threads: int | None = None,
                    windows=None, progress: bool = False) -> dict:
    """Perplexity computed by llama.cpp over non-overlapping ``seq_len`` windows.

    ``tokenizer``: the model's Hugging Face tokenizer, which gives the very windows the PyTorch evaluator
    uses (recommended); if None, llama.cpp's tokenizer from the file (the result says which). ``windows``
    (a tensor of token ids, windows x seq_len) overrides dataset, split and tokenizer.
    """
    from tqdm.auto import tqdm

    from ..data import load_text, token_windows

    if seq_len < 2:
        raise SelfpruneError(f"seq_len {seq_len} is too short: use at least 2 (128 or 2048 are standard)")
    model = LlamaCppModel(path, n_ctx=seq_len if windows is None else int(windows.shape[1]), threads=threads)
    try:
        settings = {}
        if windows is None:
            source = load_text(dataset, split, data_dir)
            windows = token_windows(tokenizer or _LlamaCppTokenizer(model.llm), source, seq_len, max_windows)
            settings = {"dataset": source.name, "split": source.split, "origin": source.origin}
        settings |= {"seq_len": int(windows.shape[1]), "windows": int(windows.shape[0]), "tokens": int(windows.numel()),
                     "tokenizer": "huggingface" if tokenizer is not None else "llama.cpp"}
        if int(windows.max()) >= model.vocab_size:
            raise SelfpruneError(f"token id {int(windows.max())} is outside the file's vocabulary of {model.vocab_size}: "
                                 "use the tokenizer of the model the file was exported from")
        total, start = 0.0, time.perf_counter()
        for row in tqdm(windows.tolist(), desc="perplexity (llama.cpp)", disable=not progress, leave=False):
            total += window_nll(model.logits(row), row)
        predicted = int(windows.shape[0] * (windows.shape[1] - 1))
        nll = total / predicted
        return {"ppl": math.exp(nll), "nll": nll, "predicted_tokens": predicted, "engine": "llama.cpp",
                "model": str(path), "threads": threads, "seconds": time.perf_counter() - start, **settings}
    finally:
        model.close()


# -- speed -----------------------------------------------------------------------------------------------
def _prefill_run(model: LlamaCppModel, ids: list[int]):
    def run() -> float:
        model.llm.reset()
        start = time.perf_counter()
        model.llm.eval(ids)
        return time.perf_counter() - start

    return run


def _decode_run(model: LlamaCppModel, prompt: list[int], steps: list[int]):
    def run() -> float:
        model.llm.reset()
        model.llm.eval(prompt)  # untimed: the KV cache the decode steps attend to
        start = time.perf_counter()
        for token in steps:
            model.llm.eval([token])
        return time.perf_counter() - start

    return run


def compare_speed_gguf(model_path: str | os.PathLike, baseline_path: str | os.PathLike, *, threads=(1, 2),
                       prompt_len: int = 256, decode_tokens: int = 32, warmup: int = 2, repeats: int = 5,
                       seed: int = 0) -> dict:
    """Prefill and decode tokens/s of a pruned GGUF (``model_path``) and its dense one in one run, per thread count.

    Ratios are pruned / dense time, each beside ``ideal_ratio`` = FLOPs(pruned) / FLOPs(dense) from the files'
    shapes. ``resident_bytes`` is the growth of this process's resident memory while a file is loaded
    (without mmap, so the weights are read in) and run once: weights plus llama.cpp's buffers, approximate.
    """
    from .speed import cpu_name, interleaved_times, resident_bytes  # one timing protocol for both engines

    if warmup < 0 or repeats < 1:
        raise SelfpruneError(f"warmup {warmup} must be >= 0 and repeats {repeats} >= 1")
    if prompt_len < 1 or decode_tokens < 1:
        raise SelfpruneError(f"prompt_len {prompt_len} and decode_tokens {decode_tokens} must be at least 1")
    threads = [int(t) for t in threads]
    if not threads or min(threads) < 1:
        raise SelfpruneError(f"threads {threads} must list counts of at least 1")
    facts = {"dense": gguf_facts(baseline_path), "pruned": gguf_facts(model_path)}
    if facts["dense"].vocab_size != facts["pruned"].vocab_size:
        raise SelfpruneError("the two GGUF files have different vocabularies: compare a pruned file with its dense source")
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, facts["dense"].vocab_size, prompt_len).tolist()
    steps = rng.integers(0, facts["dense"].vocab_size, decode_tokens).tolist()
    models, resident = {}, {}
    try:
        for name, fact in facts.items():
            before = resident_bytes()
            models[name] = LlamaCppModel(fact.path, n_ctx=prompt_len + decode_tokens, threads=threads[0],
                                         all_logits=False, use_mmap=False)
            _prefill_run(models[name], prompt)()
            after = resident_bytes()
            resident[name] = after - before if before is not None and after is not None else None
        result = {
            "engine": "llama.cpp", "llama_cpp_python": _import_llama_cpp().__version__,
            "cpu": cpu_name(), "load_average_before": list(os.getloadavg()),
            "warmup": warmup, "repeats": repeats, "statistic": "median",
            "order": "interleaved per repeat (dense, pruned / pruned, dense alternating)",
            "prompt_len": prompt_len, "decode_tokens": decode_tokens,
            "models": {name: fact.to_dict() | {"resident_bytes": resident[name]} for name, fact in facts.items()},
            "file_ratio": facts["pruned"].file_bytes / facts["dense"].file_bytes,
            "threads": {},
        }
        prefill_flops = {n: f.flops_per_token(prompt_len)["total"] for n, f in facts.items()}
        context = prompt_len + (decode_tokens + 1) // 2
        decode_flops = {n: f.flops_per_token(context)["total"] for n, f in facts.items()}
        for count in threads:
            for model in models.values():
                model.set_threads(count)
            pre = interleaved_times({n: _prefill_run(m, prompt) for n, m in models.items()}, warmup, repeats)
            dec = interleaved_times({n: _decode_run(m, prompt, steps) for n, m in models.items()}, max(1, warmup), repeats)
            row = {"prefill": {}, "decode": {}}
            for name in models:
                p, d = statistics.median(pre[name]), statistics.median(dec[name])
                row["prefill"][name] = {"median_s": p, "tokens_per_s": prompt_len / p, "times_s": pre[name]}
                row["decode"][name] = {"median_s": d, "tokens_per_s": decode_tokens / d,
                                       "ms_per_token": 1000 * d / decode_tokens, "times_s": dec[name]}
            for kind, flops in (("prefill", prefill_flops), ("decode", decode_flops)):
                row[kind]["time_ratio"] = row[kind]["pruned"]["median_s"] / row[kind]["dense"]["median_s"]
                row[kind]["ideal_ratio"] = flops["pruned"] / flops["dense"]
            result["threads"][str(count)] = row
        result["load_average_after"] = list(os.getloadavg())
        return result
    finally:
        for model in models.values():
            model.close()


def format_speed_gguf(result: dict) -> str:
    """A plain table: dense, pruned, pruned/dense and the FLOPs ideal, per thread count."""
    d, p = result["models"]["dense"], result["models"]["pruned"]
    rows = [("", "dense", "pruned", "pruned/dense", "ideal (FLOPs)"),
            ("file MiB", f"{d['file_bytes'] / 2**20:.1f}", f"{p['file_bytes'] / 2**20:.1f}", f"{result['file_ratio']:.3f}", "")]
    if d.get("resident_bytes") and p.get("resident_bytes"):
        rows.append(("resident MiB", f"{d['resident_bytes'] / 2**20:.1f}", f"{p['resident_bytes'] / 2**20:.1f}",
                     f"{p['resident_bytes'] / d['resident_bytes']:.3f}", ""))
    for count, row in result["threads"].items():
        for kind, label in (("prefill", f"prefill {result['prompt_len']} tok/s"),
                            ("decode", f"decode {result['decode_tokens']} tok/s")):
            r = row[kind]
            rows.append((f"{label}, {count} thr", f"{r['dense']['tokens_per_s']:.1f}", f"{r['pruned']['tokens_per_s']:.1f}",
                         f"{r['time_ratio']:.3f}", f"{r['ideal_ratio']:.3f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    header = (f"llama.cpp (llama-cpp-python {result['llama_cpp_python']}), {result['cpu']}, median of "
              f"{result['repeats']} after {result['warmup']} warm-up, interleaved; time ratios are pruned/dense; "
              f"load average {result['load_average_before'][0]:.1f}")
    return "\n".join([header, *lines])


# -- llama.cpp's own importance matrix ---------------------------------------------------------------------------
class _GgmlTensor(ctypes.Structure):
    pass


_GgmlTensor._fields_ = [  # ggml.h's struct ggml_tensor (GGML_MAX_DIMS 4, GGML_MAX_OP_PARAMS 64, GGML_MAX_SRC 10)
    ("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4), ("nb", ctypes.c_size_t * 4),
    ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16), ("flags", ctypes.c_int32),
    ("src", ctypes.POINTER(_GgmlTensor) * 10), ("view_src", ctypes.POINTER(_GgmlTensor)), ("view_offs", ctypes.c_size_t),
    ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64), ("extra", ctypes.c_void_p), ("padding", ctypes.c_char * 8)]


def llamacpp_imatrix(path: str | os.PathLike, windows, threads: int = 1):
    """The importance matrix llama.cpp itself computes for a GGUF file on token ``windows`` (what ``llama-imatrix``
    collects: for every ``blk.*`` matrix multiplication of 16 tokens or more, the per-column sum of squared f32
    inputs), through the graph-evaluation callback. An independent check of ``selfprune.imatrix``."""
    from ..export import check_gguf_file
    from ..export.gguf_export import _quiet_native_output
    from ..export.quantize import ImportanceMatrix, ggml_library

    llama_cpp = _import_llama_cpp()
    path = check_gguf_file(path)
    windows = [[int(t) for t in w] for w in windows]
    lib = ggml_library()
    mul_mat = next(i for i in range(200) if lib.ggml_op_name(i) == b"MUL_MAT")
    result = ImportanceMatrix(datasets=[f"{len(windows)} windows"], chunk_size=len(windows[0]))

    def collect(tensor_ptr, ask, _user_data):
        t = ctypes.cast(tensor_ptr, ctypes.POINTER(_GgmlTensor)).contents
        if t.op != mul_mat or not t.src[0] or not t.src[1]:
            return False if ask else True
        src0, src1 = t.src[0].contents, t.src[1].contents
        name = src0.name.decode()
        wanted = name.startswith("blk.") and src1.type == 0 and src1.ne[1] * src1.ne[2] * src1.ne[3] >= 16
        if ask:
            return wanted
        if wanted:
            cols, rows = src1.ne[0], src1.ne[1] * src1.ne[2] * src1.ne[3]
            span = (rows - 1) * src1.nb[1] + cols * 4
            raw = np.ctypeslib.as_array((ctypes.c_uint8 * span).from_address(src1.data))
            x = np.lib.stride_tricks.as_strided(raw.view(np.float32), (rows, cols), (src1.nb[1], 4)).astype(np.float64)
            result.add(name, (x * x).sum(0), rows)
        return True

    callback = llama_cpp.ggml_backend_sched_eval_callback(collect)
    mparams = llama_cpp.llama_model_default_params()
    mparams.n_gpu_layers = 0
    with _quiet_native_output():
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
    if not model:
        raise SelfpruneError(f"llama.cpp could not load {path}: export it again with selfprune export")
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = max(len(w) for w in windows)
    cparams.n_threads = cparams.n_threads_batch = threads
    cparams.type_k = cparams.type_v = llama_cpp.GGML_TYPE_F32   # the PyTorch side attends in f32 too
    cparams.cb_eval, cparams.cb_eval_user_data = callback, None
    with _quiet_native_output():
        ctx = llama_cpp.llama_init_from_model(model, cparams)
    batch = llama_cpp.llama_batch_init(cparams.n_ctx, 0, 1)
    try:
        for window in windows:
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
            # logits for every token, as llama-imatrix asks: otherwise the last layer's MLP sees one row
            batch.n_tokens = len(window)
            for i, token in enumerate(window):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, i, 1, True
                batch.seq_id[i][0] = 0
            with _quiet_native_output():
                code = llama_cpp.llama_decode(ctx, batch)
            if code != 0:
                raise SelfpruneError(f"llama.cpp could not evaluate a window of {len(window)} tokens with {path}")
    finally:
        with _quiet_native_output():
            llama_cpp.llama_batch_free(batch)
            llama_cpp.llama_free(ctx)
            llama_cpp.llama_model_free(model)
    return result
