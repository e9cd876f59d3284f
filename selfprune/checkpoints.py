"""What loading needs from a model folder, shared by ``models/loading.py`` and ``pruned_format.py``
(kept apart from both so neither imports the other): dtype names and a check of the weight files, so that
a missing or damaged file is one clear error instead of a traceback from deep inside transformers."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import SelfpruneError

DTYPES = ("float32", "float16", "bfloat16")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def torch_dtype(dtype: str):
    import torch

    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise SelfpruneError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return table[dtype]


def _damaged(file: Path, why: str) -> SelfpruneError:
    return SelfpruneError(f"{file} is damaged ({why}): copy or save the model again")


def _check_safetensors(file: Path) -> None:
    """Open the file's header and check that every tensor it lists lies inside the file (a truncated
    copy fails here); reads the header only, not the weights."""
    from safetensors import safe_open

    if not file.is_file():
        raise SelfpruneError(f"weights file {file} is missing: copy or save the model again")
    size = file.stat().st_size
    if size < 8:
        raise _damaged(file, f"only {size} bytes")
    with open(file, "rb") as handle:
        header_len = int.from_bytes(handle.read(8), "little")
        if header_len > size - 8:
            raise _damaged(file, f"header of {header_len} bytes in a file of {size}")
        try:
            header = json.loads(handle.read(header_len))
        except (ValueError, UnicodeDecodeError):
            raise _damaged(file, "unreadable header") from None
    if not isinstance(header, dict):
        raise _damaged(file, "unreadable header")
    ends = [entry["data_offsets"][1] for name, entry in header.items()
            if name != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry]
    needed = 8 + header_len + max(ends, default=0)
    if needed > size:
        raise _damaged(file, f"truncated: {size:,} of {needed:,} bytes")
    try:
        with safe_open(str(file), framework="pt"):
            pass
    except Exception as exc:  # safetensors raises its own error types for bad headers
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise _damaged(file, first[:120]) from None


def check_weights(folder: str | Path) -> None:
    """Raise a SelfpruneError naming the file when a model folder's weights are missing or damaged."""
    folder = Path(folder)
    present = [name for name in WEIGHT_FILES if (folder / name).is_file()]
    if not present:
        raise SelfpruneError(f"{folder} has no weights file ({WEIGHT_FILES[0]}): the folder is incomplete; "
                             f"copy or save the model again")
    name = present[0]
    if name == "model.safetensors":
        _check_safetensors(folder / name)
    elif name.endswith(".index.json"):
        index_file = folder / name
        try:
            shards = sorted(set(json.loads(index_file.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise _damaged(index_file, "not a weight index") from None
        for shard in shards:
            if shard.endswith(".safetensors"):
                _check_safetensors(folder / shard)
            elif not (folder / shard).is_file():
                raise SelfpruneError(f"weights file {folder / shard} is missing: copy or save the model again")
