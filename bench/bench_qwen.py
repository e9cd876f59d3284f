"""Issue 31 benchmark: what pruning real Qwen2.5 models costs on this 24 GB, 2-core machine, and a projection to
7B / 70B on one GPU.

Each step runs in its own process (its peak resident memory is the process's ``ru_maxrss``), one thread, on
Qwen2.5-Coder-0.5B-Instruct and -1.5B-Instruct (``scripts/install.sh --with-qwen``), in this order:

* ``load``: the model from selfprune's cache (converted from the GGUF at first use; that once is timed apart);
* ``prune``: FLAP calibration (C4, ``--calib-samples`` x 128 tokens), then a 20% uniform build with the
  least-squares refit, layer by layer (one layer's second moments held at a time), then WikiText-2 perplexity;
* ``fitness``: what one search candidate costs: a 30% build without refit plus 16 validation windows; then every
  layer's second moments cached on disk (``cache_moments(directory)``, what a refit search keeps) and the same
  candidate built with the refit from them;
* ``kd-lora``: KD recovery steps with LoRA rank 16, student and teacher in fp32; ``kd-full-bf16``: full fine-tuning
  with student, teacher and AdamW states in bf16. Full fp32 fine-tuning with an fp32 teacher is not run: its
  memory (weights, gradients and two AdamW moments of the student: 16 bytes per parameter, plus the teacher's 4)
  is computed and compared with the machine's RAM.

Rows go to results/qwen_scale_rows.jsonl as they finish (a finished step is skipped); --render writes
qwen_scale.json / .md with the projection (shapes of LLaMA-2-7B and -70B; memory exact from the shapes, time from
FLOPs at an assumed sustained GPU throughput, labelled as a projection).

    python bench/bench_qwen.py --models qwen2.5-0.5b,qwen2.5-1.5b [--steps load,prune,fitness,kd-lora,kd-full-bf16]
    python bench/bench_qwen.py --render
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import DATA_DIR, RESULTS, versions

from selfprune.io import atomic_write_json, atomic_write_text

ROWS = RESULTS / "qwen_scale_rows.jsonl"
STEPS = ("load", "prune", "fitness", "kd-lora", "kd-full-bf16")
CALIB_SAMPLES = {"qwen2.5-0.5b": 128, "qwen2.5-1.5b": 32}   # the 1.5B's calibration at 128 would take ~an hour here
PPL_WINDOWS = 16
FITNESS_WINDOWS = 16
KD_STEPS = 2
MACHINE_RAM_GIB = 24
WORK = Path(os.environ.get("SELFPRUNE_BENCH_WORK", tempfile.gettempdir())) / "selfprune-qwen-scale"
# LLaMA-2 shapes for the projection: hidden, MLP width, layers, query heads, KV heads, vocabulary
PROJECTED = {"LLaMA-2-7B": (4096, 11008, 32, 32, 32, 32000), "LLaMA-2-70B": (8192, 28672, 80, 64, 8, 32000)}
ASSUMED_TFLOPS = 200   # sustained bf16 / fp32-accumulate matmul throughput of one H100 for the projection


def load_rows() -> list[dict]:
    return [json.loads(line) for line in ROWS.read_text().splitlines() if line.strip()] if ROWS.exists() else []


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def shapes(model) -> dict:
    config = model.config
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    return {"parameters": total, "embedding_share": embed / total, "layers": config.num_hidden_layers,
            "hidden": config.hidden_size, "mlp": config.intermediate_size, "heads": config.num_attention_heads,
            "kv_heads": config.num_key_value_heads, "tied": bool(config.tie_word_embeddings)}


# -- the steps, each in its own process --------------------------------------------------------------------
def step_load(name: str) -> dict:
    from selfprune.models import load_model, resolve_model_spec
    from selfprune.models.packaged import CHUNKED_MODELS

    model_info = CHUNKED_MODELS[name]
    start = time.perf_counter()
    converted_now = not (model_info.conversion / "model.safetensors").is_file()
    resolve_model_spec(name)   # assembles and converts at first use
    convert_seconds = time.perf_counter() - start if converted_now else None
    start = time.perf_counter()
    model, _ = load_model(name)
    return {"seconds": time.perf_counter() - start, "convert_seconds": convert_seconds, **shapes(model),
            "safetensors_mib": sum(f.stat().st_size for f in model_info.conversion.glob("*.safetensors")) / 2**20}


def _calibration(name: str):
    from selfprune.calibration import CalibrationConfig

    return CalibrationConfig(source="c4", num_samples=CALIB_SAMPLES[name], seq_len=128, seed=0, data_dir=DATA_DIR)


def step_prune(name: str) -> dict:
    from selfprune.models import load_model
    from selfprune.evaluation.perplexity import PerplexityEvaluator
    from selfprune.pruning import Pruner

    model, tokenizer = load_model(name)
    start = time.perf_counter()
    pruner = Pruner(model, tokenizer, "flap", _calibration(name), reconstruct="lstsq", progress=False)
    calibrate_seconds = time.perf_counter() - start
    start = time.perf_counter()
    pruned, report = pruner.build([0.2] * pruner.num_layers)
    build_seconds = time.perf_counter() - start
    evaluator = PerplexityEvaluator(tokenizer, "wikitext2", "test", 128, PPL_WINDOWS, 8, DATA_DIR)
    start = time.perf_counter()
    ppl = evaluator(pruned)["ppl"]
    ppl_seconds = time.perf_counter() - start
    dense = evaluator(model)["ppl"]
    return {"calibrate_seconds": calibrate_seconds, "build_seconds": build_seconds,
            "refit_seconds": pruner.refit_seconds, "achieved_rate": report.achieved_rate,
            "ppl_pruned": ppl, "ppl_dense": dense, "ppl_seconds_per_window": ppl_seconds / PPL_WINDOWS,
            "calibration": _calibration(name).to_dict(), "ppl_windows": PPL_WINDOWS}


def step_fitness(name: str) -> dict:
    import shutil

    from selfprune.models import load_model
    from selfprune.evaluation.perplexity import PerplexityEvaluator
    from selfprune.pruning import Pruner

    model, tokenizer = load_model(name)
    evaluator = PerplexityEvaluator(tokenizer, "wikitext2", "validation", 128, FITNESS_WINDOWS, 8, DATA_DIR)
    base = Pruner(model, tokenizer, "flap", _calibration(name), progress=False)
    rates = [0.3] * base.num_layers
    start = time.perf_counter()
    evaluator(base.build(rates)[0])
    plain = time.perf_counter() - start
    moments = WORK / f"{name}-moments"
    shutil.rmtree(moments, ignore_errors=True)
    refit = Pruner.from_state(model, base.state() | {"reconstruct": "lstsq", "moments": None}, tokenizer)
    start = time.perf_counter()
    refit.cache_moments(str(moments))
    moments_seconds = time.perf_counter() - start
    moments_mib = sum(f.stat().st_size for f in moments.rglob("*") if f.is_file()) / 2**20
    start = time.perf_counter()
    evaluator(refit.build(rates)[0])
    with_refit = time.perf_counter() - start
    shutil.rmtree(moments, ignore_errors=True)
    return {"eval_seconds": plain, "eval_seconds_refit": with_refit, "refit_seconds": refit.refit_seconds,
            "moments_seconds": moments_seconds, "moments_disk_mib": moments_mib, "windows": FITNESS_WINDOWS}


def step_kd(name: str, lora: bool) -> dict:
    from selfprune.models import load_model
    from selfprune.pruned_format import read_report, save_pruned
    from selfprune.pruning import Pruner
    from selfprune.recovery import RecoveryConfig, recover_from_specs

    student = WORK / f"{name}-uniform-20"
    if not (student / "config.json").is_file():
        model, tokenizer = load_model(name)
        pruned, report = Pruner(model, tokenizer, "flap", _calibration(name), progress=False).build(
            [0.2] * model.config.num_hidden_layers)
        save_pruned(pruned, tokenizer, student, {"report": report.to_dict()}, overwrite=True)
        del model, pruned
    dtype = "float32" if lora else "bfloat16"
    config = RecoveryConfig(method="kd", tokens=KD_STEPS * 256, seq_len=256, batch_size=1,
                            lora_rank=16 if lora else 0, heldout_sequences=1, eval_every=1000, checkpoint_every=1000)
    out = WORK / f"{name}-kd-{'lora' if lora else 'full-bf16'}"
    start = time.perf_counter()
    recover_from_specs(str(student), out, teacher=name, config=config, data_dir=DATA_DIR, dtype=dtype,
                       overwrite=True, progress=False)
    summary = read_report(out)["recovery"]["summary"]
    return {"wall_seconds": time.perf_counter() - start, "train_seconds": summary["train_seconds"],
            "seconds_per_step": summary["train_seconds"] / KD_STEPS, "tokens_per_step": 256, "dtype": dtype,
            "lora_rank": config.lora_rank}


def run_step(step: str, name: str) -> None:
    import torch

    torch.set_num_threads(1)
    WORK.mkdir(parents=True, exist_ok=True)
    functions = {"load": step_load, "prune": step_prune, "fitness": step_fitness,
                 "kd-lora": lambda n: step_kd(n, True), "kd-full-bf16": lambda n: step_kd(n, False)}
    row = {"model": name, "step": step, **functions[step](name), "peak_rss_mib": peak_mib(),
           "load_average": os.getloadavg(), "versions": versions()}
    with open(ROWS, "a") as handle:
        handle.write(json.dumps(row) + "\n")
    print(json.dumps({k: v for k, v in row.items() if k != "versions"}), flush=True)


# -- the table and the projection --------------------------------------------------------------------------
def full_fp32_gib(parameters: int) -> float:
    """Student weights + gradients + two AdamW moments (16 bytes per parameter) + an fp32 teacher (4)."""
    return parameters * 20 / 2**30


def projection() -> list[dict]:
    rows = []
    for label, (hidden, mlp, layers, heads, kv, vocab) in PROJECTED.items():
        kv_width = hidden // heads * kv
        per_layer = hidden * (hidden + 2 * kv_width) + hidden * hidden + 3 * hidden * mlp
        params = layers * per_layer + 2 * vocab * hidden
        calib_tokens = 128 * 128
        rows.append({
            "model": label, "parameters": params, "weights_bf16_gib": params * 2 / 2**30,
            "one_layer_bf16_gib": per_layer * 2 / 2**30,
            "one_layer_moments_gib": (hidden ** 2 + mlp ** 2) * 8 / 2**30,
            "all_moments_gib": layers * (hidden ** 2 + mlp ** 2) * 8 / 2**30,
            "calibration_tflop": 2 * params * calib_tokens / 1e12,
            "moments_tflop": layers * calib_tokens * 2 * (hidden ** 2 + mlp ** 2) / 1e12,
            "refit_tflop": layers * (hidden ** 3 + mlp ** 3) / 3 / 1e12,
            "fitness_tflop": 2 * params * FITNESS_WINDOWS * 128 / 1e12,
            "full_fp32_kd_gib": full_fp32_gib(params)})
        for key in ("calibration", "moments", "refit", "fitness"):
            rows[-1][f"{key}_seconds"] = rows[-1][f"{key}_tflop"] / ASSUMED_TFLOPS
    return rows


def render() -> None:
    rows = load_rows()
    by = {(r["model"], r["step"]): r for r in rows}
    models = sorted({r["model"] for r in rows})
    lines = ["# Real Qwen2.5 models on a 24 GB, 2-core CPU: time and memory of each step", "",
             "Generated by `bench/bench_qwen.py` from `qwen_scale.json`. Qwen2.5-Coder-Instruct from its PyPI chunk "
             "packages, fp32 unless said, one torch thread per step, each step its own process (peak RSS = the "
             "process's ru_maxrss, model load included), on a machine shared with other benchmark processes "
             "(load average in the JSON): seconds are indicative.", "",
             "| model | params | embeddings | step | seconds | peak RSS MiB | notes |", "|---|---|---|---|---|---|---|"]
    for model in models:
        info = by.get((model, "load"), {})
        head = (f"| {model} | {info.get('parameters', 0) / 1e9:.2f}B | {info.get('embedding_share', 0):.0%} "
                if info else f"| {model} | | ")
        for step in STEPS:
            r = by.get((model, step))
            if not r:
                continue
            if step == "load":
                seconds = f"{r['seconds']:.0f}"
                note = (f"{r['safetensors_mib']:.0f} MiB safetensors"
                        + (f"; first conversion from the GGUF {r['convert_seconds']:.0f} s" if r["convert_seconds"]
                           else ""))
            elif step == "prune":
                seconds = f"{r['calibrate_seconds']:.0f} + {r['build_seconds']:.0f}"
                note = (f"calibration ({r['calibration']['num_samples']} x 128 tokens) + 20% build with refit "
                        f"(refit {r['refit_seconds']:.0f} s); ppl {r['ppl_dense']:.2f} -> {r['ppl_pruned']:.2f} on "
                        f"{r['ppl_windows']} windows, {r['ppl_seconds_per_window']:.1f} s per window")
            elif step == "fitness":
                seconds = f"{r['eval_seconds']:.0f} / {r['eval_seconds_refit']:.0f}"
                note = (f"one candidate ({r['windows']} windows) without / with the refit; every layer's moments "
                        f"on disk: {r['moments_disk_mib'] / 1024:.1f} GiB in {r['moments_seconds']:.0f} s")
            else:
                seconds = f"{r['seconds_per_step']:.0f} per step"
                note = (f"KD, {r['tokens_per_step']} tokens per step, {r['dtype']}, "
                        + (f"LoRA rank {r['lora_rank']}" if r["lora_rank"] else "full fine-tuning, AdamW in bf16"))
            lines.append(head + f"| {step} | {seconds} | {r['peak_rss_mib']:.0f} | {note} |")
        if info:
            need = full_fp32_gib(info["parameters"])
            lines.append(head + f"| kd full fp32 | not run | {need * 1024:.0f} (computed) | weights, gradients, two "
                                f"AdamW moments (16 bytes per parameter) and an fp32 teacher (4): "
                                f"{'fits' if need < MACHINE_RAM_GIB * 0.9 else 'does not fit'} in {MACHINE_RAM_GIB} GB "
                                "before activations |")
    lines += ["", f"## Projection to one GPU (computed from the shapes, not measured; time at an assumed "
                  f"{ASSUMED_TFLOPS} TFLOP/s sustained)", "",
              "Calibration: 128 x 128 tokens through the dense model; moments: the o_proj / down_proj input second "
              "moments (float64) of every layer; refit: one Cholesky solve per projection; fitness: 16 windows of "
              "128 tokens. Layer-by-layer work holds one layer's weights and moments at a time.", "",
              "| model | params | weights bf16 GiB | one layer bf16 GiB | one layer's moments GiB | all moments GiB | "
              "calibration s | moments s | refit s | one fitness eval s | full fp32 KD GiB |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    projected = projection()
    for r in projected:
        lines.append(f"| {r['model']} | {r['parameters'] / 1e9:.1f}B | {r['weights_bf16_gib']:.1f} | "
                     f"{r['one_layer_bf16_gib']:.2f} | {r['one_layer_moments_gib']:.2f} | {r['all_moments_gib']:.0f} | "
                     f"{r['calibration_seconds']:.1f} | {r['moments_seconds']:.1f} | {r['refit_seconds']:.2f} | "
                     f"{r['fitness_seconds']:.2f} | {r['full_fp32_kd_gib']:.0f} |")
    atomic_write_json(RESULTS / "qwen_scale.json", {"rows": rows, "projection": projected,
                                                     "assumed_tflops": ASSUMED_TFLOPS, "versions": versions()})
    atomic_write_text(RESULTS / "qwen_scale.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="qwen2.5-0.5b,qwen2.5-1.5b")
    parser.add_argument("--steps", default=",".join(STEPS))
    parser.add_argument("--step", default=None, help=argparse.SUPPRESS)   # one step, in this process
    parser.add_argument("--render", action="store_true")
    args = parser.parse_args()
    if args.step:
        run_step(args.step, args.models)
        return
    if not args.render:
        done = {(r["model"], r["step"]) for r in load_rows()}
        for name in args.models.split(","):
            for step in args.steps.split(","):
                if (name, step) in done:
                    continue
                code = subprocess.call([sys.executable, __file__, "--step", step, "--models", name])
                if code != 0:
                    print(f"{name} {step}: exit code {code}", flush=True)
    render()


if __name__ == "__main__":
    main()
