"""Numeric search operators and the heuristic baselines (uniform, OWL, random, evolution).

An operator proposes raw candidates; the runner repairs, deduplicates, evaluates and journals them.
Operators never consume a global random stream: the runner hands each call a generator derived from
(seed, iteration), so a resumed run re-creates exactly the same proposals.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from .space import SearchSpace

# How often a numeric operator retries to produce a candidate that was not evaluated before.
NOVELTY_TRIES = 20
# Ends the operator name of a candidate that the numeric fallback made because the LLM gave no usable reply.
FALLBACK_SUFFIX = ":fallback"
# Operators whose candidates come from replies to prompts (the LLM, or the ablation's random replies).
REPLY_OPERATORS = ("llm", "llm-random")

Claim = Callable[[Sequence[float]], bool]
"""``claim(raw_rates)`` is True (and reserves the candidate for this batch) when its repaired form was never
seen before; the runner supplies it (it repairs and keys the candidate like the evaluation will)."""


@dataclass
class Proposal:
    """A raw candidate (before repair) and where it came from."""

    rates: list[float]
    operator: str
    parents: list[int] = field(default_factory=list)
    llm: dict | None = None

    def to_json(self) -> dict:
        return {"rates": list(self.rates), "operator": self.operator, "parents": list(self.parents), "llm": self.llm}

    @classmethod
    def from_json(cls, data: dict) -> "Proposal":
        return cls(list(data["rates"]), data["operator"], list(data.get("parents") or []), data.get("llm"))


@dataclass
class Member:
    """An evaluated candidate (id = its evaluation index in the journal)."""

    id: int
    rates: list[float]
    fitness: float


def candidate_source(operator: str) -> str:
    """Where a candidate came from: ``reply`` (the LLM's own, or the ablation's random reply), ``fallback`` (the
    numeric operator, filling in for an unusable reply), ``seed`` (a heuristic seed) or ``numeric``."""
    if operator.endswith(FALLBACK_SUFFIX):
        return "fallback"
    if operator.startswith("seed:"):
        return "seed"
    if operator.split(":", 1)[0] in REPLY_OPERATORS:
        return "reply"
    return "numeric"


def source_stats(records: Sequence[dict]) -> dict:
    """Evaluations and best fitness per :func:`candidate_source`, from journal records (``operator``,
    ``fitness``): what the LLM's own candidates did, apart from the fallback's."""
    stats: dict = {}
    for record in records:
        entry = stats.setdefault(candidate_source(str(record.get("operator", ""))),
                                 {"evaluations": 0, "best_fitness": None, "best_index": None})
        entry["evaluations"] += 1
        fitness = record.get("fitness")
        if isinstance(fitness, (int, float)) and fitness == fitness and (
                entry["best_fitness"] is None or fitness < entry["best_fitness"]):
            entry["best_fitness"], entry["best_index"] = float(fitness), record.get("index")
    return stats


def accept_all(_rates: Sequence[float]) -> bool:
    """The claim used when nobody deduplicates: every candidate counts as new."""
    return True


class Operator:
    """Interface: ``initial`` builds the first population, ``offspring`` one iteration's children."""

    name = "operator"

    def initial(self, n: int, rng: np.random.Generator, seeds: list[Proposal], claim: Claim = accept_all,
                iteration: int = 0) -> list[Proposal]:
        raise NotImplementedError

    def offspring(self, population: list[Member], rng: np.random.Generator, claim: Claim = accept_all,
                  iteration: int = 1) -> list[Proposal]:
        raise NotImplementedError

    def stats(self) -> dict:
        return {}


# --- heuristics ----------------------------------------------------------------------------------------

def uniform_rates(space: SearchSpace) -> list[float]:
    return space.uniform()


def owl_rates(space: SearchSpace, outlier_ratios: Sequence[float], lam: float = 0.08) -> list[float]:
    """OWL allocation: layers with more outliers are pruned less.

    Outlier ratios are min-max normalised to [0, 1] and mapped linearly to rates in
    [target + lam, target - lam] (most outliers -> lowest rate), re-centred on the target with the
    parameter weights and repaired into the bounds.
    """
    d = np.asarray(outlier_ratios, dtype=np.float64)
    if d.shape != (space.num_layers,):
        raise ValueError(f"expected {space.num_layers} outlier ratios, got {d.shape}")
    spread = float(d.max() - d.min())
    norm = (d - d.min()) / spread if spread > 0 else np.full_like(d, 0.5)
    rates = space.target + lam - 2.0 * lam * norm
    rates = rates - space.mean(rates) + space.target
    return space.repair(rates).rates


def random_rates(space: SearchSpace, rng: np.random.Generator, concentration: float = 2.0) -> list[float]:
    """A Dirichlet-distributed split of the removable parameters over layers, then repaired.

    The mass above the lower bound, ``target - lo`` (in weighted-mean units), is divided among layers by
    Dirichlet weights; smaller ``concentration`` gives more uneven allocations.
    """
    share = rng.dirichlet(np.full(space.num_layers, float(concentration)))
    rates = space.lo + (space.target - space.lo) * share / space.weights
    return space.repair(rates).rates


# --- variation -----------------------------------------------------------------------------------------

