"""The rules a search run's settings obey, in one place: the command line builds a config and checks it here,
the Python API checks what it is given here, and ``--resume`` checks the config.json it reads here, so a value
the command line refuses (a target that is not a number, zero samples, zero fitness windows) is refused in a
saved run too, naming the key in the file."""
from __future__ import annotations

import math

from ..errors import SelfpruneError, is_real, is_whole

CANDIDATE_KINDS = ("sliced", "masked")


class _Refused(Exception):
    """One broken rule: the key path (``fitness.windows``) and what the value must be."""

    def __init__(self, key: str, value, must: str):
        super().__init__(key, value, must)
        self.key, self.value, self.must = key, value, must


def _whole(key, value, low=1):
    if not is_whole(value, low):
        must = {1: "a positive whole number", None: "a whole number"}.get(low, f"a whole number >= {low}")
        raise _Refused(key, value, must)


def _real(key, value, low=None, high=None, low_open=False, high_open=False):
    if not is_real(value) or not math.isfinite(value):
        raise _Refused(key, value, "a number")
    if low is not None and (value < low or (low_open and value == low)):
        raise _Refused(key, value, f"a number {'>' if low_open else '>='} {low:g}")
    if high is not None and (value > high or (high_open and value == high)):
        raise _Refused(key, value, f"a number {'<' if high_open else '<='} {high:g}")


def _choice(key, value, choices):
    if value not in choices:
        raise _Refused(key, value, f"one of {', '.join(map(str, choices))}")


def _text(key, value, optional=False):
    if value is None and optional:
        return
    if not isinstance(value, str) or not value.strip():
        raise _Refused(key, value, "a non-empty text")


def _section(config, key) -> dict:
    value = config.get(key)
    if not isinstance(value, dict):
        raise _Refused(key, value, "an object")
    return value


def _rules(config: dict) -> None:
    from ..accounting import GQA_POLICIES
    from ..checkpoints import DTYPES
    from ..criteria import CRITERIA
    from ..pruning import STRUCTURES
    from ..reconstruction import RECONSTRUCTIONS
    from .fitness import FITNESS_KINDS
    from .launch import OPERATORS, SEED_HEURISTICS
    from .llm_operator import PROMPT_VERSIONS

    _text("model", config.get("model"))
    _choice("dtype", config.get("dtype"), DTYPES)
    _text("device", config.get("device"))
    _choice("criterion", config.get("criterion"), CRITERIA)
    _choice("operator", config.get("operator"), OPERATORS)
    if "structure" in config:
        _choice("structure", config["structure"], STRUCTURES)
    if "gqa_policy" in config:
        _choice("gqa_policy", config["gqa_policy"], GQA_POLICIES)
    _real("target", config.get("target"), 0, 1, low_open=True, high_open=True)
    bounds = config.get("bounds")
    if not isinstance(bounds, list) or len(bounds) != 2:
        raise _Refused("bounds", bounds, "a list [LO, HI]")
    for i, b in enumerate(bounds):
        _real(f"bounds[{i}]", b, 0, 1, high_open=True)
    if not bounds[0] < bounds[1] or not bounds[0] <= config["target"] <= bounds[1]:
        raise _Refused("bounds", bounds, f"LO < HI with LO <= target ({config['target']}) <= HI")
    for key in ("budget", "population"):
        _whole(key, config.get(key))
    for key in ("crossovers", "mutations"):
        _whole(key, config.get(key), low=0)
    _whole("seed", config.get("seed"), low=None)
    seeds = config.get("seed_population")
    if not isinstance(seeds, list):
        raise _Refused("seed_population", seeds, "a list")
    for i, name in enumerate(seeds):
        _choice(f"seed_population[{i}]", name, SEED_HEURISTICS)
    owl = _section(config, "owl")
    if not isinstance(owl.get("lambdas"), list) or not owl["lambdas"]:
        raise _Refused("owl.lambdas", owl.get("lambdas"), "a non-empty list")
    for i, lam in enumerate(owl["lambdas"]):
        _real(f"owl.lambdas[{i}]", lam, 0, 1, high_open=True)
    _real("owl.m", owl.get("m"), 0, low_open=True)
    evolution = _section(config, "evolution")
    _real("evolution.step", evolution.get("step"), 0, 1, low_open=True, high_open=True)
    _whole("evolution.tournament", evolution.get("tournament"))
    llm = config.get("llm")
    if llm is not None:
        if not isinstance(llm, dict):
            raise _Refused("llm", llm, "an object or null")
        if config["operator"] == "llm":
            _text("llm.spec", llm.get("spec"))
        _text("llm.base_url", llm.get("base_url"), optional=True)
        _text("llm.api_key_env", llm.get("api_key_env"), optional=True)
        _whole("llm.retries", llm.get("retries"), low=0)
        _real("llm.temperature", llm.get("temperature"), 0, 2)
        if llm.get("max_tokens") is not None:   # None: sized to the model when the run starts
            _whole("llm.max_tokens", llm["max_tokens"])
        if llm.get("timeout") is not None:
            _real("llm.timeout", llm["timeout"], 0, low_open=True)
        _choice("llm.prompt_version", llm.get("prompt_version"), PROMPT_VERSIONS)
    fitness = _section(config, "fitness")
    _choice("fitness.kind", fitness.get("kind"), FITNESS_KINDS)
    _text("fitness.dataset", fitness.get("dataset"))
    for key in ("windows", "seq_len", "batch_size"):
        _whole(f"fitness.{key}", fitness.get(key))
    calibration = _section(config, "calibration")
    _text("calibration.source", calibration.get("source"))
    _text("calibration.split", calibration.get("split"))
    for key in ("num_samples", "seq_len"):
        _whole(f"calibration.{key}", calibration.get(key))
    _whole("calibration.seed", calibration.get("seed"), low=None)
    if config.get("data_dir") is not None:
        _text("data_dir", config["data_dir"])
    reconstruction = config.get("reconstruction")
    if reconstruction is not None:
        if not isinstance(reconstruction, dict):
            raise _Refused("reconstruction", reconstruction, "an object")
        _choice("reconstruction.method", reconstruction.get("method"), RECONSTRUCTIONS)
        _real("reconstruction.ridge", reconstruction.get("ridge"), 0, 1000, high_open=True)
    for key, low in (("workers", 1), ("worker_threads", 1)):
        if config.get(key) is not None:
            _whole(key, config[key], low=low)
    if "candidates" in config:
        _choice("candidates", config["candidates"], CANDIDATE_KINDS)
    if config.get("rescore") is not None:
        rescore = _section(config, "rescore")
        _whole("rescore.top", rescore.get("top"), low=0)
        _whole("rescore.windows", rescore.get("windows"))
    if config.get("recover") is not None:
        _whole("recover.tokens", _section(config, "recover").get("tokens"), low=0)


def validate_run_config(config, where: str, fix: str = "restore the file or start a new run") -> dict:
    """``config`` if every setting obeys the rules, else one line naming ``where`` (the file, or "the search
    settings"), the key and what its value must be."""
    if not isinstance(config, dict):
        raise SelfpruneError(f"{where} does not hold a run config (a JSON object): start a new run")
    try:
        _rules(config)
    except _Refused as refused:
        raise SelfpruneError(f"{where}: {refused.key} is {refused.value!r}, but must be {refused.must}: {fix}") from None
    return config
