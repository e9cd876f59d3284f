"""Deploy II benchmark: the size / quality frontier of GGUF files llama.cpp runs, dense and pruned.

SmolLM2-135M-Instruct (the default). Dense at every llama-quantize preset, without and with an importance matrix; pruned models
(uniform FLAP at 10 / 20 / 30 / 50% and the best searched allocation at 20 / 30 / 50%, both refit by least squares,
the best training-free finish in bench/results/reconstruct.md; and the refit searched 20% model after KD on 0.1M
tokens, bench/bench_recover.py's, where it exists) at q8_0 / q6_k / q4_k_m / q3_k_m / q2_k with their own importance
matrix. Columns: file MiB, MiB of the decoder layers alone (what scales to 7B / 70B, where the embeddings are 2-4% of
the weights), llama.cpp perplexity (WikiText-2 test, 80 windows of 128, the PyTorch
evaluator's windows, llama.cpp's default f16 KV cache), and with --speed prefill / decode tokens/s at 1 and 2
threads, each pruned file timed interleaved with the dense file of the same preset.

Gemma 3 270M (`--base-model gemma3-270m`): dense at f16 / q8_0 / q4_k_m / q2_k with and without an importance matrix,
uniform FLAP 20 / 50% and the OWL allocation at 20% (no search has run on Gemma; OWL's uneven MLP widths show what
the one-shape `gemma3` graph's padding costs) at q8_0 / q4_k_m / q2_k, on the first 40 test windows (llama.cpp's
perplexity over a 262k-token vocabulary costs ~16 minutes for 80 windows here). Its graph has no o_proj /
down_proj bias, so the refit fits none (`--bias-compensation off`).

    python bench/bench_frontier.py --quality       # export, quantize, perplexity (rows appended, resumable)
    python bench/bench_frontier.py --speed         # prefill / decode timings (run on an otherwise idle machine)
    python bench/bench_frontier.py --render        # frontier.json, frontier.md and the plots from the rows

Importance matrices: C4 validation, 128 x 128 tokens, seed 0 (the calibration text), each model's own (after
pruning and refit), computed by selfprune.imatrix. The work files go to $SELFPRUNE_GGUF_WORK
(/tmp/selfprune-frontier by default).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from common import DATA_DIR, RESULTS, best_searched_row, versions

from selfprune.calibration import CalibrationConfig
from selfprune.io import atomic_write_json, atomic_write_text

ROWS = RESULTS / "frontier_rows.jsonl"
WORK = Path(os.environ.get("SELFPRUNE_GGUF_WORK", "/tmp/selfprune-frontier"))
DENSE_PRESETS = ("f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0", "iq4_xs", "q3_k_m", "q3_k_s", "q2_k", "iq3_xxs",
                 "iq2_xs")
PRUNED_PRESETS = ("q8_0", "q6_k", "q4_k_m", "q3_k_m", "q2_k")
UNIFORM_RATES = (0.1, 0.2, 0.3, 0.5)
SEARCHED_RATES = (0.2, 0.3, 0.5)
CALIBRATION = CalibrationConfig(source="c4", num_samples=128, seq_len=128, seed=0, data_dir=DATA_DIR)
WINDOWS = 80
SPEED_PRESETS = ("q8_0", "q4_k_m")   # the files kept for --speed
THREADS = 1   # llama.cpp threads for quantizing and perplexity (--threads); results do not depend on it
# Other base models (--base-model): fewer presets (each llama.cpp pass over a 262k-token vocabulary costs more)
GEMMA = "gemma3-270m"
GEMMA_DENSE_PRESETS = ("f16", "q8_0", "q4_k_m", "q2_k")
GEMMA_PRUNED_PRESETS = ("q8_0", "q4_k_m", "q2_k")
# llama.cpp's perplexity over Gemma's 262k-token vocabulary costs ~16 min for 80 windows on this shared CPU
WINDOWS_BY_MODEL = {GEMMA: 40}
OWL_M, OWL_LAMBDA = 5.0, 0.08   # selfprune search --operator owl's defaults
BASE_MODEL = "default"   # --base-model
# name -> bench_recover.py row: the refit searched 20% allocation distilled from the dense model
KD_MODELS = {"searched-0.2-kd0.1M": "searched 20% v3 refit kd full 0.1M lr 3e-4"}
TITLES = {"default": "SmolLM2-135M", GEMMA: "Gemma 3 270M"}


def load_rows(base_model: str | None = None) -> list[dict]:
    """The rows of one base model (rows written before other base models were added are the default's)."""
    rows = [json.loads(line) for line in ROWS.read_text().splitlines() if line.strip()] if ROWS.exists() else []
    return [r for r in rows if base_model is None or r.get("base_model", "default") == base_model]


def append(row: dict) -> None:
    with open(ROWS, "a") as handle:
        handle.write(json.dumps(row) + "\n")
    print(json.dumps({k: v for k, v in row.items() if k not in ("rates", "versions")}))


def model_plan() -> dict[str, dict]:
    """name -> how the model is made (rates, criterion); the searched rates are pinned in the rows once measured."""
    plan = {"dense": {"rates": None, "method": "dense"}}
    for rate in UNIFORM_RATES:
        plan[f"uniform-{rate:g}"] = {"rates": rate, "criterion": "flap", "method": "uniform FLAP + lstsq refit"}
    if BASE_MODEL != "default":   # no search has run on it: OWL's allocation stands for the uneven ones
        plan["owl-0.2"] = {"rates": "owl", "target": 0.2, "criterion": "flap",
                           "method": f"OWL allocation (M {OWL_M:g}, lambda {OWL_LAMBDA:g}) FLAP + lstsq refit"}
        return plan
    pinned = {r["model"]: r for r in load_rows(BASE_MODEL)
              if r["model"].startswith("searched") and r.get("kind") != "speed" and "rates" in r}
    for rate in SEARCHED_RATES:
        name = f"searched-{rate:g}"
        if name in pinned:
            plan[name] = {"rates": pinned[name]["rates"], "criterion": pinned[name]["criterion"],
                          "method": pinned[name]["method"]}
            continue
        row = best_searched_row(rate)
        if row:
            plan[name] = {"rates": row["best_rates"], "criterion": row["criterion"],
                          "method": f"searched ({row['operator']}, seed {row['seed']}) + lstsq refit"}
    for name, recovered in KD_MODELS.items():   # distilled models bench_recover.py trained, where they exist
        from bench_recover import recovered_dir

        if (recovered_dir(recovered) / "config.json").is_file():
            plan[name] = {"rates": "folder", "path": str(recovered_dir(recovered)),
                          "method": f"bench_recover.py: {recovered}"}
    return plan


def decoder_mib(path: Path) -> float:
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors if t.name.startswith("blk.")) / 2**20


