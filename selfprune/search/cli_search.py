"""``selfprune search``: find per-layer pruning rates, then save the best pruned model.

This module is the composition root: it turns options into a ``config.json`` and builds every object
of a run (model, pruner, fitness, search space, operator) from that config alone, so ``--resume``
rebuilds exactly the run that was interrupted.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

from ..errors import SelfpruneError
from ..io import atomic_write_json
from .llm_operator import DEFAULT_PROMPT_VERSION, PROMPT_VERSIONS
from .runner import (CONFIG, MODEL_DIR, RESCORE, SUMMARY, RunSettings, SearchProblem, SearchRunner, create_run_dir,
                     format_summary, load_run_config)
from .space import DEFAULT_BOUNDS, SearchSpace, parse_bounds

OPERATORS = ("llm", "evolution", "random", "owl", "uniform")
SEED_HEURISTICS = ("uniform", "owl")
# Self-Pruner's setting: population 30 + 20 iterations x (10 crossovers + 10 mutations).
DEFAULT_BUDGET = 430
DEFAULT_POPULATION = 30
DEFAULT_RESCORE_WINDOWS = 64
DEFAULT_OFFSPRING = 20
CONFIG_VERSION = 1


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show "(default: X)" unless the help already explains the default (or there is none to show)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default" in text or action.default is None or action.default is False \
                or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


def add_search_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "search",
        help="search per-layer pruning rates (Self-Pruner LLM evolution or a baseline)",
        description="Search one pruning rate per decoder layer whose parameter-weighted mean is the target, "
                    "scoring candidates by the pruned model's perplexity; save the best pruned model in "
                    "<out>/model. Kill it at any time and continue with --resume <out>.",
        formatter_class=_HelpFormatter,
    )
    g = p.add_argument_group("run")
    g.add_argument("--out", default=None, help="run directory (default: runs/<operator>-t<target>-s<seed>)")
    g.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue the run in RUN_DIR with its saved config; other options are ignored except "
                        "--budget (to extend a run), --llm-base-url / --llm-api-key-env (the LLM server may have "
                        "moved), --no-progress and --no-save-model")
    g.add_argument("--overwrite", action="store_true", help="replace an existing --out folder (default: refuse)")
    g.add_argument("--seed", type=int, default=0, help="seed of every random choice of the search")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bar (default: shown)")
    g.add_argument("--no-save-model", action="store_true",
                   help="do not save the best pruned model (default: saved in <out>/model)")
    g = p.add_argument_group("model and pruning")
    g.add_argument("--model", default="default", help="hub id, model folder or .gguf file")
    g.add_argument("--dtype", default="float32", help="weights dtype (float32, bfloat16, float16)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    g.add_argument("--criterion", default="flap", choices=("flap", "wanda_sp", "magnitude"),
                   help="which heads/channels go inside a layer")
    from ..accounting import GQA_POLICIES
    from ..pruning import DEFAULT_GQA_POLICY, DEFAULT_STRUCTURE, STRUCTURES

    g.add_argument("--structure", default=DEFAULT_STRUCTURE, choices=STRUCTURES,
                   help="how a layer's rate is split between heads and MLP channels (see selfprune prune --help)")
    g.add_argument("--gqa-policy", default=DEFAULT_GQA_POLICY, choices=GQA_POLICIES,
                   help="query: remove query heads evenly from every KV group; group: remove whole KV groups")
    g.add_argument("--target", type=float, default=None,
                   help="fraction of the decoder layers' attention+MLP parameters to remove, in (0, 1) "
                        "(required, no default)")
    g.add_argument("--bounds", default=f"{DEFAULT_BOUNDS[0]:g},{DEFAULT_BOUNDS[1]:g}",
                   help="lowest and highest rate of any layer, LO,HI")
    g.add_argument("--calib-dataset", default="c4", help="calibration text: c4, wikitext2, ptb or a file")
    g.add_argument("--calib-samples", type=int, default=64, help="calibration sequences")
    g.add_argument("--data-dir", default=None, help="local data folder (default: $SELFPRUNE_DATA_DIR, else the hub)")
    g = p.add_argument_group("fitness")
    g.add_argument("--fitness", default="ppl", choices=("ppl", "kl"),
                   help="ppl: perplexity of the pruned model; kl: KL divergence to the dense model's logits")
    g.add_argument("--fitness-dataset", default="wikitext2", choices=("wikitext2", "c4", "ptb"),
                   help="text scored during the search (always its validation split, never test)")
    g.add_argument("--fitness-windows", type=int, default=16, help="number of seq-len windows scored per candidate")
    g.add_argument("--seq-len", type=int, default=128, help="tokens per window (fitness and calibration)")
    g.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    g.add_argument("--rescore-top", type=int, default=None,
                   help="multi-fidelity: at the end, score the N best candidates again on --rescore-windows "
                        "and keep the best of those (default 0: off; may be changed on --resume)")
    g.add_argument("--rescore-windows", type=int, default=None,
                   help=f"windows of the same validation split for re-scoring (default {DEFAULT_RESCORE_WINDOWS})")
    g = p.add_argument_group("search")
    g.add_argument("--operator", default="llm", choices=OPERATORS,
                   help="llm: Self-Pruner; evolution: EvoPress-style without LLM; random; owl; uniform")
    g.add_argument("--budget", type=int, default=None,
                   help=f"evaluations (distinct pruned models) (default: {DEFAULT_BUDGET}; 1 for uniform; "
                        f"one per --owl-lambda for owl)")
    g.add_argument("--population", type=int, default=DEFAULT_POPULATION, help="population size")
    g.add_argument("--offspring", type=int, default=DEFAULT_OFFSPRING,
                   help="children per iteration: half crossovers, half mutations")
    g.add_argument("--seed-population", default=None,
                   help="heuristics put into the initial population, comma-separated from "
                        "uniform,owl, or none (default: none for llm, uniform for evolution and random)")
    g.add_argument("--owl-lambda", default="0.08",
                   help="OWL's rate spread; a comma list makes --operator owl sweep it (one evaluation each)")
    g.add_argument("--owl-m", type=float, default=5.0, help="OWL outlier threshold M (x the layer mean)")
    g.add_argument("--evo-step", type=float, default=0.02, help="rate moved between two layers per mutation move")
    g.add_argument("--tournament", type=int, default=3, help="tournament size of the numeric selection")
    g = p.add_argument_group("LLM operator")
    g.add_argument("--llm", default="openai:gpt-4o",
                   help="openai:<model> (any OpenAI-compatible server), self (the model being pruned), "
                        "or local:<hub id or folder>")
    g.add_argument("--llm-base-url", default=None, help="base URL of an OpenAI-compatible server (default: OpenAI's)")
    g.add_argument("--llm-api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    g.add_argument("--llm-retries", type=int, default=2, help="retries of an unusable LLM answer before the "
                                                              "numeric operator fills the slot")
    g.add_argument("--llm-temperature", type=float, default=0.7, help="sampling temperature")
    g.add_argument("--llm-max-tokens", type=int, default=None,
                   help="answer length limit (default: 8 per layer + 128, at least 256)")
    g.add_argument("--llm-timeout", type=float, default=120.0, help="seconds per LLM request")
    g.add_argument("--prompt-version", default=DEFAULT_PROMPT_VERSION, choices=PROMPT_VERSIONS,
                   help="prompt templates selfprune/prompts/<version>_*.txt (default %(default)s)")
    p.set_defaults(func=run_search_command)
    return p


# -- config -------------------------------------------------------------------------------------------

def _floats(text: str, option: str) -> list[float]:
    try:
        values = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise SelfpruneError(f"{option} {text!r} is not a comma-separated list of numbers: e.g. {option} 0.08")
    return values


def _seed_names(text: str | None, operator: str) -> list[str]:
    if text is None:
        return [] if operator == "llm" else ["uniform"]
    names = [n.strip() for n in text.split(",") if n.strip() and n.strip() != "none"]
    for n in names:
        if n not in SEED_HEURISTICS:
            raise SelfpruneError(f"unknown --seed-population entry {n!r}: use uniform, owl or none")
    return list(dict.fromkeys(names))


def _versions() -> dict:
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for name in ("selfprune", "torch", "transformers", "numpy", "openai"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    return versions


def build_config(args) -> dict:
    """Validate the options (cheaply, before any model is loaded) and gather them into the run config."""
    if args.target is None:
        raise SelfpruneError("--target is required: pass the fraction of parameters to remove, e.g. --target 0.3")
    bounds = parse_bounds(args.bounds)
    SearchSpace([1.0], args.target, bounds)  # target and bounds errors now, not after loading the model
    for option, value, low in (("--population", args.population, 1), ("--offspring", args.offspring, 1),
                               ("--fitness-windows", args.fitness_windows, 1), ("--seq-len", args.seq_len, 2),
                               ("--batch-size", args.batch_size, 1), ("--calib-samples", args.calib_samples, 1),
                               ("--llm-retries", args.llm_retries, 0), ("--tournament", args.tournament, 1)):
        if value < low:
            raise SelfpruneError(f"{option} {value} is too small: use at least {low}")
    if args.budget is not None and args.budget < 1:
        raise SelfpruneError(f"--budget {args.budget} is too small: use at least 1 evaluation")
    lambdas = _floats(args.owl_lambda, "--owl-lambda")
    if any(not 0 <= lam < 1 for lam in lambdas):
        raise SelfpruneError(f"--owl-lambda {args.owl_lambda} must be in [0, 1): e.g. 0.08")
    if not 0 < args.evo_step < 1:
        raise SelfpruneError(f"--evo-step {args.evo_step} must be in (0, 1): e.g. 0.02")
    seeds = _seed_names(args.seed_population, args.operator)
    budget = args.budget
    if budget is None:
        budget = {"uniform": 1, "owl": len(lambdas)}.get(args.operator, DEFAULT_BUDGET)
    n_cross = args.offspring // 2
    return {
        "config_version": CONFIG_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv[1:],
        "model": args.model,
        "dtype": args.dtype,
        "device": args.device,
        "criterion": args.criterion,
        "structure": args.structure,
        "gqa_policy": args.gqa_policy,
        "target": args.target,
        "bounds": list(bounds),
        "operator": args.operator,
        "budget": budget,
        "population": args.population,
        "crossovers": n_cross,
        "mutations": args.offspring - n_cross,
        "seed": args.seed,
        "seed_population": seeds,
        "owl": {"lambdas": lambdas, "m": args.owl_m},
        "evolution": {"step": args.evo_step, "tournament": args.tournament},
        "llm": None if args.operator != "llm" else {
            "spec": args.llm, "base_url": args.llm_base_url, "api_key_env": args.llm_api_key_env,
            "retries": args.llm_retries, "temperature": args.llm_temperature, "max_tokens": args.llm_max_tokens,
            "timeout": args.llm_timeout, "prompt_version": args.prompt_version,
        },
        "fitness": {"kind": args.fitness, "dataset": args.fitness_dataset, "split": "validation",
                    "windows": args.fitness_windows, "seq_len": args.seq_len, "batch_size": args.batch_size},
        "rescore": _rescore_settings(None, args),
        "calibration": {"source": args.calib_dataset, "num_samples": args.calib_samples, "seq_len": args.seq_len,
                        "seed": args.seed},
        "data_dir": args.data_dir,
        "versions": _versions(),
    }


def default_out(config: dict) -> Path:
    return Path("runs") / f"{config['operator']}-t{config['target']:g}-s{config['seed']}"


# -- building a run from its config ---------------------------------------------------------------------

def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def build_seeds(names: list[str], space: SearchSpace, problem: SearchProblem, owl: dict):
    from .operators import Proposal, owl_rates

    seeds = []
    for name in names:
        if name == "uniform":
            seeds.append(Proposal(space.uniform(), "seed:uniform"))
        elif name == "owl":
            ratios = problem.outlier_ratios()
            seeds.append(Proposal(owl_rates(space, ratios, owl["lambdas"][0]), "seed:owl"))
    return seeds


def build_operator(config: dict, space: SearchSpace, problem: SearchProblem, run_dir: Path, backend=None):
    """The operator named in the config; ``backend`` is the LLM's ChatBackend for ``llm``."""
    from .operators import EvolutionOperator, FixedOperator, Proposal, RandomOperator, owl_rates

    name = config["operator"]
    if name == "uniform":
        return FixedOperator("uniform", [Proposal(space.uniform(), "uniform")])
    if name == "owl":
        ratios = problem.outlier_ratios()
        return FixedOperator("owl", [Proposal(owl_rates(space, ratios, lam), f"owl:lambda={lam:g}")
                                     for lam in config["owl"]["lambdas"]])
    if name == "random":
        return RandomOperator(space, config["crossovers"] + config["mutations"])
    evo = config["evolution"]
    if name == "evolution":
        return EvolutionOperator(space, config["crossovers"], config["mutations"], evo["step"], evo["tournament"])
    if name == "llm":
        from .llm_operator import LLMOperator

        llm = config["llm"]
        return LLMOperator(backend, space, log_dir=run_dir / "llm", n_crossover=config["crossovers"],
                           n_mutation=config["mutations"], retries=llm["retries"],
                           prompt_version=llm["prompt_version"], temperature=llm["temperature"],
                           max_tokens=llm["max_tokens"], fallback_step=evo["step"],
                           tournament_size=evo["tournament"])
    raise SelfpruneError(f"unknown operator {name!r}: use one of {', '.join(OPERATORS)}")


