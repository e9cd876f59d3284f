"""Multi-fidelity: does re-scoring a search's top candidates on more validation tokens pick a better model?

For each finished search run of the search benchmark (results/search*.json, searched operators only), a copy of
the run is resumed with ``--rescore-top K --rescore-windows N``: no new evaluation, only the K best candidates
scored again on N WikiText-2 validation windows, and the best of those saved. Reported: WikiText-2 test
perplexity (the same 80 windows as the search benchmark) of the cheap winner and of the re-scored choice, and
what the re-scoring cost. The test split is never used to choose.

    python bench/bench_rescore.py [--top 5] [--windows 64] [--results search]

The committed results: ``--top 5 --windows 32`` (the runs of bench/results/search.json).
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from common import DATA_DIR, RESULTS, versions, write_results

from selfprune.cli import main as cli
from selfprune.models import load_model
from selfprune.evaluation.perplexity import PerplexityEvaluator

BENCH = Path(__file__).resolve().parent


def rescored_copy(run: Path, top: int, windows: int) -> Path:
    out = run.with_name(f"{run.name}-rescore{top}x{windows}")
    if not (out / "summary.json").is_file():
        if not out.exists():  # else a killed earlier attempt: the resume reuses its rescore.jsonl
            shutil.copytree(run, out)
            (out / "summary.json").unlink()
        code = cli(["search", "--resume", str(out), "--rescore-top", str(top), "--rescore-windows", str(windows),
                    "--no-progress"])
        if code != 0:
            raise SystemExit(f"re-scoring {out} failed with exit code {code}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--results", default="search", help="comma list of bench/results/<name>.json to take runs from")
    parser.add_argument("--test-windows", type=int, default=80)
    parser.add_argument("--gqa-policy", default="group", help="only runs with this GQA policy")
    args = parser.parse_args()
    _, tokenizer = load_model("default")
    test = PerplexityEvaluator(tokenizer, "wikitext2", "test", 128, args.test_windows, 8, DATA_DIR)
    out_file = RESULTS / "rescore.json"
    rows = json.loads(out_file.read_text())["rows"] if out_file.is_file() else []
    done = {r["run_dir"] for r in rows}
    sources = [r for name in args.results.split(",") for r in json.loads((RESULTS / f"{name}.json").read_text())["rows"]]
    for source in sources:
        if source["evaluations"] <= 1 or source["run_dir"] in done:
            continue
        done.add(source["run_dir"])  # a run may be listed in several results files
        if source.get("gqa_policy", args.gqa_policy) != args.gqa_policy:
            continue
        start = time.time()
        copy = rescored_copy(BENCH / source["run_dir"], args.top, args.windows)
        summary = json.loads((copy / "summary.json").read_text())
        rescore = summary["rescore"]
        model, _ = load_model(str(copy / "model"))
        rescored_test = test(model)["ppl"]
        cheap_test = rescored_test  # the same model when re-scoring kept the cheap winner
        if summary["best_index"] != rescore["cheapest_winner_index"]:
            cheap_test = test(load_model(str(BENCH / source["run_dir"] / "model"))[0])["ppl"]
        rows.append({
            "operator": source["operator"], "target": source["target"], "budget": source["budget"],
            "evaluations": source["evaluations"], "run_dir": source["run_dir"],
            "cheap_winner": {"index": rescore["cheapest_winner_index"], "valid_ppl": source["best_fitness_valid_ppl"],
                             "test_ppl": cheap_test},
            "rescored_choice": {"index": summary["best_index"], "valid_ppl_rescored": rescore["best_rescored_fitness"],
                                "test_ppl": rescored_test},
            "candidates": rescore["candidates"], "rescore_seconds": rescore["seconds"],
            "rescore_tokens": rescore["tokens"], "search_eval_seconds": summary["eval_seconds"],
            "bench_seconds": round(time.time() - start),
        })
        save(rows, args, test)
    save(rows, args, test)


def save(rows: list, args, test) -> None:
    lines = ["# Multi-fidelity: re-scoring a search's best candidates on more validation tokens", "",
             f"Each finished search run is resumed with `--rescore-top {args.top} --rescore-windows {args.windows}`: its "
             f"{args.top} best candidates by the cheap fitness (6 WikiText-2 validation windows) are scored again on "
             f"{args.windows} validation windows x 128 tokens and the best of those is kept. Test: WikiText-2 test "
             f"perplexity, first {test.settings['windows']} windows, seq-len 128. Cost: re-scoring seconds over the "
             "search's evaluation seconds.", "",
             "| target | operator | evals | cheap winner (eval #) | test ppl | re-scored choice (eval #) | test ppl | change | cost |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["target"], r["operator"], r["budget"])):
        a, b = r["cheap_winner"], r["rescored_choice"]
        lines.append(f"| {r['target']:.0%} | {r['operator']} | {r['evaluations']} | #{a['index']} | {a['test_ppl']:.2f} | "
                     f"#{b['index']} | {b['test_ppl']:.2f} | {b['test_ppl'] / a['test_ppl'] - 1:+.1%} | "
                     f"{r['rescore_seconds'] / r['search_eval_seconds']:.1%} |")
    write_results("rescore", {"rows": rows, "settings": {"top": args.top, "windows": args.windows, "test": test.settings,
                                                         "versions": versions()}}, "\n".join(lines))


if __name__ == "__main__":
    main()