class Frontier:
    def __init__(self, base_model: str = "default"):
        from bench_reconstruct import Bench

        from selfprune.export.gguf_export import PADDED_FAMILIES

        self.base_model = base_model
        self.bench = Bench(base_model)
        self.tokenizer = self.bench.tokenizer
        self.windows = self.bench.evaluators["test"].windows[:WINDOWS_BY_MODEL.get(base_model, WINDOWS)]
        # llama.cpp's one-shape graphs (gemma3, gemma2, qwen3) have no o_proj / down_proj bias: refit without one
        self.intercept = self.bench.model.config.model_type not in PADDED_FAMILIES
        self.work = WORK if base_model == "default" else WORK / base_model

    def build(self, spec: dict):
        from selfprune.reconstruction import DEFAULT_RIDGE

        if spec["rates"] is None:
            return self.bench.model
        if spec["rates"] == "folder":
            from selfprune.models import load_model

            return load_model(spec["path"])[0]
        pruner = self.bench.pruner(spec["criterion"], "lstsq", DEFAULT_RIDGE, intercept=self.intercept)
        if spec["rates"] == "owl":
            from selfprune.search.operators import owl_rates
            from selfprune.search.space import SearchSpace

            spec["rates"] = owl_rates(SearchSpace(pruner.layer_params, spec["target"]),
                                      pruner.outlier_ratios(OWL_M), OWL_LAMBDA)
        rates = spec["rates"] if isinstance(spec["rates"], list) else [spec["rates"]] * pruner.num_layers
        return pruner.build(rates)[0]

    def quality(self, name: str, spec: dict, presets, with_imatrix: tuple[bool, ...], done: set) -> None:
        from selfprune.evaluation.llamacpp import gguf_perplexity
        from selfprune.export import export_gguf, quantize_gguf
        from selfprune.export.gguf_export import importance_for_file
        from selfprune.export.quantize import NEEDS_IMATRIX, ImportanceMatrix
        from selfprune.imatrix import collect_imatrix

        todo = [(p, m) for p in presets for m in with_imatrix if (name, p, m) not in done
                and not (p in NEEDS_IMATRIX and not m) and not (p == "f16" and m)]
        if not todo:
            return
        WORK = self.work
        WORK.mkdir(parents=True, exist_ok=True)
        model = self.build(spec)
        f32 = WORK / f"{name}.f32.gguf"
        if not f32.exists():
            export_gguf(model, self.tokenizer, f32, "f32", overwrite=True)
        matrix_file = WORK / f"{name}.imatrix.gguf"
        if any(m for _, m in todo) and not matrix_file.exists():
            start = time.perf_counter()
            collect_imatrix(model, self.tokenizer, CALIBRATION).save(matrix_file)
            print(f"{name}: importance matrix in {time.perf_counter() - start:.0f} s")
        for preset, use_matrix in todo:
            importance = importance_for_file(model, ImportanceMatrix.load(matrix_file), 32) if use_matrix else None
            path = WORK / f"{name}.{preset}{'.imatrix' if use_matrix else ''}.gguf"
            start = time.perf_counter()
            if preset == "f16":
                export_gguf(model, self.tokenizer, path, "f16", overwrite=True)
            else:
                quantize_gguf(f32, path, preset, threads=THREADS, importance=importance)
            quantize_seconds = time.perf_counter() - start
            start = time.perf_counter()
            ppl = gguf_perplexity(path, windows=self.windows, threads=THREADS)
            append({"base_model": self.base_model, "model": name, "method": spec["method"],
                    "criterion": spec.get("criterion"), "padding": padding(model),
                    "rates": spec["rates"], "preset": preset, "imatrix": use_matrix,
                    "mib": path.stat().st_size / 2**20, "decoder_mib": decoder_mib(path), "ppl": ppl["ppl"],
                    "quantize_seconds": quantize_seconds, "ppl_seconds": time.perf_counter() - start,
                    "settings": {"ppl": {k: ppl[k] for k in ("seq_len", "windows", "tokens", "predicted_tokens")}
                                 | {"text": "wikitext2/test", "kv_cache": "f16"},
                                 "imatrix": CALIBRATION.to_dict() if use_matrix else None, "ffn_multiple": 32,
                                 "refit_intercept": self.intercept},
                    "versions": versions()})
            if preset not in SPEED_PRESETS:
                path.unlink()   # the timed presets' files stay for --speed