def _make_fitness(pruner, config: dict, windows: int | None = None):
    """The search's fitness; ``windows`` overrides the window count (the multi-fidelity re-scoring)."""
    from .fitness import make_fitness

    f = config["fitness"]
    return make_fitness(pruner, kind=f["kind"], dataset=f["dataset"], split=f["split"], seq_len=f["seq_len"],
                        max_windows=windows or f["windows"], batch_size=f["batch_size"], data_dir=config["data_dir"])


def execute(config: dict, run_dir: Path, *, progress: bool = True, save_model: bool = True) -> dict:
    """Load the model, build the run from ``config`` and run (or resume) it in ``run_dir``."""
    import selfprune
    from selfprune.models import load_model
    from selfprune.pruning import CalibrationConfig, Pruner

    model, tokenizer = load_model(config["model"], dtype=config["dtype"], device=_device(config["device"]))
    c = config["calibration"]
    calibration = CalibrationConfig(source=c["source"], num_samples=c["num_samples"], seq_len=c["seq_len"],
                                    seed=c["seed"], data_dir=config["data_dir"])
    pruner = Pruner(model, tokenizer, criterion=config["criterion"], calibration=calibration, progress=progress,
                    gqa_policy=config["gqa_policy"], structure=config["structure"])
    fitness = _make_fitness(pruner, config)
    rescore = config.get("rescore") or {"top": 0, "windows": 0}  # runs made before multi-fidelity have none
    space = SearchSpace(pruner.layer_params, config["target"], config["bounds"])

    def finalize(rates, directory: Path) -> dict:
        pruned, report = pruner.build(rates)
        path = Path(directory) / MODEL_DIR
        metadata = {"search": {"run_dir": str(directory), "operator": config["operator"],
                               "target": config["target"], "fitness": config["fitness"], "rates": rates}}
        selfprune.save_pruned(pruned, tokenizer, path, metadata=metadata, overwrite=True)
        return {"path": str(path), "achieved_rate": report.achieved_rate}

    problem = SearchProblem(
        layer_params=pruner.layer_params,
        evaluate=fitness,
        achieved=pruner.achieved,
        outlier_ratios=lambda: pruner.outlier_ratios(config["owl"]["m"]),
        finalize=finalize if save_model else None,
        rescore=_make_fitness(pruner, config, rescore["windows"]) if rescore["top"] else None,
    )
    backend = None
    if config["operator"] == "llm":
        from ..llm import make_backend

        llm = config["llm"]
        backend = make_backend(llm["spec"], base_url=llm["base_url"], api_key_env=llm["api_key_env"],
                               self_model=model, self_tokenizer=tokenizer, timeout=llm["timeout"])
    operator = build_operator(config, space, problem, run_dir, backend)
    population = config["population"]
    if config["operator"] in ("uniform", "owl"):
        population = max(1, len(getattr(operator, "_proposals", [])))
    settings = RunSettings(budget=config["budget"], population=population, seed=config["seed"],
                           rescore_top=rescore["top"])
    seeds = build_seeds(config["seed_population"], space, problem, config["owl"])
    runner = SearchRunner(run_dir, space, problem, operator, settings, seeds=seeds, progress=progress)
    summary = runner.run()
    settings_of = getattr(fitness, "settings", None)
    if settings_of is not None:  # what the fitness really scored (dataset origin, tokens), for the record
        summary["fitness_settings"] = settings_of() if callable(settings_of) else settings_of
        atomic_write_json(run_dir / SUMMARY, summary)
    return summary


