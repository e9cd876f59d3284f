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


def serve_gguf(path: Path, threads: int):
    """llama.cpp's OpenAI-compatible server for the GGUF at `path` on loopback (the tests' launcher), with its key in
    $SELFPRUNE_BENCH_KEY for --llm-api-key-env / api_key_env. Returns (server, stop); it is also stopped at exit."""
    import atexit
    import functools
    import os
    import tempfile

    sys.path.insert(0, str(REPO / "tests"))
    from llama_server import start_llama_server, stop_server

    process, server = start_llama_server(path, Path(tempfile.mkdtemp()) / "llama.log", n_ctx=8192, n_threads=threads)
    stop = functools.partial(stop_server, process)
    atexit.register(stop)
    os.environ["SELFPRUNE_BENCH_KEY"] = server.api_key
    return server, stop


def write_results(name: str, data: dict, table: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(table + "\n")
    print(table)


def search_rows() -> list[dict]:
    """Every committed search run's row in results/search*.json, file by file (a merged run appears in its own
    file and in the one it was merged into)."""
    return [row for path in sorted(RESULTS.glob("search*.json")) for row in json.loads(path.read_text())["rows"]]


def best_searched_row(target: float) -> dict | None:
    """The search run with the best validation fitness at ``target`` in results/search*.json (never chosen on
    test): the "searched" model of every benchmark that compares against uniform. Searches that refit every
    candidate (bench_search.py --reconstruct lstsq) are left out: their models need the refit to rebuild."""
    rows = [r for r in search_rows() if r["target"] == target and r["operator"] != "uniform"
            and r.get("reconstruct", "bias") == "bias"]   # a refit search's fitness is not comparable
    return min(rows, key=lambda r: r["best_fitness_valid_ppl"]) if rows else None
