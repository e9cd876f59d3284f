"""Issue 13 benchmark: SmolLM2-135M pruned models in llama.cpp (GGUF), dense vs uniform FLAP and the best searched
allocations at 20 / 30 / 50%, at f16, q8_0 and q4_k_m: file size, llama.cpp perplexity (WikiText-2 test, 80 windows
of 128, the PyTorch evaluator's windows), prefill (256 tokens) and decode (32 tokens) tokens/s at 1 and 2 threads,
time ratios vs dense of the same outtype measured in the same run (interleaved, medians) beside the FLOPs ideal,
and the cost of odd MLP widths: the export pads MLP widths to multiples of 32 with zero channels by default
(``-pad1`` rows: the same models written with their odd widths) and ``-mm64`` rows prune to widths that are
multiples of 64 in the first place (``mlp_multiple=64``).

    python bench/bench_gguf.py                       # everything (exports, perplexity, timing)
    python bench/bench_gguf.py --retime              # keep sizes and perplexities, measure the speed again
    python bench/bench_gguf.py --outtypes q8_0 --models dense,uniform-0.5   # a subset (merged into gguf.json)

Pruning: FLAP, C4 calibration 64 x 128 seed 0 (the search runs' setting), each searched allocation with its own
run's GQA policy; searched rates are the run with the best validation fitness per target in results/search*.json,
pinned once measured (gguf.json keeps them, so a later, better search does not change the model under committed
rows; delete a model's entry under "specs" there to take the newest best).
The machine is shared: the load average is recorded before and after every timing.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from common import DATA_DIR, RESULTS, best_searched_row, versions

from selfprune.calibration import CalibrationConfig
from selfprune.data import load_text, token_windows
from selfprune.evaluation.llamacpp import compare_speed_gguf, gguf_facts, gguf_perplexity
from selfprune.export import DEFAULT_FFN_MULTIPLE, export_gguf, quantize_gguf
from selfprune.io import atomic_write_json, atomic_write_text
from selfprune.models import load_model
from selfprune.pruning import Pruner

OUTTYPES = ("f16", "q8_0", "q4_k_m")
TARGETS = (0.2, 0.3, 0.5)
WORK = Path(os.environ.get("SELFPRUNE_GGUF_WORK", "/tmp/selfprune-gguf-bench"))


def model_specs() -> dict[str, dict]:
    committed = RESULTS / "gguf.json"
    pinned = json.loads(committed.read_text()).get("specs", {}) if committed.exists() else {}
    specs = {"dense": {"rates": None}}
    for target in TARGETS:
        specs[f"uniform-{target}"] = {"rates": target, "policy": "group", "mlp_multiple": 1, "source": "uniform FLAP",
                                      "ffn_multiple": DEFAULT_FFN_MULTIPLE}
        row = best_searched_row(target)
        if isinstance(pinned.get(f"searched-{target}", {}).get("rates"), list):
            specs[f"searched-{target}"] = pinned[f"searched-{target}"]
        elif row:
            specs[f"searched-{target}"] = {"rates": row["best_rates"], "policy": row.get("gqa_policy", "group"),
                                           "mlp_multiple": 1, "source": f"{row['operator']} (budget {row['budget']})",
                                           "ffn_multiple": DEFAULT_FFN_MULTIPLE}
    for target in (0.2, 0.5):  # the same models written with their odd MLP widths (no zero padding)
        for base in (f"uniform-{target}", f"searched-{target}"):
            if base in specs:
                specs[f"{base}-pad1"] = specs[base] | {"ffn_multiple": 1}
    for target in (0.3, 0.5):  # odd widths vs widths rounded to 64, same rates
        for base in (f"uniform-{target}", f"searched-{target}"):
            if base in specs:
                specs[f"{base}-mm64"] = specs[base] | {"mlp_multiple": 64}
    return specs


def export_all(names, outtypes, specs) -> dict[str, dict[str, Path]]:
    """f32 from PyTorch once per model, then every outtype by llama.cpp's quantizer (f16 included)."""
    WORK.mkdir(parents=True, exist_ok=True)
    files = {name: {t: WORK / f"{name}.{t}.gguf" for t in outtypes} for name in names}
    missing = [n for n in names if not all(p.exists() for p in files[n].values())]
    if not missing:
        return files
    model, tokenizer = load_model("default")
    calibration = CalibrationConfig(source="c4", num_samples=64, seq_len=128, seed=0, data_dir=DATA_DIR)
    pruners = {}
    for name in missing:
        spec = specs[name]
        if spec["rates"] is None:
            pruned = model
        else:
            key = (spec["policy"], spec["mlp_multiple"])
            if key not in pruners:
                calib = next(iter(pruners.values())).calibration if pruners else calibration
                pruners[key] = Pruner(model, tokenizer, "flap", calib, gqa_policy=key[0], mlp_multiple=key[1],
                                      progress=False)
            pruner = pruners[key]
            rates = spec["rates"] if isinstance(spec["rates"], list) else [spec["rates"]] * pruner.num_layers
            pruned, _ = pruner.build(rates)
        f32 = export_gguf(pruned, tokenizer, WORK / f"{name}.f32.gguf", "f32", overwrite=True,
                          ffn_multiple=spec.get("ffn_multiple", DEFAULT_FFN_MULTIPLE))
        for outtype, path in files[name].items():
            if not path.exists():
                quantize_gguf(f32, path, outtype)
        f32.unlink()
        print(f"exported {name}", flush=True)
    return files


