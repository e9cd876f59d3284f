"""llama.cpp's quantizer from Python: presets, per-tensor type overrides, importance matrices, and one tensor
at a time.

Files are quantized by llama.cpp itself (``llama_model_quantize`` in the library llama-cpp-python ships), so a
preset chooses every tensor's type by llama.cpp's own per-name rules and shape fallbacks and the bytes are the
ones ``llama-quantize`` writes. On top of the preset, ``tensor_types`` overrides types by pattern (llama.cpp's
``--tensor-type``: the first regular expression found in the tensor name wins) and an importance matrix (the
per-input-column mean of squared activations, what ``llama-imatrix`` collects) weights the rounding error of
every tensor it names.

The same ggml routines are reachable per tensor (``ggml_quantize_chunk``, and each type's ``to_float``): a
tensor's bytes can be computed before a file is written and its dequantized values evaluated in PyTorch,
equal to what llama.cpp computes with.
"""
from __future__ import annotations

import ctypes
import functools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import SelfpruneError

#: outtype -> llama.cpp's ``LLAMA_FTYPE_*`` constant; the presets of ``llama-quantize``, largest first.
PRESETS = {
    "f32": "LLAMA_FTYPE_ALL_F32",
    "f16": "LLAMA_FTYPE_MOSTLY_F16",
    "bf16": "LLAMA_FTYPE_MOSTLY_BF16",
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q5_k_s": "LLAMA_FTYPE_MOSTLY_Q5_K_S",
    "q5_1": "LLAMA_FTYPE_MOSTLY_Q5_1",
    "q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q4_k_s": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
    "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "iq4_xs": "LLAMA_FTYPE_MOSTLY_IQ4_XS",
    "iq4_nl": "LLAMA_FTYPE_MOSTLY_IQ4_NL",
    "q3_k_l": "LLAMA_FTYPE_MOSTLY_Q3_K_L",
    "q3_k_m": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
    "q3_k_s": "LLAMA_FTYPE_MOSTLY_Q3_K_S",
    "iq3_m": "LLAMA_FTYPE_MOSTLY_IQ3_M",
    "iq3_s": "LLAMA_FTYPE_MOSTLY_IQ3_S",
    "iq3_xs": "LLAMA_FTYPE_MOSTLY_IQ3_XS",
    "iq3_xxs": "LLAMA_FTYPE_MOSTLY_IQ3_XXS",
    "q2_k": "LLAMA_FTYPE_MOSTLY_Q2_K",
    "q2_k_s": "LLAMA_FTYPE_MOSTLY_Q2_K_S",
    "iq2_m": "LLAMA_FTYPE_MOSTLY_IQ2_M",
    "iq2_s": "LLAMA_FTYPE_MOSTLY_IQ2_S",
    "iq2_xs": "LLAMA_FTYPE_MOSTLY_IQ2_XS",
    "iq2_xxs": "LLAMA_FTYPE_MOSTLY_IQ2_XXS",
    "iq1_m": "LLAMA_FTYPE_MOSTLY_IQ1_M",
    "iq1_s": "LLAMA_FTYPE_MOSTLY_IQ1_S",
}
#: presets llama.cpp refuses without an importance matrix (their types, or some tensors' types, need one).
NEEDS_IMATRIX = ("q2_k_s", "iq3_xs", "iq3_xxs", "iq2_m", "iq2_s", "iq2_xs", "iq2_xxs", "iq1_m", "iq1_s")
#: written by selfprune's own writer (no quantizer run), unless type overrides ask for the quantizer.
WRITTEN_DIRECTLY = ("f32", "f16")


def check_outtype(outtype: str) -> str:
    key = str(outtype).lower()
    if key not in PRESETS:
        raise SelfpruneError(f"unknown GGUF outtype {outtype!r}: use one of {', '.join(PRESETS)}")
    return key


# -- ggml types --------------------------------------------------------------------------------------------
def ggml_type(name: str) -> int:
    """The ggml type id of a type name as llama.cpp spells it (``q4_k``, ``q6_k``, ``q8_0``, ``f16``, ``iq4_nl``...)."""
    import gguf

    try:
        return int(gguf.GGMLQuantizationType[str(name).upper()])
    except KeyError:
        known = ", ".join(t.name.lower() for t in gguf.GGMLQuantizationType)
        raise SelfpruneError(f"unknown tensor type {name!r}: use one of {known}") from None


def ggml_type_name(type_id: int) -> str:
    import gguf

    return gguf.GGMLQuantizationType(int(type_id)).name.lower()


@dataclass(frozen=True)
class TypeOverride:
    """One ``pattern=type`` rule: tensors whose name contains a match of ``pattern`` get ``type``."""

    pattern: str
    type: str

    def matches(self, tensor_name: str) -> bool:
        return re.search(self.pattern, tensor_name) is not None


