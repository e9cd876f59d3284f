"""Issue #3 benchmark: per-layer allocations for SmolLM2-135M found by uniform, OWL-style, random search,
evolution and the LLM operator with the model itself (`--llm self`), on the same evaluation budget.

Fitness: perplexity on WikiText-2 *validation* windows; the final number is WikiText-2 *test* perplexity
(seq-len 128) of each run's saved best model, so the search never sees the reported split.
Results are appended run by run (a long benchmark that is stopped keeps what it finished).

    python bench/bench_search.py [--rates 0.3,0.2,0.5] [--budget 100] [--operators uniform,owl,random,evolution,llm]

`--operators llm-random` runs the ablation (the LLM operator's prompts, repair and fallback, random replies).

The committed results came from (parallel runs write their own --name, then --merge folds them in):

    python bench/bench_search.py --fitness-windows 6 --operators uniform,owl,random,evolution
    python bench/bench_search.py --fitness-windows 6 --operators random,evolution --rates 0.5 --budget 430 --name search-430
    python bench/bench_search.py --fitness-windows 6 --operators llm --llm-server --llm-threads 1 --llm-retries 0 \
        --rates 0.2 --name search-llm          # likewise 0.5 (also --budget 430) and 0.3 (--name search-llm-30)
    python bench/bench_search.py --fitness-windows 6 --merge search-430,search-llm,search-llm-30
    # seeds 1 and 2 beside the seed-0 runs above, and the llm-random ablation (then merged the same way):
    python bench/bench_search.py --fitness-windows 6 --name search-seeds --rates 0.2,0.5 --seeds 1,2 \
        --operators random,evolution
    python bench/bench_search.py --fitness-windows 6 --name search-seeds --rates 0.2,0.5 --seeds 0,1,2 \
        --operators llm-random --llm-retries 0
    python bench/bench_search.py --fitness-windows 6 --merge search-seeds
    # the LLM operator with the v3 prompts (replies usable by construction), seeds 0-2 at 20% and 50%:
    python bench/bench_search.py --fitness-windows 6 --operators llm --llm-server --llm-threads 1 --llm-retries 0 \
        --rates 0.2 --seeds 0,1,2 --name search-llm-v3     # likewise --rates 0.5 and 0.3
    python bench/bench_search.py --fitness-windows 6 --merge search-llm-v3
    # the same with every candidate refit (issue 29): seed 0 first with ridge 1e-3 (the default then), then
    # seeds 0-2 with the swept default 1e-5
    python bench/bench_search.py --fitness-windows 6 --operators llm --llm-server --llm-threads 1 --llm-retries 0 \
        --rates 0.5 --seeds 0,1,2 --reconstruct lstsq --name search-llm-v3-lstsq

`--regenerate` rebuilds a results file and its table from the stored rows alone (no run, no model): it is how
the committed files got the LLM's duplicate replies under one counter, "duplicates" (the runs had counted them
under "duplicate", which the tables did not read):

    for name in search search-430 search-llm search-llm-30; do
        python bench/bench_search.py --name $name --regenerate
    done

A larger budget continues the finished smaller run of the same operator, rate and seed (its first evaluations
are that run's), so the 430-evaluation rows extend the 100-evaluation ones. The LLM's 430-evaluation run was
stopped at 210 by session time: its row comes from a copy finalized with `selfprune search --resume COPY
--budget 210` and scored like the others; rerunning its command continues the original run to 430.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from common import DATA_DIR, RESULTS, search_rows, serve_gguf, versions, write_results

from selfprune.cli import main as cli
from selfprune.models import load_model
from selfprune.evaluation.perplexity import PerplexityEvaluator
from selfprune.reconstruction import DEFAULT_RIDGE
from selfprune.search.llm_operator import DEFAULT_PROMPT_VERSION
from selfprune.search.runner import fold_llm_counts

RUNS = Path(__file__).resolve().parent / "runs"


def run_name(operator: str, target: float, budget: int, seed: int, gqa: str, model: str = "default",
             llm_name: str | None = None, reconstruct: str = "bias", ridge: float | None = None) -> str:
    """The run's folder. LLM runs name their prompt version: the committed v2 runs (llm-t0.2-b100-s0, ...)
    would otherwise share a folder name, and a results row, with the v3 runs of the same seed."""
    if operator == "llm":
        operator += f"-{DEFAULT_PROMPT_VERSION}"
    return (("" if model == "default" else f"{model}-") + operator + (f"-by-{llm_name}" if llm_name else "")
            + f"-t{target:g}-b{budget}-s{seed}" + ("" if gqa == "group" else f"-{gqa}")
            + ("" if reconstruct == "bias" else f"-{reconstruct}")
            + ("" if ridge is None or reconstruct == "bias" else f"-r{ridge:g}"))


def run_search(operator: str, target: float, budget: int, windows: int, seed: int, server=None,
               llm_retries: int = 2, gqa: str = "group", criterion: str = "flap_unsquared",
               model: str = "default", llm_name: str | None = None, reconstruct: str = "bias",
               ridge: float | None = None) -> Path:
    """One `selfprune search` run in bench/runs (resumed when its folder exists). The LLM operator runs on
    `server` (llama.cpp) when given, under the model name `llm_name` (default smollm2), else in transformers."""
    out = RUNS / run_name(operator, target, budget, seed, gqa, model, llm_name, reconstruct, ridge)
    argv = ["search", "--model", model, "--target", str(target), "--operator", operator, "--fitness-windows", str(windows),
            "--seq-len", "128", "--gqa-policy", gqa, "--criterion", criterion,
            "--calib-samples", "64", "--data-dir", DATA_DIR, "--seed", str(seed), "--no-progress", "--device", "cpu",
            "--reconstruct", reconstruct] + ([] if ridge is None or reconstruct == "bias" else ["--ridge", f"{ridge:g}"])
    if operator not in ("uniform", "owl"):
        argv += ["--budget", str(budget)]
    if operator in ("llm", "llm-random"):  # llm-random: the ablation, the LLM operator with random replies
        argv += ["--llm-retries", str(llm_retries)]
    if operator == "llm" and server is None:
        argv += ["--llm", "self", "--llm-max-tokens", "600"]
    elif operator == "llm":  # the same SmolLM2 weights (its GGUF), served by llama.cpp: much faster generation
        argv += ["--llm", f"openai:{llm_name or 'smollm2'}", "--llm-base-url", server.base_url, "--llm-api-key-env",
                 "SELFPRUNE_BENCH_KEY", "--llm-max-tokens", "600"]
    if (out / "summary.json").is_file():
        return out
    runs = {b: RUNS / run_name(operator, target, b, seed, gqa, model, llm_name, reconstruct, ridge)
            for b in range(1, budget)}
    shorter = [path for b, path in sorted(runs.items()) if (path / "summary.json").is_file()]
    if not out.exists() and shorter:
        # A larger budget continues the largest finished smaller one: its first evaluations are that run's.
        shutil.copytree(shorter[-1], out)
        (out / "summary.json").unlink()
    argv += ["--resume", str(out)] if (out / "config.json").is_file() else ["--out", str(out)]
    code = cli(argv)
    if code != 0:
        raise SystemExit(f"search {operator} at {target} failed with exit code {code}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rates", default="0.3,0.2,0.5")
    parser.add_argument("--budget", type=int, default=100)
    parser.add_argument("--operators", default="uniform,owl,random,evolution,llm")
    parser.add_argument("--fitness-windows", type=int, default=8)
    parser.add_argument("--test-windows", type=int, default=80)
    parser.add_argument("--seeds", default="0",
                        help="comma list of search seeds (the calibration stays fixed); runs go seed by seed per rate")
    parser.add_argument("--criterion", default="flap_unsquared",
                        help="the committed runs' criterion (made before `flap` squared the o_proj metric); keep it "
                             "for rows that join them")
    parser.add_argument("--name", default="search", help="results file name in bench/results (parallel runs use their own)")
    parser.add_argument("--llm-server", action="store_true",
                        help="serve the model's own GGUF with llama.cpp for the LLM operator instead of transformers")
    parser.add_argument("--gqa-policy", default="group", choices=("group", "query"))
    parser.add_argument("--ridge", type=float, default=DEFAULT_RIDGE,
                        help="the refit's ridge with --reconstruct lstsq (the first 50%% run, seed 0, used 1e-3, the "
                             "default before the sweep; its folder has no -r suffix)")
    parser.add_argument("--reconstruct", default="bias", choices=("bias", "lstsq"),
                        help="how candidates are finished (lstsq: every candidate refit, issue 29); the run folder "
                             "and row name it when it is not bias")
    parser.add_argument("--merge", default=None,
                        help="comma list of results names (from parallel runs with --name) to merge into --name, "
                             "then only rewrite the table")
    parser.add_argument("--llm-retries", type=int, default=2,
                        help="retries of an unusable LLM answer (the CLI's default is 2)")
    parser.add_argument("--llm-threads", type=int, default=2,
                        help="llama.cpp threads (the search waits on each call, so both cores are free then)")
    parser.add_argument("--llm-model", default="self", choices=("self", "qwen2.5-0.5b", "qwen2.5-1.5b"),
                        help="the LLM operator with --llm-server: the pruned model's own GGUF (self), or a packaged "
                             "Qwen2.5-Coder-Instruct GGUF (scripts/install.sh --with-qwen)")
    parser.add_argument("--regenerate", action="store_true",
                        help="only rebuild results/<name>.json and .md from the stored rows and settings")
    args = parser.parse_args()
    if args.regenerate:
        regenerate(args.name)
        return
    server, llm_name = None, None
    if args.llm_model != "self" and not args.llm_server:
        parser.error("--llm-model needs --llm-server (the Qwen operators are served by llama.cpp)")
    if args.llm_server and args.llm_model == "self":
        from selfprune.models.loading import packaged_default_gguf

        server, _ = serve_gguf(packaged_default_gguf(), args.llm_threads)
    elif args.llm_server:
        from selfprune.models.packaged import assemble

        server, _ = serve_gguf(assemble(args.llm_model), args.llm_threads)
        llm_name = args.llm_model
    _, tokenizer = load_model("default")
    test_evaluator = PerplexityEvaluator(tokenizer, "wikitext2", "test", 128, args.test_windows, 8, DATA_DIR)
    test = test_evaluator.settings
    results_file = RESULTS / f"{args.name}.json"
    rows = json.loads(results_file.read_text())["rows"] if results_file.is_file() else []
    if args.merge:
        known = {r["run_dir"] for r in rows}
        for name in args.merge.split(","):
            for row in json.loads((RESULTS / f"{name}.json").read_text())["rows"]:
                row.setdefault("gqa_policy", gqa_of(row))
                if "best_operator" not in row:
                    summary = json.loads((RUNS.parent / row["run_dir"] / "summary.json").read_text())
                    row["best_operator"] = summary["best_operator"]
                if "best_valid_at_30" not in row:
                    enough = row["evaluations"] >= 30
                    row["best_valid_at_30"] = best_at(RUNS.parent / row["run_dir"], 30) if enough else None
                if row["run_dir"] not in known:
                    rows.append(row)
                    known.add(row["run_dir"])
        save(rows, args, test)
        return
    done = {(r["operator"].split(" ")[0], r["target"], r["budget"], gqa_of(r), r.get("seed", 0),
             r.get("reconstruct", "bias"), r.get("ridge") if r.get("reconstruct", "bias") != "bias" else None,
             r.get("llm_model", "self")) for r in rows}
    plan = [(target, seed, operator) for target in [float(x) for x in args.rates.split(",")]
            for seed in [int(x) for x in args.seeds.split(",")] for operator in args.operators.split(",")]
    for target, seed, operator in plan:
        budget = 1 if operator in ("uniform", "owl") else args.budget
        ridge = None if args.reconstruct == "bias" else args.ridge
        key = (operator, target, budget, args.gqa_policy, seed, args.reconstruct, ridge,
               args.llm_model if operator == "llm" else "self")
        if key in done or (budget == 1 and seed != 0):
            continue  # uniform and OWL do not depend on the search seed
        start = time.time()
        run = run_search(operator, target, budget, args.fitness_windows, seed, server, args.llm_retries,
                         args.gqa_policy, args.criterion, reconstruct=args.reconstruct, ridge=ridge,
                         llm_name=llm_name if operator == "llm" else None)
        summary = json.loads((run / "summary.json").read_text())
        journal = [json.loads(l) for l in (run / "journal.jsonl").read_text().splitlines() if l.strip()]
        model, _ = load_model(str(run / "model"))
        test_ppl = test_evaluator(model)["ppl"]
        forward = [r.get("forward_seconds") for r in journal if r.get("forward_seconds")]
        eval_s = [r["seconds"] for r in journal]
        config = json.loads((run / "config.json").read_text())
        label = operator
        if operator == "llm-random":
            label = f"llm-random (prompts {config['llm']['prompt_version']}, {config['llm']['retries']} retries)"
        if operator == "llm":
            label = (f"llm ({llm_name or 'self'}{', llama.cpp' if server else ''}, prompts "
                     f"{config['llm']['prompt_version']}, {config['llm']['retries']} retries)")
        if args.reconstruct != "bias":   # a table group of its own beside the same search without refit
            label += f" + {args.reconstruct} refit (ridge {config['reconstruction']['ridge']:g})"
        rows.append({
            "operator": label, "target": target, "budget": budget, "gqa_policy": config["gqa_policy"], "seed": seed,
            **({"llm_model": llm_name} if llm_name and operator == "llm" else {}),
            "criterion": config["criterion"],
            **({"reconstruct": args.reconstruct, "ridge": config["reconstruction"]["ridge"],
                "refit_seconds_per_eval": summary.get("refit_seconds_per_eval"),
                "seconds_per_eval_without_refit": summary.get("seconds_per_eval_without_refit"),
                "moments_seconds": summary["reconstruction"]["moments_seconds"]}
               if args.reconstruct != "bias" else {}),
            "best_operator": summary["best_operator"],
            "best_valid_at_30": best_at(run, 30) if summary["evaluations"] >= 30 else None,
            "evaluations": summary["evaluations"], "best_fitness_valid_ppl": summary["best_fitness"],
            "test_ppl": test_ppl, "search_wall_seconds": summary["wall_seconds"],
            "seconds_per_eval": summary["seconds_per_eval"],
            "eval_over_forward": (sum(eval_s) / sum(forward)) if forward else None,
            "llm": summary.get("llm"), "sources": summary.get("sources"), "repairs": summary.get("repairs"), "cache_hits": summary.get("cache_hits"),
            "best_rates": summary["best_rates"], "run_dir": str(run.relative_to(RUNS.parent)),
            "bench_seconds": round(time.time() - start),
        })
        save(rows, args, test)
    save(rows, args, test)  # also regenerates the table when every run was already done


def gqa_of(row: dict) -> str:
    if "gqa_policy" in row:
        return row["gqa_policy"]
    return json.loads((RUNS.parent / row["run_dir"] / "config.json").read_text()).get("gqa_policy", "query")


def best_at(run: Path, evaluations: int) -> float:
    """Best fitness within the first ``evaluations`` (operators compared on an equal, smaller budget)."""
    journal = [json.loads(line) for line in (run / "journal.jsonl").read_text().splitlines() if line.strip()]
    return min(r["fitness"] for r in journal[:evaluations])


def regenerate(name: str) -> None:
    """Rewrite ``results/<name>.json`` and ``.md`` from the stored rows: LLM counters under their current
    names (duplicates were counted under "duplicate" by the runs), the table rebuilt by :func:`save`."""
    data = json.loads((RESULTS / f"{name}.json").read_text())
    rows = data["rows"]
    # a parallel run's file may lack the fields that --merge added (from the run folders) to its merged copy
    merged = {}
    for row in search_rows():
        merged.setdefault(row["run_dir"], {}).update(row)
    for row in rows:
        if row.get("llm"):
            row["llm"] = fold_llm_counts(row["llm"])
        for key in ("gqa_policy", "best_operator", "best_valid_at_30"):
            if key not in row and key in merged.get(row["run_dir"], {}):
                row[key] = merged[row["run_dir"]][key]
    settings = data["settings"]
    save(rows, argparse.Namespace(name=name, fitness_windows=settings["fitness_windows"]), settings["test"],
         settings.get("versions"))


def source_cell(row: dict) -> str:
    """'41 (53.2) / 59 (51.9)': evaluations from replies and from the fallback, best validation ppl of each."""
    sources = row.get("sources")
    if not row["operator"].startswith("llm"):
        return ""
    if not sources:
        return "n/a"
    cells = []
    for key in ("reply", "fallback"):
        entry = sources.get(key) or {}
        best = entry.get("best_fitness")
        cells.append(f"{entry.get('evaluations', 0)}" + (f" ({best:.2f})" if best is not None else ""))
    return " / ".join(cells)


def save(rows: list, args, test: dict, versions_of_runs: dict | None = None) -> None:
    """Write the rows and their table; ``test`` is the test-perplexity evaluator's settings."""
    lines = ["# Search benchmark: SmolLM2-135M, per-layer allocations on the same budget", "",
             f"Fitness: WikiText-2 validation perplexity, {args.fitness_windows} windows x 128 tokens per candidate. "
             f"Reported: WikiText-2 test perplexity of the saved best model, first {test['windows']} windows "
             f"({test['predicted_tokens']:,} predicted tokens), seq-len 128. Criterion FLAP as the first runs had it "
             "(`flap_unsquared`, kept for every seed; mlp_first split; GQA policy per row), calibration C4 64 x 128 with calibration seed 0; 'seed' is the search's own seed. eval/fwd = seconds per evaluation (build + score) over "
             "the pruned forward pass alone. 'best valid @30 evals' compares operators on an equal budget of 30. "
             "'best from': the operator that proposed the best candidate (':fallback': the numeric operator filled a slot "
             "whose LLM reply was unusable). LLM rows: SmolLM2's own weights (the GGUF the default model is converted "
             "from) served by llama.cpp on loopback, 1 thread, temperature 0.7, JSON schema enforced by grammar; "
             "prompt version and retries per row. LLM counts: valid / repaired / unusable / duplicates (a reply "
             "repeating an evaluated candidate) / fallbacks. "
             "A 430-evaluation row continues the 100-evaluation run of the same operator and rate. 'evals from "
             "replies / fallback': evaluated candidates from the LLM's own replies (llm-random: the ablation's random "
             "replies to the same prompts) and from the numeric fallback, with the best validation ppl of each.", "",
             "| target | operator | GQA | budget | seed | evals | best valid ppl | best valid @30 evals | test ppl | best from | search s | s/eval | eval/fwd | LLM v/r/u/dup/fb | evals from replies / fallback |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["target"], gqa_of(r), r["operator"], r["budget"], r.get("seed", 0))):
        llm = r.get("llm") or {}
        counts = ("/".join(str(llm.get(k, 0)) for k in ("valid", "repaired", "unusable", "duplicates", "fallbacks"))
                  if r["operator"].startswith("llm") else "")
        ratio = f"{r['eval_over_forward']:.3f}" if r.get("eval_over_forward") else "n/a"
        gqa = gqa_of(r)
        at30 = f"{r['best_valid_at_30']:.2f}" if r.get("best_valid_at_30") else "n/a"
        lines.append(f"| {r['target']:.0%} | {r['operator']} | {gqa} | {r['budget']} | {r.get('seed', 0)} | {r['evaluations']} | "
                     f"{r['best_fitness_valid_ppl']:.2f} | {at30} | {r['test_ppl']:.2f} | {r.get('best_operator', 'n/a')} | "
                     f"{r['search_wall_seconds']:.0f} | "
                     f"{r['seconds_per_eval']:.2f} | {ratio} | {counts} | {source_cell(r)} |")
    lines += seed_summary(rows)
    write_results(args.name, {"rows": rows, "settings": {"fitness_windows": args.fitness_windows, "test": test,
                                                         "versions": versions_of_runs or versions()}}, "\n".join(lines))


def seed_summary(rows: list) -> list[str]:
    """Mean and spread of test perplexity over search seeds, per rate, GQA policy, operator and budget.

    With three seeds a confidence interval says little, so the table gives the range, and an operator counts as
    ahead of another only where the ranges do not overlap; every other difference is called within the noise."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["target"], gqa_of(r), r["budget"], r["operator"]), []).append(r)
    lines = ["", "## Over search seeds", "",
             "Test perplexity of each run's best model over the search seeds run so far (calibration fixed). "
             "'vs best': where this operator's range of test perplexity overlaps the range of the operator with "
             "the lowest mean over several seeds at that rate and budget ('within the noise'), or lies above it "
             "('behind'); a one-seed run is placed against the ranges of the operators with several seeds. 'all seeds "
             "below uniform and OWL': every seed's test perplexity is lower than both (they do not depend on the "
             "search seed).", "",
             "| target | GQA | budget | operator | seeds | test ppl mean +- std | test ppl range | best valid mean "
             "| vs best | all seeds below uniform and OWL |", "|---|---|---|---|---|---|---|---|---|---|"]
    stats = {}
    for key, members in groups.items():
        tests = [m["test_ppl"] for m in members]
        mean = sum(tests) / len(tests)
        std = (sum((t - mean) ** 2 for t in tests) / (len(tests) - 1)) ** 0.5 if len(tests) > 1 else None
        valid = sum(m["best_fitness_valid_ppl"] for m in members) / len(members)
        stats[key] = {"seeds": sorted(m.get("seed", 0) for m in members), "mean": mean, "std": std,
                      "low": min(tests), "high": max(tests), "valid": valid}
    for key in sorted(stats, key=lambda k: (k[0], k[1], k[2], stats[k]["mean"])):
        s = stats[key]
        peers = [stats[k] for k in stats if k[:3] == key[:3]]
        seeded = [p for p in peers if len(p["seeds"]) > 1]
        best = min(seeded or peers, key=lambda x: x["mean"])
        fixed = [stats[k]["mean"] for k in stats if k[:2] == key[:2] and k[3] in ("uniform", "owl")]
        others = [p for p in seeded if p is not s]
        if key[2] == 1:
            verdict = "no search seed"
        elif len(s["seeds"]) < 2:
            if not others:
                verdict = "one seed"
            elif s["mean"] < min(p["low"] for p in others):
                verdict = "one seed: below every seed of the others"
            elif s["mean"] > max(p["high"] for p in others):
                verdict = "one seed: above every seed of the others"
            else:
                verdict = "one seed: inside the others' ranges"
        elif best is s:
            verdict = "lowest mean"
        else:
            verdict = "within the noise" if s["low"] <= best["high"] else "behind"
        spread = f"{s['mean']:.2f} +- {s['std']:.2f}" if s["std"] is not None else f"{s['mean']:.2f}"
        lines.append(f"| {key[0]:.0%} | {key[1]} | {key[2]} | {key[3]} | {','.join(map(str, s['seeds']))} | "
                     f"{spread} | {s['low']:.2f}-{s['high']:.2f} | {s['valid']:.2f} | {verdict} | "
                     f"{'' if key[2] == 1 or len(fixed) < 2 else ('yes' if s['high'] < min(fixed) else 'no')} |")
    return lines


if __name__ == "__main__":
    main()
