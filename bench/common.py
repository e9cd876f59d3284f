"""Shared bench helpers: the default model, the reporting windows, interleaved timing and result writing."""
from __future__ import annotations

import json
import platform
import statistics
import sys
import time
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


@torch.no_grad()
def interleaved_forward_times(models: dict, batch: int = 8, seq_len: int = 128, warmup: int = 2, repeats: int = 7) -> dict:
    """Median forward seconds of each model on the same random batch, models alternated in every repeat so
    that the machine's noise hits all of them alike."""
    ids = torch.randint(0, 1000, (batch, seq_len))
    times = {name: [] for name in models}
    for rep in range(warmup + repeats):
        for name, model in models.items():
            start = time.perf_counter()
            model(ids, use_cache=False)
            if rep >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def write_results(name: str, data: dict, table: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(table + "\n")
    print(table)
