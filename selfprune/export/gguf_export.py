"""Write a dense or pruned LLaMA / Mistral model as a GGUF file that stock llama.cpp runs.

llama.cpp's plain ``llama`` graph uses layer 0's head counts and MLP width for every layer, so pruned
models are written with the ``deci`` architecture (Nemotron-NAS), whose graph builds each layer with its
own query heads, key-value heads and MLP width, and adds the optional ``attn_output`` / ``ffn_down`` biases
that FLAP's compensation leaves. Dense models use the same writer (every layer has the same shape).

What makes the file compute exactly what the PyTorch model computes:
- q and k rows are permuted per layer with that layer's query / key-value head count, as llama.cpp's HF
  converter does (its rope pairs dimensions i and i + head_dim/2 the GPT-J way after the permutation);
- ``attention.key_length`` / ``value_length`` and the rope dimension are written as head_dim explicitly
  (llama.cpp would otherwise derive them from layer 0, which may have been pruned);
- rope base, rope scaling and the RMS epsilon come from the config; a tied output matrix is not written
  (llama.cpp uses ``token_embd.weight`` when ``output.weight`` is absent, as its own converter relies on);
- the tokenizer fields are copied from a GGUF with the same vocabulary (the default model's) or built from
  the Hugging Face tokenizer the way llama.cpp's converter builds a BPE vocabulary.

Layers whose heads or MLP channels are all gone are written with 0 (llama.cpp skips that block), except
where llama.cpp's ``deci`` graph would then compute something else: it drops the attention output of a
layer whose MLP width is 0, ignores ``attn_output.bias`` when a layer has no heads, and derives head_dim
from layer 0's head count. There one all-zero stand-in (a head, or an MLP channel) is written, which
contributes exactly its bias (or nothing) and costs next to no compute.

Other outtypes than f32 / f16 are made by llama.cpp's own quantizer from a temporary f32 file, with its preset's
per-tensor rules, optional pattern overrides and an optional importance matrix (``quantize.py``).

MLP widths are written padded with all-zero channels to a multiple of ``ffn_multiple`` (default 32; the
outputs are unchanged: a channel whose gate and up rows are zero contributes nothing). A pruned width such as
1229 otherwise costs twice in llama.cpp: its quantizer cannot put a row of 1229 values into 32-value blocks,
so ``ffn_down`` falls back to F16 in a q8_0 / q4_k_m file (a 20% pruned SmolLM2 q8_0 was then 2% smaller than
the dense one instead of 13%), and prompt processing leaves llama.cpp's fast matrix kernels for odd sizes
(bench/results/gguf.md measures both).
"""
from __future__ import annotations

import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import SelfpruneError
from ..io import output_lock
from .quantize import PRESETS, WRITTEN_DIRECTLY, ImportanceMatrix, TypeOverride, check_outtype, run_llama_quantize

log = logging.getLogger(__name__)

ARCH = "deci"
SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "phi3", "gemma3_text", "gemma2", "qwen3")
#: families written with another llama.cpp graph than ``deci`` (module with ``write``), every layer padded to one shape
PADDED_FAMILIES = {"gemma3_text": "gguf_padded", "gemma2": "gguf_padded", "qwen3": "gguf_padded"}
#: outtype -> llama.cpp's ``LLAMA_FTYPE_*`` constant (the presets of ``llama-quantize``)
OUTTYPES = PRESETS
#: MLP widths are padded to a multiple of this (the block size of llama.cpp's q8_0 / q4_0 / q5_0 types).
DEFAULT_FFN_MULTIPLE = 32


@dataclass(frozen=True)
class LayerShape:
    """What one block is written as (after stand-ins), and what the model itself has."""

    heads: int
    kv_heads: int
    ffn: int
    model_heads: int
    model_ffn: int

    @property
    def stand_in_head(self) -> bool:
        return self.heads != self.model_heads

    @property
    def stand_in_channel(self) -> bool:
        return self.model_ffn == 0 and self.ffn > 0

    @property
    def padded_channels(self) -> int:
        """All-zero channels added to reach the written width (0 for a stand-in or an unpadded layer)."""
        return self.ffn - self.model_ffn if self.model_ffn else 0


