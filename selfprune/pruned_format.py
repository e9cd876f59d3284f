"""The pruned-model format: safetensors weights, a config recording every layer's shape and kept indices,
and ``modeling_selfprune.py`` beside them, named in ``auto_map`` so that plain transformers reloads it."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from .errors import SelfpruneError
from .io import atomic_directory, atomic_write_json

MODELING_FILE = "modeling_selfprune.py"
REPORT_FILE = "selfprune_report.json"


def _pruned_class_name(model) -> str:
    from .adapters import get_adapter

    return get_adapter(model).pruned_class_name


def save_pruned(model, tokenizer, out_dir, metadata: dict | None = None, overwrite: bool = False) -> Path:
    """Write a pruned model atomically: a killed save leaves no half-written folder behind."""
    if not hasattr(model.config, "selfprune"):
        raise SelfpruneError("this model was not pruned by selfprune: prune it first (selfprune.prune)")
    out_dir = Path(out_dir)
    class_name = _pruned_class_name(model)
    config = model.config
    config.auto_map = {"AutoModelForCausalLM": f"{Path(MODELING_FILE).stem}.{class_name}"}
    config.architectures = [class_name]
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        shutil.copyfile(Path(__file__).with_name(MODELING_FILE), tmp / MODELING_FILE)
        atomic_write_json(tmp / REPORT_FILE, metadata or {})
    return out_dir


def load_pruned(path, dtype: str = "float32", device_map=None):
    """Reload a pruned model with selfprune's copy of the modeling file (no remote code needed)."""
    from transformers import AutoConfig

    from . import modeling_selfprune
    from .models.loading import _torch_dtype

    path = Path(path)
    config = AutoConfig.from_pretrained(str(path))
    spec = getattr(config, "selfprune", None)
    if not spec:
        raise SelfpruneError(f"{path} is not a selfprune pruned model (no 'selfprune' in config.json)")
    target = config.auto_map["AutoModelForCausalLM"].split(".")[-1]
    cls = getattr(modeling_selfprune, target, None)
    if cls is None:
        raise SelfpruneError(f"{path} names an unknown pruned class {target}: upgrade selfprune")
    return cls.from_pretrained(str(path), config=config, dtype=_torch_dtype(dtype), device_map=device_map)


def read_report(path) -> dict:
    report = Path(path) / REPORT_FILE
    return json.loads(report.read_text()) if report.is_file() else {}
