"""The Self-Pruner operators carried out by an LLM: initial population, parent selection, crossover, mutation.

Every reply is classified before use:

* ``valid``: a list of the right length of finite numbers that already satisfies the constraint up to
  :data:`VALID_TOLERANCE` (LLMs write 3 decimals, so their mean is rarely exact);
* ``repaired``: usable numbers that the repair step had to move further (outside the search bounds but
  still fractions, wrong mean, percentages instead of fractions);
* ``unusable``: no JSON, wrong length, non-numeric or non-finite entries, or a value that is no rate at all
  (outside [0, 1] once percentages are converted). Projecting such a reply onto the constraint would always
  give *some* candidate, but it would be the repair's choice, not the LLM's, so it must not count as one.

An unusable reply (or one that repeats an evaluated candidate: status ``duplicate``, counted under
``duplicates``) is retried with the reason appended to the conversation, up to ``retries`` times; then the
numeric operator (:mod:`.operators`) fills the slot and the fallback is counted. Every prompt and reply goes
to ``<run>/llm/calls.jsonl`` with tokens, seconds and the classification, fsynced as it arrives.

Resume: a run killed in the middle of an LLM batch has no proposals record for that batch, so the runner
asks the operator again. The operator then answers each call that ``calls.jsonl`` already holds (same
iteration, operation, slot and attempt, and the same prompt and seed) from the log instead of the LLM, and
does not log it again. Classification, claims and random draws are replayed exactly, so the batch comes out
as the uninterrupted run's, and only the calls that never returned are made.

Replies usable by construction (prompt version v3, the default): rates are asked for as whole percentages
with a JSON schema of exactly ``num_layers`` integers within the bounds, and parent picks with the population's
ids as an enum. A backend that enforces schemas (OpenAI, vLLM, llama.cpp) can then only return a list of the
right length within the bounds; the repair step still moves the mean onto the target. Servers without schema
support get the same prompts and are parsed leniently.

The ablation :class:`RandomReplyOperator` (``--operator llm-random``) runs this operator with every reply
replaced by a random valid one, so comparing the two measures what the LLM's content adds.

The operator works with any object that has the ``ChatBackend`` interface (``complete(messages, ...)``).
"""
from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Sequence

import numpy as np

from ..errors import SelfpruneError
from ..io import append_jsonl, read_jsonl
from ..llm.backends import ChatResult
from ..llm.parsing import extract_json
from .operators import (
    FALLBACK_SUFFIX,
    Claim,
    Member,
    Operator,
    Proposal,
    accept_all,
    crossover_uniform,
    mutate_move,
    novel_rates,
    random_rates,
    tournament,
)
from .space import SearchSpace

PROMPTS_DIR = Path(__file__).resolve().parent.parent / "prompts"
# v2 puts what stays the same between consecutive calls first (the candidates so far, the best candidate),
# so that prefix caches (llama.cpp, vLLM, OpenAI prompt caching) skip most of each prompt. v3 writes rates as
# whole percentages and asks for them with a schema (integers within the bounds, exactly num_layers of them),
# so that a server that enforces schemas can only return usable candidates.
PROMPT_VERSIONS = ("v1", "v2", "v3")
DEFAULT_PROMPT_VERSION = "v3"
# Prompt versions whose candidates are whole percentages (the others: fractions with 3 decimals).
PERCENT_VERSIONS = ("v3",)
VALID_TOLERANCE = 1e-3
# Whole percentages rarely meet the mean exactly: within half a step (0.5 %) a reply counts as valid.
PERCENT_VALID_TOLERANCE = 5e-3
VALID, REPAIRED, UNUSABLE, DUPLICATE = "valid", "repaired", "unusable", "duplicate"
# The summary's counter for each reply status (one key per status, the one reports read).
STATUS_COUNTER = {VALID: "valid", REPAIRED: "repaired", UNUSABLE: "unusable", DUPLICATE: "duplicates"}
# What the fitness measures, as the prompts name it: (short name, full description); lower is better for both.
FITNESS_TEXTS = {
    "ppl": ("perplexity", "the perplexity of the pruned model on held-out text"),
    "kl": ("KL divergence", "the KL divergence of the pruned model's next-token distribution from the dense "
                            "model's on held-out text"),
}
# Candidates shown in the initial-population prompt (v1 showed the 12 latest; v2 all of them up to this cap,
# so that each prompt extends the previous one and a prefix cache skips it).
MAX_EXISTING_SHOWN = {"v1": 12, "v2": 32, "v3": 32}


