"""Issue 10, part 4 (first rows): Gemma 3 270M (MQA: 4 query heads, 1 key-value head; Gemma terms apply to
its weights), WikiText-2 test perplexity (seq-len 128) dense vs uniform FLAP / Wanda-sp / magnitude, both GQA
policies and the head/MLP split options, next to SmolLM2's bench/results/core.md.

Gemma needs <bos> at the start of every window (4 windows of WikiText-2: ppl 245 without, 45 with); selfprune's
perplexity and calibration windows carry it for every tokenizer that has one (`bos_per_window` in the settings).

    python bench/bench_gemma.py --windows 80 [--rates 0.2,0.5] [--criteria flap]   # results/gemma.{json,md}
    python bench/bench_gemma.py --windows 80 --rates 0.2,0.3,0.5 --criteria wanda_sp,magnitude,flap \
        --structures mlp_first:group,standardized:query   # (proportional:group equals mlp_first:group with MQA)
    python bench/bench_gemma.py --windows 80 --allocations uniform,owl   # per-layer allocations via selfprune search
    python bench/bench_gemma.py --windows 80 --allocations random,evolution,llm:smollm2   # searches, 100 evaluations
    python bench/bench_gemma.py --windows 80 --allocations llm:gemma3-270m   # (beside it) Gemma as its own operator
    python bench/bench_gemma.py --windows 80 --allocations random --rates 0.2 --seeds 1,2   # more search seeds
"""
from __future__ import annotations

import argparse
import json

from common import DATA_DIR, RESULTS, serve_gguf, versions, write_results
from bench_search import run_search, seed_summary

from selfprune.calibration import CalibrationConfig
from selfprune.models import load_model
from selfprune.evaluation.perplexity import PerplexityEvaluator
from selfprune.pruning import Pruner
from selfprune.search.runner import fold_llm_counts

STRUCTURE_POLICIES = [("proportional", "group"), ("proportional", "query"), ("mlp_first", "group"),
                      ("standardized", "query")]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--windows", type=int, default=20, help="WikiText-2 test windows of 128 tokens")
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--rates", default="0.2,0.5")
    parser.add_argument("--criteria", default="flap")
    parser.add_argument("--structures", default=",".join(f"{s}:{p}" for s, p in STRUCTURE_POLICIES),
                        help="comma list of structure:gqa_policy pairs for the uniform rows")
    parser.add_argument("--render", action="store_true", help="only rewrite gemma.md from gemma.json")
    parser.add_argument("--allocations", default=None,
                        help="comma list of search operators (uniform, owl, random, ...) to run through `selfprune "
                             "search` on Gemma instead of the uniform rows")
    parser.add_argument("--budget", type=int, default=100, help="evaluations for the searching operators")
    parser.add_argument("--seeds", default="0", help="comma list of search seeds (the calibration stays seed 0)")
    args = parser.parse_args()
    if args.allocations:
        allocations(args)
        return
    if args.render:
        data = json.loads((RESULTS / "gemma.json").read_text())
        write_results("gemma", data, render(data))
        return
    model, tokenizer = load_model("gemma3-270m")
    evaluator = PerplexityEvaluator(tokenizer, "wikitext2", "test", 128, args.windows, 8, DATA_DIR)
    calibration = CalibrationConfig(source="c4", num_samples=args.calib_samples, seq_len=128, seed=0, data_dir=DATA_DIR)
    header = {"model": "gemma3-270m (Gemma 3 270M, Q4_K_M GGUF dequantized)", "versions": versions(),
              "settings": {"ppl": evaluator.settings, "calibration": calibration.to_dict()},
              "parameters": sum(p.numel() for p in model.parameters()), "dense_ppl": evaluator(model)["ppl"]}
    print(f"dense {header['dense_ppl']:.2f}", flush=True)
    path = RESULTS / "gemma.json"
    done = {(r["criterion"], r["rate"], r["structure"], r["gqa_policy"])
            for r in (json.loads(path.read_text())["rows"] if path.exists() else [])}
    calibrated = None
    for criterion in args.criteria.split(","):
        for structure, policy in (pair.split(":") for pair in args.structures.split(",")):
            rates = [float(r) for r in args.rates.split(",") if (criterion, float(r), structure, policy) not in done]
            if not rates:
                continue
            pruner = Pruner(model, tokenizer, criterion, calibrated or calibration, policy, structure=structure,
                            progress=False)
            calibrated = calibrated or pruner.calibration
            for rate in rates:
                pruned, report = pruner.build([rate] * pruner.num_layers)
                row = {"criterion": criterion, "rate": rate, "structure": structure, "gqa_policy": policy,
                       "achieved": report.achieved_rate, "params": report.pruned_total_params,
                       "query_heads": sum(l.num_heads for l in report.layers),
                       "ppl": evaluator(pruned)["ppl"]}
                print(row, flush=True)
                add_row("rows", row, **header)


