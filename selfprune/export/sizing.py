"""Per-tensor GGUF types and the exact bytes of the file they make, before anything is written.

A search that trades pruning against quantization (issue 32) must count a candidate's file to the byte: each
tensor's rows in its type (``quantize.row_bytes``) padded to the file's alignment, plus the header, metadata and
tensor infos. The metadata of a model's candidates is the same size whatever their widths (per-layer counts are
fixed-size integers), so it is measured once from a file of the same model (``GGUFLayout.from_file``) and every
other candidate is counted from its tensor list. ``effective_type`` is llama.cpp's own fallback for rows a type
cannot hold (llama-quant.cpp, ``tensor_type_fallback``), so a planned type is the type the file will have.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import SelfpruneError
from .quantize import TypeOverride, ggml_library, ggml_type, tensor_bytes

#: llama.cpp's fallback when a row length is not a multiple of the type's block (then F16 if that fails too).
FALLBACK = {"iq1_s": "iq4_nl", "iq1_m": "iq4_nl", "iq2_xxs": "iq4_nl", "iq2_xs": "iq4_nl", "iq2_s": "iq4_nl",
            "iq3_xxs": "iq4_nl", "iq3_s": "iq4_nl", "iq4_xs": "iq4_nl", "q2_k": "q4_0", "q3_k": "q4_0",
            "tq1_0": "q4_0", "tq2_0": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}


def block_size(type_name: str) -> int:
    return int(ggml_library().ggml_blck_size(ggml_type(type_name)))


def effective_type(type_name: str, row_length: int) -> str:
    """The type llama.cpp's quantizer stores rows of ``row_length`` values in when asked for ``type_name``."""
    type_name = type_name.lower()
    if row_length % block_size(type_name) == 0:
        return type_name
    fallback = FALLBACK.get(type_name, type_name)
    return fallback if row_length % block_size(fallback) == 0 else "f16"


def fits_rows(type_name: str, row_length: int) -> bool:
    """Whether ``type_name`` stores rows of ``row_length`` values as asked (no fallback)."""
    return effective_type(type_name, row_length) == type_name.lower()


def tensor_info_bytes(name: str, n_dims: int) -> int:
    """A GGUF tensor info: name (u64 length + bytes), n_dims (u32), dims (u64 each), type (u32), offset (u64)."""
    return 8 + len(name.encode()) + 4 + 8 * n_dims + 4 + 8


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]   # PyTorch order: rows x row length
    type: str

    @property
    def nbytes(self) -> int:
        size = tensor_bytes(self.type, self.shape)
        if not size:
            raise SelfpruneError(f"{self.name}: rows of {self.shape[-1]} values cannot be stored as {self.type}")
        return size


@dataclass(frozen=True)
class GGUFLayout:
    """What a model's files share: header + metadata bytes (before the tensor infos) and the data alignment."""

    kv_bytes: int
    alignment: int = 32

    @classmethod
    def from_file(cls, path: str | Path) -> "GGUFLayout":
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        if not reader.tensors:
            raise SelfpruneError(f"{path} holds no tensors: give a GGUF model file")
        return cls(min(t.field.offset for t in reader.tensors), int(reader.alignment))

    def file_bytes(self, tensors: list[PlannedTensor]) -> int:
        """The file's exact size: header, metadata and tensor infos padded to the alignment, then each tensor's
        data padded to it (the layout gguf writers and llama.cpp's quantizer use)."""
        infos = sum(tensor_info_bytes(t.name, len(t.shape)) for t in tensors)
        return _align(self.kv_bytes + infos, self.alignment) + sum(_align(t.nbytes, self.alignment) for t in tensors)


def gguf_tensor_shapes(model, ffn_multiple: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, PyTorch shape) of every tensor the export writes for ``model``, in its order."""
    from ..adapters import get_adapter
    from .gguf_export import PADDED_FAMILIES, _llama3_rope_factors, _rope_settings, _tensors, layer_shapes, padded_writer

    adapter = get_adapter(model)
    if adapter.model_type in PADDED_FAMILIES:
        pairs = padded_writer(adapter.model_type).tensors(model, ffn_multiple)
        return [(name, tuple(tensor.shape)) for name, tensor in pairs]
    out = []
    theta, rope = _rope_settings(model.config)
    if (rope.get("rope_type") or rope.get("type") or "default").lower() == "llama3":
        out.append(("rope_freqs.weight", tuple(_llama3_rope_factors(rope, adapter.head_dim, theta).shape)))
    out += [(name, tuple(tensor.shape)) for name, tensor in _tensors(model, layer_shapes(model, ffn_multiple))]
    return out


def plan_types(shapes: list[tuple[str, tuple[int, ...]]], types: dict[str, str], default: str) -> list[PlannedTensor]:
    """Each tensor with the type the quantizer will give it: 1-D tensors (norms, biases) stay f32; a 2-D tensor
    gets ``types[name]`` (else ``default``) or llama.cpp's fallback for its row length."""
    planned = []
    for name, shape in shapes:
        if len(shape) < 2:
            planned.append(PlannedTensor(name, shape, "f32"))
        else:
            planned.append(PlannedTensor(name, shape, effective_type(types.get(name, default), shape[-1])))
    return planned


def exact_overrides(types: dict[str, str]) -> list[TypeOverride]:
    """One override per tensor, matching its name only (llama.cpp applies the first override that matches)."""
    return [TypeOverride(f"^{re.escape(name)}$", type_name) for name, type_name in types.items()]