def mutate_move(rates: Sequence[float], space: SearchSpace, rng: np.random.Generator, step: float = 0.02,
                max_moves: int = 3) -> list[float]:
    """EvoPress-style budget-preserving mutation: move ``step`` of rate from one layer to another, 1-3 times.

    The receiving layer loses as many parameters as the giving layer gains, so the weighted mean is
    unchanged; a move that would cross a bound is shortened to what fits.
    """
    x = np.asarray(rates, dtype=np.float64).copy()
    w = space.weights
    n = len(x)
    if n < 2:
        return [float(v) for v in x]
    for _ in range(int(rng.integers(1, max_moves + 1))):
        i, j = rng.choice(n, size=2, replace=False)
        # raise layer i by s, lower layer j by s * w_i / w_j
        room_up = space.hi - x[i]
        room_down = (x[j] - space.lo) * w[j] / w[i]
        s = min(step, room_up, room_down)
        if s <= 0:
            continue
        x[i] += s
        x[j] -= s * w[i] / w[j]
    return space.repair(x).rates


def crossover_uniform(a: Sequence[float], b: Sequence[float], rng: np.random.Generator) -> list[float]:
    mask = rng.random(len(a)) < 0.5
    return [float(x if m else y) for x, y, m in zip(a, b, mask)]


def crossover_one_point(a: Sequence[float], b: Sequence[float], rng: np.random.Generator) -> list[float]:
    if len(a) < 2:
        return list(a)
    cut = int(rng.integers(1, len(a)))
    return [float(v) for v in list(a[:cut]) + list(b[cut:])]


def tournament(population: list[Member], rng: np.random.Generator, size: int = 3) -> Member:
    """Best of ``size`` members drawn without replacement."""
    picks = rng.choice(len(population), size=min(size, len(population)), replace=False)
    return min((population[int(k)] for k in picks), key=lambda m: (m.fitness, m.id))


# --- operators -----------------------------------------------------------------------------------------

class FixedOperator(Operator):
    """One-shot baselines (uniform, OWL): the initial population is the whole search."""

    def __init__(self, name: str, proposals: list[Proposal]):
        self.name = name
        self._proposals = proposals

    def initial(self, n, rng, seeds, claim=accept_all, iteration=0):
        return list(self._proposals)

    def offspring(self, population, rng, claim=accept_all, iteration=1):
        return []


def novel_rates(make: Callable[[], list[float]], claim: Claim, tries: int = NOVELTY_TRIES) -> list[float]:
    """Call ``make`` until it yields a candidate that ``claim`` accepts (after ``tries`` calls, return the last
    one anyway: the runner then answers it from its cache)."""
    rates = make()
    for _ in range(tries - 1):
        if claim(rates):
            return rates
        rates = make()
    claim(rates)
    return rates


class RandomOperator(Operator):
    """Random search: every candidate is an independent random feasible allocation."""

    name = "random"

    def __init__(self, space: SearchSpace, n_offspring: int = 20, concentration: float = 2.0):
        self.space = space
        self.n_offspring = n_offspring
        self.concentration = concentration

    def _batch(self, n, rng, claim):
        return [Proposal(novel_rates(lambda: random_rates(self.space, rng, self.concentration), claim), "random")
                for _ in range(n)]

    def initial(self, n, rng, seeds, claim=accept_all, iteration=0):
        for s in seeds:
            claim(s.rates)
        return list(seeds) + self._batch(max(0, n - len(seeds)), rng, claim)

    def offspring(self, population, rng, claim=accept_all, iteration=1):
        return self._batch(self.n_offspring, rng, claim)


class EvolutionOperator(Operator):
    """Classical (mu + lambda) evolution without an LLM, the control for the LLM operator.

    Per iteration ``n_crossover`` children from uniform or one-point crossover of two tournament-selected
    parents, and ``n_mutation`` children from budget-preserving moves applied to a tournament-selected
    parent. Survivor selection (in the runner) keeps the best ``population`` of parents and children, so
    parents survive and the elite is never lost.
    """

    name = "evolution"

    def __init__(self, space: SearchSpace, n_crossover: int = 10, n_mutation: int = 10, step: float = 0.02,
                 tournament_size: int = 3, init_spread: float = 0.1):
        self.space = space
        self.n_crossover = n_crossover
        self.n_mutation = n_mutation
        self.step = step
        self.tournament_size = tournament_size
        self.init_spread = init_spread

    def _around_uniform(self, rng):
        """Initial individuals: uniform plus noise, so the search starts near the safe allocation."""
        noise = rng.uniform(-self.init_spread, self.init_spread, self.space.num_layers)
        return self.space.repair(np.asarray(self.space.uniform()) + noise).rates

    def initial(self, n, rng, seeds, claim=accept_all, iteration=0):
        for s in seeds:
            claim(s.rates)
        out = list(seeds)
        while len(out) < n:
            out.append(Proposal(novel_rates(lambda: self._around_uniform(rng), claim), "evolution:init"))
        return out

    def offspring(self, population, rng, claim=accept_all, iteration=1):
        children = []
        for _ in range(self.n_crossover):
            holder: dict = {}

            def make():
                a = tournament(population, rng, self.tournament_size)
                b = tournament(population, rng, self.tournament_size)
                cross = crossover_uniform if rng.random() < 0.5 else crossover_one_point
                holder["parents"] = [a.id, b.id]
                return cross(a.rates, b.rates, rng)  # raw: the runner's repair logs how far it moves

            rates = novel_rates(make, claim)
            children.append(Proposal(rates, "evolution:crossover", holder["parents"]))
        for _ in range(self.n_mutation):
            holder = {}

            def make():
                p = tournament(population, rng, self.tournament_size)
                holder["parents"] = [p.id]
                return mutate_move(p.rates, self.space, rng, self.step)

            rates = novel_rates(make, claim)
            children.append(Proposal(rates, "evolution:mutation", holder["parents"]))
        return children
