"""What one LLM-operator call costs with `--llm self` (transformers, the fp32 model in memory) against the same
SmolLM2 weights served by llama.cpp (the GGUF the default model is converted from), on the very prompts a search
sent: the first attempt of the first calls of each kind (initial, select, crossover, mutate) in a run's
``llm/calls.jsonl``, replayed with the same seed, temperature and token limit.

It explains why the search benchmark runs the self-operator through llama.cpp on this CPU, and what a user pays
per call with either backend. Replies are classified like the search does (valid / repaired / unusable).

    python bench/bench_llm_backends.py [--run bench/runs/llm-t0.2-b100-s0] [--per-kind 2] [--threads 2]

With ``--usable`` it measures instead how many replies the search can use (issue 14, part 2): the real LLM
operator, prompt version v2 (fractions, schema of plain numbers: "before") and v3 (whole percentages, schema of
bounded integers: "after"), each driving a short search against SmolLM2 served by llama.cpp. The fitness is a
synthetic perplexity-like function of the rates (no model is pruned: only the replies are measured), so the
prompts have the form and size of a real search's; results go to ``results/llm_usable.{json,md}``.

    python bench/bench_llm_backends.py --usable [--versions v2,v3] [--targets 0.3] [--budget 30] [--threads 2]

The committed ``llm_usable`` results came from four such searches run in parallel on the shared 2-core machine
(so seconds per call are inflated by contention), each counted again from its folder with ``--count-run`` (the
runs' own rows had an older form), then combined:

    S="--budget 14 --population 6 --offspring 8 --threads 1"
    python bench/bench_llm_backends.py --usable --versions v3 --targets 0.3 $S --results llm_usable_v3
    python bench/bench_llm_backends.py --usable --versions v3 --targets 0.5 $S --results llm_usable_v3_50
    python bench/bench_llm_backends.py --usable --versions v3 --targets 0.2 $S --results llm_usable_v3_20
    python bench/bench_llm_backends.py --usable --versions v2 --targets 0.3 $S --results llm_usable_v2
    python bench/bench_llm_backends.py --count-run <its folder> --versions v2 --targets 0.3 $S --results llm_usable_v2
    python bench/bench_llm_backends.py --combine llm_usable_v2,llm_usable_v3_20,llm_usable_v3,llm_usable_v3_50
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch
from common import REPO, RESULTS, serve_gguf, versions, write_results

from selfprune.io import read_jsonl
from selfprune.llm import OpenAICompatibleBackend, TransformersChatBackend
from selfprune.models import load_model
from selfprune.models.loading import packaged_default_gguf
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


def synthetic_fitness(space: SearchSpace):
    """A perplexity-like fitness with a known best allocation (ends of the stack pruned less), ~60 at best."""
    n = space.num_layers
    shape = 1.0 - 0.6 * np.exp(-np.arange(n) / 2.0) - 0.8 * np.exp(-(n - 1 - np.arange(n)) / 2.0)
    best = np.asarray(space.repair(space.target * shape / np.mean(shape)).rates)

    def evaluate(rates):
        return {"fitness": float(60.0 * np.exp(8.0 * np.sum(space.weights * (np.asarray(rates) - best) ** 2)))}

    return evaluate


def usable_rates(args) -> None:
    """Usable-reply rates of the LLM operator per prompt version (see the module docstring)."""
    from selfprune.search import RunSettings, SearchProblem, SearchRunner
    from selfprune.search.llm_operator import LLMOperator

    if args.llm_model == "self":
        gguf, name = packaged_default_gguf(), "smollm2"
    else:   # a packaged Qwen2.5-Coder-Instruct file (issue 31): the stronger operator
        from selfprune.models.packaged import assemble

        gguf, name = assemble(args.llm_model), args.llm_model
    server, stop = serve_gguf(gguf, args.threads)
    rows = []
    try:
        for target in [float(t) for t in args.targets.split(",")]:
            for version in args.versions.split(","):
                backend = OpenAICompatibleBackend(name, base_url=server.base_url,
                                                  api_key_env="SELFPRUNE_BENCH_KEY", timeout=900)
                if args.format != "auto":
                    backend.start_at_format(args.format)
                space = SearchSpace([1] * 30, target, (0.0, 0.8))  # SmolLM2: 30 decoder layers of one size
                run = Path(tempfile.mkdtemp()) / f"{version}-t{target:g}"
                operator = LLMOperator(backend, space, log_dir=run / "llm", n_crossover=args.offspring // 2,
                                       n_mutation=args.offspring - args.offspring // 2, retries=args.retries,
                                       prompt_version=version, temperature=0.7)
                problem = SearchProblem([1] * 30, synthetic_fitness(space))
                summary = SearchRunner(run, space, problem, operator, RunSettings(
                    budget=args.budget, population=args.population, seed=args.seed), progress=False).run()
                row = usable_row(read_jsonl(run / "llm" / "calls.jsonl"), target, version, args.retries)
                row.update(format_mode=backend.format_mode, evaluations=summary["evaluations"], complete=True,
                           llm_model=name,
                           counts=summary["llm"], sources=summary.get("sources"))
                rows.append(row)
                print({k: v for k, v in row.items() if k not in ("counts", "reasons")}, flush=True)
    finally:
        stop()
    settings = {**vars(args), "threads": args.threads}
    write_results(args.results, {"rows": rows, "settings": settings, "versions": versions()}, usable_table(rows, settings))


def usable_row(calls: list[dict], target: float, version: str, retries: int) -> dict:
    """Reply counts of one search from its ``llm/calls.jsonl`` alone (so a run stopped early can be counted too).

    A slot (one candidate asked for) is filled by the LLM when one of its attempts was usable, and by the numeric
    fallback when its last attempt (``retries``) was not; a slot whose attempts stopped earlier was cut off."""
    rate_calls = [c for c in calls if c["operator"] != "select"]
    select_calls = [c for c in calls if c["operator"] == "select"]
    usable = ("valid", "repaired")
    slots: dict = {}
    for c in rate_calls:
        slots.setdefault((c["iteration"], c["operator"], c["slot"]), []).append(c)
    filled = sum(any(c["status"] in usable for c in tries) for tries in slots.values())
    fallbacks = sum(not any(c["status"] in usable for c in tries) and max(c["attempt"] for c in tries) >= retries
                    for tries in slots.values())
    return {
        "target": target, "prompt_version": version,
        "schema_enforced": all(c.get("structured") for c in calls),
        "rate_calls": len(rate_calls),
        "rate_calls_usable": sum(c["status"] in usable for c in rate_calls),
        "rate_calls_valid": sum(c["status"] == "valid" for c in rate_calls),
        "rate_calls_duplicate": sum(c["status"] == "duplicate" for c in rate_calls),
        "rate_first_attempts": sum(c["attempt"] == 0 for c in rate_calls),
        "rate_first_attempts_usable": sum(c["attempt"] == 0 and c["status"] in usable for c in rate_calls),
        "slots": filled + fallbacks, "slots_from_llm": filled, "fallbacks": fallbacks,
        "select_calls": len(select_calls),
        "select_usable": sum(c["status"] in usable for c in select_calls),
        "select_valid": sum(c["status"] == "valid" for c in select_calls),
        "mean_seconds_per_call": sum(c["seconds"] for c in calls) / max(1, len(calls)),
        "mean_completion_tokens": sum(c["completion_tokens"] for c in calls) / max(1, len(calls)),
        "reasons": sorted({c["reason"] for c in calls if c["status"] == "unusable"})[:10],
    }


def count_run(run: Path, version: str, target: float, retries: int, name: str, args) -> None:
    """Results for one --usable search folder counted from its files, e.g. one stopped before its budget by
    session time (it has no summary.json: "stopped early" in the table)."""
    row = usable_row(read_jsonl(run / "llm" / "calls.jsonl"), target, version, retries)
    row.update(complete=(run / "summary.json").is_file(), evaluations=len(read_jsonl(run / "journal.jsonl")))
    if row["complete"]:
        summary = json.loads((run / "summary.json").read_text())
        row.update(counts=summary["llm"], sources=summary.get("sources"))
    settings = {**vars(args), "counted_run": str(run)}
    write_results(name, {"rows": [row], "settings": settings, "versions": versions()}, usable_table([row], settings))


def combine_usable(names: list[str], out: str) -> None:
    """One table from several --usable result files (runs made in parallel, one per prompt version)."""
    parts = [json.loads((RESULTS / f"{name}.json").read_text()) for name in names]
    rows = [row for part in parts for row in part["rows"]]
    settings = parts[0]["settings"]
    write_results(out, {"rows": rows, "settings": [p["settings"] for p in parts], "versions": parts[0]["versions"],
                        "combined_from": names}, usable_table(rows, settings))


def usable_table(rows: list[dict], args: dict) -> str:
    def pct(a, b):
        return f"{a}/{b} ({100 * a / b:.0f}%)" if b else "-"

    models = sorted({r.get("llm_model", "smollm2") for r in rows})
    title = ("prompts v2 (before) vs v3 (after), SmolLM2-135M-Instruct (Q4_1)" if models == ["smollm2"] else
             f"operator {', '.join(models)} (schema enforced by grammar, or text: none sent)")
    lines = [f"# Usable LLM replies: {title} on llama.cpp", "",
             f"Each row: one short search driven by the real LLM operator against llama-cpp-python's server "
             f"({args['threads']} thread{'s' if args['threads'] != 1 else ''}), population {args['population']}, {args['offspring']} children per "
             f"generation, budget {args['budget']} evaluations, {args['retries']} retries per slot, temperature 0.7, "
             f"seed {args['seed']}; "
             "30 equal layers, bounds 0..0.8. The fitness is a synthetic perplexity-like function of the rates (only "
             "the replies are measured here, no model is pruned). v2 asks for fractions under a schema of plain "
             "numbers; v3 asks for whole percentages under a schema of exactly 30 integers within the bounds, which "
             "the backend sends to this server as an enum (its grammar ignores minimum/maximum). Usable = valid or "
             "repaired (the repair step still moves the mean onto the target); a duplicate is a usable reply that "
             "repeats an evaluated candidate and is retried.", "",
             "| target | operator | JSON asked as | prompts | evaluations | rate replies usable | first attempts usable | "
             "duplicates | slots filled by the numeric fallback | parent picks usable (valid) | s/call |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        stopped = "" if r.get("complete", True) else " (stopped early)"
        lines.append(f"| {r['target']:g} | {r.get('llm_model', 'smollm2')} | {r.get('format_mode', '?')} | "
                     f"{r['prompt_version']} | {r.get('evaluations', '?')}{stopped} | "
                     f"{pct(r['rate_calls_usable'], r['rate_calls'])} | "
                     f"{pct(r['rate_first_attempts_usable'], r['rate_first_attempts'])} | {r['rate_calls_duplicate']} | "
                     f"{pct(r['fallbacks'], r['slots'])} | {pct(r['select_usable'], r['select_calls'])} "
                     f"({r['select_valid']}) | {r['mean_seconds_per_call']:.1f} |")
    lines += ["", "Reasons for unusable replies (first 10 distinct per row) are in the JSON file beside this one."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", default=str(REPO / "bench" / "runs" / "llm-t0.2-b100-s0"))
    parser.add_argument("--per-kind", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch and llama.cpp threads (the same for both)")
    parser.add_argument("--usable", action="store_true", help="measure usable-reply rates per prompt version")
    parser.add_argument("--versions", default="v2,v3")
    parser.add_argument("--targets", default="0.3")
    parser.add_argument("--budget", type=int, default=30)
    parser.add_argument("--population", type=int, default=10)
    parser.add_argument("--offspring", type=int, default=10)
    parser.add_argument("--retries", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", default="llm_usable", help="name of the --usable result files")
    parser.add_argument("--llm-model", default="self", choices=("self", "qwen2.5-0.5b", "qwen2.5-1.5b"),
                        help="--usable: the served operator (self: SmolLM2's own GGUF)")
    parser.add_argument("--format", default="auto", choices=("auto", "text"),
                        help="--usable: text sends no JSON schema (no grammar), to measure what enforcing it costs")
    parser.add_argument("--combine", default=None, help="comma-separated --usable result names to merge into --results")
    parser.add_argument("--count-run", default=None,
                        help="a --usable search folder (e.g. one stopped early): count its calls into --results")
    args = parser.parse_args()
    if args.count_run:
        return count_run(Path(args.count_run), args.versions, float(args.targets), args.retries, args.results, args)
    if args.combine:
        return combine_usable(args.combine.split(","), args.results)
    if args.usable:
        return usable_rates(args)
    run = Path(args.run)
    config = json.loads((run / "config.json").read_text())
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(config["model"], dtype=config["dtype"])
    # SmolLM2's decoder layers all have the same size, so equal weights give the search's constraint.
    space = SearchSpace([1] * model.config.num_hidden_layers, config["target"], config["bounds"])
    calls = pick_calls(run, args.per_kind)

    server, stop = serve_gguf(packaged_default_gguf(), args.threads)
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
        stop()

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
