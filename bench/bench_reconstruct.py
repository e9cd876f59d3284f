"""Issue 29 benchmark: refitting the kept weights after pruning (``--reconstruct lstsq``), training-free.

Uniform rates, every criterion, 20 / 30 / 50%, three ways of finishing a pruned layer: ``bias`` (today's
default: FLAP's bias compensation for flap, nothing for wanda_sp / magnitude), ``lstsq`` one-shot (o_proj and
down_proj refit on the dense model's calibration activations) and ``lstsq-seq`` (each layer refit on what the
already pruned layers before it produce). WikiText-2 test perplexity, 80 windows of 128 tokens; calibration is
the default (128 x 128 C4 tokens, seed 0); default structure (mlp_first) and GQA policy (group). Then the ridge
sweep that chose the default lambda, judged on WikiText-2 *validation* (test reported beside it).

    python bench/bench_reconstruct.py --uniform --model default        # SmolLM2-135M (~40 min on 2 cores)
    python bench/bench_reconstruct.py --uniform --model gemma3-270m    # Gemma 3 270M
    python bench/bench_reconstruct.py --ridge-sweep                    # SmolLM2, FLAP 20% and Wanda-sp 50%
    python bench/bench_reconstruct.py --render                         # reconstruct.json / .md from the rows

Rows are appended to results/reconstruct_rows.jsonl as they finish (lanes can run side by side; a row already
there is not measured again). ``seconds`` is the build: for ``lstsq`` from the second moments taken once per
model (``moments_seconds``, shared by every one-shot row, as a search shares them), for ``lstsq-seq`` including
its own layer-by-layer pass. ``peak_rss_delta_mib`` is the most resident memory the build added.
"""
from __future__ import annotations

import argparse
import json
import os
import threading
import time

import torch

from common import DATA_DIR, RESULTS, versions, write_results

from selfprune.calibration import CalibrationConfig
from selfprune.models import load_model
from selfprune.evaluation.perplexity import PerplexityEvaluator
from selfprune.pruning import Pruner
from selfprune.reconstruction import DEFAULT_RIDGE

ROWS = RESULTS / "reconstruct_rows.jsonl"
CRITERIA = ("flap", "wanda_sp", "magnitude")
RATES = (0.2, 0.3, 0.5)
MODES = ("bias", "lstsq", "lstsq-seq")
RIDGES = (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2)
SWEEP = (("flap", 0.2), ("wanda_sp", 0.2))
WINDOWS = 80


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRSS:
    """Samples this process's resident memory every 20 ms while the block runs."""

    def __enter__(self):
        self.start = self.peak = rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_mib())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mib())

    @property
    def delta(self) -> float:
        return self.peak - self.start


def done_keys() -> set:
    if not ROWS.exists():
        return set()
    return {row_key(json.loads(line)) for line in ROWS.read_text().splitlines() if line.strip()}


def row_key(row: dict) -> tuple:
    key = (row["section"], row["model"], row["criterion"], row["rate"], row["mode"], row.get("ridge"))
    return key + (row["from"]["run_dir"],) if row["section"] == "searched" else key


def append(row: dict) -> None:
    with open(ROWS, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())
    print(json.dumps({k: row[k] for k in ("section", "model", "criterion", "rate", "mode", "ridge", "ppl",
                                          "seconds")}), flush=True)