def render(data: dict) -> str:
    lines = [
        "# SmolLM2-135M in llama.cpp (GGUF, `deci` architecture): size, perplexity, speed",
        "",
        f"llama-cpp-python {data['settings'].get('llama_cpp_python')}, {data['settings'].get('cpu')}; perplexity: "
        f"WikiText-2 test, {data['settings']['ppl_windows']} windows of 128 (the PyTorch evaluator's windows), computed by "
        "llama.cpp; speed: prefill 256 tokens and decode 32 tokens, median of the repeats after warm-up, dense and pruned of "
        "the same outtype interleaved in one run; ratio = pruned time / dense time, ideal = FLOPs ratio. "
        "Load average (1 min) during each timing in the last column: the machine was shared, so ratios are noisy.",
        "",
        "| model | type | MiB | vs dense f16 | ppl | prefill tok/s 1t | 2t | ratio 1t | 2t | decode tok/s 1t | 2t | ratio 1t | 2t | ideal prefill / decode | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    dense_f16 = data["rows"].get("dense", {}).get("f16", {}).get("file_bytes")
    order = [n for n in data.get("specs", {}) if n in data["rows"]] + [n for n in data["rows"] if n not in data.get("specs", {})]
    for name in order:  # the specs' order (dense, then each rate), f16 / q8_0 / q4_k_m within a model
        by_type = data["rows"][name]
        for outtype in sorted(by_type, key=lambda t: OUTTYPES.index(t) if t in OUTTYPES else len(OUTTYPES)):
            row = by_type[outtype]
            size = row.get("file_bytes", 0) / 2**20
            vs = f"{dense_f16 / row['file_bytes']:.2f}x smaller" if dense_f16 else ""
            speed = row.get("speed") or {}
            cells = []
            for kind in ("prefill", "decode"):
                per = speed.get("threads", {})
                tps = [f"{per[t][kind]['pruned']['tokens_per_s']:.0f}" if t in per else "" for t in ("1", "2")]
                ratio = [f"{per[t][kind]['time_ratio']:.3f}" if t in per and name != "dense" else "" for t in ("1", "2")]
                cells += tps + ratio
            ideal = ""
            if speed.get("threads") and name != "dense":
                any_t = next(iter(speed["threads"].values()))
                ideal = f"{any_t['prefill']['ideal_ratio']:.3f} / {any_t['decode']['ideal_ratio']:.3f}"
            load = f"{speed['load_average_before'][0]:.1f}" if speed else ""
            ppl = f"{row['ppl']:.2f}" if row.get("ppl") else ""
            lines.append(f"| {name} | {outtype} | {size:.1f} | {vs} | {ppl} | " + " | ".join(cells) + f" | {ideal} | {load} |")
    lines += ["", "Searched allocations: " + "; ".join(f"{n}: {s['source']}" for n, s in data["specs"].items()
                                                     if s.get("source", "").startswith(("llm", "random", "evolution")) and
                                                     not n.endswith(("mm64", "pad1"))),
              "", "MLP widths are written padded with zero channels to multiples of 32 (the export's default; outputs "
                  "unchanged). `-pad1`: the same models written with their odd pruned widths (`--ffn-multiple 1`), where "
                  "llama.cpp's quantizer keeps `ffn_down` in F16. `-mm64`: the same rates pruned to MLP widths that are "
                  "multiples of 64 (`mlp_multiple=64`)."]
    lines += ["", *findings(data)]
    if data.get("notes"):
        lines += ["", *data["notes"]]
    return "\n".join(lines)


def findings(data: dict) -> list[str]:
    """The issue's targets checked on the rows above, and what odd MLP widths cost (computed, not typed)."""
    rows, out = data["rows"], ["## Targets and odd widths (computed from the rows above)", ""]
    dense_f16 = rows.get("dense", {}).get("f16", {}).get("file_bytes")
    checks = []
    for name in (n for n in rows if n.startswith(("uniform-0.3", "searched-0.3", "uniform-0.5", "searched-0.5"))
                 and not n.endswith("pad1")):
        for outtype, row in rows[name].items():
            for threads, per in ((row.get("speed") or {}).get("threads") or {}).items():
                for kind in ("prefill", "decode"):
                    checks.append((name, outtype, threads, kind, per[kind]["time_ratio"] / per[kind]["ideal_ratio"]))
    if checks:
        within = [c for c in checks if c[4] <= 1.10]
        worst = max(checks, key=lambda c: c[4])
        out.append(f"- Speed within 10% of the FLOPs ideal at 30% and 50% (time ratio / ideal <= 1.10): {len(within)} of "
                   f"{len(checks)} measurements (model x outtype x threads x prefill/decode); worst "
                   f"{worst[4]:.2f}x the ideal ({worst[0]} {worst[1]} {worst[2]} thread(s) {worst[3]}).")
    if dense_f16:
        q4 = {n: dense_f16 / r["q4_k_m"]["file_bytes"] for n, r in rows.items()
              if n != "dense" and "q4_k_m" in r and not n.endswith("pad1")}
        if q4:
            ok = [n for n, x in q4.items() if x >= 2.5]
            out.append(f"- Pruned + q4_k_m at least 2.5x smaller than dense f16: {len(ok)} of {len(q4)} models "
                       f"({', '.join(f'{n} {x:.2f}x' for n, x in q4.items())}).")
    for name in (n for n in rows if n.endswith("-pad1")):
        padded = rows.get(name.removesuffix("-pad1"), {})
        for outtype, odd in rows[name].items():
            even = padded.get(outtype)
            if not even:
                continue
            text = (f"- {name.removesuffix('-pad1')} {outtype}: odd widths {odd['file_bytes'] / 2**20:.1f} MiB vs padded "
                    f"{even['file_bytes'] / 2**20:.1f} MiB")
            odd_t, even_t = (r.get("speed", {}).get("threads", {}).get("1") for r in (odd, even))
            if odd_t and even_t:
                text += (f"; 1-thread prefill / decode time vs dense {odd_t['prefill']['time_ratio']:.3f} / "
                         f"{odd_t['decode']['time_ratio']:.3f} odd, {even_t['prefill']['time_ratio']:.3f} / "
                         f"{even_t['decode']['time_ratio']:.3f} padded")
            out.append(text + ".")
    return out


def save(data: dict) -> None:
    atomic_write_json(RESULTS / "gguf.json", data)
    atomic_write_text(RESULTS / "gguf.md", render(data) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--outtypes", default=",".join(OUTTYPES))
    parser.add_argument("--models", default=None, help="comma-separated subset of the model names (default: all)")
    parser.add_argument("--windows", type=int, default=80)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", default="1,2", help="llama.cpp thread counts for the timing")
    parser.add_argument("--ppl-threads", type=int, default=1,
                        help="llama.cpp threads for perplexity (1: on a busy machine spinning threads wait on each other)")
    parser.add_argument("--retime", action="store_true", help="keep sizes and perplexities, measure speed again")
    parser.add_argument("--no-speed", action="store_true", help="sizes and perplexity only")
    parser.add_argument("--render", action="store_true", help="only rewrite gguf.md from gguf.json")
    args = parser.parse_args()
    if args.render:
        save(json.loads((RESULTS / "gguf.json").read_text()))
        return
    start = time.time()
    specs = model_specs()
    names = args.models.split(",") if args.models else list(specs)
    outtypes = args.outtypes.split(",")
    threads = [int(t) for t in args.threads.split(",")]
    previous = json.loads((RESULTS / "gguf.json").read_text()) if (RESULTS / "gguf.json").exists() else {}
    data = {"rows": previous.get("rows", {}), "specs": {n: {k: v for k, v in s.items() if k != "rates"} | {
        "rates": s["rates"]} for n, s in specs.items()}, "settings": previous.get("settings", {}),
        "notes": previous.get("notes", [])}
    files = export_all(names, outtypes, specs)
    _, tokenizer = load_model("default")
    windows = token_windows(tokenizer, load_text("wikitext2", "test", DATA_DIR), 128, args.windows)
    data["settings"] |= {"ppl_windows": int(windows.shape[0]), "versions": versions(), "threads": threads,
                         "repeats": args.repeats, "warmup": args.warmup, "work_dir": str(WORK)}
    for name in names:
        for outtype in outtypes:
            row = data["rows"].setdefault(name, {}).setdefault(outtype, {})
            path = files[name][outtype]
            row |= {"file_bytes": path.stat().st_size, "shapes": {k: v for k, v in gguf_facts(path).to_dict().items()
                                                                  if k in ("heads", "kv_heads", "ffn")}}
            if not args.retime or "ppl" not in row:
                result = gguf_perplexity(path, tokenizer, windows=windows, threads=args.ppl_threads)
                row |= {"ppl": result["ppl"], "ppl_seconds": result["seconds"]}
            if name != "dense" and not args.no_speed:
                speed = compare_speed_gguf(path, files["dense"][outtype] if "dense" in files else WORK / f"dense.{outtype}.gguf",
                                           threads=threads, repeats=args.repeats, warmup=args.warmup)
                row["speed"] = speed
                data["settings"] |= {"llama_cpp_python": speed["llama_cpp_python"], "cpu": speed["cpu"]}
                if "dense" in data["rows"] and outtype in data["rows"]["dense"]:  # dense tok/s as timed beside it
                    data["rows"]["dense"][outtype]["speed"] = {
                        "load_average_before": speed["load_average_before"],
                        "threads": {t: {k: {"pruned": r[k]["dense"]} for k in ("prefill", "decode")}
                                    for t, r in speed["threads"].items()}}
            print(f"{name} {outtype}: {row['file_bytes'] / 2**20:.1f} MiB, ppl {row.get('ppl', float('nan')):.2f}", flush=True)
            data["settings"]["wall_seconds"] = round(time.time() - start)
            save(data)
    print(render(data))


if __name__ == "__main__":
    main()
