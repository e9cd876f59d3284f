"""``selfprune search``: find per-layer pruning rates, then save the best pruned model."""
from __future__ import annotations

from pathlib import Path

from ..errors import SelfpruneError
from .common import (HelpFormatter, _number, add_calibration_options, add_data_option, add_model_options, add_pruning_options,
                     check_model, check_model_options, check_output, nonnegative_int, open_fraction, positive_float,
                     positive_int, say)


def register(sub, parents=()):
    from ..search.defaults import DEFAULT_FITNESS_SEQ_LEN, DEFAULT_FITNESS_WINDOWS
    from ..search.launch import (CANDIDATE_KINDS, DEFAULT_BUDGET, DEFAULT_CANDIDATES, DEFAULT_OFFSPRING,
                                 DEFAULT_POPULATION, DEFAULT_RESCORE_WINDOWS, OPERATORS)
    from ..search.llm_operator import DEFAULT_PROMPT_VERSION, PROMPT_VERSIONS
    from ..search.space import DEFAULT_BOUNDS

    p = sub.add_parser(
        "search", parents=list(parents), formatter_class=HelpFormatter,
        help="search per-layer pruning rates (Self-Pruner LLM evolution or a baseline)",
        description="Search one pruning rate per decoder layer whose parameter-weighted mean is the target, "
                    "scoring candidates on a validation split; save the best pruned model in <out>/model. "
                    "Kill it at any time and continue with --resume <out>.")
    g = p.add_argument_group("run")
    g.add_argument("--out", default=None, help="run directory; if not given: runs/<operator>-t<target>-s<seed>")
    g.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue the run in RUN_DIR with its saved config; other options are ignored except "
                        "--budget (to extend a run), --rescore-top / --rescore-windows, --llm-base-url / "
                        "--llm-api-key-env (the LLM server may have moved), --workers / --worker-threads / "
                        "--ray-address (where candidates are scored; results do not change), --recover-tokens, "
                        "--no-progress and --no-save-model")
    g.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out run; the old one stays until the new run starts")
    g.add_argument("--seed", type=int, default=0, help="seed of every random choice of the search (not calibration)")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    g.add_argument("--no-save-model", action="store_true", help="do not save the best pruned model in <out>/model")
    g.add_argument("--recover-tokens", type=nonnegative_int, default=None, metavar="N",
                   help="after the search, distil the best model from the dense one on N tokens of the C4 sample (KD, "
                        "full fine-tuning; see `selfprune recover`) into <out>/model-recovered, keeping <out>/model as "
                        "searched; ~15 tokens/s for SmolLM2 on a 2-core CPU; if not given: 0 (off) for a new run, "
                        "unchanged on --resume")
    g = p.add_argument_group("model and pruning")
    add_model_options(g)
    add_pruning_options(g)
    g.add_argument("--target", type=open_fraction, default=None,
                   help="fraction of the decoder layers' attention+MLP parameters to remove, in (0, 1); required "
                        "for a new run")
    g.add_argument("--bounds", default=f"{DEFAULT_BOUNDS[0]:g},{DEFAULT_BOUNDS[1]:g}",
                   help="lowest and highest rate of any layer, LO,HI")
    add_calibration_options(g)
    add_data_option(g)
    g = p.add_argument_group("fitness")
    g.add_argument("--fitness", default="ppl", choices=("ppl", "kl"),
                   help="ppl: perplexity of the pruned model; kl: KL divergence to the dense model's logits")
    g.add_argument("--fitness-dataset", default="wikitext2", choices=("wikitext2", "c4", "ptb"),
                   help="text scored during the search (always its validation split, never test)")
    g.add_argument("--fitness-windows", type=positive_int, default=DEFAULT_FITNESS_WINDOWS,
                   help="seq-len windows scored per candidate")
    g.add_argument("--seq-len", type=positive_int, default=None,
                   help=f"tokens per fitness window; if not given: {DEFAULT_FITNESS_SEQ_LEN}, or the model's context "
                        "length when shorter (bench/results/fitness.md compares window counts and lengths)")
    g.add_argument("--batch-size", type=positive_int, default=8, help="windows per forward pass")
    g.add_argument("--rescore-top", type=nonnegative_int, default=None,
                   help="multi-fidelity: at the end, score the N best candidates again on --rescore-windows and keep "
                        "the best of those; if not given: 0 (off) for a new run, unchanged on --resume")
    g.add_argument("--rescore-windows", type=positive_int, default=None,
                   help=f"windows of the same validation split for re-scoring; if not given: {DEFAULT_RESCORE_WINDOWS} "
                        "for a new run, unchanged on --resume")
    g = p.add_argument_group("evaluation (where candidates are scored; the results do not depend on it)")
    g.add_argument("--workers", type=positive_int, default=None, metavar="N",
                   help="score candidates on N Ray actors, each holding the model: one per GPU with --device cuda, "
                        "else one per --worker-threads CPU cores; 1 scores them in this process without Ray. If not "
                        "given: 1 for a new run, unchanged on --resume")
    g.add_argument("--ray-address", metavar="ADDR", default=None,
                   help="join an existing Ray cluster (e.g. auto, or host:6379) instead of starting a local one; "
                        "none on --resume drops the address a run was started with")
    g.add_argument("--worker-threads", type=positive_int, default=None, metavar="N",
                   help="torch threads per worker; if not given: 1 for a new run, unchanged on --resume")
    g.add_argument("--candidates", default=DEFAULT_CANDIDATES, choices=CANDIDATE_KINDS,
                   help="sliced: score a physically pruned copy of each candidate (fast); masked: score the dense "
                        "weights with the removed heads and channels masked (no copy: for models that barely fit)")
    g.add_argument("--moments-dir", default=None, metavar="DIR",
                   help="--reconstruct lstsq: keep every layer's second moments in files in DIR (one per layer, "
                        "read back per candidate) instead of in memory: LLaMA-2-7B's take ~35 GB, 70B's ~570 GB")
    g.add_argument("--save-imatrix", action="store_true",
                   help="also save the best model's importance matrix (RUN/model/imatrix.gguf, on the calibration "
                        "text): selfprune export then gives it to llama.cpp's quantizer")
    g = p.add_argument_group("search")
    g.add_argument("--operator", default="llm", choices=OPERATORS,
                   help="llm: Self-Pruner; llm-random: its ablation (same prompts, repair, fallback and budget, but "
                        "random valid replies instead of the LLM's); evolution: EvoPress-style without LLM; random; "
                        "owl; uniform")
    g.add_argument("--budget", type=positive_int, default=None,
                   help=f"evaluations (distinct pruned models); if not given: {DEFAULT_BUDGET}, 1 for uniform, one per "
                        "--owl-lambda for owl; on --resume a larger value extends the run")
    g.add_argument("--population", type=positive_int, default=DEFAULT_POPULATION, help="population size")
    g.add_argument("--offspring", type=positive_int, default=DEFAULT_OFFSPRING,
                   help="children per iteration: half crossovers, half mutations")
    g.add_argument("--seed-population", default=None,
                   help="heuristics put into the initial population, comma-separated from uniform,owl, or none; if "
                        "not given: none for llm and llm-random, uniform for evolution and random")
    g.add_argument("--owl-lambda", default="0.08",
                   help="OWL's rate spread; a comma list makes --operator owl sweep it (one evaluation each)")
    g.add_argument("--owl-m", type=positive_float, default=5.0, help="OWL outlier threshold M (x the layer mean)")
    g.add_argument("--evo-step", type=open_fraction, default=0.02, help="rate moved between two layers per mutation move")
    g.add_argument("--tournament", type=positive_int, default=3, help="tournament size of the numeric selection")
    g = p.add_argument_group("LLM operator (ignored by llm-random)")
    g.add_argument("--llm", default="openai:gpt-4o",
                   help="openai:<model> (any OpenAI-compatible server), self (the model being pruned), "
                        "or local:<hub id or folder>")
    g.add_argument("--llm-base-url", default=None,
                   help="base URL of an OpenAI-compatible server; if not given, $OPENAI_BASE_URL, else OpenAI's. "
                        "Recorded in the run: a resume sends requests there unless given this option again")
    g.add_argument("--llm-api-key-env", default=None,
                   help="environment variable holding the API key; if not given, OPENAI_API_KEY, which is sent to "
                        "OpenAI's own host only (name the variable to send a key to another server)")
    g.add_argument("--llm-retries", type=nonnegative_int, default=2,
                   help="retries of an unusable LLM answer before the numeric operator fills the slot")
    g.add_argument("--llm-temperature", type=_number(float, low=0, high=2, what="a temperature in [0, 2]"),
                   default=0.7, help="sampling temperature")
    g.add_argument("--llm-max-tokens", type=positive_int, default=None,
                   help="answer length limit; if not given, 8 per layer + 128, at least 256")
    g.add_argument("--llm-timeout", type=positive_float, default=120.0, help="seconds per LLM request")
    g.add_argument("--prompt-version", default=DEFAULT_PROMPT_VERSION, choices=PROMPT_VERSIONS,
                   help="prompt templates selfprune/prompts/<version>_*.txt")
    p.set_defaults(func=run, default_offspring=DEFAULT_OFFSPRING)
    return p