def parse_tensor_types(spec: str | None) -> list[TypeOverride]:
    """``pattern=type`` rules from a comma list or a file (one rule per line, ``#`` comments), in order.

    Patterns are regular expressions searched in llama.cpp's tensor names (``blk.3.ffn_down.weight``,
    ``attn_v``, ``token_embd``), lower-cased as ``llama-quantize --tensor-type`` does; the first that matches wins.
    """
    if not spec:
        return []
    path = Path(spec).expanduser()
    if path.exists():
        from ..io import expect_file

        expect_file(path, "tensor types file", "give a file of pattern=type lines (e.g. ffn_down=q6_k)")
        try:
            lines = [line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines()]
        except UnicodeDecodeError:
            raise SelfpruneError(f"tensor types file {path} is not text: give a file of pattern=type lines") from None
        if not any(lines):
            raise SelfpruneError(f"tensor types file {path} holds no pattern=type line: add one per line "
                                 "(e.g. ffn_down=q6_k)")
        source = str(path)
    elif "=" not in spec and (path.suffix or "/" in spec):
        raise SelfpruneError(f"tensor types file {spec} does not exist: give a file of pattern=type lines, or "
                             "pattern=type,... on the command line")
    else:
        lines, source = [part.strip() for part in spec.split(",")], "--tensor-types"
    rules = []
    for line in filter(None, lines):
        pattern, sep, type_name = line.partition("=")
        pattern, type_name = pattern.strip().lower(), type_name.strip().lower()
        if not sep or not pattern or not type_name:
            raise SelfpruneError(f"{source}: {line!r} is not pattern=type (e.g. ffn_down=q6_k or blk\\.0\\.=q8_0)")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise SelfpruneError(f"{source}: {pattern!r} is not a regular expression ({exc})") from None
        try:
            ggml_type(type_name)
        except SelfpruneError as exc:
            raise SelfpruneError(f"{source}: {exc}") from None
        rules.append(TypeOverride(pattern, type_name))
    return rules


# -- the ggml library ---------------------------------------------------------------------------------------
class _TypeTraits(ctypes.Structure):
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p), ("from_float_ref", ctypes.c_void_p)]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)


@functools.lru_cache(maxsize=1)
def ggml_library() -> ctypes.CDLL:
    """``libggml-base`` as shipped by llama-cpp-python (the build that runs and quantizes the exported files)."""
    try:
        import llama_cpp
    except ImportError:
        raise SelfpruneError("llama-cpp-python is not installed: run scripts/install.sh "
                             "(or pip install llama-cpp-python)") from None
    folder = Path(llama_cpp.__file__).parent / "lib"
    candidates = sorted(folder.glob("libggml-base.*")) + sorted(folder.glob("ggml-base.*"))
    if not candidates:
        raise SelfpruneError(f"llama-cpp-python at {folder.parent} ships no libggml-base library: reinstall it")
    lib = ctypes.CDLL(str(candidates[0]))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_float), ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.POINTER(ctypes.c_float)]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_blck_size.restype = ctypes.c_int64
    lib.ggml_blck_size.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    lib.ggml_op_name.restype = ctypes.c_char_p
    lib.ggml_op_name.argtypes = [ctypes.c_int]
    return lib


def row_bytes(type_name: str, row_length: int) -> int:
    """Bytes of one row of ``row_length`` values in ``type_name`` (0 if the type's blocks do not divide it)."""
    lib, type_id = ggml_library(), ggml_type(type_name)
    if row_length % lib.ggml_blck_size(type_id):
        return 0
    return int(lib.ggml_row_size(type_id, row_length))