def _rescore_settings(current: dict | None, args) -> dict:
    """Multi-fidelity settings: the options given, else the run's current ones, else the defaults."""
    current = current or {"top": 0, "windows": DEFAULT_RESCORE_WINDOWS}
    top = current["top"] if args.rescore_top is None else args.rescore_top
    windows = current["windows"] if args.rescore_windows is None else args.rescore_windows
    for option, value, low in (("--rescore-top", top, 0), ("--rescore-windows", windows, 1)):
        if value < low:
            raise SelfpruneError(f"{option} {value} is too small: use at least {low}")
    return {"top": top, "windows": windows}


def apply_resume_overrides(config: dict, args) -> bool:
    """The few settings a resumed run may change: its budget, where the LLM server is now, and the final
    re-scoring of its best candidates.

    None changes what was evaluated; returns whether the config changed."""
    changed = False
    rescore = _rescore_settings(config.get("rescore"), args)
    if rescore != config.get("rescore"):
        config["rescore"], changed = rescore, True
    if args.budget is not None:
        if args.budget < 1:
            raise SelfpruneError(f"--budget {args.budget} is too small: use at least 1 evaluation")
        changed |= config["budget"] != args.budget
        config["budget"] = args.budget
    llm = config.get("llm")
    if llm is not None:
        if args.llm_base_url is not None and args.llm_base_url != llm["base_url"]:
            llm["base_url"], changed = args.llm_base_url, True
        if args.llm_api_key_env != "OPENAI_API_KEY" and args.llm_api_key_env != llm["api_key_env"]:
            llm["api_key_env"], changed = args.llm_api_key_env, True
    return changed


def run_search_command(args) -> int:
    if args.resume:
        run_dir = Path(args.resume)
        config = load_run_config(run_dir)
        old_windows = (config.get("rescore") or {}).get("windows")
        if apply_resume_overrides(config, args):
            if config["rescore"]["windows"] != old_windows:  # earlier re-scores used other windows
                (run_dir / RESCORE).unlink(missing_ok=True)
            atomic_write_json(run_dir / CONFIG, config)
        print(f"resuming {run_dir} with its saved settings ({run_dir / 'config.json'})", file=sys.stderr)
    else:
        config = build_config(args)
        run_dir = Path(args.out) if args.out else default_out(config)
        if run_dir.exists() and not args.overwrite:
            raise SelfpruneError(f"{run_dir} already exists: pass --resume {run_dir} to continue it, "
                                 f"--overwrite to replace it, or another --out")
        create_run_dir(run_dir, config, overwrite=args.overwrite)
    summary = execute(config, run_dir, progress=not args.no_progress, save_model=not args.no_save_model)
    print(format_summary(summary))
    print(f"run directory: {run_dir}")
    return 0
