"""The user's saved defaults (today: the data folder), in ``$XDG_CONFIG_HOME/selfprune/config.json``.

``$SELFPRUNE_CONFIG`` names another file (tests and CI use it to stay out of the user's home).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import SelfpruneError

CONFIG_ENV = "SELFPRUNE_CONFIG"


def user_config_path() -> Path:
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV]).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or "~/.config"
    return Path(base).expanduser() / "selfprune" / "config.json"


def read_user_config() -> dict:
    path = user_config_path()
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise SelfpruneError(f"{path} is not valid JSON: fix or delete it (`selfprune config --reset`)") from None
    return data if isinstance(data, dict) else {}


def write_user_config(data: dict) -> Path:
    from .io import atomic_write_json

    path = user_config_path()
    atomic_write_json(path, data)
    return path