def padding(model) -> dict | None:
    """Zero parameters written to give every layer one shape (llama.cpp's one-shape graphs only)."""
    from selfprune.export.gguf_export import PADDED_FAMILIES, padded_writer

    if model.config.model_type not in PADDED_FAMILIES:
        return None
    return padded_writer(model.config.model_type).padding_cost(model, 32)


def run_quality(models: list[str] | None, only_presets: list[str] | None = None) -> None:
    """Rows for ``models`` (all by default) at their presets, or only at ``only_presets`` (the order of a session
    short of time: the rows that decide the front first)."""
    plan = model_plan()
    frontier = Frontier(BASE_MODEL)
    for name in models or list(plan):   # in the order given
        spec = plan[name]
        windows = WINDOWS_BY_MODEL.get(BASE_MODEL, WINDOWS)
        done = {(r["model"], r["preset"], r["imatrix"]) for r in load_rows(BASE_MODEL)
                if r.get("kind") != "speed" and r["settings"]["ppl"]["windows"] == windows}
        if name == "dense":
            presets = DENSE_PRESETS if BASE_MODEL == "default" else GEMMA_DENSE_PRESETS
        else:
            presets = PRUNED_PRESETS if BASE_MODEL == "default" else GEMMA_PRUNED_PRESETS
        presets = [p for p in presets if not only_presets or p in only_presets]
        frontier.quality(name, spec, presets, (False, True) if name == "dense" else (True,), done)


