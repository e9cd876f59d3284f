"""Issue 10, part 4 (first rows): Gemma 3 270M (MQA: 4 query heads, 1 key-value head; Gemma terms apply to
its weights), WikiText-2 test perplexity (seq-len 128) dense vs uniform FLAP / Wanda-sp / magnitude, both GQA
policies and the head/MLP split options, next to SmolLM2's bench/results/core.md.

Gemma needs <bos> at the start of every window (4 windows of WikiText-2: ppl 245 without, 45 with); selfprune's
perplexity and calibration windows carry it for every tokenizer that has one (`bos_per_window` in the settings).

    python bench/bench_gemma.py --windows 80 [--rates 0.2,0.5] [--criteria flap]   # results/gemma.{json,md}
    python bench/bench_gemma.py --windows 80 --allocations uniform,owl   # per-layer allocations via selfprune search
"""
from __future__ import annotations

import argparse
import json
import time

from common import DATA_DIR, RESULTS, versions, write_results
from bench_search import run_search

from selfprune.calibration import CalibrationConfig
from selfprune.models import load_model
from selfprune.perplexity import PerplexityEvaluator
from selfprune.pruning import Pruner

STRUCTURE_POLICIES = [("proportional", "group"), ("proportional", "query"), ("mlp_first", "group"),
                      ("standardized", "query")]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--windows", type=int, default=20, help="WikiText-2 test windows of 128 tokens")
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--rates", default="0.2,0.5")
    parser.add_argument("--criteria", default="flap")
    parser.add_argument("--render", action="store_true", help="only rewrite gemma.md from gemma.json")
    parser.add_argument("--allocations", default=None,
                        help="comma list of search operators (uniform, owl, random, ...) to run through `selfprune "
                             "search` on Gemma instead of the uniform rows")
    parser.add_argument("--budget", type=int, default=100, help="evaluations for the searching operators")
    args = parser.parse_args()
    if args.allocations:
        allocations(args)
        return
    if args.render:
        data = json.loads((RESULTS / "gemma.json").read_text())
        write_results("gemma", data, render(data))
        return
    start = time.time()
    model, tokenizer = load_model("gemma3-270m")
    evaluator = PerplexityEvaluator(tokenizer, "wikitext2", "test", 128, args.windows, 8, DATA_DIR)
    calibration = CalibrationConfig(source="c4", num_samples=args.calib_samples, seq_len=128, seed=0, data_dir=DATA_DIR)
    path = RESULTS / "gemma.json"
    data = json.loads(path.read_text()) if path.exists() else {"rows": []}
    data |= {"model": "gemma3-270m (Gemma 3 270M, Q4_K_M GGUF dequantized)", "versions": versions(),
             "settings": {"ppl": evaluator.settings, "calibration": calibration.to_dict()},
             "parameters": sum(p.numel() for p in model.parameters())}
    data["dense_ppl"] = evaluator(model)["ppl"]
    print(f"dense {data['dense_ppl']:.2f}", flush=True)
    done = {(r["criterion"], r["rate"], r["structure"], r["gqa_policy"]) for r in data["rows"]}
    calibrated = None
    for criterion in args.criteria.split(","):
        for structure, policy in STRUCTURE_POLICIES:
            pruner = Pruner(model, tokenizer, criterion, calibrated or calibration, policy, structure=structure,
                            progress=False)
            calibrated = calibrated or pruner.calibration
            for rate in (float(r) for r in args.rates.split(",")):
                if (criterion, rate, structure, policy) in done:
                    continue
                pruned, report = pruner.build([rate] * pruner.num_layers)
                row = {"criterion": criterion, "rate": rate, "structure": structure, "gqa_policy": policy,
                       "achieved": report.achieved_rate, "params": report.pruned_total_params,
                       "query_heads": sum(l.num_heads for l in report.layers),
                       "ppl": evaluator(pruned)["ppl"]}
                data["rows"].append(row)
                print(row, flush=True)
                data["seconds"] = time.time() - start
                write_results("gemma", data, render(data))