@dataclass
class Classified:
    status: str  # valid | repaired | unusable
    rates: list[float] | None
    reason: str


def _find_rates(obj) -> object:
    """The candidate inside a parsed reply: a bare list, or the ``rates`` entry (or sole list) of an object."""
    if isinstance(obj, list):
        return obj
    if isinstance(obj, dict):
        if "rates" in obj:
            return obj["rates"]
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(lists) == 1:
            return lists[0]
    return None


def classify_rates(text: str, space: SearchSpace, tolerance: float | None = None, percent: bool = False) -> Classified:
    """Classify one LLM reply that should hold a rate vector (see the module docstring).

    ``percent``: the prompt asked for whole percentages (prompt version v3); a reply of fractions (every value
    at most 1, some not whole) is still read as fractions, and counted as repaired.
    """
    if tolerance is None:
        tolerance = PERCENT_VALID_TOLERANCE if percent else VALID_TOLERANCE
    obj = extract_json(text)
    if obj is None:
        return Classified(UNUSABLE, None, "no JSON found in the answer")
    values = _find_rates(obj)
    if not isinstance(values, list):
        return Classified(UNUSABLE, None, 'the JSON holds no list of rates (expected {"rates": [...]})')
    if len(values) != space.num_layers:
        return Classified(UNUSABLE, None, f"expected {space.num_layers} rates, got {len(values)}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return Classified(UNUSABLE, None, "every rate must be a number")
    x = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        return Classified(UNUSABLE, None, "every rate must be a finite number")
    notes = []
    if percent:
        if x.max() <= 1.0 and np.any(x != np.round(x)):  # [0.2, 0.35, ...]: fractions despite the prompt
            notes.append("fractions instead of percentages")
        else:
            x = x / 100.0
    elif 1.0 < x.max() <= 100.0 and np.all((x == 0.0) | (x >= 1.0)):  # "30" meaning 30 %; not [0.2, 30, 0.3]
        x = x / 100.0
        notes.append("percentages converted to fractions")
    outside = np.flatnonzero((x < 0.0) | (x > 1.0))
    if outside.size:
        i = int(outside[0])
        what = "a percentage between 0 and 100" if percent else "a fraction between 0 and 1"
        return Classified(UNUSABLE, None, f"rate {values[i]:g} of layer {i} is not {what} "
                                          f"({outside.size} such rates)")
    repair = space.repair(x)
    if not notes and repair.max_abs <= tolerance:
        return Classified(VALID, [float(v) for v in x], "")
    notes.append(f"repair moved a rate by up to {repair.max_abs:.4f}")
    return Classified(REPAIRED, [float(v) for v in x], "; ".join(notes))


def classify_selection(text: str, population_ids: Sequence[int], n_pairs: int, n_mutations: int):
    """Parse a parent-selection reply into (status, pairs, parents, reason).

    Unknown ids and missing entries make the reply ``repaired`` (the runner tops it up by tournament);
    a reply with no usable id at all is ``unusable``.
    """
    obj = extract_json(text)
    if not isinstance(obj, dict):
        return UNUSABLE, [], [], "expected a JSON object with crossover_pairs and mutation_parents"
    known = set(int(i) for i in population_ids)

    def as_id(v):
        if isinstance(v, bool):
            return None
        if isinstance(v, (int, float)) and float(v).is_integer() and int(v) in known:
            return int(v)
        return None

    pairs, dropped = [], 0
    for pair in obj.get("crossover_pairs") or []:
        ids = [as_id(v) for v in pair] if isinstance(pair, list) else []
        if len(ids) == 2 and None not in ids:
            pairs.append(ids)
        else:
            dropped += 1
    parents = []
    for v in obj.get("mutation_parents") or []:
        i = as_id(v)
        if i is None:
            dropped += 1
        else:
            parents.append(i)
    pairs, parents = pairs[:n_pairs], parents[:n_mutations]
    if not pairs and not parents:
        return UNUSABLE, [], [], "no known candidate ids in crossover_pairs / mutation_parents"
    if dropped or len(pairs) < n_pairs or len(parents) < n_mutations:
        return REPAIRED, pairs, parents, f"{dropped} unknown ids dropped; short lists topped up by tournament"
    return VALID, pairs, parents, ""


def _call_key(record: dict) -> tuple:
    return (record.get("iteration"), record.get("operator"), record.get("slot"), record.get("attempt"))


def _fmt_rates(rates: Sequence[float]) -> str:
    return "[" + ", ".join(f"{r:.3f}" for r in rates) + "]"


def _fmt_fit(value: float) -> str:
    return "inf" if not math.isfinite(value) else f"{value:.4f}"


def rates_schema(n: int) -> dict:
    """Prompt versions v1/v2: fractions (numbers; servers enforce the length, not the range)."""
    return {
        "type": "object",
        "properties": {"rates": {"type": "array", "items": {"type": "number"}, "minItems": n, "maxItems": n}},
        "required": ["rates"],
        "additionalProperties": False,
    }


def percent_rates_schema(space: SearchSpace) -> dict:
    """Prompt version v3: exactly ``num_layers`` whole percentages within the bounds.

    Written with ``minimum``/``maximum``, the standard form that OpenAI, vLLM and llama.cpp's llama-server
    enforce; the backend spells the range out as an enum for servers whose grammar ignores numeric bounds
    (llama-cpp-python's: ``integer_ranges_as_enums`` in selfprune.llm.backends).
    """
    low, high = math.ceil(100 * space.lo - 1e-9), math.floor(100 * space.hi + 1e-9)
    n = space.num_layers
    item = {"type": "integer", "minimum": low, "maximum": high}
    return {
        "type": "object",
        "properties": {"rates": {"type": "array", "items": item, "minItems": n, "maxItems": n}},
        "required": ["rates"],
        "additionalProperties": False,
    }


def selection_schema(n_pairs: int, n_mutations: int, ids: Sequence[int] | None = None) -> dict:
    """Parent picks; with ``ids`` (prompt version v3) only the population's ids can be written."""
    id_item = {"type": "integer"} if ids is None else {"type": "integer", "enum": sorted(set(int(i) for i in ids))}
    pair = {"type": "array", "items": id_item, "minItems": 2, "maxItems": 2}
    return {
        "type": "object",
        "properties": {
            "crossover_pairs": {"type": "array", "items": pair, "minItems": n_pairs, "maxItems": n_pairs},
            "mutation_parents": {"type": "array", "items": id_item,
                                 "minItems": n_mutations, "maxItems": n_mutations},
        },
        "required": ["crossover_pairs", "mutation_parents"],
        "additionalProperties": False,
    }


class PromptSet:
    """The versioned prompt templates (``selfprune/prompts/<version>_<name>.txt``), filled with $fields.

    A version holds only the templates it changes; the others come from the newest earlier version, so a
    recorded run keeps its exact prompts while later versions evolve.
    """

    NAMES = ("system", "initial", "select", "crossover", "mutate", "retry")

    def __init__(self, version: str = DEFAULT_PROMPT_VERSION, directory: Path = PROMPTS_DIR):
        if version not in PROMPT_VERSIONS:
            raise SelfpruneError(f"unknown prompt version {version!r}: use one of {', '.join(PROMPT_VERSIONS)}")
        self.version = version
        lineage = PROMPT_VERSIONS[: PROMPT_VERSIONS.index(version) + 1][::-1]  # newest first
        self.templates, self.paths = {}, {}
        for name in self.NAMES:
            path = next((p for v in lineage if (p := directory / f"{v}_{name}.txt").is_file()), None)
            if path is None:
                raise SelfpruneError(f"prompt template {name!r} of version {version} is missing in {directory}: "
                                     "reinstall selfprune")
            self.paths[name] = path
            self.templates[name] = Template(path.read_text(encoding="utf-8"))

    def render(self, name: str, **fields) -> str:
        return self.templates[name].substitute(**fields).strip()


class LLMOperator(Operator):
    """Self-Pruner: the LLM creates the population, selects parents, and performs crossover and mutation.

    ``fitness`` names what the search minimises in the prompts: a key of :data:`FITNESS_TEXTS` (``ppl``,
    ``kl``) or a ``(name, description)`` pair.
    """

    name = "llm"

    def __init__(self, backend, space: SearchSpace, *, log_dir: str | Path | None = None, n_crossover: int = 10,
                 n_mutation: int = 10, retries: int = 2, prompt_version: str = DEFAULT_PROMPT_VERSION,
                 temperature: float = 0.7,
                 max_tokens: int | None = None, fallback_step: float = 0.02, tournament_size: int = 3,
                 fitness: str | tuple[str, str] = "ppl"):
        self.backend = backend
        self.space = space
        if isinstance(fitness, str):
            if fitness not in FITNESS_TEXTS:
                raise SelfpruneError(f"unknown fitness {fitness!r}: use one of {', '.join(FITNESS_TEXTS)} "
                                     "or a (name, description) pair")
            fitness = FITNESS_TEXTS[fitness]
        self.fitness_name, self.fitness_description = fitness
        self.log_path = Path(log_dir) / "calls.jsonl" if log_dir is not None else None
        self._logged = self._read_log()
        self.n_crossover = n_crossover
        self.n_mutation = n_mutation
        self.retries = max(0, int(retries))
        self.prompts = PromptSet(prompt_version)
        self.percent = self.prompts.version in PERCENT_VERSIONS
        self.temperature = temperature
        # ~6 tokens per "0.123, " plus room for the JSON wrapper and a stray sentence.
        self.max_tokens = max_tokens or max(256, 8 * space.num_layers + 128)
        self.fallback_step = fallback_step
        self.tournament_size = tournament_size
        self._counts: dict = {}
        self.system = self._system_text()

    # -- bookkeeping ------------------------------------------------------------------------------------
    def _count(self, key: str, amount=1) -> None:
        self._counts[key] = self._counts.get(key, 0) + amount

    def take_counts(self) -> dict:
        """Counters since the last call (the runner stores them with each batch, so resume keeps them)."""
        counts, self._counts = self._counts, {}
        return counts

    def _log(self, record: dict) -> None:
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            append_jsonl(self.log_path, record)

    def _log_call(self, where: dict, seed: int, messages, result, status: str, reason: str, **extra) -> None:
        self._log({
            **where, "seed": seed, **extra, "messages": messages, "response": result.text, "status": status,
            "reason": reason, "prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "seconds": result.seconds, "structured": result.structured, "model": result.model, "time": time.time(),
        })

    def _read_log(self) -> dict:
        """The calls a killed run already made, by (iteration, operation, slot, attempt), for replay."""
        if self.log_path is None:
            return {}
        return {_call_key(r): r for r in read_jsonl(self.log_path) if isinstance(r, dict) and "response" in r}

    # -- prompts ----------------------------------------------------------------------------------------
    def _fields(self) -> dict:
        s = self.space
        if s.equal_weights:
            mean_kind = "average"
            note = "All layers have the same size, so this is the plain average of the rates."
        else:
            mean_kind = "parameter-weighted average"
            note = ("Layers differ in size, so the average is weighted by each layer's parameter count: "
                    f"{s.layer_params}.")
        return {
            "num_layers": s.num_layers, "last_layer": s.num_layers - 1, "low": f"{s.lo:g}", "high": f"{s.hi:g}",
            "target": f"{s.target:g}", "target_pct": f"{100 * s.target:g}", "mean_kind": mean_kind,
            "low_pct": f"{math.ceil(100 * s.lo - 1e-9)}", "high_pct": f"{math.floor(100 * s.hi + 1e-9)}",
            "weights_note": note, "fitness_name": self.fitness_name, "fitness_description": self.fitness_description,
        }

    def _fmt(self, rates: Sequence[float]) -> str:
        """A candidate as the prompts write it: whole percentages (v3) or fractions with 3 decimals."""
        if self.percent:
            return "[" + ", ".join(str(int(round(100 * r))) for r in rates) + "]"
        return _fmt_rates(rates)

    def _rates_schema(self) -> dict:
        return percent_rates_schema(self.space) if self.percent else rates_schema(self.space.num_layers)

    def _rates_format(self) -> str:
        s = self.space
        if self.percent:
            f = self._fields()
            return f'{{"rates": [exactly {s.num_layers} whole numbers from {f["low_pct"]} to {f["high_pct"]}]}}'
        return f'{{"rates": [exactly {s.num_layers} numbers between {s.lo:g} and {s.hi:g}]}}'

    def _system_text(self) -> str:
        return self.prompts.render("system", **self._fields())

    def _messages(self, name: str, **fields) -> list[dict]:
        text = self.prompts.render(name, **self._fields(), **fields)
        return [{"role": "system", "content": self.system}, {"role": "user", "content": text}]

    # -- one call with classification, retries and fallback ----------------------------------------------
    def _call(self, messages, schema, rng, where: dict):
        """One LLM call (or its logged reply, on resume): returns (result, seed, fresh).

        ``where`` is the call's place in the search: iteration, operator, slot, attempt. The seed is drawn
        either way, so the random stream is the same as in the uninterrupted run.
        """
        seed = int(rng.integers(0, 2**31 - 1))
        logged = self._logged.pop(_call_key(where), None)
        if logged is not None:
            if logged.get("messages") != messages or logged.get("seed") != seed:
                raise SelfpruneError(
                    f"{self.log_path} holds another prompt for iteration {where['iteration']}, {where['operator']} "
                    f"slot {where['slot']} than the resumed search asks: the run folder was modified or written "
                    "by other code; start a new run")
            result = ChatResult(logged["response"], logged.get("prompt_tokens") or 0,
                                logged.get("completion_tokens") or 0, logged.get("seconds") or 0.0,
                                bool(logged.get("structured")), logged.get("model") or "")
            self._count("replayed_calls")
        else:
            result = self.backend.complete(messages, json_schema=schema, max_tokens=self.max_tokens,
                                           temperature=self.temperature, seed=seed)
        self._count("calls")
        self._count("prompt_tokens", int(result.prompt_tokens or 0))
        self._count("completion_tokens", int(result.completion_tokens or 0))
        self._count("seconds", float(result.seconds or 0.0))
        return result, seed, logged is None

    def _ask_rates(self, op: str, messages: list[dict], rng, claim: Claim, fallback, parents: list[int],
                   iteration: int, slot: int) -> Proposal:
        meta = {"prompt_tokens": 0, "completion_tokens": 0, "attempts": 0}
        schema = self._rates_schema()
        for attempt in range(self.retries + 1):
            where = {"iteration": iteration, "operator": op, "slot": slot, "attempt": attempt}
            result, seed, fresh = self._call(messages, schema, rng, where)
            meta["attempts"] += 1
            meta["prompt_tokens"] += int(result.prompt_tokens or 0)
            meta["completion_tokens"] += int(result.completion_tokens or 0)
            verdict = classify_rates(result.text, self.space, percent=self.percent)
            status, reason = verdict.status, verdict.reason
            if status != UNUSABLE and not claim(verdict.rates):
                status, reason = DUPLICATE, "this candidate was already evaluated; propose a different one"
            self._count(STATUS_COUNTER[status])
            if fresh:
                self._log_call(where, seed, messages, result, status, reason, parents=parents)
            if status in (VALID, REPAIRED):
                return Proposal(verdict.rates, f"{self.name}:{op}", parents, {**meta, "status": status})
            messages = messages + [
                {"role": "assistant", "content": result.text},
                {"role": "user", "content": self.prompts.render("retry", reason=reason, format=self._rates_format())},
            ]
        self._count("fallbacks")
        rates = novel_rates(fallback, claim)
        return Proposal(rates, f"{self.name}:{op}{FALLBACK_SUFFIX}", parents, {**meta, "status": "fallback"})

    # -- operators --------------------------------------------------------------------------------------
    def initial(self, n, rng, seeds, claim=accept_all, iteration=0):
        proposals = list(seeds)
        for s in seeds:
            claim(s.rates)
        count = max(0, n - len(seeds))
        for k in range(count):
            shown = proposals[-MAX_EXISTING_SHOWN[self.prompts.version]:]
            existing = "\n".join(self._fmt(self.space.repair(p.rates).rates) for p in shown) or "(none yet)"
            messages = self._messages("initial", index=k + 1, count=count, existing=existing)

            def fallback():
                noise = rng.uniform(-0.1, 0.1, self.space.num_layers)
                return self.space.repair(np.asarray(self.space.uniform()) + noise).rates

            proposals.append(self._ask_rates("initial", messages, rng, claim, fallback, [], iteration, k))
        return proposals

    def _select(self, population: list[Member], rng, iteration: int):
        """LLM parent selection; missing or unknown picks are filled by tournament selection."""
        ranked = sorted(population, key=lambda m: (m.fitness, m.id))
        table = "\n".join(f"id {m.id}: {self.fitness_name} {_fmt_fit(m.fitness)}, rates {self._fmt(m.rates)}"
                          for m in ranked)
        messages = self._messages("select", population=table, n_pairs=self.n_crossover,
                                  n_mutations=self.n_mutation)
        ids = [m.id for m in population]
        schema = selection_schema(self.n_crossover, self.n_mutation, ids if self.percent else None)
        pairs, parents = [], []
        for attempt in range(self.retries + 1):
            where = {"iteration": iteration, "operator": "select", "slot": 0, "attempt": attempt}
            result, seed, fresh = self._call(messages, schema, rng, where)
            status, pairs, parents, reason = classify_selection(result.text, ids, self.n_crossover,
                                                                self.n_mutation)
            self._count(f"select_{status}")
            if fresh:
                self._log_call(where, seed, messages, result, status, reason)
            if status != UNUSABLE:
                break
            messages = messages + [
                {"role": "assistant", "content": result.text},
                {"role": "user", "content": self.prompts.render(
                    "retry", reason=reason,
                    format='{"crossover_pairs": [[id, id], ...], "mutation_parents": [id, ...]}')},
            ]
        else:
            self._count("select_fallbacks")
        by_id = {m.id: m for m in population}
        while len(pairs) < self.n_crossover:
            pairs.append([tournament(population, rng, self.tournament_size).id,
                          tournament(population, rng, self.tournament_size).id])
        while len(parents) < self.n_mutation:
            parents.append(tournament(population, rng, self.tournament_size).id)
        return [(by_id[a], by_id[b]) for a, b in pairs], [by_id[i] for i in parents]

    def _cross_fallback(self, a: Member, b: Member, rng):
        """Uniform crossover; when that keeps giving known candidates (similar or identical parents), the
        child is also mutated, so the slot still brings a new candidate."""
        tries = {"n": 0}

        def make():
            tries["n"] += 1
            child = crossover_uniform(a.rates, b.rates, rng)
            if tries["n"] > 3:
                child = mutate_move(self.space.repair(child).rates, self.space, rng, self.fallback_step)
            return child

        return make

    def offspring(self, population, rng, claim=accept_all, iteration=1):
        pairs, parents = self._select(population, rng, iteration)
        best = min(population, key=lambda m: (m.fitness, m.id))
        best_fields = {"best_fit": _fmt_fit(best.fitness), "best_rates": self._fmt(best.rates)}
        children = []
        for slot, (a, b) in enumerate(pairs):
            messages = self._messages(
                "crossover", id_a=a.id, fit_a=_fmt_fit(a.fitness), rates_a=self._fmt(a.rates), id_b=b.id,
                fit_b=_fmt_fit(b.fitness), rates_b=self._fmt(b.rates), **best_fields)
            children.append(self._ask_rates("crossover", messages, rng, claim, self._cross_fallback(a, b, rng),
                                            [a.id, b.id], iteration, slot))
        for k, p in enumerate(parents):
            messages = self._messages("mutate", id=p.id, fit=_fmt_fit(p.fitness), rates=self._fmt(p.rates),
                                      **best_fields)
            children.append(self._ask_rates(
                "mutate", messages, rng, claim,
                lambda p=p: mutate_move(p.rates, self.space, rng, self.fallback_step),
                [p.id], iteration, len(pairs) + k))
        return children


_ID_LINE = re.compile(r"^id (\d+):", re.MULTILINE)


class RandomReplyBackend:
    """The ablation's stand-in for the LLM: answers every call with a random valid reply, drawn from the call's
    seed (so a resumed run draws the same), in the form the prompt asked for.

    Rates: a random feasible allocation (:func:`.operators.random_rates`), written as the prompt writes rates
    (whole percentages or 3-decimal fractions), so it goes through the same classification and repair as an
    LLM's. Parent picks: ids drawn uniformly from the population (the schema's enum, else the prompt's table).
    """

    name = "random-replies"

    def __init__(self, space: SearchSpace, percent: bool, concentration: float = 2.0):
        self.space = space
        self.percent = percent
        self.concentration = concentration

    def complete(self, messages, *, json_schema=None, max_tokens=1024, temperature=0.7, seed=None) -> ChatResult:
        rng = np.random.default_rng(seed)
        properties = (json_schema or {}).get("properties") or {}
        if "crossover_pairs" in properties:
            pairs, parents = properties["crossover_pairs"], properties["mutation_parents"]
            ids = parents["items"].get("enum") or [int(i) for i in _ID_LINE.findall(messages[-1]["content"])]
            pick = lambda k: [int(i) for i in rng.choice(ids, size=k)]  # noqa: E731
            reply = {"crossover_pairs": [pick(2) for _ in range(pairs["minItems"])],
                     "mutation_parents": pick(parents["minItems"])}
        else:
            rates = random_rates(self.space, rng, self.concentration)
            reply = {"rates": [int(round(100 * r)) for r in rates] if self.percent else [round(r, 3) for r in rates]}
        text = json.dumps(reply)
        return ChatResult(text, 0, 0, 0.0, True, self.name)


class RandomReplyOperator(LLMOperator):
    """Ablation of the LLM operator: the same prompts, calls, classification, repair, retries, fallback and budget,
    but every reply is a random valid one (:class:`RandomReplyBackend`) instead of the LLM's. Whatever the LLM
    operator does better than this comes from the content of the LLM's replies."""

    name = "llm-random"

    def __init__(self, space: SearchSpace, **settings):
        version = settings.get("prompt_version", DEFAULT_PROMPT_VERSION)
        super().__init__(RandomReplyBackend(space, percent=version in PERCENT_VERSIONS), space, **settings)