def run(args) -> int:
    from ..io import restore_interrupted, run_lock
    from ..search import launch
    from ..search.runner import budget_notes, format_summary

    if args.resume:
        run_dir = Path(args.resume)
        if not restore_interrupted(run_dir):  # (a run folder a killed --overwrite left aside comes back)
            raise SelfpruneError(f"{run_dir} holds no search run: check the --resume path")
        with run_lock(run_dir):  # a second process on this run is refused before it says or writes anything
            summary = _resume(args, run_dir)
        if summary is None:
            return 0
    else:
        config = launch.build_config(args)
        run_dir = Path(args.out) if args.out else launch.default_out(config)
        if run_dir.exists() and not args.overwrite:
            raise SelfpruneError(f"{run_dir} already exists: pass --resume {run_dir} to continue it, "
                                 f"--overwrite to replace it, or another --out")
        check_output(run_dir, kind="dir", overwrite=args.overwrite)
        check_model_options(args)
        check_model(config["model"], {"--seq-len": config["fitness"]["seq_len"],
                                      "--calib-seq-len": config["calibration"]["seq_len"]})
        with run_lock(run_dir):  # an --overwrite of a run still going is refused here
            for note in budget_notes(config):
                say(note)
            launch.preflight(config)
            summary = launch.start(config, run_dir, overwrite=args.overwrite, progress=not args.no_progress,
                                   save_model=not args.no_save_model)
    print(format_summary(summary))
    print(f"run directory: {run_dir}")
    return 0


def _resume(args, run_dir: Path) -> dict | None:
    """Continue a run (its lock held); None when it is already finished."""
    from ..io import atomic_write_json
    from ..search import launch
    from ..search.runner import CONFIG, RESCORE, format_summary, load_run_config, run_is_finished

    config = launch.check_run_config(load_run_config(run_dir), run_dir / CONFIG)
    old_windows = (config.get("rescore") or {}).get("windows")
    changed = launch.apply_resume_overrides(config, args)
    finished = run_is_finished(run_dir, config, save_model=not args.no_save_model)
    if finished is not None:
        print(format_summary(finished))
        say(f"{run_dir} is finished ({finished['evaluations']} evaluations of budget {config['budget']}): "
            f"nothing to do; pass a larger --budget to extend it")
        return None
    launch.preflight(config)
    if changed:
        if config["rescore"]["windows"] != old_windows:  # earlier re-scores used other windows
            (run_dir / RESCORE).unlink(missing_ok=True)
        atomic_write_json(run_dir / CONFIG, launch.config_for_disk(config))
    say(f"resuming {run_dir} with its saved settings ({run_dir / CONFIG})")
    return launch.resume(config, run_dir, progress=not args.no_progress, save_model=not args.no_save_model)
