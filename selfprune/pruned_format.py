"""The pruned-model format: safetensors weights, a config recording every layer's shape, the kept indices
in a side file, and ``modeling_selfprune.py`` beside them, named in ``auto_map`` so that plain transformers
reloads it.

``config.json``'s ``selfprune`` entry holds only what the modeling file needs to rebuild each layer (query
heads, key-value heads, MLP width, bias flags) plus criterion, calibration and versions; the kept head and
channel indices (hundreds of KB for a real model) go to ``selfprune_indices.json``. Folders written before
the split (indices inside config.json) still load.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from .checkpoints import check_weights, torch_dtype
from .errors import SelfpruneError
from .io import atomic_directory, atomic_write_json

MODELING_FILE = "modeling_selfprune.py"
REPORT_FILE = "selfprune_report.json"
INDICES_FILE = "selfprune_indices.json"
FORMAT_VERSION = 2
SHAPE_KEYS = ("num_attention_heads", "num_key_value_heads", "intermediate_size", "o_proj_bias", "down_proj_bias")
INDEX_KEYS = ("kept_query_heads", "kept_kv_heads", "kept_channels")


def split_spec(spec: dict) -> tuple[dict, list[dict]]:
    """Split ``config.selfprune`` into the small part config.json keeps and the per-layer kept indices."""
    layers = spec.get("layers", [])
    slim = dict(spec) | {"format_version": FORMAT_VERSION, "indices_file": INDICES_FILE,
                         "layers": [{k: layer[k] for k in SHAPE_KEYS if k in layer} for layer in layers]}
    indices = [{k: layer[k] for k in INDEX_KEYS if k in layer} for layer in layers]
    return slim, indices


def reload_hint(path) -> str:
    """What to tell the user after a save: how to reload, and why remote code is only for trusted folders."""
    path = str(path)
    return (f"reload with selfprune.load({path!r}) (uses selfprune's own modeling code); without selfprune, "
            f"AutoModelForCausalLM.from_pretrained({path!r}, trust_remote_code=True) runs the "
            f"{MODELING_FILE} found in that folder, so use it only for folders you trust")


def _pruned_class_name(model) -> str:
    from .adapters import get_adapter

    return get_adapter(model).pruned_class_name


def save_pruned(model, tokenizer, out_dir, metadata: dict | None = None, overwrite: bool = False,
                imatrix=None) -> Path:
    """Write a pruned model atomically: a killed save leaves the previous folder (or none), never half a one.

    ``selfprune_report.json`` holds ``metadata`` plus, unless it already has one, the model's PruneReport;
    ``imatrix`` (an ``ImportanceMatrix`` of the pruned model) goes beside it as ``imatrix.gguf``.
    """
    if not hasattr(model.config, "selfprune"):
        raise SelfpruneError("this model was not pruned by selfprune: prune it first (selfprune.prune)")
    if tokenizer is None or not hasattr(tokenizer, "save_pretrained"):
        raise SelfpruneError("save_pruned needs the model's tokenizer (a folder without one does not load with "
                             "selfprune.load or transformers): pass the tokenizer that load_model returned")
    out_dir = Path(out_dir)
    class_name = _pruned_class_name(model)
    config = model.config
    config.auto_map = {"AutoModelForCausalLM": f"{Path(MODELING_FILE).stem}.{class_name}"}
    config.architectures = [class_name]
    metadata = dict(metadata or {})
    report = getattr(model, "selfprune_report", None)
    if "report" not in metadata and report is not None:
        metadata["report"] = report.to_dict()
    full_spec = config.selfprune
    slim, indices = split_spec(full_spec)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        config.selfprune = slim
        try:
            model.save_pretrained(tmp)
        finally:
            config.selfprune = full_spec
        tokenizer.save_pretrained(tmp)
        shutil.copyfile(Path(__file__).with_name(MODELING_FILE), tmp / MODELING_FILE)
        atomic_write_json(tmp / INDICES_FILE, {"format_version": FORMAT_VERSION, "layers": indices})
        atomic_write_json(tmp / REPORT_FILE, metadata)
        if imatrix is not None:
            from .imatrix import IMATRIX_FILE

            imatrix.save(tmp / IMATRIX_FILE)
    return out_dir


def read_indices(path) -> list[dict] | None:
    """The per-layer kept indices of a saved pruned model (None for a folder without the side file)."""
    file = Path(path) / INDICES_FILE
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text(encoding="utf-8"))["layers"]
    except (ValueError, KeyError, TypeError):
        raise SelfpruneError(f"{file} is damaged (not the JSON selfprune wrote): restore it or save the model "
                             f"again") from None


def load_pruned(path, dtype: str = "float32", device_map=None, **placement):
    """Reload a pruned model with selfprune's copy of the modeling file (no remote code needed); ``placement``
    (``max_memory``, ``offload_folder``) goes to ``from_pretrained`` with ``device_map``."""
    from transformers import AutoConfig

    from . import modeling_selfprune

    path = Path(path)
    config = AutoConfig.from_pretrained(str(path))
    spec = getattr(config, "selfprune", None)
    if not spec:
        raise SelfpruneError(f"{path} is not a selfprune pruned model (no 'selfprune' in config.json)")
    target = config.auto_map["AutoModelForCausalLM"].split(".")[-1]
    cls = getattr(modeling_selfprune, target, None)
    if cls is None:
        raise SelfpruneError(f"{path} names an unknown pruned class {target}: upgrade selfprune")
    indices = read_indices(path)
    if indices is not None:  # in memory the spec is whole again, as right after pruning
        if len(indices) != len(spec["layers"]):
            raise SelfpruneError(f"{path / INDICES_FILE} has {len(indices)} layers, config.json "
                                 f"{len(spec['layers'])}: the folder mixes two saves; save the model again")
        spec["layers"] = [layer | kept for layer, kept in zip(spec["layers"], indices)]
    check_weights(path)
    return cls.from_pretrained(str(path), config=config, dtype=torch_dtype(dtype), device_map=device_map, **placement)


def read_report(path) -> dict:
    report = Path(path) / REPORT_FILE
    return json.loads(report.read_text()) if report.is_file() else {}
