"""A model's weights as llama.cpp will compute with them: each tensor quantized to its GGUF type and dequantized.

ggml quantizes a tensor row by row (a row is one output unit: its input weights), each row on its own with the
same per-column importance weights, so a row's values do not depend on the order of rows in the file (the export
permutes q / k rows for llama.cpp's rotary layout). The only thing that changes a row is the zero columns the
export pads ``ffn_down`` with (MLP widths rounded up to ``ffn_multiple``): they are added here too before
quantizing and dropped after. The result, evaluated in PyTorch, is what a joint pruning + quantization search
scores (issue 32): bit-equal weights to the file's, computed before the file exists.
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import SelfpruneError
from .quantize import dequantize_tensor, quantize_tensor
from .sizing import fits_rows


def gguf_weights(model, ffn_multiple: int) -> list[tuple[str, torch.nn.Parameter, int]]:
    """(GGUF name, the model's parameter, written row length) of every matrix the export quantizes.

    ``ffn_down``'s written rows are longer than the model's when the export pads the MLP; every other matrix is
    written with the model's own row length. Layers written as stand-ins (no heads or no channels) have none.
    """
    from ..adapters import get_adapter
    from .gguf_export import PADDED_FAMILIES, layer_shapes, ties_embeddings

    adapter = get_adapter(model)
    if adapter.model_type in PADDED_FAMILIES:
        raise SelfpruneError(f"quantized evaluation of {adapter.model_type} is not supported yet: llama.cpp's graph for "
                             "it writes removed heads back as zero columns of attn_output, which changes its blocks")
    decoder = adapter.decoder()
    out = [("token_embd.weight", decoder.embed_tokens.weight, decoder.embed_tokens.weight.shape[1])]
    for index, (layer, shape) in enumerate(zip(adapter.layers(), layer_shapes(model, ffn_multiple))):
        prefix = f"blk.{index}"
        if shape.heads and not shape.stand_in_head:
            attn = adapter.attention_linears(layer)
            for name, linear in (("attn_q", attn.q), ("attn_k", attn.k), ("attn_v", attn.v), ("attn_output", attn.o)):
                out.append((f"{prefix}.{name}.weight", linear.weight, linear.weight.shape[1]))
        if shape.ffn and not shape.stand_in_channel:
            mlp = adapter.mlp_linears(layer)
            out.append((f"{prefix}.ffn_gate.weight", mlp.gate.weight, mlp.gate.weight.shape[1]))
            out.append((f"{prefix}.ffn_up.weight", mlp.up.weight, mlp.up.weight.shape[1]))
            out.append((f"{prefix}.ffn_down.weight", mlp.down.weight, shape.ffn))
    if not ties_embeddings(model):
        head = model.get_output_embeddings().weight
        out.append(("output.weight", head, head.shape[1]))
    return out


def fake_quantize(weight: torch.Tensor, type_name: str, written_length: int,
                  importance: np.ndarray | None = None) -> torch.Tensor:
    """``weight`` (rows x columns) as ggml stores it in ``type_name`` and reads it back, rows zero-padded to
    ``written_length`` for the quantizer as the file pads them."""
    rows, columns = weight.shape
    if type_name == "f32":
        return weight.detach().clone()
    values = np.zeros((rows, written_length), dtype=np.float32)
    values[:, :columns] = weight.detach().to(device="cpu", dtype=torch.float32).numpy()
    data = quantize_tensor(values, type_name, importance)
    restored = dequantize_tensor(data, type_name, (rows, written_length))[:, :columns]
    return torch.from_numpy(np.ascontiguousarray(restored)).to(dtype=weight.dtype, device=weight.device)


def quantize_weights_in_place(model, types: dict[str, str], importance: dict[str, np.ndarray] | None = None,
                              ffn_multiple: int = 32) -> dict[str, str]:
    """Replace every matrix the export quantizes by its quantized-then-dequantized values; returns the types used.

    ``types``: a type per GGUF tensor name, every matrix named (``sizing.plan_types`` gives the types llama.cpp
    will store); ``importance``: importance weights by tensor name as written (``importance_for_file``). A type
    that cannot hold a tensor's rows is refused: plan types first, so the evaluation and the file agree.
    """
    used = {}
    for name, parameter, written in gguf_weights(model, ffn_multiple):
        if name not in types:
            raise SelfpruneError(f"no type given for {name}: give every matrix a type (sizing.plan_types)")
        type_name = types[name].lower()
        if not fits_rows(type_name, written):   # float types hold any row (blocks of one value)
            raise SelfpruneError(f"{name}: rows of {written} values cannot be stored as {type_name}; llama.cpp would "
                                 "fall back to another type (plan the types with sizing.plan_types)")
        entry = None if importance is None else importance.get(name)
        with torch.no_grad():
            parameter.data.copy_(fake_quantize(parameter.data, type_name, written, entry))
        used[name] = type_name
    return used
