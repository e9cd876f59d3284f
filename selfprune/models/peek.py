"""Facts about a model read from its config alone, so options can be checked before weights load."""
from __future__ import annotations

import json
from pathlib import Path

CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def model_config_dict(spec: str | None) -> dict | None:
    """The model's config as a dict (folder, default model, .gguf, or hub id when reachable); None if unknown."""
    from .loading import resolve_model_spec

    location = resolve_model_spec(spec)
    path = Path(location).expanduser()
    if path.suffix == ".gguf":
        return _gguf_config(path) if path.is_file() else None
    if path.is_dir():
        try:
            return json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
    try:  # a hub id: the config is small and cached by huggingface_hub; offline, only that cache is asked
        from transformers import AutoConfig

        from ..data import hub_reachable

        return AutoConfig.from_pretrained(location, local_files_only=not hub_reachable()).to_dict()
    except Exception:  # offline or unknown id: load_model reports it properly
        return None


def _gguf_config(path: Path) -> dict | None:
    from .gguf_metadata import read_metadata

    try:
        fields = read_metadata(path)
        arch = fields["general.architecture"][0]
        context = fields.get(f"{arch}.context_length")
        return {"max_position_embeddings": int(context[0])} if context else {}
    except Exception:  # an unreadable file is the loader's to report
        return None


def context_length(spec: str | None) -> int | None:
    """The longest sequence the model was built for, or None when its config does not say."""
    return config_context_length(model_config_dict(spec))


def config_context_length(config: dict | None) -> int | None:
    """context_length from a config already read (a hub id offline is then not asked twice)."""
    config = config or {}
    config = config.get("text_config", config)
    for key in CONTEXT_KEYS:
        if isinstance(config.get(key), int) and config[key] > 0:
            return config[key]
    return None