def check_exportable(model) -> None:
    """A one-line error for a model llama.cpp's graphs cannot express, before anything is written."""
    from ..adapters import get_adapter

    adapter = get_adapter(model)
    family = adapter.model_type
    if family not in SUPPORTED_FAMILIES:
        raise SelfpruneError(f"GGUF export supports {', '.join(SUPPORTED_FAMILIES)}, not {family!r}")
    if family in PADDED_FAMILIES:
        padded_writer(family).check(model)
    if family == "phi3" and float(getattr(model.config, "partial_rotary_factor", 1.0) or 1.0) != 1.0:
        raise SelfpruneError("Phi-3 with a partial rotary factor cannot be exported yet: llama.cpp's deci graph "
                             "rotates whole heads")
    window = getattr(model.config, "sliding_window", None)
    if family in ("mistral", "phi3") and window and window < getattr(model.config, "max_position_embeddings", 0):
        log.warning("sliding window %d is not written: llama.cpp's deci graph attends to the whole context", window)


def layer_shapes(model, ffn_multiple: int = 1) -> list[LayerShape]:
    """What each block is written as; MLP widths rounded up to ``ffn_multiple`` with zero channels."""
    from ..adapters import get_adapter

    if ffn_multiple < 1:
        raise SelfpruneError(f"ffn_multiple {ffn_multiple} must be 1 or more (1 writes the pruned widths as they are)")
    adapter = get_adapter(model)
    shapes = []
    for index, layer in enumerate(adapter.layers()):
        n_q, n_kv, width = adapter.layer_shape(layer)
        heads, kv_heads, ffn = n_q, n_kv, width
        o_bias = adapter.attention_linears(layer).o.bias is not None
        down_bias = adapter.mlp_linears(layer).down.bias is not None
        if n_q == 0 and (o_bias or index == 0):
            heads, kv_heads = 1, 1
        elif n_q == 0:
            kv_heads = 0
        if width == 0 and (heads > 0 or down_bias):
            ffn = 1
        elif width:
            ffn = -(-width // ffn_multiple) * ffn_multiple
        if heads > 0 and kv_heads == 0:  # deci would read this as a "linear attention" block
            raise SelfpruneError(f"layer {index} has query heads but no key-value heads: this model cannot be exported")
        shapes.append(LayerShape(heads, kv_heads, ffn, n_q, width))
    return shapes


def _permute_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's ``LlamaModel.permute``: HF's rotate-half layout to the interleaved pairs its rope expects."""
    if n_heads == 0:
        return weight
    return (weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _rope_settings(config) -> tuple[float, dict]:
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = getattr(config, "rope_scaling", None) or {}
    params = {**scaling, **params}
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return float(theta), params


def _llama3_rope_factors(params: dict, head_dim: int, theta: float) -> np.ndarray:
    """The per-frequency divisors llama.cpp's converter writes as ``rope_freqs`` for LLaMA-3 rope scaling."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    factor = params.get("factor", 8.0)
    low, high = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    old_context = params.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_context / low, old_context / high
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


# -- tokenizer ------------------------------------------------------------------------------------------
def _hf_tokens(tokenizer, vocab_size: int) -> list[str]:
    vocab = tokenizer.get_vocab()
    reverse = {i: t for t, i in vocab.items()}
    return [reverse.get(i, f"[PAD{i}]") for i in range(vocab_size)]


def _gguf_tokens(path: Path) -> list[str] | None:
    from ..models.gguf_metadata import read_metadata

    return read_metadata(path).get("tokenizer.ggml.tokens", (None,))[0]


def default_model_gguf() -> Path | None:
    """The GGUF the default model (SmolLM2) comes from, if installed."""
    from ..models import loading

    finder = getattr(loading, "packaged_default_gguf", None) or getattr(loading, "_packaged_default_gguf")
    return finder()


def padded_writer(family: str):
    """The module that writes ``family`` (a key of PADDED_FAMILIES) padded to one shape per layer."""
    import importlib

    return importlib.import_module(f"{__package__}.{PADDED_FAMILIES[family]}")


def find_tokenizer_gguf(tokenizer, vocab_size: int) -> Path | None:
    """The GGUF of a model selfprune installs offline (SmolLM2, Gemma 3 270M) whose vocabulary is this
    tokenizer's, else None."""
    from ..models.loading import cache_dir, packaged_default_gguf

    if tokenizer is None:
        return None
    candidates = [packaged_default_gguf(), cache_dir() / "gguf" / "gemma-3-270m-q4_k_m.gguf"]
    for candidate in candidates:
        if candidate is None or not Path(candidate).is_file():
            continue
        tokens = _gguf_tokens(Path(candidate))
        if tokens is not None and len(tokens) == vocab_size and tokens == _hf_tokens(tokenizer, vocab_size):
            return Path(candidate)
    return None


def _copy_tokenizer_fields(writer, source: Path, vocab_size: int) -> None:
    from ..models.gguf_metadata import read_metadata

    fields = {name: f for name, f in read_metadata(source).items() if name.startswith("tokenizer.")}
    if "tokenizer.ggml.tokens" not in fields:
        raise SelfpruneError(f"{source} carries no tokenizer: give a GGUF file with tokenizer metadata")
    count = len(fields["tokenizer.ggml.tokens"][0])
    if count != vocab_size:
        raise SelfpruneError(f"{source} has {count} tokens but the model has {vocab_size}: give the source model's GGUF")
    for name, (value, kind, item_kind) in fields.items():
        writer.add_key_value(name, value, kind, sub_type=item_kind)


def _build_tokenizer_fields(writer, tokenizer, vocab_size: int) -> None:
    """A BPE vocabulary from the HF tokenizer, as llama.cpp's converter builds it (``_set_vocab_gpt2``)."""
    import json

    import gguf

    if tokenizer is None:
        raise SelfpruneError("no tokenizer to write into the GGUF file: pass the model's tokenizer")
    state = json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else {}
    model = state.get("model", {})
    if model.get("type") != "BPE":
        raise SelfpruneError(f"only BPE tokenizers can be written into GGUF here, not {model.get('type')!r}: "
                             "pass tokenizer_gguf, a GGUF file of the source model")
    added = {t.content: t for t in tokenizer.added_tokens_decoder.values()}
    tokens = _hf_tokens(tokenizer, vocab_size)
    types = [gguf.TokenType.UNUSED if t.startswith("[PAD") and t not in tokenizer.get_vocab()
             else gguf.TokenType.CONTROL if t in added and added[t].special
             else gguf.TokenType.USER_DEFINED if t in added else gguf.TokenType.NORMAL for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if not merges:  # llama.cpp's BPE loader needs the key; a merge of two special tokens never applies to text
        special = [t for t, k in zip(tokens, types) if k == gguf.TokenType.CONTROL] or tokens[-1:]
        merges = [f"{special[0]} {special[0]}"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    vocab = tokenizer.get_vocab()
    for kind, token in (("bos", tokenizer.bos_token), ("eos", tokenizer.eos_token), ("pad", tokenizer.pad_token)):
        if token in vocab:
            getattr(writer, f"add_{kind}_token_id")(vocab[token])
    writer.add_add_bos_token(False)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


# -- writing --------------------------------------------------------------------------------------------
def _array(tensor: torch.Tensor, dtype) -> np.ndarray:
    return tensor.detach().to(device="cpu", dtype=torch.float32).numpy().astype(dtype, copy=False)


def _pad_rows(tensor: torch.Tensor, count: int) -> torch.Tensor:
    """``tensor`` with ``count`` zero rows appended (along dim 0)."""
    if not count:
        return tensor
    return torch.cat([tensor.detach(), tensor.new_zeros((count, *tensor.shape[1:]))])


def _tensors(model, shapes: list[LayerShape]):
    """(name, tensor) pairs in llama.cpp's naming, with stand-ins for emptied blocks."""
    from ..adapters import get_adapter

    adapter = get_adapter(model)
    hidden, head_dim = adapter.hidden_size, adapter.head_dim
    decoder = adapter.decoder()
    embed = decoder.embed_tokens.weight
    yield "token_embd.weight", embed
    for index, (layer, shape) in enumerate(zip(adapter.layers(), shapes)):
        attn, mlp = adapter.attention_linears(layer), adapter.mlp_linears(layer)
        prefix = f"blk.{index}"
        if shape.heads:
            yield f"{prefix}.attn_norm.weight", layer.input_layernorm.weight
            if shape.stand_in_head:  # zero q/k/v: the head's output is 0 and o_proj adds only its bias
                zeros = torch.zeros(head_dim, hidden)
                q = k = v = zeros
                o = torch.zeros(hidden, head_dim)
            else:
                q = _permute_rope_rows(attn.q.weight, shape.heads)
                k = _permute_rope_rows(attn.k.weight, shape.kv_heads)
                v, o = attn.v.weight, attn.o.weight
            yield f"{prefix}.attn_q.weight", q
            yield f"{prefix}.attn_k.weight", k
            yield f"{prefix}.attn_v.weight", v
            yield f"{prefix}.attn_output.weight", o
            if not shape.stand_in_head:
                for name, linear, heads in (("attn_q", attn.q, shape.heads), ("attn_k", attn.k, shape.kv_heads)):
                    if linear.bias is not None:
                        yield f"{prefix}.{name}.bias", _permute_rope_rows(linear.bias, heads)
                if attn.v.bias is not None:
                    yield f"{prefix}.attn_v.bias", attn.v.bias
            if attn.o.bias is not None:
                yield f"{prefix}.attn_output.bias", attn.o.bias
        if shape.ffn:
            yield f"{prefix}.ffn_norm.weight", layer.post_attention_layernorm.weight
            if shape.stand_in_channel:  # gate = up = 0: silu(0) * 0 = 0, so the block adds only down's bias
                yield f"{prefix}.ffn_gate.weight", torch.zeros(1, hidden)
                yield f"{prefix}.ffn_up.weight", torch.zeros(1, hidden)
                yield f"{prefix}.ffn_down.weight", torch.zeros(hidden, 1)
            else:  # zero channels up to the written width: gate = up = 0 there, so they add nothing
                pad = shape.padded_channels
                yield f"{prefix}.ffn_gate.weight", _pad_rows(mlp.gate.weight, pad)
                yield f"{prefix}.ffn_up.weight", _pad_rows(mlp.up.weight, pad)
                yield f"{prefix}.ffn_down.weight", _pad_rows(mlp.down.weight.T, pad).T
                for name, linear in (("ffn_gate", mlp.gate), ("ffn_up", mlp.up)):
                    if linear.bias is not None:
                        yield f"{prefix}.{name}.bias", _pad_rows(linear.bias, pad)
            if mlp.down.bias is not None:
                yield f"{prefix}.ffn_down.bias", mlp.down.bias
    yield "output_norm.weight", decoder.norm.weight
    if not ties_embeddings(model):
        yield "output.weight", model.get_output_embeddings().weight


def ties_embeddings(model) -> bool:
    """Whether the output matrix is the embedding matrix (then the file holds it once, as llama.cpp's converter
    writes it): the same tensor, or equal values under a config that declares them tied."""
    output, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if output is None:
        return True
    if output.weight is embed.weight or output.weight.data_ptr() == embed.weight.data_ptr():
        return True
    declared = getattr(model.config, "tie_word_embeddings", False)
    return bool(declared) and output.weight.shape == embed.weight.shape and torch.equal(output.weight, embed.weight)


def _add_metadata(writer, metadata: dict) -> None:
    for key, value in metadata.items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, list):
            writer.add_array(key, value)
        else:
            writer.add_uint32(key, int(value))


def _write_gguf(model, tokenizer, path: Path, float_type: str, tokenizer_gguf: Path | None, name: str,
                ffn_multiple: int = 1, metadata: dict | None = None) -> None:
    import gguf

    from ..adapters import get_adapter

    adapter = get_adapter(model)
    vocab_size = model.get_input_embeddings().weight.shape[0]
    if adapter.model_type in PADDED_FAMILIES:
        def add_tokenizer(writer):
            if tokenizer_gguf is not None:
                _copy_tokenizer_fields(writer, Path(tokenizer_gguf), vocab_size)
            else:
                _build_tokenizer_fields(writer, tokenizer, vocab_size)

        padded_writer(adapter.model_type).write(model, tokenizer, path, float_type, tokenizer_gguf, name, ffn_multiple,
                                                 metadata or {}, _add_metadata, add_tokenizer)
        return
    config = model.config
    shapes = layer_shapes(model, ffn_multiple)
    head_dim = adapter.head_dim
    theta, rope = _rope_settings(config)
    rope_type = (rope.get("rope_type") or rope.get("type") or "default").lower()

    writer = gguf.GGUFWriter(str(path), ARCH)
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if float_type == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    writer.add_block_count(len(shapes))
    writer.add_context_length(int(getattr(config, "max_position_embeddings", 2048)))
    writer.add_embedding_length(adapter.hidden_size)
    writer.add_head_count([s.heads for s in shapes])
    writer.add_head_count_kv([s.kv_heads for s in shapes])
    writer.add_feed_forward_length([s.ffn for s in shapes])
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(vocab_size)
    extra = {}
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope_type == "llama3":
        extra["rope_freqs.weight"] = _llama3_rope_factors(rope, head_dim, theta)
    elif rope_type != "default":
        raise SelfpruneError(f"rope scaling {rope_type!r} is not supported by the GGUF export: use default, linear or llama3")
    _add_metadata(writer, metadata or {})
    if tokenizer_gguf is not None:
        _copy_tokenizer_fields(writer, Path(tokenizer_gguf), vocab_size)
    else:
        _build_tokenizer_fields(writer, tokenizer, vocab_size)

    weight_dtype = np.float32 if float_type == "f32" else np.float16
    for tensor_name, array in extra.items():
        writer.add_tensor(tensor_name, array)
    for tensor_name, tensor in _tensors(model, shapes):
        two_d = tensor.dim() == 2  # norms and biases stay f32, as llama.cpp's converter keeps them
        writer.add_tensor(tensor_name, _array(tensor, weight_dtype if two_d else np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _temp_sibling(path: Path, suffix: str) -> Path:
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(handle)
    return Path(name)


def _publish(tmp: Path, out_path: Path) -> None:
    """Give the finished temporary file the umask's normal mode, flush it to disk and rename it into place."""
    from ..io import default_file_mode

    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.chmod(tmp, default_file_mode())
    os.replace(tmp, out_path)


def quantize_gguf(source: str | os.PathLike, out_path: str | os.PathLike, outtype: str, threads: int = 0,
                  importance: dict[str, np.ndarray] | None = None,
                  tensor_types: list[TypeOverride] | None = None) -> Path:
    """llama.cpp's quantizer (through llama-cpp-python) from an f32/f16 GGUF; the output appears whole or not at all.

    ``importance``: importance-matrix weights by tensor name (each as long as the tensor's rows);
    ``tensor_types``: pattern overrides of the preset's per-tensor types. Tensors whose row length a type cannot
    hold fall back to another type inside llama.cpp (a 32-block type, else F16); the file is still valid.
    """
    outtype = check_outtype(outtype)
    source, out_path = Path(source), Path(out_path)
    check_gguf_file(source)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(out_path, ".partial")
    try:
        run_llama_quantize(source, tmp, outtype, threads, importance, tensor_types)
        _publish(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return out_path


def importance_for_file(model, imatrix: ImportanceMatrix, ffn_multiple: int) -> dict[str, np.ndarray]:
    """The quantizer's importance weights for the tensors as written: every entry must match the model's widths
    (a matrix of another model, or of the model before pruning, is refused); ffn_down entries are extended over
    the zero channels the export pads with (their weights are zero: any importance gives the same bytes)."""
    from ..adapters import get_adapter

    adapter = get_adapter(model)
    weights = imatrix.means()
    padded = adapter.model_type in PADDED_FAMILIES
    shapes = layer_shapes(model, ffn_multiple)
    spec = (getattr(model.config, "selfprune", None) or {}).get("layers")
    out = {}
    for index, (layer, shape) in enumerate(zip(adapter.layers(), shapes)):
        attn, mlp = adapter.attention_linears(layer), adapter.mlp_linears(layer)
        ffn = padded_writer(adapter.model_type).padded_ffn(model, ffn_multiple) if padded else shape.ffn
        for name, linear in (("attn_q", attn.q), ("attn_k", attn.k), ("attn_v", attn.v), ("attn_output", attn.o),
                             ("ffn_gate", mlp.gate), ("ffn_up", mlp.up), ("ffn_down", mlp.down)):
            key = f"blk.{index}.{name}.weight"
            values = weights.get(key)
            if values is None or not padded and (name == "attn_output" and shape.stand_in_head
                                                 or name == "ffn_down" and shape.stand_in_channel):
                continue
            if values.size != linear.in_features:
                raise SelfpruneError(f"the importance matrix has {values.size} values for {key}, but the model's "
                                     f"{name} takes {linear.in_features} inputs: compute it for this model "
                                     "(selfprune imatrix, or export --calibrate)")
            fill = float(values.mean()) if values.size else 1.0   # zero rows and columns: any weight gives their bytes
            if name == "ffn_down" and ffn > values.size:
                values = np.concatenate([values, np.full(ffn - values.size, fill, np.float32)])
            if name == "attn_output" and padded:   # heads back at their original positions, as the weights are
                heads = model.config.num_attention_heads
                kept = spec[index]["kept_query_heads"] if spec else list(range(heads))
                values = padded_writer(adapter.model_type).scatter_heads(
                    torch.from_numpy(values), kept, heads, adapter.head_dim, fill).numpy()
            out[key] = values
    return out


def _quiet_native_output():
    """llama-cpp-python's redirect of the C library's stdout/stderr, unless logging is at DEBUG level."""
    import contextlib

    try:
        from llama_cpp._utils import suppress_stdout_stderr
    except ImportError:
        return contextlib.nullcontext()
    return suppress_stdout_stderr(disable=log.isEnabledFor(logging.DEBUG))


def check_gguf_file(path: str | os.PathLike) -> Path:
    """A GGUF file that exists, parses and holds all its tensors, or a one-line error (``checkpoints.check_gguf``)."""
    from ..checkpoints import check_gguf

    return check_gguf(path)


def export_gguf(model, tokenizer, out_path: str | os.PathLike, outtype: str = "f16",
                tokenizer_gguf: str | os.PathLike | None = None, overwrite: bool = False, threads: int = 0,
                ffn_multiple: int = DEFAULT_FFN_MULTIPLE, imatrix: ImportanceMatrix | None = None,
                tensor_types: list[TypeOverride] | None = None, imatrix_source: str | None = None) -> Path:
    """Write ``model`` (dense or pruned LLaMA / Mistral) as a GGUF file llama.cpp runs; returns its path.

    ``tokenizer_gguf``: a GGUF whose tokenizer fields are copied (same vocabulary); if None, the packaged
    default model's GGUF when the vocabularies match, else a BPE vocabulary built from ``tokenizer``.
    The file is written under a temporary name and renamed, so a failed export leaves nothing behind.
    ``ffn_multiple``: MLP widths are padded with zero channels to a multiple of it (1: as pruned; see the module
    docstring for why 32 is the default). ``imatrix``: the model's importance matrix (``selfprune.imatrix``), given
    to llama.cpp's quantizer and recorded in the file as ``llama-quantize`` records it (``imatrix_source`` names
    its file). ``tensor_types``: per-tensor type overrides of the preset (``quantize.parse_tensor_types``).
    """
    outtype = check_outtype(outtype)
    out_path = Path(out_path).expanduser()
    if out_path.exists() and not overwrite:
        raise SelfpruneError(f"output file {out_path} already exists: choose another path or pass overwrite=True")
    if out_path.is_dir():
        raise SelfpruneError(f"output path {out_path} is a folder: give a file path ending in .gguf")
    check_exportable(model)
    layer_shapes(model, ffn_multiple)  # a bad ffn_multiple is refused before anything is written
    if tensor_types and outtype in ("f32", "f16", "bf16"):
        raise SelfpruneError(f"--tensor-types needs a quantized outtype (llama.cpp applies overrides within its "
                             f"quantized presets only), not {outtype}: e.g. --outtype q8_0 with ffn_down=f16")
    quantized = outtype not in WRITTEN_DIRECTLY
    importance, metadata = None, {}
    if imatrix is not None and quantized:
        importance = importance_for_file(model, imatrix, ffn_multiple)  # a mismatched matrix fails before writing
        metadata = {"quantize.imatrix.file": imatrix_source or "selfprune",
                    "quantize.imatrix.dataset": (imatrix.datasets or ["selfprune"])[0],
                    "quantize.imatrix.entries_count": len(importance),
                    "quantize.imatrix.chunks_count": imatrix.tokens // max(imatrix.chunk_size, 1)}
    vocab_size = model.get_input_embeddings().weight.shape[0]
    if tokenizer_gguf is not None:
        tokenizer_gguf = check_gguf_file(tokenizer_gguf)
    else:
        tokenizer_gguf = find_tokenizer_gguf(tokenizer, vocab_size)
    name = Path(getattr(model.config, "_name_or_path", "") or "model").name or "model"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    float_type = "f32" if quantized else outtype
    with output_lock(out_path):   # one writer per file; what a killed export left is removed first
        tmp = _temp_sibling(out_path, f".{float_type}.partial")
        try:
            _write_gguf(model, tokenizer, tmp, float_type, tokenizer_gguf, name, ffn_multiple, metadata)
            if not quantized:
                _publish(tmp, out_path)
            else:
                quantize_gguf(tmp, out_path, outtype, threads, importance, tensor_types)
        finally:
            tmp.unlink(missing_ok=True)
    return out_path
