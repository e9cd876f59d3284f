"""Shared bench helpers: where the data and results live, library versions, and result writing."""
from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
DATA_DIR = str(REPO.parent / "shared" / "data")


def versions() -> dict:
    import transformers

    import selfprune

    return {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
            "selfprune": selfprune.__version__, "machine": platform.machine(), "threads": torch.get_num_threads()}


def write_results(name: str, data: dict, table: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(table + "\n")
    print(table)