def run_speed(presets=("q4_k_m",)) -> None:
    """Each pruned file against the dense file of the same preset (both with importance matrices), interleaved."""
    from selfprune.evaluation.llamacpp import compare_speed_gguf

    work = WORK if BASE_MODEL == "default" else WORK / BASE_MODEL
    done = {(r["model"], r["preset"]) for r in load_rows(BASE_MODEL) if r.get("kind") == "speed"}
    for preset in presets:
        dense = work / f"dense.{preset}.imatrix.gguf"
        for path in sorted(work.glob(f"*.{preset}.imatrix.gguf")):
            name = path.name.split(f".{preset}")[0]
            if name == "dense" or (name, preset) in done or not dense.exists():
                continue
            result = compare_speed_gguf(path, dense, threads=(1, 2))
            append({"kind": "speed", "base_model": BASE_MODEL, "model": name, "preset": preset, "imatrix": True,
                    **result, "load_average": os.getloadavg(), "versions": versions()})


# -- the table and the plots -------------------------------------------------------------------------------
def pareto(rows: list[dict], key: str = "mib") -> set[int]:
    """Indices of the rows no other row beats on both ``key`` and perplexity."""
    order = sorted(range(len(rows)), key=lambda i: (rows[i][key], rows[i]["ppl"]))
    front, best = set(), float("inf")
    for i in order:
        if rows[i]["ppl"] < best:
            front.add(i)
            best = rows[i]["ppl"]
    return front


