"""Gemma 3 and Qwen3 as llama.cpp's ``gemma3`` / ``qwen3`` architectures, pruned layers padded to one shape.

llama.cpp's ``gemma3`` and ``qwen3`` graphs build every layer with layer 0's head counts and MLP width (they have
no per-layer widths, unlike ``deci``, and ``deci`` has no q/k norms), and they have no o_proj / down_proj bias. So a pruned model is written with every layer's
heads back at their original positions (the removed heads' q / k / v rows and o columns all zero: their output is
zero, exactly what the pruned model computes) and every MLP padded with zero channels to the widest kept layer
(a channel whose gate and up rows are zero adds nothing). A layer left with no heads or channels becomes all zero
rows, and (Gemma) the post-attention / post-MLP RMS norms of a zero vector are zero: the residual passes unchanged,
as in the pruned model. The padding costs file bytes and compute, which the frontier benchmark reports; pruned
biases cannot be written (prune with ``--bias-compensation off``, which the refit then follows).

Gemma's norm weights are written plus one (its RMS norm multiplies by ``1 + w``; llama.cpp's by the stored value),
and q / k rows keep Hugging Face's layout (llama.cpp runs both families' rope in the NeoX layout), as llama.cpp's
converter does.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import SelfpruneError


class Family:
    """What differs between the padded graphs: the architecture name, the norm weights' offset, the norms by
    GGUF name -> the decoder layer's attribute, and whether the output matrix may be untied."""

    def __init__(self, arch: str, norm_shift: float, norms: dict[str, str], qk_norms: bool = True,
                 attention_softcap: bool = False):
        self.arch, self.norm_shift, self.norms = arch, norm_shift, norms
        self.qk_norms, self.attention_softcap = qk_norms, attention_softcap