def tensor_bytes(type_name: str, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of PyTorch ``shape`` (rows x row length) stored as ``type_name``."""
    return row_bytes(type_name, shape[-1]) * math.prod(shape[:-1])


def quantize_tensor(values: np.ndarray, type_name: str, importance: np.ndarray | None = None) -> np.ndarray:
    """``values`` (rows x row length) quantized by ggml to ``type_name``: the bytes llama.cpp's quantizer writes.

    ``importance``: one weight per column (an importance matrix row), or None.
    """
    lib, type_id = ggml_library(), ggml_type(type_name)
    rows = np.ascontiguousarray(values, dtype=np.float32).reshape(-1, values.shape[-1])
    n_rows, n_per_row = rows.shape
    if n_per_row % lib.ggml_blck_size(type_id):
        raise SelfpruneError(f"rows of {n_per_row} values cannot be stored as {type_name} "
                             f"(blocks of {lib.ggml_blck_size(type_id)})")
    if importance is None and lib.ggml_quantize_requires_imatrix(type_id):
        raise SelfpruneError(f"{type_name} needs an importance matrix")
    out = np.empty(int(lib.ggml_row_size(type_id, n_per_row)) * n_rows, dtype=np.uint8)
    weights = None
    if importance is not None:
        importance = np.ascontiguousarray(importance, dtype=np.float32)
        if importance.shape != (n_per_row,):
            raise SelfpruneError(f"importance has {importance.size} values for rows of {n_per_row}")
        weights = importance.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    written = lib.ggml_quantize_chunk(type_id, rows.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                                      out.ctypes.data_as(ctypes.c_void_p), 0, n_rows, n_per_row, weights)
    if written != out.size:
        raise SelfpruneError(f"ggml wrote {written} bytes for a {n_rows} x {n_per_row} {type_name} tensor, not {out.size}")
    return out


def dequantize_tensor(data: np.ndarray, type_name: str, shape: tuple[int, ...]) -> np.ndarray:
    """float32 values of ``shape`` from ``type_name`` bytes, by ggml's own ``to_float`` (what llama.cpp computes with)."""
    lib, type_id = ggml_library(), ggml_type(type_name)
    data = np.ascontiguousarray(data, dtype=np.uint8)
    count = math.prod(shape)
    if type_name == "f32":
        return data.view(np.float32).reshape(shape).copy()
    traits = lib.ggml_get_type_traits(type_id).contents
    if not traits.to_float:
        raise SelfpruneError(f"ggml has no dequantization for {type_name}")
    out = np.empty(count, dtype=np.float32)
    rows, row = count // shape[-1], row_bytes(type_name, shape[-1])
    if data.size != rows * row:
        raise SelfpruneError(f"{data.size} bytes do not hold a {shape} {type_name} tensor ({rows * row} needed)")
    _TO_FLOAT(traits.to_float)(data.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                               count)
    return out.reshape(shape)


# -- importance matrices ------------------------------------------------------------------------------------
@dataclass
class ImportanceMatrix:
    """Per-tensor sums of squared input activations and the token counts they came from (llama-imatrix's data).

    Names are the GGUF tensor names (``blk.0.attn_q.weight``); ``means()`` is what the quantizer is given.
    """

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_size: int = 512

    def add(self, name: str, squares: np.ndarray, tokens: int) -> None:
        squares = np.asarray(squares, dtype=np.float64)
        if name in self.sums:
            self.sums[name] = self.sums[name] + squares
            self.counts[name] += int(tokens)
        else:
            self.sums[name], self.counts[name] = squares.copy(), int(tokens)

    def means(self) -> dict[str, np.ndarray]:
        """The quantizer's weights: sum / count per column (1 where nothing was seen, as llama-quantize does)."""
        return {name: (self.sums[name] / self.counts[name] if self.counts[name] else np.ones_like(self.sums[name]))
                .astype(np.float32) for name in self.sums}

    @property
    def tokens(self) -> int:
        return max(self.counts.values(), default=0)

    def save(self, path: str | Path) -> Path:
        """llama.cpp's GGUF imatrix format (``<name>.in_sum2``, ``<name>.counts``), readable by ``llama-quantize
        --imatrix``; written under a temporary name and renamed."""
        import gguf

        from .gguf_export import _publish, _temp_sibling

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_sibling(path, ".partial")
        try:
            writer = gguf.GGUFWriter(str(tmp), arch="")
            writer.kv_data[0].pop("general.architecture", None)   # llama-imatrix writes none
            writer.add_type("imatrix")
            writer.add_array("imatrix.datasets", list(self.datasets) or ["selfprune"])
            writer.add_uint32("imatrix.chunk_count", int(self.tokens // max(self.chunk_size, 1)))
            writer.add_uint32("imatrix.chunk_size", int(self.chunk_size))
            for name in sorted(self.sums):
                writer.add_tensor(f"{name}.in_sum2", self.sums[name].astype(np.float32)[None, :])
                writer.add_tensor(f"{name}.counts", np.array([[float(self.counts[name])]], dtype=np.float32))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
            _publish(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ImportanceMatrix":
        """An imatrix file in llama.cpp's GGUF format or its older ``.dat`` format."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise SelfpruneError(f"importance matrix {path} does not exist: give a file written by selfprune imatrix "
                                 "or llama-imatrix")
        with open(path, "rb") as handle:
            magic = handle.read(4)
        try:
            return cls._load_gguf(path) if magic == b"GGUF" else cls._load_legacy(path)
        except SelfpruneError:
            raise
        except Exception as exc:  # a damaged file: name it, not the parser's internals
            raise SelfpruneError(f"{path} is not a readable importance matrix ({type(exc).__name__}: {exc}): "
                                 "give a file written by selfprune imatrix or llama-imatrix") from None

    @classmethod
    def _load_gguf(cls, path: Path) -> "ImportanceMatrix":
        import gguf

        reader = gguf.GGUFReader(str(path))
        tensors = {t.name: np.asarray(t.data, dtype=np.float64) for t in reader.tensors}
        result = cls()
        for name in sorted(n[: -len(".in_sum2")] for n in tensors if n.endswith(".in_sum2")):
            counts = tensors.get(f"{name}.counts")
            if counts is None:
                raise SelfpruneError(f"{path}: {name}.in_sum2 has no {name}.counts")
            if counts.size != 1:
                raise SelfpruneError(f"{path}: {name} has per-expert counts; only dense models are supported")
            result.sums[name] = tensors[f"{name}.in_sum2"].reshape(-1)
            result.counts[name] = int(counts.reshape(-1)[0])
        if not result.sums:
            raise SelfpruneError(f"{path} holds no importance matrix entries (no <tensor>.in_sum2)")
        field_ = reader.fields.get("imatrix.chunk_size")
        if field_ is not None:
            result.chunk_size = int(field_.parts[field_.data[0]][0])
        field_ = reader.fields.get("imatrix.datasets")
        if field_ is not None:
            result.datasets = [bytes(field_.parts[i]).decode("utf-8", "replace") for i in field_.data]
        return result

    @classmethod
    def _load_legacy(cls, path: Path) -> "ImportanceMatrix":
        """The ``.dat`` format: n entries of (name, ncall, values = mean * ncall), then the last chunk and dataset."""
        data = path.read_bytes()
        offset = 0

        def take(fmt: str, count: int = 1):
            nonlocal offset
            size = np.dtype(fmt).itemsize * count
            if offset + size > len(data):
                raise SelfpruneError(f"{path} ends early: not an importance matrix (or a damaged one)")
            out = np.frombuffer(data, dtype=fmt, count=count, offset=offset)
            offset += size
            return out

        result = cls()
        entries = int(take("<i4")[0])
        if entries <= 0 or entries > 1_000_000:
            raise SelfpruneError(f"{path} is not an importance matrix (GGUF or llama.cpp's .dat format)")
        for _ in range(entries):
            length = int(take("<i4")[0])
            name = bytes(take("u1", length)).decode("utf-8")
            ncall, nval = int(take("<i4")[0]), int(take("<i4")[0])
            values = take("<f4", nval).astype(np.float64)
            # legacy sums are mean * ncall: keep them as sums over ncall "chunks" of one token each
            result.sums[name], result.counts[name] = values, max(ncall, 1)
        return result


def _imatrix_array(weights: dict[str, np.ndarray]):
    """``llama_model_imatrix_data[]`` for llama_model_quantize (terminated by a NULL name), with its buffers."""
    import llama_cpp

    keep, entries = [], (llama_cpp.llama_model_imatrix_data * (len(weights) + 1))()
    for i, (name, values) in enumerate(sorted(weights.items())):
        values = np.ascontiguousarray(values, dtype=np.float32)
        encoded = name.encode()
        keep += [values, encoded]
        entries[i].name = encoded
        entries[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entries[i].size = values.size
    return entries, keep


def _override_array(overrides: list[TypeOverride]):
    import llama_cpp

    keep, entries = [], (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
    for i, rule in enumerate(overrides):
        encoded = rule.pattern.encode()
        keep.append(encoded)
        entries[i].pattern = encoded
        entries[i].type = ggml_type(rule.type)
    return entries, keep


def run_llama_quantize(source: Path, out: Path, outtype: str, threads: int = 0,
                       importance: dict[str, np.ndarray] | None = None,
                       overrides: list[TypeOverride] | None = None) -> None:
    """``llama_model_quantize(source -> out)`` with llama.cpp's preset rules, ``overrides`` and ``importance``."""
    import llama_cpp

    from .gguf_export import _quiet_native_output

    outtype = check_outtype(outtype)
    if outtype in NEEDS_IMATRIX and not importance:
        raise SelfpruneError(f"{outtype} needs an importance matrix: pass --imatrix FILE or --calibrate "
                             "(or choose q2_k / q3_k_s / iq4_xs, which do not)")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, PRESETS[outtype])
    params.nthread = threads
    keep = []
    if importance:
        array, buffers = _imatrix_array(importance)
        params.imatrix = ctypes.cast(array, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        keep += [array, buffers]
    if overrides:
        array, buffers = _override_array(overrides)
        params.tt_overrides = ctypes.cast(array, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
        keep += [array, buffers]
    with _quiet_native_output():  # llama.cpp prints one line per tensor
        code = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params)
    if code != 0:
        raise SelfpruneError(f"llama.cpp could not quantize {source} to {outtype} (code {code}): try q8_0 or f16")
    del keep


def file_tensor_types(path: str | Path) -> dict[str, str]:
    """Each tensor's type in a GGUF file, by name."""
    import gguf

    return {t.name: t.tensor_type.name.lower() for t in gguf.GGUFReader(str(path)).tensors}