def render() -> None:
    """frontier.md / frontier.json: one section per base model (SmolLM2 first), each with its own front."""
    lines = ["# The size / quality frontier: GGUF files of SmolLM2-135M and Gemma 3 270M, dense and pruned", "",
             "llama.cpp perplexity on WikiText-2 test (80 windows of 128 tokens, the PyTorch evaluator's windows, "
             "llama.cpp's default f16 KV cache). Pruned models: FLAP, structure mlp_first, GQA policy group, refit by "
             "least squares (ridge 1e-5, C4 128 x 128 calibration); searched = the allocation with the best "
             "validation fitness in results/search*.json. Importance matrices: each model's own, C4 validation "
             "128 x 128 tokens. MLP widths padded to multiples of 32. 'front': on the Pareto front of file MiB vs "
             "perplexity over the rows of that model; 'front (layers)': of decoder-layer MiB vs perplexity. "
             "Generated by bench/bench_frontier.py from frontier.json."]
    data = {"models": {}, "versions": versions()}
    for base_model in sorted({r.get("base_model", "default") for r in load_rows()}, key=lambda m: m != "default"):
        section, data["models"][base_model] = model_section(base_model)
        lines += section
    atomic_write_json(RESULTS / "frontier.json", data)
    atomic_write_text(RESULTS / "frontier.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


def model_section(base_model: str) -> tuple[list[str], dict]:
    windows = WINDOWS_BY_MODEL.get(base_model, WINDOWS)
    rows = [r for r in load_rows(base_model) if "ppl" in r and r.get("kind") != "speed"
            and r["settings"]["ppl"]["windows"] == windows]   # one set of windows per table
    front = pareto(rows)
    front_decoder = pareto(rows, "decoder_mib")
    title = TITLES.get(base_model, base_model)
    lines = ["", f"## {title}", "", f"Perplexity on the first {windows} test windows.", ""]
    if base_model != "default":
        lines += ["Rows with zero parameters: llama.cpp's `gemma3` graph takes one shape for every layer, so an "
                  "uneven allocation is written padded to the widest kept layer (outputs unchanged; 'zero params' "
                  "counts what the padding adds). The refit fits no bias there (the graph has none).", ""]
    lines += ["| model | preset | imatrix | MiB | decoder MiB | ppl | zero params | front | front (layers) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for i in sorted(range(len(rows)), key=lambda i: rows[i]["mib"]):
        r = rows[i]
        zeros = (r.get("padding") or {}).get("zero_parameters")
        lines.append(f"| {r['model']} | {r['preset']} | {'yes' if r['imatrix'] else 'no'} | {r['mib']:.1f} | "
                     f"{r['decoder_mib']:.1f} | {r['ppl']:.2f} | {f'{zeros:,}' if zeros else ''} | "
                     f"{'**yes**' if i in front else ''} | {'**yes**' if i in front_decoder else ''} |")
    dense_plain = {r["preset"]: r for r in rows if r["model"] == "dense" and not r["imatrix"]}
    if base_model == "default":
        before = json.loads((RESULTS / "gguf.json").read_text())["rows"].get("dense", {})
        lines += ["", "### The tied embedding written once", "",
                  "Dense files before (bench/results/gguf.json, which wrote `output.weight` beside the tied "
                  "`token_embd.weight`) and now, same windows. q4_k_m's perplexity moves because llama.cpp then "
                  "quantizes the one tied matrix with the output rule (q8_0 for 576-value rows).", "",
                  "| preset | MiB before | MiB now | ppl before | ppl now |", "|---|---|---|---|---|"]
        for preset in ("f16", "q8_0", "q4_k_m"):
            if preset in before and preset in dense_plain:
                b, a = before[preset], dense_plain[preset]
                lines.append(f"| {preset} | {b['file_bytes'] / 2**20:.1f} | {a['mib']:.1f} | {b['ppl']:.2f} | "
                             f"{a['ppl']:.2f} |")
    lines += ["", "### Importance matrix: same preset, without vs with", "",
              "| preset | MiB | ppl without | ppl with | change |", "|---|---|---|---|---|"]
    dense = {(r["preset"], r["imatrix"]): r for r in rows if r["model"] == "dense"}
    for preset in DENSE_PRESETS:
        if (preset, False) in dense and (preset, True) in dense:
            a, b = dense[(preset, False)], dense[(preset, True)]
            lines.append(f"| {preset} | {a['mib']:.1f} | {a['ppl']:.2f} | {b['ppl']:.2f} | {b['ppl'] / a['ppl'] - 1:+.1%} |")
    speed = [r for r in load_rows(base_model) if r.get("kind") == "speed"]
    if speed:
        lines += ["", "### Speed in llama.cpp (each file against the dense file of the same preset, both with "
                  "importance matrices)", "",
                  f"Prefill {speed[0]['prompt_len']} tokens, decode {speed[0]['decode_tokens']} tokens; medians of "
                  f"{speed[0]['repeats']} interleaved repeats; time ratio = pruned / dense (lower is faster), beside the "
                  "FLOPs ideal. Load average before each pair in the last column.", "",
                  "| model | preset | threads | prefill tok/s | dense prefill tok/s | prefill ratio | ideal | "
                  "decode tok/s | dense decode tok/s | decode ratio | ideal | load |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(speed, key=lambda r: (r["preset"], r["model"])):
            for count, row in r["threads"].items():
                pre, dec = row["prefill"], row["decode"]
                lines.append(f"| {r['model']} | {r['preset']} | {count} | {pre['pruned']['tokens_per_s']:.0f} | "
                             f"{pre['dense']['tokens_per_s']:.0f} | {pre['time_ratio']:.3f} | {pre['ideal_ratio']:.3f} | "
                             f"{dec['pruned']['tokens_per_s']:.1f} | {dec['dense']['tokens_per_s']:.1f} | "
                             f"{dec['time_ratio']:.3f} | {dec['ideal_ratio']:.3f} | {r['load_average_before'][0]:.1f} |")
    lines += ["", "### Findings", ""] + findings(rows, front, front_decoder, windows)
    suffix = "" if base_model == "default" else f"_{base_model}"
    plot(rows, front, front_decoder, title, RESULTS / f"frontier{suffix}.png")
    lines += ["", f"Plot: `frontier{suffix}.png`."]
    return lines, {"rows": rows, "speed": speed, "front": sorted(front), "front_decoder": sorted(front_decoder)}


def findings(rows, front, front_decoder, windows: int = WINDOWS) -> list[str]:
    """Where pruning is on the front and where it is not, from the rows."""
    out = []
    dense = [r for r in rows if r["model"] == "dense"]
    for label, key, points in (("file MiB", "mib", front), ("decoder-layer MiB (what scales to 7B / 70B)",
                                                               "decoder_mib", front_decoder)):
        pruned = sorted((rows[i] for i in points if rows[i]["model"] != "dense"), key=lambda r: r[key])
        smallest = min(dense, key=lambda r: r[key]) if dense else None
        if not pruned:
            out.append(f"- By {label}: every row on the front is dense; quantizing the dense model harder beats "
                       "pruning at every size measured.")
            continue
        listed = ", ".join(f"{r['model']} {r['preset']} ({r[key]:.1f} MiB, {r['ppl']:.1f})" for r in pruned)
        above = [r for r in pruned if smallest and r[key] >= smallest[key]]
        text = (f"- By {label}: pruned rows on the front: {listed}. The smallest dense file measured is {smallest['preset']} "
                f"({smallest[key]:.1f} MiB, {smallest['ppl']:.1f}): pruning extends the front below the sizes "
                "llama.cpp's presets reach")
        gaps = []
        for r in above:   # on the front among the dense files: name the next larger dense file
            larger = [d for d in dense if d[key] > r[key]]
            nxt = min(larger, key=lambda d: d[key]) if larger else None
            gaps.append(f"{r['model']} {r['preset']} only in a gap between presets" + (
                f" (the next dense file, {nxt['preset']}{' + imatrix' if nxt['imatrix'] else ''}, is "
                f"{nxt[key] - r[key]:.1f} MiB larger at perplexity {nxt['ppl']:.1f})" if nxt else ""))
        out.append(text + ("; above it " + "; ".join(gaps) + ", and the dense presets win everywhere else."
                           if gaps else ", and loses to the dense presets everywhere above."))
    searched = any(r["model"].startswith("searched") for r in rows)
    out.append("- One calibration sample (C4, seed 0) for every importance matrix and refit; "
               + ("one search seed per searched allocation; " if searched else "")
               + f"perplexities from one pass over the same {windows} windows.")
    return out


def plot(rows, front, front_decoder, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    groups: dict = {}
    for i, r in enumerate(rows):
        label = "dense" + (" + imatrix" if r["imatrix"] else "") if r["model"] == "dense" else r["model"]
        groups.setdefault(label, []).append(i)
    for ax, key, points in ((axes[0], "mib", front), (axes[1], "decoder_mib", front_decoder)):
        for label, indices in sorted(groups.items()):
            indices = sorted(indices, key=lambda i: rows[i][key])
            ax.plot([rows[i][key] for i in indices], [rows[i]["ppl"] for i in indices], marker="o", ms=3, lw=1,
                    label=label)
        line = sorted(points, key=lambda i: rows[i][key])
        ax.plot([rows[i][key] for i in line], [rows[i]["ppl"] for i in line], color="black", lw=2, alpha=0.35,
                label="Pareto front")
        ax.set_yscale("log")
        ax.set_xlabel("file MiB" if key == "mib" else "decoder-layer MiB")
        ax.set_ylabel("llama.cpp perplexity (WikiText-2 test)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{title} GGUF files: perplexity against size")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quality", action="store_true")
    parser.add_argument("--speed", action="store_true")
    parser.add_argument("--speed-presets", default="q4_k_m", help=f"comma list of {', '.join(SPEED_PRESETS)}")
    parser.add_argument("--render", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads for quantizing and perplexity")
    parser.add_argument("--models", default=None, help="comma list of model names (dense, uniform-0.2, searched-0.5)")
    parser.add_argument("--presets", default=None, help="comma list: only these presets (of each model's own)")
    parser.add_argument("--base-model", default="default", choices=("default", GEMMA),
                        help="the model the rows are made from")
    args = parser.parse_args()
    global THREADS, BASE_MODEL
    THREADS, BASE_MODEL = args.threads, args.base_model
    if args.quality:
        run_quality(args.models.split(",") if args.models else None,
                    args.presets.split(",") if args.presets else None)
    if args.speed:
        run_speed(tuple(args.speed_presets.split(",")))
    if args.render or args.quality or args.speed:
        render()


if __name__ == "__main__":
    main()