def allocations(args) -> None:
    """Per-layer allocations on Gemma through `selfprune search`, with the SmolLM2 search runs' settings (FLAP, the
    group GQA policy, C4 64 x 128, 6 WikiText-2 validation windows, seed 0), then scored on the test windows."""
    data = json.loads((RESULTS / "gemma.json").read_text())
    rows = data.setdefault("allocations", [])
    _, tokenizer = load_model("gemma3-270m")
    evaluator = PerplexityEvaluator(tokenizer, "wikitext2", "test", 128, args.windows, 8, DATA_DIR)
    for rate in (float(r) for r in args.rates.split(",")):
        for operator in args.allocations.split(","):
            if any(r["operator"] == operator and r["target"] == rate for r in rows):
                continue
            budget = 1 if operator in ("uniform", "owl") else args.budget
            out = run_search(operator, rate, budget, 6, 0, criterion="flap", model="gemma3-270m")
            summary = json.loads((out / "summary.json").read_text())
            config = json.loads((out / "config.json").read_text())
            model, _ = load_model(str(out / "model"))
            rows.append({"operator": operator, "target": rate, "budget": budget, "evaluations": summary["evaluations"],
                         "criterion": config["criterion"], "gqa_policy": config["gqa_policy"],
                         "best_fitness_valid_ppl": summary["best_fitness"], "test_ppl": evaluator(model)["ppl"],
                         "search_wall_seconds": summary["wall_seconds"], "best_rates": summary["best_rates"]})
            data["versions"] = versions()
            write_results("gemma", data, render(data))


def render(data: dict) -> str:
    lines = [f"# Gemma 3 270M: uniform pruning (WikiText-2 test, seq-len 128, "
             f"{data['settings']['ppl'].get('windows', '?')} windows)", "",
             f"Dense perplexity {data['dense_ppl']:.2f}; {data['parameters']:,} parameters (embeddings ~63%). "
             "MQA: with one key-value head `group` never removes attention (the only group is all of it), so "
             "`group` rows prune MLP channels only; `query` removes query heads sharing the KV head.", "",
             "| criterion | rate | structure | GQA policy | achieved | query heads left (of 72) | ppl |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(data["rows"], key=lambda r: (r["criterion"], r["rate"], r["structure"], r["gqa_policy"])):
        lines.append(f"| {r['criterion']} | {r['rate']:.0%} | {r['structure']} | {r['gqa_policy']} | "
                     f"{r['achieved']:.2%} | {r['query_heads']} | {r['ppl']:.2f} |")
    if data.get("allocations"):
        lines += ["", "## Per-layer allocations (`selfprune search`)", "",
                  "FLAP, C4 64 x 128 calibration, fitness WikiText-2 validation 6 x 128, search seed 0 (the SmolLM2 "
                  "search runs' settings); test perplexity on the windows above. One run each.", "",
                  "| target | operator | GQA policy | evaluations | best valid ppl | test ppl | search s |",
                  "|---|---|---|---|---|---|---|"]
        for r in sorted(data["allocations"], key=lambda r: (r["target"], r["test_ppl"])):
            lines.append(f"| {r['target']:.0%} | {r['operator']} | {r['gqa_policy']} | {r['evaluations']} | "
                         f"{r['best_fitness_valid_ppl']:.2f} | {r['test_ppl']:.2f} | {r['search_wall_seconds']:.0f} |")
    return "\n".join(lines + next_to_smollm2(data))


def next_to_smollm2(data: dict) -> list[str]:
    """Gemma's rows beside SmolLM2's with the same criterion and calibration (core.json's head-scoring rows:
    `flap`, group policy, C4 128 x 128, WikiText-2 test 80 x 128), as perplexity over each model's dense."""
    core = json.loads((RESULTS / "core.json").read_text()).get("head_scoring")
    if not core:
        return []
    smol = {(r["structure"], r["rate"]): r["ppl"] for r in core["rows"] if r["criterion"] == "flap"}
    gemma = {(r["structure"], r["gqa_policy"], r["rate"]): r["ppl"] for r in data["rows"] if r["criterion"] == "flap"}
    lines = ["", "## Next to SmolLM2-135M", "",
             f"Same criterion (`flap`), calibration (C4 {core['settings']['calibration']['num_samples']} x "
             f"{core['settings']['calibration']['seq_len']}) and test windows; SmolLM2's rows from `core.json` "
             f"(GQA policy {core['settings']['gqa_policy']}, 9 query / 3 KV heads; dense {core['dense_ppl']:.2f}). "
             "Perplexity, and in brackets its ratio to the model's dense perplexity.", "",
             "| rate | structure | SmolLM2 (group) | Gemma 3 270M (group: MLP only) | Gemma 3 270M (query) |",
             "|---|---|---|---|---|"]

    def cell(ppl, dense):
        return f"{ppl:.2f} ({ppl / dense:.2f}x)" if ppl is not None else "n/a"

    for rate in sorted({k[2] for k in gemma}):
        for structure in ("mlp_first", "proportional", "standardized"):
            lines.append(f"| {rate:.0%} | {structure} | {cell(smol.get((structure, rate)), core['dense_ppl'])} | "
                         f"{cell(gemma.get((structure, 'group', rate)), data['dense_ppl'])} | "
                         f"{cell(gemma.get((structure, 'query', rate)), data['dense_ppl'])} |")
    return lines


if __name__ == "__main__":
    main()
