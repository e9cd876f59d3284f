"""Setting up a search run: options -> ``config.json`` -> every object of the run.

This module is the composition root behind ``selfprune search`` (its argparse lives in
``selfprune.cli.search``): it turns options into a ``config.json`` and builds every object of a run (model,
pruner, fitness, search space, operator) from that config alone, so a resume rebuilds exactly the run that
was interrupted.
"""
from __future__ import annotations

import os
import platform
import sys
import time
from functools import partial
from pathlib import Path

from ..errors import SelfpruneError
from ..io import atomic_write_json
from ..reconstruction import DEFAULT_RIDGE
from .defaults import DEFAULT_FITNESS_SEQ_LEN
from .parallel import require_ray
from .runner import MODEL_DIR, SUMMARY, RunSettings, SearchProblem, SearchRunner, create_run_dir, size_population
from .space import SearchSpace, parse_bounds

# llm-random: the LLM operator's ablation (same prompts, repair and fallback; random replies instead of the LLM's).
OPERATORS = ("llm", "llm-random", "evolution", "random", "owl", "uniform")
PROMPTED_OPERATORS = ("llm", "llm-random")
SEED_HEURISTICS = ("uniform", "owl")
# Self-Pruner's setting: population 30 + 20 iterations x (10 crossovers + 10 mutations).
DEFAULT_BUDGET = 430
DEFAULT_POPULATION = 30
DEFAULT_RESCORE_WINDOWS = 64  # of the fitness seq-len: 4x the default fitness tokens (fitness.md: 64 x 128)
DEFAULT_OFFSPRING = 20
DEFAULT_WORKERS = 1
DEFAULT_WORKER_THREADS = 1
CANDIDATE_KINDS = ("sliced", "masked")
DEFAULT_CANDIDATES = "sliced"
# 2: "flap" squares the o_proj metric before the per-head sum (FLAP's reference); version-1 runs scored heads
# unsquared, so they resume with "flap_unsquared" and keep ranking heads as they did.
CONFIG_VERSION = 2


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
        return [] if operator in PROMPTED_OPERATORS else ["uniform"]
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


def fitness_seq_len(model: str) -> int:
    """The default fitness window, shortened for a model built for fewer tokens (its config says so)."""
    from ..models import context_length

    limit = context_length(model)
    return DEFAULT_FITNESS_SEQ_LEN if limit is None else min(DEFAULT_FITNESS_SEQ_LEN, limit)


def destination(spec: str | None, base_url: str | None) -> str | None:
    """Where an ``openai:`` operator's requests go, resolved once when the run is made: ``--llm-base-url``, else
    ``$OPENAI_BASE_URL``, else OpenAI. Recorded in the run config, so a resume in another shell (without the
    variable, or with another value) sends the run's requests, and its key, where they went before."""
    if base_url is not None or not spec or not str(spec).startswith("openai:"):
        return base_url
    from ..llm.backends import OPENAI_BASE_URL

    return (os.environ.get("OPENAI_BASE_URL") or "").strip() or OPENAI_BASE_URL


