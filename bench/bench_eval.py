"""Issue #4 benchmark: SmolLM2-135M dense vs FLAP-uniform vs the best searched allocation at 20% and 50%:
the seven commonsense tasks (lm-eval, local data, the same first N items of every task for every model),
average accuracy, WikiText-2 test perplexity, and speed ratios against the ideal from FLOPs.

The searched allocations come from bench/bench_search.py's runs (the best test-perplexity run per rate).

    python bench/bench_eval.py [--limit 30] [--rates 0.2,0.5]
"""
from __future__ import annotations

import argparse
import json
import time

from common import DATA_DIR, RESULTS, best_searched_row, versions, write_results

from selfprune.calibration import CalibrationConfig
from selfprune.evaluation.speed import compare_speed
from selfprune.evaluation.zero_shot import REPORTED_METRIC, TASKS, evaluate_zero_shot
from selfprune.models import load_model
from selfprune.evaluation.perplexity import PerplexityEvaluator
from selfprune.pruning import Pruner


def best_searched_rates(target: float) -> tuple[list[float], str] | None:
    best = best_searched_row(target)  # chosen on validation, not on test
    return (best["best_rates"], f"{best['operator']} (budget {best['budget']})") if best else None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit", type=int, default=30, help="first N items of every task")
    parser.add_argument("--rates", default="0.2,0.5")
    parser.add_argument("--test-windows", type=int, default=80)
    args = parser.parse_args()
    start = time.time()
    model, tokenizer = load_model("default")
    ppl = PerplexityEvaluator(tokenizer, "wikitext2", "test", 128, args.test_windows, 8, DATA_DIR)
    pruner = Pruner(model, tokenizer, "flap", CalibrationConfig(num_samples=64, data_dir=DATA_DIR), progress=False)
    candidates = [("dense", None, model)]
    for target in (float(x) for x in args.rates.split(",")):
        candidates.append((f"flap uniform {target:.0%}", target, pruner.build([target] * pruner.num_layers)[0]))
        searched = best_searched_rates(target)
        if searched:
            candidates.append((f"searched {target:.0%}: {searched[1]}", target, pruner.build(searched[0])[0]))
    # Incremental: rows already measured with the same limit are kept (the searched rows come later).
    previous = RESULTS / "eval.json"
    rows = []
    if previous.is_file():
        old = json.loads(previous.read_text())
        if old["settings"]["limit"] == args.limit:
            rows = [r for r in old["rows"] if r["model"] in {name for name, _, _ in candidates}]
    done = {r["model"] for r in rows}
    for name, target, candidate in candidates:
        if name in done:
            continue
        acc = evaluate_zero_shot(candidate, tokenizer, list(TASKS), limit=args.limit, data_dir=DATA_DIR, batch_size=8)
        row = {"model": name, "target": target, "average": acc["average"],
               "tasks": {t: acc["tasks"][t]["value"] for t in TASKS}, "ppl": ppl(candidate)["ppl"]}
        if candidate is not model:
            speed = compare_speed(candidate, model, sweep=[(8, 128)], decode_tokens=16, repeats=5, memory=False)
            row["speed"] = speed
        row["lm_eval_version"] = acc["lm_eval_version"]
        rows.append(row)
        print(name, round(row["average"], 4), round(row["ppl"], 2), flush=True)
        save(rows, args.limit, ppl.settings, start)


def save(rows, limit, ppl_settings, start) -> None:
    dense_avg = next(r["average"] for r in rows if r["model"] == "dense")
    header = "| model | " + " | ".join(f"{t} ({REPORTED_METRIC[t]})" for t in TASKS) + " | average | % of dense | wikitext2 ppl | prefill 8x128 time / ideal | decode time / ideal |"
    lines = ["# Zero-shot benchmark: SmolLM2-135M dense vs FLAP-uniform vs searched", "",
             f"lm-eval {rows[0]['lm_eval_version']}, zero-shot, local data, first {limit} items of every task "
             f"(the same items for every model). WikiText-2 test perplexity on {ppl_settings['predicted_tokens']:,} "
             "predicted tokens at seq-len 128. Speed: pruned / dense time (median of 5, interleaved, CPU) beside the "
             "FLOPs ideal; decode is batch 1, 16 new tokens after a 128-token prompt.", "",
             f"Read with care: {limit} items per task give a standard error near 0.09 per task. SmolLM2-135M is near "
             "chance on most of these tasks, and BoolQ's first items are mostly 'yes', so a model that always answers "
             "'no' (the dense one) scores 0.167 and one that always answers 'yes' scores 0.833: the averages above "
             "dense come from that flip, not from better models. Perplexity is the reliable signal at this size.", "",
             header, "|" + "---|" * (len(TASKS) + 6)]
    for r in rows:
        cells = " | ".join(f"{r['tasks'][t]:.3f}" for t in TASKS)
        speed = r.get("speed")
        prefill = f"{speed['prefill'][0]['time_ratio']:.3f} / {speed['prefill'][0]['ideal_ratio']:.3f}" if speed else "1 / 1"
        decode = f"{speed['decode']['time_ratio']:.3f} / {speed['decode']['ideal_ratio']:.3f}" if speed else "1 / 1"
        lines.append(f"| {r['model']} | {cells} | {r['average']:.4f} | {r['average'] / dense_avg:.1%} | {r['ppl']:.2f} "
                     f"| {prefill} | {decode} |")
    write_results("eval", {"rows": rows, "settings": {"limit": limit, "ppl": ppl_settings, "versions": versions(),
                                                       "wall_seconds": round(time.time() - start)}}, "\n".join(lines))


if __name__ == "__main__":
    main()