class Bench:
    def __init__(self, model_name: str):
        self.model_name = model_name
        self.model, self.tokenizer = load_model(model_name)
        self.calibration = CalibrationConfig(source="c4", num_samples=128, seq_len=128, seed=0, data_dir=DATA_DIR)
        self.evaluators = {split: PerplexityEvaluator(self.tokenizer, "wikitext2", split, 128, WINDOWS, 8, DATA_DIR)
                           for split in ("test", "validation")}
        self._bases: dict = {}
        self._moments = None
        self.moments_seconds = None

    def dense(self, split: str) -> float:
        return self.evaluators[split](self.model)["ppl"]

    def base(self, criterion: str) -> Pruner:
        """One calibration and scoring per criterion, shared by every mode and rate."""
        if criterion not in self._bases:
            self._bases[criterion] = Pruner(self.model, self.tokenizer, criterion, self.calibration, progress=False)
            if self._bases[criterion].calibration is None:   # magnitude: the refit still needs the text
                from selfprune.calibration import calibrate

                self._bases[criterion].calibration = calibrate(self.model, self.tokenizer,
                                                               self._bases[criterion].adapter, self.calibration, False)
        return self._bases[criterion]

    def pruner(self, criterion: str, mode: str, ridge: float, intercept: bool = True) -> Pruner:
        """``intercept=False``: the refit fits no bias (for llama.cpp graphs that have none)."""
        base = self.base(criterion)
        state = {k: v for k, v in base.state().items() if k not in ("moments",)}
        state |= {"reconstruct": "bias" if mode == "bias" else "lstsq", "sequential": mode == "lstsq-seq",
                  "ridge": ridge, "moments": None, "refit_intercept": intercept}
        pruner = Pruner.from_state(self.model, state, self.tokenizer)
        if mode == "lstsq":   # the dense model's moments do not depend on the criterion: taken once per model
            if self._moments is None:
                start = time.perf_counter()
                self._moments = pruner.cache_moments()
                self.moments_seconds = time.perf_counter() - start
            pruner.moments = self._moments
        return pruner

    def row(self, section: str, criterion: str, rate: float, mode: str, ridge: float, splits=("test",),
            rates: list[float] | None = None) -> dict:
        pruner = self.pruner(criterion, mode, ridge)
        with PeakRSS() as memory:
            start = time.perf_counter()
            pruned, report = pruner.build(rates or [rate] * pruner.num_layers)
            seconds = time.perf_counter() - start
        row = {"section": section, "model": self.model_name, "criterion": criterion, "rate": rate, "mode": mode,
               "ridge": None if mode == "bias" else ridge, "achieved_rate": report.achieved_rate,
               "seconds": seconds, "refit_seconds": pruner.refit_seconds, "peak_rss_delta_mib": memory.delta,
               "moments_seconds": self.moments_seconds if mode == "lstsq" else None}
        for split in splits:
            key = "ppl" if split == "test" else f"ppl_{split}"
            row[key] = self.evaluators[split](pruned)["ppl"]
        del pruned
        return row


def run_uniform(model_name: str, criteria=CRITERIA, rates=RATES, modes=MODES) -> None:
    done = done_keys()
    bench = Bench(model_name)
    if ("dense", model_name, None, 0.0, "dense", None) not in done:
        append({"section": "dense", "model": model_name, "criterion": None, "rate": 0.0, "mode": "dense",
                "ridge": None, "ppl": bench.dense("test"), "ppl_validation": bench.dense("validation"),
                "seconds": 0.0, "settings": settings(bench), "versions": versions()})
    for criterion in criteria:
        for rate in rates:
            for mode in modes:
                ridge = None if mode == "bias" else DEFAULT_RIDGE
                if ("uniform", model_name, criterion, rate, mode, ridge) in done:
                    continue
                append(bench.row("uniform", criterion, rate, mode, DEFAULT_RIDGE))


def run_searched(model_name: str, modes=MODES) -> None:
    """The best searched allocation of each target (results/search*.json, chosen on validation), rebuilt with
    the criterion its search used and finished each way."""
    from common import best_searched_row, search_rows

    done = done_keys()
    bench = Bench(model_name)
    refit_searches = [r for r in search_rows() if r.get("reconstruct") == "lstsq"]
    for target in RATES:
        sources = [best_searched_row(target)] + [r for r in refit_searches if r["target"] == target]
        for source, mode in ((source, mode) for source in sources for mode in modes):
            ridge = None if mode == "bias" else DEFAULT_RIDGE
            if ("searched", model_name, source["criterion"], target, mode, ridge, source["run_dir"]) in done:
                continue
            row = bench.row("searched", source["criterion"], target, mode, DEFAULT_RIDGE, rates=source["best_rates"])
            append(row | {"from": {"run_dir": source["run_dir"], "operator": source["operator"],
                                   "seed": source["seed"], "test_ppl": source["test_ppl"]},
                          "rates": source["best_rates"]})


