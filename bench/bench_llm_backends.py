"""What one LLM-operator call costs with `--llm self` (transformers, the fp32 model in memory) against the same
SmolLM2 weights served by llama.cpp (the GGUF the default model is converted from), on the very prompts a search
sent: the first attempt of the first calls of each kind (initial, select, crossover, mutate) in a run's
``llm/calls.jsonl``, replayed with the same seed, temperature and token limit.

It explains why the search benchmark runs the self-operator through llama.cpp on this CPU, and what a user pays
per call with either backend. Replies are classified like the search does (valid / repaired / unusable).

    python bench/bench_llm_backends.py [--run bench/runs/llm-t0.2-b100-s0] [--per-kind 2] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from common import REPO, versions, write_results

from selfprune.io import read_jsonl
from selfprune.llm import OpenAICompatibleBackend, TransformersChatBackend
from selfprune.models import load_model
from selfprune.search.llm_operator import classify_rates, classify_selection, rates_schema, selection_schema
from selfprune.search.space import SearchSpace

KINDS = ("initial", "select", "crossover", "mutate")


def pick_calls(run: Path, per_kind: int) -> list[dict]:
    calls = [c for c in read_jsonl(run / "llm" / "calls.jsonl") if c["attempt"] == 0]
    return [c for kind in KINDS for c in [c for c in calls if c["operator"] == kind][:per_kind]]


def classify(call: dict, text: str, space: SearchSpace, config: dict) -> str:
    if call["operator"] == "select":
        ids = [int(line.split(":")[0][3:]) for line in call["messages"][-1]["content"].splitlines()
               if line.startswith("id ")]
        return classify_selection(text, ids, config["crossovers"], config["mutations"])[0]
    return classify_rates(text, space).status


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", default=str(REPO / "bench" / "runs" / "llm-t0.2-b100-s0"))
    parser.add_argument("--per-kind", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch and llama.cpp threads (the same for both)")
    args = parser.parse_args()
    run = Path(args.run)
    config = json.loads((run / "config.json").read_text())
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(config["model"], dtype=config["dtype"])
    # SmolLM2's decoder layers all have the same size, so equal weights give the search's constraint.
    space = SearchSpace([1] * model.config.num_hidden_layers, config["target"], config["bounds"])
    calls = pick_calls(run, args.per_kind)

    sys.path.insert(0, str(REPO / "tests"))
    from llama_server import default_gguf, start_llama_server, stop_server

    process, server = start_llama_server(default_gguf(), Path(tempfile.mkdtemp()) / "llama.log", n_ctx=8192,
                                         n_threads=args.threads)
    os.environ["SELFPRUNE_BENCH_KEY"] = server.api_key
    backends = {
        "self (transformers, fp32)": TransformersChatBackend(model, tokenizer, name="self"),
        "self GGUF (llama.cpp, Q4_1)": OpenAICompatibleBackend("smollm2", base_url=server.base_url,
                                                               api_key_env="SELFPRUNE_BENCH_KEY", timeout=600),
    }
    rows = []
    try:
        for call in calls:
            for name, backend in backends.items():
                schema = (selection_schema(config["crossovers"], config["mutations"]) if call["operator"] == "select"
                          else rates_schema(space.num_layers))
                result = backend.complete(call["messages"], json_schema=schema, max_tokens=config["llm"]["max_tokens"],
                                          temperature=config["llm"]["temperature"], seed=call["seed"])
                rows.append({"backend": name, "operator": call["operator"], "structured": result.structured,
                             "prompt_tokens": result.prompt_tokens,
                             "completion_tokens": result.completion_tokens, "seconds": round(result.seconds, 2),
                             "status": classify(call, result.text, space, config)})
                print(rows[-1], flush=True)
    finally:
        stop_server(process)

    lines = ["# One LLM-operator call: `--llm self` (transformers) vs the same weights served by llama.cpp", "",
             f"Prompts: the first {args.per_kind} first-attempt calls of each kind from `{run.relative_to(REPO)}`, "
             f"replayed with their seeds, temperature {config['llm']['temperature']}, at most "
             f"{config['llm']['max_tokens']} new tokens, the search's JSON schema requested (llama.cpp enforces it "
             "with a grammar; transformers cannot, so its replies are parsed leniently, as in a search). "
             f"{args.threads} threads each, same machine, one after the other. Both backends keep the previous call's "
             "keys/values and compute only what follows the shared prefix (here the system prompt).", "",
             "| backend | calls | mean prompt tokens | mean new tokens | mean s/call | new tokens/s | valid/repaired/unusable |",
             "|---|---|---|---|---|---|---|"]
    summary = {}
    for name in backends:
        mine = [r for r in rows if r["backend"] == name]
        seconds = sum(r["seconds"] for r in mine)
        counts = {s: sum(r["status"] == s for r in mine) for s in ("valid", "repaired", "unusable")}
        summary[name] = {"calls": len(mine), "mean_seconds": seconds / len(mine),
                         "tokens_per_second": sum(r["completion_tokens"] for r in mine) / seconds, **counts}
        lines.append(f"| {name} | {len(mine)} | {statistics.mean(r['prompt_tokens'] for r in mine):.0f} | "
                     f"{statistics.mean(r['completion_tokens'] for r in mine):.0f} | {seconds / len(mine):.1f} | "
                     f"{summary[name]['tokens_per_second']:.1f} | "
                     f"{counts['valid']}/{counts['repaired']}/{counts['unusable']} |")
    names = list(backends)
    ratio = summary[names[0]]["mean_seconds"] / summary[names[1]]["mean_seconds"]
    lines += ["", f"transformers / llama.cpp seconds per call: {ratio:.2f}"]
    write_results("llm_backends", {"rows": rows, "summary": summary, "ratio_seconds": ratio, "run": str(run),
                                   "threads": args.threads, "versions": versions()}, "\n".join(lines))


if __name__ == "__main__":
    main()
