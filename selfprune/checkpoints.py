"""What loading needs from a model folder, shared by ``models/loading.py`` and ``pruned_format.py``
(kept apart from both so neither imports the other): dtype names and a check of the weight files, so that
a missing or damaged file is one clear error instead of a traceback from deep inside transformers."""
from __future__ import annotations

import json
import os
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


# -- the config, and GGUF files ----------------------------------------------------------------------------
#: keys every supported family's config has, each a positive whole number (transformers would fill a missing
#: one with its own default, e.g. hidden_size 4096, and load a model that is not the one on disk)
REQUIRED_POSITIVE = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
OPTIONAL_POSITIVE = ("num_key_value_heads", "head_dim", "max_position_embeddings")
OPTIONAL_REAL = ("rms_norm_eps", "rope_theta")


def _bad_config(file: Path, what: str) -> SelfpruneError:
    return SelfpruneError(f"{file}: {what}; restore the file (or copy or save the model again)")


def check_config(folder: str | Path) -> dict:
    """The folder's config.json as a dict, or one error naming the file and the key that is wrong: not JSON, not
    an object, a required key missing, a count that is not a positive whole number (a string, a list, zero,
    negative), a width the head count does not divide, key-value heads that do not divide the query heads."""
    from .errors import is_real, is_whole

    file = Path(folder) / "config.json"
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SelfpruneError(f"{folder} is not a model folder (no config.json): give a folder saved by "
                             "save_pretrained or selfprune") from None
    except (ValueError, UnicodeDecodeError) as exc:
        where = f" (line {exc.lineno}: {exc.msg})" if isinstance(exc, json.JSONDecodeError) else ""
        raise _bad_config(file, f"not valid JSON{where}") from None
    except OSError as exc:
        raise SelfpruneError(f"{file} cannot be read ({exc.strerror})") from None
    if not isinstance(config, dict):
        raise _bad_config(file, "not a JSON object")
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    if not isinstance(config.get("model_type"), str):
        raise _bad_config(file, "model_type is missing or not a name")
    from .adapters import SUPPORTED_FAMILIES

    if config["model_type"] not in SUPPORTED_FAMILIES and text.get("model_type") not in SUPPORTED_FAMILIES:
        return config   # another family's keys: the caller says it is not supported
    for key in REQUIRED_POSITIVE + OPTIONAL_POSITIVE:
        if key not in text or (key in OPTIONAL_POSITIVE and text[key] is None):
            if key in REQUIRED_POSITIVE:
                raise _bad_config(file, f"{key} is missing")
            continue
        value = text[key]
        if not is_whole(value, 1):
            raise _bad_config(file, f"{key} is {value!r}, not a positive whole number")
    for key in OPTIONAL_REAL:
        value = text.get(key)
        if value is not None and (not is_real(value) or not value > 0 or value == float("inf")):
            raise _bad_config(file, f"{key} is {value!r}, not a positive number")
    heads, kv = text["num_attention_heads"], text.get("num_key_value_heads") or text["num_attention_heads"]
    if heads % kv:
        raise _bad_config(file, f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    if text.get("head_dim") is None and text["hidden_size"] % heads:
        raise _bad_config(file, f"hidden_size {text['hidden_size']} is not a multiple of num_attention_heads "
                                f"{heads} (and no head_dim says otherwise)")
    return config


def check_gguf(path: str | Path) -> Path:
    """A GGUF file whose header parses and whose tensors all lie inside it, or one error naming the file."""
    from .io import expect_file

    path = expect_file(path, "GGUF file", "give a .gguf file written by llama.cpp or selfprune export")
    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise SelfpruneError(f"{path} is not a GGUF file (no GGUF header): give a .gguf file written by "
                                 "llama.cpp or selfprune export")
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        alignment = int(reader.alignment)
        needed = reader.data_offset + sum(-(-int(t.n_bytes) // alignment) * alignment for t in reader.tensors)
    except Exception as exc:   # gguf-py raises plain ValueErrors / numpy errors on a cut or corrupt file
        first = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise _damaged(path, f"its tensors cannot be read from its {path.stat().st_size:,} bytes, cut short or "
                             f"corrupt: {first}") from None
    size = path.stat().st_size
    if needed - size >= alignment:   # a writer may leave out the last tensor's padding, nothing more
        raise _damaged(path, f"truncated: {size:,} of {needed:,} bytes")
    if not reader.tensors:
        raise _damaged(path, "no tensors")
    return path


def check_model_source(location: str | Path) -> None:
    """Everything loading reads from a local model, checked once before any work: the GGUF file, or the folder's
    config and weights. Hub ids are left to the hub."""
    path = Path(location).expanduser()
    if path.suffix == ".gguf" and os.path.lexists(path):
        check_gguf(path)
    elif path.is_dir():
        check_config(path)
        check_weights(path)