_GEMMA_NORMS = {"attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
                "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
FAMILIES = {
    "gemma3_text": Family("gemma3", 1.0, _GEMMA_NORMS),
    "gemma2": Family("gemma2", 1.0, _GEMMA_NORMS, qk_norms=False, attention_softcap=True),
    "qwen3": Family("qwen3", 0.0, {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}),
}


def family_of(model) -> Family:
    from ..adapters import get_adapter

    return FAMILIES[get_adapter(model).model_type]


def architecture(model) -> str:
    return family_of(model).arch


def _spec_layers(model) -> list[dict] | None:
    spec = getattr(model.config, "selfprune", None)
    return spec.get("layers") if spec else None


def check(model) -> None:
    """One-line refusals before anything is written."""
    from ..adapters import get_adapter

    adapter = get_adapter(model)
    arch = family_of(model).arch
    for index, layer in enumerate(adapter.layers()):
        attn, mlp = adapter.attention_linears(layer), adapter.mlp_linears(layer)
        if attn.o.bias is not None or mlp.down.bias is not None:
            raise SelfpruneError(f"layer {index} has an o_proj / down_proj bias, which llama.cpp's {arch} graph cannot "
                                 f"add: prune with --bias-compensation off to export it (a --reconstruct lstsq refit "
                                 "then fits without a bias)")
        if any(linear.bias is not None for linear in (mlp.gate, mlp.up)):
            raise SelfpruneError(f"layer {index} has MLP gate / up biases, which llama.cpp's {arch} graph cannot add")
    layers = _spec_layers(model)
    if layers is not None and any("kept_query_heads" not in spec for spec in layers):
        raise SelfpruneError("this pruned model lacks its kept head indices (selfprune_indices.json): save it again "
                             "with selfprune")


def padded_ffn(model, ffn_multiple: int) -> int:
    """The one MLP width every layer is written with: the widest kept layer, rounded up to ``ffn_multiple``."""
    from ..adapters import get_adapter

    adapter = get_adapter(model)
    widest = max(adapter.mlp_linears(layer).down.in_features for layer in adapter.layers())
    return -(-widest // ffn_multiple) * ffn_multiple if widest else ffn_multiple


def scatter_heads(weight: torch.Tensor, kept: list[int], total: int, head_dim: int, fill: float = 0.0) -> torch.Tensor:
    """Rows of the kept heads put back at their original head positions, ``fill`` elsewhere."""
    out = weight.new_full((total * head_dim, *weight.shape[1:]), fill)
    for position, head in enumerate(kept):
        out[head * head_dim:(head + 1) * head_dim] = weight[position * head_dim:(position + 1) * head_dim]
    return out


def tensors(model, ffn_multiple: int):
    """(name, tensor) pairs in llama.cpp's naming, padded to one shape per layer."""
    from ..adapters import get_adapter
    from .gguf_export import ties_embeddings

    family = family_of(model)

    def _norm(weight: torch.Tensor) -> torch.Tensor:
        return weight.detach().float() + family.norm_shift

    adapter = get_adapter(model)
    config = model.config
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, adapter.head_dim
    ffn = padded_ffn(model, ffn_multiple)
    spec = _spec_layers(model)
    decoder = adapter.decoder()
    yield "token_embd.weight", decoder.embed_tokens.weight
    for index, layer in enumerate(adapter.layers()):
        attn, mlp = adapter.attention_linears(layer), adapter.mlp_linears(layer)
        kept_q = spec[index]["kept_query_heads"] if spec else list(range(heads))
        kept_kv = spec[index]["kept_kv_heads"] if spec else list(range(kv_heads))
        prefix = f"blk.{index}"
        self_attn = adapter.attention(layer)
        for gguf_name, attribute in family.norms.items():
            yield f"{prefix}.{gguf_name}.weight", _norm(getattr(layer, attribute).weight)
        for gguf_name, linear, kept, total in (("attn_q", attn.q, kept_q, heads), ("attn_k", attn.k, kept_kv, kv_heads),
                                               ("attn_v", attn.v, kept_kv, kv_heads)):
            if linear.bias is not None:
                yield f"{prefix}.{gguf_name}.bias", scatter_heads(linear.bias.detach(), kept, total, head_dim)
        yield f"{prefix}.attn_q.weight", scatter_heads(attn.q.weight.detach(), kept_q, heads, head_dim)
        yield f"{prefix}.attn_k.weight", scatter_heads(attn.k.weight.detach(), kept_kv, kv_heads, head_dim)
        yield f"{prefix}.attn_v.weight", scatter_heads(attn.v.weight.detach(), kept_kv, kv_heads, head_dim)
        yield f"{prefix}.attn_output.weight", scatter_heads(attn.o.weight.detach().T, kept_q, heads, head_dim).T
        if family.qk_norms:
            yield f"{prefix}.attn_q_norm.weight", _norm(self_attn.q_norm.weight)
            yield f"{prefix}.attn_k_norm.weight", _norm(self_attn.k_norm.weight)
        pad = ffn - mlp.down.in_features
        zeros = mlp.gate.weight.new_zeros((pad, mlp.gate.in_features))
        yield f"{prefix}.ffn_gate.weight", torch.cat([mlp.gate.weight.detach(), zeros])
        yield f"{prefix}.ffn_up.weight", torch.cat([mlp.up.weight.detach(), zeros])
        yield f"{prefix}.ffn_down.weight", torch.cat([mlp.down.weight.detach().T, zeros]).T
    yield "output_norm.weight", _norm(decoder.norm.weight)
    if not ties_embeddings(model):
        yield "output.weight", model.get_output_embeddings().weight


def write_metadata(writer, model, ffn_multiple: int) -> None:
    from ..adapters import get_adapter

    config = model.config
    adapter = get_adapter(model)
    layer_types = list(getattr(config, "layer_types", None) or [])
    rope = dict(getattr(config, "rope_parameters", None) or {})
    full = rope.get("full_attention", rope) if isinstance(rope.get("full_attention"), dict) else rope
    local = rope.get("sliding_attention", {}) if isinstance(rope.get("sliding_attention"), dict) else {}
    for which in (full, local):
        kind = (which.get("rope_type") or "default").lower()
        if kind not in ("default", "linear"):
            raise SelfpruneError(f"rope scaling {kind!r} is not supported by the Gemma 3 GGUF export: use default or linear")
    writer.add_block_count(adapter.num_layers)
    writer.add_context_length(int(getattr(config, "max_position_embeddings", 32768)))
    writer.add_embedding_length(adapter.hidden_size)
    writer.add_feed_forward_length(padded_ffn(model, ffn_multiple))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_head_count_kv(int(config.num_key_value_heads))
    writer.add_key_length(adapter.head_dim)
    writer.add_value_length(adapter.head_dim)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_freq_base(float(full.get("rope_theta", getattr(config, "rope_theta", 1e6))))
    writer.add_vocab_size(model.get_input_embeddings().weight.shape[0])
    if (full.get("rope_type") or "default").lower() == "linear":
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(full["factor"]))
    window = getattr(config, "sliding_window", None)
    if window and "sliding_attention" in layer_types:
        writer.add_sliding_window(int(window))
        writer.add_sliding_window_pattern([kind == "sliding_attention" for kind in layer_types])
        if local.get("rope_theta") is not None:
            writer.add_rope_freq_base_swa(float(local["rope_theta"]))
    softcap = getattr(config, "final_logit_softcapping", None)
    if softcap:
        writer.add_final_logit_softcapping(float(softcap))
    softcap = getattr(config, "attn_logit_softcapping", None)
    if softcap and family_of(model).attention_softcap:
        writer.add_attn_logit_softcapping(float(softcap))
    elif softcap:
        raise SelfpruneError(f"attention logit soft-capping is not in llama.cpp's {family_of(model).arch} graph: "
                             "this model cannot be exported")
    scalar = getattr(config, "query_pre_attn_scalar", None)
    arch = family_of(model).arch
    # llama.cpp scales queries by 1/sqrt(head_dim), or by 1/sqrt(hidden/heads) for the 27B models it knows by depth
    big = {"gemma3": 62, "gemma2": 46}.get(arch) == adapter.num_layers
    if scalar is not None and scalar != (adapter.hidden_size // config.num_attention_heads if big else adapter.head_dim):
        raise SelfpruneError(f"query_pre_attn_scalar {scalar} is not what llama.cpp's {arch} graph scales attention by: "
                             "this model cannot be exported")


def padding_cost(model, ffn_multiple: int) -> dict:
    """Parameters written as zeros to give every layer one shape (a pruned model's price in this graph)."""
    from ..adapters import get_adapter

    adapter = get_adapter(model)
    config = model.config
    hidden, head_dim, ffn = adapter.hidden_size, adapter.head_dim, padded_ffn(model, ffn_multiple)
    dense_attn = hidden * head_dim * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    zeros = 0
    for layer in adapter.layers():
        attn, mlp = adapter.attention_linears(layer), adapter.mlp_linears(layer)
        kept = sum(m.weight.numel() for m in (attn.q, attn.k, attn.v, attn.o))
        zeros += dense_attn - kept + 3 * hidden * (ffn - mlp.down.in_features)
    return {"zero_parameters": int(zeros), "ffn": ffn}


def write(model, tokenizer, path: Path, float_type: str, tokenizer_gguf: Path | None, name: str,
          ffn_multiple: int, metadata: dict, add_metadata, add_tokenizer) -> None:
    import gguf

    check(model)
    writer = gguf.GGUFWriter(str(path), family_of(model).arch)
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if float_type == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    write_metadata(writer, model, ffn_multiple)
    add_metadata(writer, metadata)
    add_tokenizer(writer)
    weight_dtype = np.float32 if float_type == "f32" else np.float16
    for tensor_name, tensor in tensors(model, ffn_multiple):
        array = tensor.detach().to(device="cpu", dtype=torch.float32).numpy()
        writer.add_tensor(tensor_name, array.astype(weight_dtype if array.ndim == 2 else np.float32, copy=False))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