def add_row(section: str, row: dict, **fields) -> list:
    """Append `row` to gemma.json's `section` and set `fields`, reading the file just before writing it and its table:
    parallel runs (say one per LLM operator beside the uniform rows) each add their rows without dropping the
    others'. Returns the section as written."""
    path = RESULTS / "gemma.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(fields)
    data.setdefault(section, []).append(row)
    write_results("gemma", data, render(data))
    return data[section]


LLM_GGUFS = {"smollm2": "packaged_default_gguf", "gemma3-270m": "packaged_gemma3_270m_gguf"}


def allocations(args) -> None:
    """Per-layer allocations on Gemma through `selfprune search`, with the SmolLM2 search runs' settings (FLAP, the
    group GQA policy, C4 64 x 128 calibration seed 0, 6 WikiText-2 validation windows), one run per search seed,
    then scored on the test windows.
    `llm:NAME` runs the LLM operator with NAME's packaged GGUF (smollm2 or gemma3-270m) served by llama.cpp
    (1 thread, no retries: the schema makes the replies usable, an unusable one goes to the numeric fallback)."""
    import selfprune.models.loading as loading

    data = json.loads((RESULTS / "gemma.json").read_text())
    rows = data.setdefault("allocations", [])
    _, tokenizer = load_model("gemma3-270m")
    evaluator = PerplexityEvaluator(tokenizer, "wikitext2", "test", 128, args.windows, 8, DATA_DIR)
    servers = {}  # llm name -> its llama.cpp server, started on first use, stopped at exit
    runs = [(seed, float(rate), spec) for seed in (int(s) for s in args.seeds.split(","))
            for rate in args.rates.split(",") for spec in args.allocations.split(",")]
    for seed, rate, spec in runs:
        operator, _, llm_name = spec.partition(":")
        if operator in ("uniform", "owl") and seed != 0:
            continue  # no search: the seed changes nothing
        if any(r["operator"] == operator and r["target"] == rate and r.get("llm_model") == (llm_name or None)
               and r.get("seed", 0) == seed for r in rows):
            continue
        if llm_name and llm_name not in servers:
            servers[llm_name] = serve_gguf(getattr(loading, LLM_GGUFS[llm_name])(), 1)[0]
        budget = 1 if operator in ("uniform", "owl") else args.budget
        out = run_search(operator, rate, budget, 6, seed, server=servers.get(llm_name), llm_retries=0,
                         criterion="flap", model="gemma3-270m", llm_name=llm_name or None)
        summary = json.loads((out / "summary.json").read_text())
        config = json.loads((out / "config.json").read_text())
        model, _ = load_model(str(out / "model"))
        row = {"operator": operator, "target": rate, "seed": seed, "budget": budget,
               "evaluations": summary["evaluations"],
               "criterion": config["criterion"], "gqa_policy": config["gqa_policy"],
               "best_fitness_valid_ppl": summary["best_fitness"], "test_ppl": evaluator(model)["ppl"],
               "search_wall_seconds": summary["wall_seconds"], "best_operator": summary["best_operator"],
               "best_rates": summary["best_rates"]}
        if operator in ("llm", "llm-random"):
            row |= {"llm_model": llm_name or None, "prompt_version": config["llm"]["prompt_version"],
                    "retries": config["llm"]["retries"],
                    "llm": fold_llm_counts(summary.get("llm") or {}), "sources": summary.get("sources")}
        rows = add_row("allocations", row, versions=versions())


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
                  "FLAP, C4 64 x 128 calibration (seed 0), fitness WikiText-2 validation 6 x 128 (the SmolLM2 "
                  "search runs' settings); test perplexity on the windows above. One row per search seed.", "",
                  "LLM rows: the operator model's packaged GGUF served by llama.cpp on loopback (1 thread, temperature "
                  "0.7, JSON schema enforced by grammar, no retries); LLM counts valid / repaired / unusable / "
                  "duplicates / fallbacks; 'best from' names the operator that proposed the best candidate.", "",
                  "| target | operator | seed | GQA policy | evaluations | best valid ppl | test ppl "
                  "| vs uniform / OWL | best from | LLM v/r/u/dup/fb | search s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        fixed = {(r["target"], r["operator"]): r["test_ppl"] for r in data["allocations"]
                 if r["operator"] in ("uniform", "owl")}
        for r in sorted(data["allocations"], key=lambda r: (r["target"], r["test_ppl"])):
            name = allocation_name(r)
            references = [fixed.get((r["target"], o)) for o in ("uniform", "owl")]
            versus = ("" if r["operator"] in ("uniform", "owl") or None in references else
                      " / ".join("below" if r["test_ppl"] < ref else "equal" if r["test_ppl"] == ref else "above"
                                 for ref in references))
            llm = r.get("llm") or {}
            counts = ("/".join(str(llm.get(k, 0)) for k in ("valid", "repaired", "unusable", "duplicates", "fallbacks"))
                      if r.get("llm_model") else "")
            seed = "" if r["operator"] in ("uniform", "owl") else r.get("seed", 0)
            lines.append(f"| {r['target']:.0%} | {name} | {seed} | {r['gqa_policy']} | {r['evaluations']} | "
                         f"{r['best_fitness_valid_ppl']:.2f} | {r['test_ppl']:.2f} | {versus} | "
                         f"{r.get('best_operator', '')} | {counts} | {r['search_wall_seconds']:.0f} |")
        # the SmolLM2 table's summary: mean, spread and range over search seeds, noise verdicts, all seeds below
        lines += seed_summary([r | {"operator": allocation_name(r)} for r in data["allocations"]])
    return "\n".join(lines + search_next_to_smollm2(data) + next_to_smollm2(data))