def run_sweep(model_name: str, cases=SWEEP) -> None:
    done = done_keys()
    bench = Bench(model_name)
    for criterion, rate in cases:
        for ridge in RIDGES:
            if ("ridge", model_name, criterion, rate, "lstsq", ridge) in done:
                continue
            append(bench.row("ridge", criterion, rate, "lstsq", ridge, splits=("test", "validation")))


def settings(bench: Bench) -> dict:
    return {"ppl": bench.evaluators["test"].settings, "calibration": bench.calibration.to_dict(),
            "structure": "mlp_first", "gqa_policy": "group"}


def load_rows() -> list[dict]:
    return [json.loads(line) for line in ROWS.read_text().splitlines() if line.strip()]


SWEEP_TOLERANCE = 0.005


def chosen_ridge(sweep: list[dict]) -> float:
    """The largest swept ridge whose validation perplexity is within SWEEP_TOLERANCE of each case's best."""
    cases: dict = {}
    for r in sweep:
        cases.setdefault((r["model"], r["criterion"], r["rate"]), {})[r["ridge"]] = r["ppl_validation"]
    ridges = set.intersection(*(set(c) for c in cases.values()))
    good = [x for x in ridges if all(c[x] <= (1 + SWEEP_TOLERANCE) * min(c.values()) for c in cases.values())]
    return max(good)