def build_config(args) -> dict:
    """Validate the options (cheaply, before any model is loaded) and gather them into the run config."""
    if args.target is None:
        raise SelfpruneError("--target is required: pass the fraction of parameters to remove, e.g. --target 0.3")
    bounds = parse_bounds(args.bounds)
    seq_len = args.seq_len if args.seq_len is not None else fitness_seq_len(args.model)
    SearchSpace([1.0], args.target, bounds)  # target and bounds errors now, not after loading the model
    for option, value, low in (("--population", args.population, 1), ("--offspring", args.offspring, 1),
                               ("--fitness-windows", args.fitness_windows, 1), ("--seq-len", seq_len, 2),
                               ("--batch-size", args.batch_size, 1), ("--calib-samples", args.calib_samples, 1),
                               ("--calib-seq-len", args.calib_seq_len, 2),
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
    if getattr(args, "moments_dir", None) and args.reconstruct != "lstsq":
        raise SelfpruneError("--moments-dir keeps the least-squares refit's moments: add --reconstruct lstsq, or "
                             "drop --moments-dir")
    seeds = _seed_names(args.seed_population, args.operator)
    budget = args.budget
    if budget is None:
        budget = {"uniform": 1, "owl": len(lambdas)}.get(args.operator, DEFAULT_BUDGET)
    n_cross = args.offspring // 2
    population, population_note = size_population(args.operator, budget, args.population, args.offspring)
    workers, worker_threads, ray_address = _evaluation_settings({}, args)
    require_ray(workers, ray_address)  # now, not after the model has loaded
    config = {
        "config_version": CONFIG_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv[1:],
        "model": args.model,
        "dtype": args.dtype,
        "device": args.device,
        "device_map": args.device_map,
        "criterion": args.criterion,
        "structure": args.structure,
        "gqa_policy": args.gqa_policy,
        "reconstruction": {"method": args.reconstruct, "ridge": args.ridge,
                           "moments_dir": getattr(args, "moments_dir", None)},
        "imatrix": bool(getattr(args, "save_imatrix", False)),
        "target": args.target,
        "bounds": list(bounds),
        "operator": args.operator,
        "budget": budget,
        "population": population,  # sized to the budget: see population_note
        "population_requested": args.population,
        "population_note": population_note,
        "cache_key": "layer_shapes",  # runs made before it was the key used the rounded achieved fractions
        "crossovers": n_cross,
        "mutations": args.offspring - n_cross,
        "seed": args.seed,
        "seed_population": seeds,
        "owl": {"lambdas": lambdas, "m": args.owl_m},
        "evolution": {"step": args.evo_step, "tournament": args.tournament},
        "llm": None if args.operator not in PROMPTED_OPERATORS else {
            # the ablation asks no LLM: record none, so its config does not name a server it never used
            **({"spec": args.llm, "base_url": destination(args.llm, args.llm_base_url),
                "api_key_env": args.llm_api_key_env}
               if args.operator == "llm" else {"spec": None, "base_url": None, "api_key_env": None}),
            "retries": args.llm_retries, "temperature": args.llm_temperature, "max_tokens": args.llm_max_tokens,
            "timeout": args.llm_timeout, "prompt_version": args.prompt_version,
        },
        "fitness": {"kind": args.fitness, "dataset": args.fitness_dataset, "split": "validation",
                    "windows": args.fitness_windows, "seq_len": seq_len, "batch_size": args.batch_size},
        "rescore": _rescore_settings(None, args),
        "recover": _recover_settings(None, args),
        "calibration": {"source": args.calib_dataset, "split": args.calib_split, "num_samples": args.calib_samples,
                        "seq_len": args.calib_seq_len, "seed": args.calib_seed},
        "data_dir": args.data_dir,
        # where candidates are scored (results do not depend on it: --resume may change it)
        "workers": workers,
        "worker_threads": worker_threads,
        "ray_address": ray_address,
        "candidates": getattr(args, "candidates", None) or DEFAULT_CANDIDATES,
        "max_memory": getattr(args, "max_memory", None),
        "offload_dir": getattr(args, "offload_dir", None),
        "versions": _versions(),
    }
    from .config_rules import validate_run_config

    return validate_run_config(config, "the search settings", fix="fix the option")


def _evaluation_settings(current: dict, args) -> tuple[int, int, str | None]:
    """(workers, worker threads, Ray address): the options given, else the run's current ones, else the
    defaults. ``--ray-address none`` drops an address a run was started with."""
    workers = getattr(args, "workers", None)
    workers = int(current.get("workers") or DEFAULT_WORKERS) if workers is None else workers
    threads = getattr(args, "worker_threads", None)
    threads = int(current.get("worker_threads") or DEFAULT_WORKER_THREADS) if threads is None else threads
    address = getattr(args, "ray_address", None)
    address = current.get("ray_address") if address is None else address
    if address is not None and address.strip().lower() in ("", "none"):
        address = None
    for option, value in (("--workers", workers), ("--worker-threads", threads)):
        if value < 1:
            raise SelfpruneError(f"{option} {value} is too small: use at least 1")
    return workers, threads, address


def default_out(config: dict) -> Path:
    return Path("runs") / f"{config['operator']}-t{config['target']:g}-s{config['seed']}"


# -- building a run from its config ---------------------------------------------------------------------

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
    if name in PROMPTED_OPERATORS:
        from .llm_operator import LLMOperator, RandomReplyOperator

        llm = config["llm"]
        settings = dict(log_dir=run_dir / "llm", n_crossover=config["crossovers"], n_mutation=config["mutations"],
                        retries=llm["retries"], prompt_version=llm["prompt_version"], temperature=llm["temperature"],
                        max_tokens=llm["max_tokens"], fallback_step=evo["step"], tournament_size=evo["tournament"],
                        fitness=config["fitness"]["kind"])
        if name == "llm-random":
            return RandomReplyOperator(space, **settings)
        return LLMOperator(backend, space, **settings)
    raise SelfpruneError(f"unknown operator {name!r}: use one of {', '.join(OPERATORS)}")


def _make_fitness(pruner, config: dict, windows: int | None = None):
    """The search's fitness; ``windows`` overrides the window count (the multi-fidelity re-scoring)."""
    from .fitness import make_fitness

    f = config["fitness"]
    return make_fitness(pruner, kind=f["kind"], dataset=f["dataset"], split=f["split"], seq_len=f["seq_len"],
                        max_windows=windows or f["windows"], batch_size=f["batch_size"], data_dir=config["data_dir"],
                        candidates=config.get("candidates", DEFAULT_CANDIDATES))


def load_options(config: dict) -> dict:
    """The keywords of ``load_model`` a run sets beyond model, dtype and device (the workers load with them too)."""
    return {key: config[key] for key in ("max_memory", "offload_dir") if config.get(key) is not None}


def execute(config: dict, run_dir: Path, *, progress: bool = True, save_model: bool = True) -> dict:
    """Load the model, build the run from ``config`` and run (or resume) it in ``run_dir``."""
    import selfprune
    from selfprune.models import load_model
    from selfprune.pruning import CalibrationConfig, Pruner

    from .fitness import layer_shapes
    from .parallel import make_pool, peak_rss_mb

    model, tokenizer = load_model(config["model"], dtype=config["dtype"], device=config["device"],
                                  device_map=config.get("device_map"), **load_options(config))
    c = config["calibration"]
    calibration = CalibrationConfig(source=c["source"], split=c.get("split", "validation"), num_samples=c["num_samples"],
                                    seq_len=c["seq_len"], seed=c["seed"], data_dir=config["data_dir"])
    reconstruction = config.get("reconstruction") or {"method": "bias"}   # runs made before refits had none
    pruner = Pruner(model, tokenizer, criterion=run_criterion(config), calibration=calibration, progress=progress,
                    gqa_policy=config["gqa_policy"], structure=config["structure"],
                    reconstruct=reconstruction["method"], ridge=reconstruction.get("ridge", DEFAULT_RIDGE))
    if pruner.reconstruct == "lstsq":   # every candidate is refit from the same moments: take them once
        pruner.cache_moments(reconstruction.get("moments_dir"))
    fitness = _make_fitness(pruner, config)
    rescore = config.get("rescore") or {"top": 0, "windows": 0}  # runs made before multi-fidelity have none
    space = SearchSpace(pruner.layer_params, config["target"], config["bounds"])

    def finalize(rates, directory: Path) -> dict:
        pruned, report = pruner.build(rates)
        path = Path(directory) / MODEL_DIR
        metadata = {"search": {"run_dir": str(directory), "operator": config["operator"],
                               "target": config["target"], "fitness": config["fitness"], "rates": rates}}
        imatrix = None
        if config.get("imatrix"):   # the saved model's own, for llama.cpp's quantizer
            from selfprune.imatrix import collect_imatrix

            imatrix = collect_imatrix(pruned, tokenizer, calibration, progress=progress)
        selfprune.save_pruned(pruned, tokenizer, path, metadata=metadata, overwrite=True, imatrix=imatrix)
        return {"path": str(path), "achieved_rate": report.achieved_rate}

    problem = SearchProblem(
        layer_params=pruner.layer_params,
        evaluate=fitness,
        achieved=pruner.achieved,
        outlier_ratios=lambda: pruner.outlier_ratios(config["owl"]["m"]),
        finalize=finalize if save_model else None,
        rescore=_make_fitness(pruner, config, rescore["windows"]) if rescore["top"] else None,
        shape_key=partial(layer_shapes, pruner) if config.get("cache_key") == "layer_shapes" else None,
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
                           rescore_top=rescore["top"], population_note=config.get("population_note"))
    seeds = build_seeds(config["seed_population"], space, problem, config["owl"])
    pool = make_pool(config, pruner, fitness)  # Ray actors start on the first batch that needs them
    try:
        runner = SearchRunner(run_dir, space, problem, operator, settings, seeds=seeds, progress=progress, pool=pool)
        summary = runner.run()
    finally:
        pool.close()
    settings_of = getattr(fitness, "settings", None)
    if settings_of is not None:  # what the fitness really scored (dataset origin, tokens), for the record
        summary["fitness_settings"] = settings_of() if callable(settings_of) else settings_of
    # peak resident memory of this session's processes (MiB; a worker that never started reports 0)
    summary["evaluation"]["peak_rss_mb"] = {"driver": peak_rss_mb(), "workers": pool.worker_peak_rss_mb()}
    if pruner.moments is not None:   # the one-off cost of refitting candidates: every layer's moments
        summary["reconstruction"] = pruner.reconstruction_settings() | {
            "moments_seconds": pruner.moments.seconds, "moments_mib": pruner.moments.nbytes / 2**20}
    if (config.get("recover") or {}).get("tokens") and save_model:  # the dense model, untouched, is the teacher
        atomic_write_json(run_dir / SUMMARY, summary)  # the search's result is on disk before training starts
        summary["recovery"] = recover_best(config, run_dir, model, tokenizer, progress)
    atomic_write_json(run_dir / SUMMARY, summary)
    return summary


def _recover_settings(current: dict | None, args) -> dict:
    """The final recovery of the best model (``--recover-tokens``): tokens 0 is off."""
    tokens = (current or {}).get("tokens", 0) if getattr(args, "recover_tokens", None) is None else args.recover_tokens
    if tokens:
        if getattr(args, "no_save_model", False):
            raise SelfpruneError("--recover-tokens needs the best model saved: drop --no-save-model")
        from ..recovery import RecoveryConfig

        step = RecoveryConfig(tokens=tokens)
        if step.total_steps == 0:
            raise SelfpruneError(f"--recover-tokens {tokens} is less than one training step "
                                 f"({step.tokens_per_step} tokens): pass more, or 0 for none")
    return {"tokens": int(tokens)}


def recover_best(config: dict, run_dir: Path, teacher_model, teacher_tokenizer, progress: bool = True) -> dict:
    """Distil the search's saved best model into ``RUN/model-recovered`` (reused when already done)."""
    from ..recovery import recover_search_model

    tokens = config["recover"]["tokens"]
    facts = recover_search_model(run_dir / MODEL_DIR, config["model"], tokens, config["data_dir"],
                                 teacher_model=teacher_model, teacher_tokenizer=teacher_tokenizer, dtype=config["dtype"],
                                 device=config["device"], device_map=config.get("device_map"), progress=progress)
    return {"requested_tokens": tokens, **facts}


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
    """The few settings a resumed run may change: its budget, where the LLM server is now, the final
    re-scoring of its best candidates, where candidates are scored (workers, their threads, the Ray
    cluster), and whether the saved model gets its importance matrix (``--imatrix`` turns it on).

    None changes what was evaluated; returns whether the config changed."""
    changed = False
    workers, threads, address = _evaluation_settings(config, args)
    for key, value, default in (("workers", workers, DEFAULT_WORKERS), ("ray_address", address, None),
                                ("worker_threads", threads, DEFAULT_WORKER_THREADS)):
        if config.get(key, default) != value:  # a run made before these settings has the defaults
            config[key], changed = value, True
    recover = _recover_settings(config.get("recover"), args)
    if recover != (config.get("recover") or {"tokens": 0}):
        config["recover"], changed = recover, True
    rescore = _rescore_settings(config.get("rescore"), args)
    if rescore != config.get("rescore"):
        config["rescore"], changed = rescore, True
    if getattr(args, "save_imatrix", False) and not config.get("imatrix"):
        config["imatrix"], changed = True, True
    if args.budget is not None:
        if args.budget < 1:
            raise SelfpruneError(f"--budget {args.budget} is too small: use at least 1 evaluation")
        changed |= config["budget"] != args.budget
        config["budget"] = args.budget
    llm = config.get("llm")
    if llm is not None:
        if args.llm_base_url is not None and args.llm_base_url != llm["base_url"]:
            llm["base_url"], changed = args.llm_base_url, True
        elif llm.get("base_url") is None and destination(llm.get("spec"), None):
            # a run made before destinations were recorded went where the environment said: record it now
            llm["base_url"], changed = destination(llm["spec"], None), True
        else:
            from ..llm import redact_url

            env = (os.environ.get("OPENAI_BASE_URL") or "").strip()
            if env and llm.get("base_url") and redact_url(env) != redact_url(llm["base_url"]):
                print(f"note: this run's LLM requests go to {redact_url(llm['base_url'])}, where they went when it was "
                      f"made; $OPENAI_BASE_URL ({redact_url(env)}) is not used: pass --llm-base-url to move them",
                      file=sys.stderr)
        if args.llm_api_key_env is not None and args.llm_api_key_env != llm["api_key_env"]:
            llm["api_key_env"], changed = args.llm_api_key_env, True
    return changed


def run_criterion(config: dict) -> str:
    """The criterion a run was scored with (see CONFIG_VERSION)."""
    if config.get("config_version", 1) < 2 and config["criterion"] == "flap":
        return "flap_unsquared"
    return config["criterion"]


def config_for_disk(config: dict) -> dict:
    """The config as written to config.json: URLs without credentials (a resumed run that needs them is
    given --llm-base-url again)."""
    from ..llm import redact_url

    llm = config.get("llm")
    if not llm or not llm.get("base_url"):
        return config
    return config | {"llm": llm | {"base_url": redact_url(llm["base_url"])}}


REQUIRED_CONFIG_KEYS = ("model", "dtype", "device", "criterion", "target", "bounds", "operator", "budget", "population",
                        "crossovers", "mutations", "seed", "seed_population", "owl", "evolution", "llm", "fitness",
                        "calibration", "data_dir")


def check_run_config(config: dict, path: Path) -> dict:
    """A resumed run's config must hold every setting the run is rebuilt from."""
    if not isinstance(config, dict):
        raise SelfpruneError(f"{path} does not hold a run config (a JSON object): start a new run")
    missing = [key for key in REQUIRED_CONFIG_KEYS if key not in config]
    if missing:
        raise SelfpruneError(f"{path} lacks {', '.join(missing)}: it was edited or written by another tool; "
                             "start a new run")
    from .config_rules import validate_run_config

    return validate_run_config(config, str(path))   # the rules the command line's options obey


def preflight(config: dict) -> None:
    """Everything checkable before the model loads: Ray where the run needs it, the LLM server, its key, the
    data."""
    require_ray(config.get("workers", DEFAULT_WORKERS), config.get("ray_address"))
    llm = config.get("llm")
    if config["operator"] == "llm" and llm is not None:
        from ..llm import preflight_backend

        preflight_backend(llm["spec"], base_url=llm["base_url"], api_key_env=llm["api_key_env"],
                          model=config["model"], timeout=float(llm.get("timeout") or 120.0))
    from ..data import check_text_available

    check_text_available(config["fitness"]["dataset"], config["fitness"]["split"], config["data_dir"])
    check_text_available(config["calibration"]["source"], config["calibration"].get("split", "validation"),
                         config["data_dir"])


def start(config: dict, run_dir: Path, *, overwrite: bool, progress: bool = True, save_model: bool = True) -> dict:
    """Create the run folder (an old run is replaced only once the new folder exists) and run it, holding the
    folder's lock for the run's life. A new run that fails before its first evaluation (model, data, server)
    leaves no folder behind, so the same command can simply be retried."""
    from contextlib import nullcontext

    from ..io import discard_on_failure, run_lock

    from .config_rules import validate_run_config

    validate_run_config(config, "the run config", fix="fix the setting")   # the API's dicts obey the CLI's rules
    fresh = not run_dir.exists()
    with run_lock(run_dir), (discard_on_failure(run_dir) if fresh else nullcontext()):
        create_run_dir(run_dir, config_for_disk(config), overwrite=overwrite)
        return execute(config, run_dir, progress=progress, save_model=save_model)


def resume(config: dict, run_dir: Path, *, progress: bool = True, save_model: bool = True) -> dict:
    """Continue the run in ``run_dir`` under its lock (a second process is refused, naming this one)."""
    from ..io import run_lock

    from .config_rules import validate_run_config

    validate_run_config(config, str(run_dir / "config.json"))
    with run_lock(run_dir):
        return execute(config, run_dir, progress=progress, save_model=save_model)