def allocation_name(row: dict) -> str:
    return row["operator"] + (f" ({row['llm_model']}, prompts {row['prompt_version']})" if row.get("llm_model") else "")


def search_next_to_smollm2(data: dict) -> list[str]:
    """Whether SmolLM2's search conclusions hold on Gemma, from both models' seed-0 rows at 100 evaluations (group
    policy): does the best search beat uniform and OWL, does OWL beat uniform, and how the operators rank."""
    all_smol = [r for r in json.loads((RESULTS / "search.json").read_text())["rows"]
                if r.get("gqa_policy") == "group" and r["budget"] in (1, 100)]
    smol_rows = [r for r in all_smol if r.get("seed", 0) == 0]
    random_seeds = {}
    for r in all_smol:
        if r["operator"] == "random":
            random_seeds.setdefault(r["target"], []).append(r["test_ppl"])
    noise = ", ".join(f"{max(v) - min(v):.0f} at {t:.0%}" for t, v in sorted(random_seeds.items()) if len(v) > 1)

    def smol_name(r):
        return r["operator"].split(" ")[0] + (":self" if r["operator"].startswith("llm (") else "")

    models = {"SmolLM2-135M": {(r["target"], smol_name(r)): r["test_ppl"] for r in smol_rows},
              "Gemma 3 270M": {(r["target"], r["operator"] + (f":{r['llm_model']}" if r.get("llm_model") else "")):
                               r["test_ppl"] for r in data.get("allocations", []) if r.get("seed", 0) == 0}}
    rates = sorted({t for t, _ in models["Gemma 3 270M"]} & {t for t, _ in models["SmolLM2-135M"]})
    if not rates:
        return []
    lines = ["", "## Do SmolLM2's search conclusions hold on Gemma?", "",
             "Test perplexity of each operator's best model, search seed 0, 100 evaluations, group policy, one run "
             "each (SmolLM2's rows from `search.json`: criterion `flap_unsquared`, its LLM row SmolLM2 itself with "
             "prompts v2; Gemma's rows above: `flap`, prompts v3). Searched = random, evolution and the LLM "
             "operators. A one-seed ranking is not known to be beyond the noise: SmolLM2's search seeds moved random "
             f"search's test perplexity by {noise} (`search.md`).", "",
             "| rate | model | uniform | OWL | OWL below uniform | best searched | searched below uniform and OWL "
             "| operators, lowest test ppl first |", "|---|---|---|---|---|---|---|---|"]
    for rate in rates:
        for model, found in models.items():
            here = {op: ppl for (t, op), ppl in found.items() if t == rate}
            uniform, owl = here.get("uniform"), here.get("owl")
            searched = {op: ppl for op, ppl in here.items() if op not in ("uniform", "owl")}
            if uniform is None or owl is None or not searched:
                continue
            best = min(searched, key=searched.get)
            order = ", ".join(f"{op} {ppl:.2f}" for op, ppl in sorted(here.items(), key=lambda kv: kv[1]))
            lines.append(f"| {rate:.0%} | {model} | {uniform:.2f} | {owl:.2f} | {'yes' if owl < uniform else 'no'} | "
                         f"{best} {searched[best]:.2f} | {'yes' if searched[best] < min(uniform, owl) else 'no'} | "
                         f"{order} |")
    return lines


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