def render(data: dict) -> str:
    rows = data["rows"]
    lines = ["# Reconstruction: refitting o_proj / down_proj after pruning (training-free)", "",
             "WikiText-2 test perplexity, 80 windows of 128 tokens; uniform rates; calibration 128 x 128 C4 tokens "
             "(seed 0); structure mlp_first, GQA policy group. `bias`: today's finish (FLAP's bias compensation "
             "for flap, none for wanda_sp / magnitude); `lstsq`: one-shot ridge refit on the dense activations; "
             "`lstsq-seq`: each layer refit on the already pruned layers' outputs. Ridge "
             f"{DEFAULT_RIDGE:g} x mean diagonal. Generated by bench/bench_reconstruct.py from reconstruct.json. Seconds "
             "and peak memory (resident memory the build added) were measured with up to five benchmark processes "
             "sharing the 2 cores: indicative only.", ""]
    for model in sorted({r["model"] for r in rows}):
        dense = next((r for r in rows if r["model"] == model and r["mode"] == "dense"), None)
        uniform = [r for r in rows if r["model"] == model and r["section"] == "uniform"]
        if not uniform:
            continue
        lines += [f"## {model}" + (f" (dense {dense['ppl']:.2f})" if dense else ""), "",
                  "| criterion | rate | bias | lstsq | lstsq-seq | bias / lstsq | lstsq s | lstsq-seq s | "
                  "peak MiB (lstsq / seq) |", "|---|---|---|---|---|---|---|---|---|"]
        for criterion in CRITERIA:
            for rate in RATES:
                cells = {r["mode"]: r for r in uniform if r["criterion"] == criterion and r["rate"] == rate}
                if not cells:
                    continue

                def ppl(mode):
                    return f"{cells[mode]['ppl']:.2f}" if mode in cells else "-"

                ratio = (f"{cells['bias']['ppl'] / cells['lstsq']['ppl']:.2f}x"
                         if "bias" in cells and "lstsq" in cells else "-")
                secs = [f"{cells[m]['seconds']:.1f}" if m in cells else "-" for m in ("lstsq", "lstsq-seq")]
                mem = "/".join(f"{cells[m]['peak_rss_delta_mib']:.0f}" if m in cells else "-"
                               for m in ("lstsq", "lstsq-seq"))
                lines.append(f"| {criterion} | {rate:.0%} | {ppl('bias')} | {ppl('lstsq')} | {ppl('lstsq-seq')} | "
                             f"{ratio} | {secs[0]} | {secs[1]} | {mem} |")
        moments = next((r["moments_seconds"] for r in uniform if r.get("moments_seconds")), None)
        if moments:
            lines += ["", f"One-shot rows share the dense model's second moments, taken once in {moments:.1f} s "
                          "(the lstsq seconds above are the refit and slicing from them); lstsq-seq seconds include "
                          "its own layer-by-layer pass."]
        lines.append("")
    searched = [r for r in rows if r["section"] == "searched"]
    if searched:
        lines += ["## Best searched allocations, finished each way (SmolLM2)", "",
                  "The allocation with the best validation fitness per target in results/search*.json, rebuilt "
                  "with the criterion its search used.", "",
                  "| target | from | criterion | bias | lstsq | lstsq-seq |", "|---|---|---|---|---|---|"]
        for target in RATES:
            for run_dir in dict.fromkeys(r["from"]["run_dir"] for r in searched if r["rate"] == target):
                cells = {r["mode"]: r for r in searched if r["rate"] == target and r["from"]["run_dir"] == run_dir}
                first = next(iter(cells.values()))
                lines.append(f"| {target:.0%} | {run_dir} | {first['criterion']} | "
                             + " | ".join(f"{cells[m]['ppl']:.2f}" if m in cells else "-" for m in MODES) + " |")
        lines.append("")
    sweep = [r for r in rows if r["section"] == "ridge"]
    if sweep:
        lines += ["## Ridge sweep (default chosen on validation)", "",
                  "| model | criterion | rate | ridge | validation ppl | test ppl |", "|---|---|---|---|---|---|"]
        for r in sorted(sweep, key=lambda r: (r["model"], r["criterion"], r["rate"], r["ridge"])):
            lines.append(f"| {r['model']} | {r['criterion']} | {r['rate']:.0%} | {r['ridge']:g} | "
                         f"{r['ppl_validation']:.2f} | {r['ppl']:.2f} |")
        lines.append("")
        chosen = chosen_ridge(sweep)
        lines += [f"The largest ridge within {SWEEP_TOLERANCE:.1%} of the best validation perplexity in every case: "
                  f"{chosen:g} (the default is {DEFAULT_RIDGE:g}). Smaller ridges fit the calibration tokens "
                  "more closely; a model whose MLP is wider than the calibration has tokens needs the ridge (or "
                  "more calibration samples), so the default keeps the largest one that costs nothing here.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--uniform", action="store_true")
    parser.add_argument("--ridge-sweep", action="store_true")
    parser.add_argument("--sweep-case", default=None, help="one sweep case, CRITERION:RATE (lanes side by side)")
    parser.add_argument("--searched", action="store_true", help="the best searched allocations (SmolLM2)")
    parser.add_argument("--model", default="default")
    parser.add_argument("--criteria", default=",".join(CRITERIA), help="--uniform: these criteria, in this order")
    parser.add_argument("--rates", default=",".join(map(str, RATES)), help="--uniform: these rates, in this order")
    parser.add_argument("--modes", default=",".join(MODES), help="--uniform / --searched: these modes")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--render", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.uniform:
        run_uniform(args.model, args.criteria.split(","), [float(r) for r in args.rates.split(",")],
                    args.modes.split(","))
    if args.ridge_sweep:
        cases = SWEEP
        if args.sweep_case:
            criterion, rate = args.sweep_case.split(":")
            cases = [(criterion, float(rate))]
        run_sweep(args.model, cases)
    if args.searched:
        run_searched(args.model, args.modes.split(","))
    if args.render or not (args.uniform or args.ridge_sweep or args.searched):
        data = {"rows": load_rows(), "default_ridge": DEFAULT_RIDGE, "windows": WINDOWS}
        write_results("reconstruct", data, render(data))


if __name__ == "__main__":
    main()
