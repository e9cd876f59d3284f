"""The search loop, its run directory, the journal and resume.

Run directory::

    config.json       every setting (written once, by the CLI)
    proposals.jsonl   one record per iteration: the raw candidates the operator proposed (+ LLM counts),
                      fsynced *before* any of them is evaluated
    journal.jsonl     one record per evaluated candidate, fsynced right after its evaluation
    llm/calls.jsonl   every LLM prompt and response (LLM operator only), fsynced as it arrives
    rescore.jsonl     multi-fidelity: the top candidates re-scored on more tokens at the end (if asked)
    best.json         best candidate so far; summary.json and model/ when the search finished

Resume replays the loop from the start: a batch found in proposals.jsonl is reused instead of being
generated again (so LLM calls are not repeated either), an evaluation found in journal.jsonl is reused
instead of being run again. A batch that was being generated when the run was killed is generated again,
and the LLM operator answers the calls it had already made from llm/calls.jsonl. Randomness comes from
generators derived from (seed, iteration), never from a stream consumed by evaluations, so the replayed
state is the state the killed run had and the rest of the run continues exactly as an uninterrupted one
would.

Budget: ``budget`` counts real evaluations (distinct models, as in the paper's ~430). A candidate whose
pruned model was already evaluated (same head/channel counts per layer) is answered from the cache and
does not use the budget; it is counted as a cache hit. A budget too small for the population and one
generation of children gets a smaller population (:func:`size_population`), said in the summary.

Multi-fidelity (``rescore_top`` > 0): the search ranks candidates by a cheap fitness (few tokens); at the end
the ``rescore_top`` best are scored again by ``problem.rescore`` (more tokens of the same split), and the
best of those is the result. The minimum of many noisy scores is biased low, so the cheap winner is often
not the truly best candidate; re-scoring a few costs little next to the search.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Hashable, Sequence

import numpy as np

from ..errors import SelfpruneError, option
from ..io import append_jsonl, atomic_directory, atomic_write_json, read_jsonl
from .operators import Member, Operator, Proposal, source_stats
from .space import REPAIR_EPS, SearchSpace

CONFIG = "config.json"
JOURNAL = "journal.jsonl"
PROPOSALS = "proposals.jsonl"
BEST = "best.json"
SUMMARY = "summary.json"
RESCORE = "rescore.jsonl"
MODEL_DIR = "model"
LLM_COUNTERS = ("calls", "valid", "repaired", "unusable", "duplicates", "fallbacks", "prompt_tokens",
                "completion_tokens", "replayed_calls")
# Counter names written by older versions -> the name used now (summaries made before the fix read both).
LLM_COUNTER_ALIASES = {"duplicate": "duplicates"}
# Operators whose population evolves (the others ignore the population or take it from their proposals).
EVOLVING_OPERATORS = ("llm", "llm-random", "evolution")


@dataclass
class SearchProblem:
    """What the loop needs from the model side.

    ``evaluate(rates)`` returns at least ``{"fitness": float}`` (lower is better; may add "tokens",
    "seconds", "forward_seconds"). ``achieved(rates)`` gives the fractions really removed after rounding
    to whole heads/channels. ``shape_key(rates)`` identifies the pruned model the rates give (e.g. the
    per-layer head, KV-head and MLP-channel counts: :func:`selfprune.search.fitness.layer_shapes`); two
    candidates with the same key are the same model and share one evaluation. Without it the rounded
    achieved fractions are the key, which can merge different shapes that remove as many parameters.
    ``finalize(rates, run_dir)`` saves the best pruned model and returns facts for the summary.
    ``rescore(rates)`` is the higher-fidelity fitness for multi-fidelity search (same return form as
    ``evaluate``).
    """

    layer_params: list[int]
    evaluate: Callable[[list[float]], dict]
    achieved: Callable[[list[float]], list[float]] | None = None
    outlier_ratios: Callable[[], list[float]] | None = None
    finalize: Callable[[list[float], Path], dict] | None = None
    rescore: Callable[[list[float]], dict] | None = None
    shape_key: Callable[[list[float]], Hashable] | None = None

    def key(self, rates: Sequence[float]) -> Hashable:
        if self.shape_key is not None:
            return self.shape_key(list(rates))
        if self.achieved is not None:
            return tuple(round(float(a), 6) for a in self.achieved(list(rates)))
        return tuple(round(float(r), 4) for r in rates)


@dataclass
class RunSettings:
    budget: int
    population: int = 30
    seed: int = 0
    max_stale_iterations: int = 3
    rescore_top: int = 0
    population_note: str | None = None  # why the population differs from the one asked for (summary)

    def __post_init__(self):
        from ..errors import check_whole, is_whole, option

        self.budget = check_whole(option("budget"), self.budget, example=100)
        self.population = check_whole(option("population"), self.population, example=30)
        self.max_stale_iterations = check_whole(option("max_stale_iterations"), self.max_stale_iterations, example=3)
        self.rescore_top = check_whole(option("rescore_top"), self.rescore_top, low=0, example=5)
        if not is_whole(self.seed):
            raise SelfpruneError(f"{option('seed')} {self.seed!r} must be a whole number: e.g. 0")
        self.seed = int(self.seed)


def size_population(operator: str, budget: int, population: int, offspring: int) -> tuple[int, str | None]:
    """The population a run of ``budget`` evaluations should use, and a note when it is not ``population``.

    An evolving run spends ``population`` evaluations on its initial population and ``offspring`` on each
    generation; a budget below both leaves too little (or nothing) for evolution. The population then
    shrinks to leave one whole generation, but keeps at least half the budget (and at least 1).
    """
    if operator not in EVOLVING_OPERATORS or budget >= population + offspring:
        return population, None
    sized = min(population, max(1, budget - offspring, budget // 2))
    left = budget - sized
    if left <= 0:
        return sized, (f"budget {budget} leaves no evaluation for evolution: the run is an initial population of "
                       f"{sized}; raise the budget above {sized} to evolve it")
    children = f"{left} child" if left == 1 else f"{left} children"
    if sized == population:
        return sized, (f"budget {budget} is less than population {population} + one generation of {offspring} "
                       f"children: the run evolves only {children}")
    return sized, (f"budget {budget} is less than population {population} + one generation of {offspring} "
                   f"children: population reduced to {sized}, leaving {children} for evolution")


def population_plan(config: dict) -> tuple[int, str | None]:
    """:func:`size_population` for a run config (pure: no model, no files); uses the population asked for."""
    requested = config.get("population_requested", config["population"])
    return size_population(config["operator"], int(config["budget"]), int(requested),
                           int(config["crossovers"]) + int(config["mutations"]))


def budget_notes(config: dict) -> list[str]:
    """What a new run will do that its settings do not say (today: a population sized to the budget)."""
    _, note = population_plan(config)
    return [note] if note else []


def fold_llm_counts(counts: dict) -> dict:
    """LLM counters under their current names (older runs counted duplicates under "duplicate")."""
    folded: dict = {}
    for key, value in counts.items():
        key = LLM_COUNTER_ALIASES.get(key, key)
        if isinstance(value, (int, float)):
            folded[key] = folded.get(key, 0) + value
    return folded


def run_is_finished(run_dir: str | Path, config: dict, save_model: bool = True) -> dict | None:
    """The summary of a run with nothing left to do, else None; reads files only (no model).

    Finished: summary.json exists, the run stopped at ``config["budget"]`` evaluations (or stopped earlier
    for another reason under that same budget), the re-scoring asked in the config is in the summary, and,
    if ``save_model``, the saved model is there.
    """
    import json

    run_dir = Path(run_dir)
    try:
        summary = json.loads((run_dir / SUMMARY).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or "evaluations" not in summary:
        return None
    budget = int(config["budget"])
    if summary["evaluations"] < budget and summary.get("budget") != budget:
        return None
    top = int((config.get("rescore") or {}).get("top") or 0)
    rescore = summary.get("rescore") or {}
    if rescore.get("top", 0) != top:
        return None
    if top:
        on_disk = {r.get("index") for r in read_jsonl(run_dir / RESCORE)}
        if any(r.get("index") not in on_disk for r in rescore.get("candidates") or []):
            return None  # the re-scores were discarded (other windows): score again
    if int((config.get("recover") or {}).get("tokens") or 0) and save_model:
        recovery = summary.get("recovery") or {}
        if recovery.get("requested_tokens") != config["recover"]["tokens"] or not recovery.get("path"):
            return None  # the best model's recovery was asked and is not done (or was done for another budget)
    if save_model:
        model = summary.get("model")
        path = Path(model["path"]) if isinstance(model, dict) and model.get("path") else run_dir / MODEL_DIR
        if not model or not (path / "config.json").is_file():
            return None
    return summary


@dataclass
class _Planned:
    """A new candidate of a batch: its index in the journal and where it came from."""

    index: int
    iteration: int
    slot: int
    proposal: Proposal
    repair: object
    key: Hashable


@dataclass
class _State:
    members: list[Member] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)
    cache: dict = field(default_factory=dict)
    cache_hits: int = 0
    best: Member | None = None


def iteration_rng(seed: int, iteration: int) -> np.random.Generator:
    """The generator for one iteration: a pure function of (seed, iteration)."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(iteration), 0x5E1F])


def _finite(value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return math.inf
    return value if math.isfinite(value) else math.inf


def survivors(members: list[Member], size: int) -> list[Member]:
    """Truncation selection: the ``size`` best (ties broken by age, oldest first)."""
    return sorted(members, key=lambda m: (m.fitness, m.id))[:size]


def create_run_dir(out: str | Path, config: dict, overwrite: bool = False) -> Path:
    """Make a fresh run directory with its config; refuse to clobber an existing one."""
    out = Path(out)
    if out.exists():
        if not overwrite:
            raise SelfpruneError(
                f"{out} already exists: pass --resume {out} to continue it, --overwrite to replace it, "
                f"or another --out"
            )
        if not out.is_dir():
            raise SelfpruneError(f"{out} exists and is not a folder: choose another --out")
    with atomic_directory(out, overwrite=True) as fresh:  # the old run stays until the new folder is ready
        atomic_write_json(fresh / CONFIG, config)
    return out


def load_run_config(run_dir: str | Path) -> dict:
    """The config of an existing run (for --resume)."""
    from ..io import restore_interrupted

    restore_interrupted(run_dir)  # a run folder left aside by a replace that was killed comes back first
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise SelfpruneError(f"{run_dir} holds no search run (no {CONFIG}): check the --resume path")
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise SelfpruneError(f"{path} is not valid JSON: the run cannot be resumed, start a new one") from None


class SearchRunner:
    """Runs (or resumes) one search in ``run_dir``."""

    def __init__(self, run_dir: str | Path, space: SearchSpace, problem: SearchProblem, operator: Operator,
                 settings: RunSettings, seeds: list[Proposal] | None = None, progress: bool = True,
                 log: Callable[[str], None] | None = None, pool=None):
        from .parallel import InProcessPool

        self.run_dir = Path(run_dir)
        # Where candidates are scored: this process (default) or workers (:class:`.parallel.RayPool`).
        self.pool = pool if pool is not None else InProcessPool(problem.evaluate)
        self.space = space
        self.problem = problem
        self.operator = operator
        self.settings = settings
        self.seeds = list(seeds or [])
        self.progress = progress
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        if settings.budget < 1:
            raise SelfpruneError(f"budget {settings.budget} is too small: pass {option('budget')} 1 or more")
        if settings.population < 1:
            raise SelfpruneError(f"population {settings.population} is too small: pass {option('population')} 1 "
                                 "or more")
        if settings.rescore_top < 0:
            raise SelfpruneError(f"rescore top {settings.rescore_top} is negative: pass {option('rescore_top')} 0 "
                                 "(off) or more")
        if settings.rescore_top and problem.rescore is None:
            raise SelfpruneError(f"re-scoring the top candidates needs a higher-fidelity fitness: pass "
                                 f"{option('rescore', '--rescore-windows')}")

    # -- files ------------------------------------------------------------------------------------------
    @property
    def journal_path(self) -> Path:
        return self.run_dir / JOURNAL

    @property
    def proposals_path(self) -> Path:
        return self.run_dir / PROPOSALS

    # -- loop -------------------------------------------------------------------------------------------
    def run(self) -> dict:
        """Run to the budget (replaying what is on disk first) and return the summary."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        journal = read_jsonl(self.journal_path)
        batches = {b["iteration"]: b for b in read_jsonl(self.proposals_path)}
        self._journal = {r["index"]: r for r in journal}
        self._batches = batches
        self._elapsed_base = max((r.get("elapsed", 0.0) for r in journal), default=0.0)
        self._session_start = time.perf_counter()
        if journal:
            self.log(f"resuming {self.run_dir}: {len(journal)} evaluations on disk")
        st = self.state = _State()
        budget = self.settings.budget
        self._bar = self._make_bar(initial=min(len(journal), budget))
        stop_reason = "budget"
        population: list[Member] = []
        iteration = 0
        done_iterations = 0
        stale = 0
        try:
            while len(st.members) < budget:
                batch = self._batch(iteration, population)
                if not batch:
                    stop_reason = "operator finished" if iteration > 0 else "no candidates"
                    break
                new = self._process(iteration, batch)
                done_iterations = iteration + 1
                population = survivors(population + new, self.settings.population)
                stale = 0 if new else stale + 1
                if stale >= self.settings.max_stale_iterations:
                    stop_reason = f"no new candidate in {stale} iterations"
                    self.log(f"stopping: the operator proposed only known candidates in {stale} iterations")
                    break
                iteration += 1
        finally:
            if self._bar is not None:
                self._bar.close()
        return self._finish(done_iterations, stop_reason)

    def _batch(self, iteration: int, population: list[Member]) -> list[Proposal]:
        """This iteration's proposals: from proposals.jsonl on resume, else from the operator (then saved)."""
        if iteration in self._batches:
            return [Proposal.from_json(p) for p in self._batches[iteration]["proposals"]]
        if any(i > iteration for i in self._batches) or any(
            r["iteration"] >= iteration for r in self._journal.values()
        ):
            raise SelfpruneError(
                f"{self.proposals_path} misses iteration {iteration} that the journal uses: the run folder "
                f"was modified; start a new run"
            )
        rng = iteration_rng(self.settings.seed, iteration)
        claimed: set = set()

        def claim(rates) -> bool:
            try:
                key = self.problem.key(self.space.repair(rates).rates)
            except ValueError:
                return False
            if key in self.state.cache or key in claimed:
                return False
            claimed.add(key)
            return True

        started = time.perf_counter()
        if iteration == 0:
            proposals = self.operator.initial(self.settings.population, rng, self.seeds, claim, iteration)
        else:
            proposals = self.operator.offspring(population, rng, claim, iteration)
        record = {
            "iteration": iteration,
            "seconds": time.perf_counter() - started,
            "llm": _take_llm_counts(self.operator),
            "proposals": [p.to_json() for p in proposals],
        }
        append_jsonl(self.proposals_path, record)
        self._batches[iteration] = record
        return proposals

    def _process(self, iteration: int, batch: list[Proposal]) -> list[Member]:
        """Repair, deduplicate and evaluate one batch (or take the evaluations from the journal).

        The batch is planned first, in slot order (cache hits, duplicates inside the batch, indices and the
        budget exactly as one-at-a-time evaluation would have them), then every new candidate goes to the pool
        at once. Each result is journaled as it arrives (in any order: the journal is keyed by index); the
        members join in index order, so N workers give the run one worker gives.
        """
        st = self.state
        planned: list[_Planned] = []
        batch_keys: set = set()
        for slot, proposal in enumerate(batch):
            if len(st.members) + len(planned) >= self.settings.budget:
                break
            try:
                repair = self.space.repair(proposal.rates)
            except ValueError as exc:  # an operator bug; never silently evaluate garbage
                raise SelfpruneError(f"operator {proposal.operator} produced an invalid candidate: {exc}") from None
            key = self.problem.key(repair.rates)
            if key in st.cache or key in batch_keys:
                st.cache_hits += 1
                continue
            batch_keys.add(key)
            planned.append(_Planned(len(st.members) + len(planned), iteration, slot, proposal, repair, key))
        records: dict[int, dict] = {}
        todo: list[_Planned] = []
        for plan in planned:
            record = self._journal.get(plan.index)
            if record is None:
                todo.append(plan)
                continue
            if record.get("iteration") != iteration or record.get("slot") != plan.slot or not np.allclose(
                record["rates"], plan.repair.rates, rtol=0, atol=1e-12
            ):
                raise SelfpruneError(
                    f"journal entry {plan.index} does not match the replayed search: {self.run_dir} was "
                    f"written with other settings or code; start a new run"
                )
            records[plan.index] = record
        new: list[Member] = []
        fresh: set[int] = set()

        def commit_ready() -> None:
            """Add the members whose lower-indexed batch mates are all in (in index order)."""
            while len(new) < len(planned) and planned[len(new)].index in records:
                plan = planned[len(new)]
                new.append(self._commit(plan, records[plan.index], plan.index in fresh))

        commit_ready()
        if todo:
            by_index = {plan.index: plan for plan in todo}
            for outcome in self.pool.evaluate([(plan.index, list(plan.repair.rates)) for plan in todo]):
                records[outcome.index] = self._journal_outcome(by_index[outcome.index], outcome)
                fresh.add(outcome.index)
                commit_ready()
        if len(new) != len(planned):  # a pool that lost a candidate: never continue on a partial batch
            missing = [plan.index for plan in planned if plan.index not in records]
            raise SelfpruneError(f"the evaluation pool returned no result for candidates {missing}: resume the run")
        return new

    def _commit(self, plan: "_Planned", record: dict, fresh: bool) -> Member:
        st = self.state
        member = Member(plan.index, list(record["rates"]), _finite(record["fitness"]))
        st.members.append(member)
        st.records.append(record)
        st.cache[plan.key] = plan.index
        if st.best is None or (member.fitness, member.id) < (st.best.fitness, st.best.id):
            st.best = member
            if fresh:  # replayed improvements are written once, at the end of the replay
                self._write_best(record)
        return member

    def _journal_outcome(self, plan: "_Planned", outcome) -> dict:
        """The journal record of one evaluation (or of a candidate that failed on every try), fsynced."""
        proposal, repair = plan.proposal, plan.repair
        result = outcome.result or {}
        seconds = outcome.seconds
        achieved = self.problem.achieved(list(repair.rates)) if self.problem.achieved else list(repair.rates)
        llm = proposal.llm or {}
        record = {
            "index": plan.index,
            "iteration": plan.iteration,
            "slot": plan.slot,
            "operator": proposal.operator,
            "parents": list(proposal.parents),
            "rates": list(repair.rates),
            "achieved": [float(a) for a in achieved],
            "fitness": math.inf if outcome.failed else _finite(result.get("fitness")),
            "tokens": int(result.get("tokens", 0) or 0),
            "seconds": float(result.get("seconds", seconds) or seconds),
            "forward_seconds": float(result.get("forward_seconds", 0.0) or 0.0),
            "repair_distance": repair.max_abs,
            "repair_mean": repair.mean_abs,
            "llm_status": llm.get("status"),
            "llm_tokens": int(llm.get("prompt_tokens", 0)) + int(llm.get("completion_tokens", 0)),
            "elapsed": self._elapsed_base + (time.perf_counter() - self._session_start),
        }
        if "refit_seconds" in result:   # only runs that refit candidates (--reconstruct lstsq)
            record["refit_seconds"] = float(result["refit_seconds"])
        if outcome.retries:  # only where it happened, so journals of runs without faults stay identical
            record["retries"] = outcome.retries
        if outcome.failed:
            record["failed"] = outcome.failed
            self.log(f"candidate {plan.index} failed on every try and is journaled as failed: {outcome.failed}")
        append_jsonl(self.journal_path, record)
        if self._bar is not None:
            best = min(_finite(record["fitness"]), self.state.best.fitness if self.state.best else math.inf)
            self._bar.set_postfix_str(f"best {best:.4g}", refresh=False)
            self._bar.update(1)
        return record

    def _rescore(self) -> list[dict]:
        """Score the ``rescore_top`` best candidates with the higher-fidelity fitness (journaled in
        rescore.jsonl, so a killed run does not score them again)."""
        path = self.run_dir / RESCORE
        done = {r["index"]: r for r in read_jsonl(path)}
        top = survivors(self.state.members, self.settings.rescore_top)
        out = []
        for member in top:
            record = done.get(member.id)
            if record is None:
                started = time.perf_counter()
                result = self.problem.rescore(list(member.rates))
                record = {"index": member.id, "fitness": member.fitness,
                          "rescored_fitness": _finite(result.get("fitness")),
                          "tokens": int(result.get("tokens", 0) or 0),
                          "seconds": float(result.get("seconds", 0.0) or (time.perf_counter() - started))}
                append_jsonl(path, record)
            out.append(record)
        return out

    def _write_best(self, record: dict) -> None:
        atomic_write_json(self.run_dir / BEST, {
            "index": record["index"],
            "fitness": record["fitness"],
            "operator": record["operator"],
            "rates": record["rates"],
            "achieved": record["achieved"],
            "evaluations_so_far": len(self.state.members),
        })

    def _make_bar(self, initial: int):
        if not self.progress:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.settings.budget, initial=initial, desc=f"search[{self.operator.name}]",
                    unit="eval", dynamic_ncols=True)

    # -- end --------------------------------------------------------------------------------------------
    def _finish(self, iterations: int, stop_reason: str) -> dict:
        st = self.state
        if st.best is None:
            raise SelfpruneError(f"the search evaluated no candidate: check {option('budget')} and the operator")
        self.pool.close()  # the workers' memory is free before the re-scoring and the model save
        rescored = self._rescore() if self.settings.rescore_top else []
        if rescored:
            chosen = min(rescored, key=lambda r: (_finite(r["rescored_fitness"]), r["index"]))
            best_record = st.records[chosen["index"]]
        else:
            best_record = st.records[st.best.id]
        self._write_best(best_record)
        llm: dict = {k: 0 for k in LLM_COUNTERS}
        llm["seconds"] = 0.0
        for batch in self._batches.values():
            for k, v in fold_llm_counts(batch.get("llm") or {}).items():
                llm[k] = llm.get(k, 0) + v
        seconds = [r["seconds"] for r in st.records]
        repaired = [r for r in st.records if r.get("repair_distance", 0.0) > REPAIR_EPS]
        uniform_key = self.problem.key(self.space.uniform())
        uniform_fitness = st.records[st.cache[uniform_key]]["fitness"] if uniform_key in st.cache else None
        summary = {
            "operator": self.operator.name,
            "evaluations": len(st.members),
            "budget": self.settings.budget,
            "population": self.settings.population,
            **({"population_note": self.settings.population_note} if self.settings.population_note else {}),
            "iterations": iterations,
            "stop_reason": stop_reason,
            "best_index": best_record["index"],
            "best_fitness": _finite(best_record["fitness"]),
            "best_operator": best_record["operator"],
            "uniform_fitness": uniform_fitness,
            "best_rates": best_record["rates"],
            "best_achieved": best_record["achieved"],
            "wall_seconds": max(r.get("elapsed", 0.0) for r in st.records),
            "eval_seconds": float(sum(seconds)),
            "seconds_per_eval": float(np.mean(seconds)),
            **({"refit_seconds_per_eval": float(np.mean([r["refit_seconds"] for r in st.records])),
                "seconds_per_eval_without_refit": float(np.mean([r["seconds"] - r["refit_seconds"]
                                                                 for r in st.records]))}
               if all("refit_seconds" in r for r in st.records) else {}),
            "cache_hits": st.cache_hits,
            "repairs": len(repaired),
            "repair_max_distance": max((r["repair_distance"] for r in st.records), default=0.0),
            "repair_mean_distance": float(np.mean([r["repair_distance"] for r in repaired])) if repaired else 0.0,
            "llm": llm,
            "sources": source_stats(st.records),  # the LLM's own candidates apart from the fallback's
            "eval_tokens": int(sum(r.get("tokens", 0) for r in st.records)),
            "evaluation": {**self.pool.describe(),
                           "retries": int(sum(r.get("retries", 0) for r in st.records)),
                           "failed": sum(1 for r in st.records if r.get("failed"))},
        }
        if rescored:
            summary["rescore"] = {
                "top": self.settings.rescore_top,
                "candidates": rescored,
                "best_rescored_fitness": chosen["rescored_fitness"],
                "cheapest_winner_index": st.best.id,
                "seconds": float(sum(r["seconds"] for r in rescored)),
                "tokens": int(sum(r["tokens"] for r in rescored)),
            }
        if self.problem.finalize is not None:
            summary["model"] = self.problem.finalize(list(best_record["rates"]), self.run_dir)
        atomic_write_json(self.run_dir / SUMMARY, summary)
        return summary


def _take_llm_counts(operator: Operator) -> dict | None:
    take = getattr(operator, "take_counts", None)
    return take() if callable(take) else None


def _source_cell(summary: dict, source: str) -> str:
    """Evaluations of one candidate source and their best fitness, e.g. ``41 (best 53.2)``."""
    entry = (summary.get("sources") or {}).get(source)
    if not entry or entry.get("best_fitness") is None:
        return "0"
    return f"{entry['evaluations']} (best {entry['best_fitness']:.6g})"


def evaluation_cell(evaluation: dict) -> str:
    """Where candidates were scored, e.g. ``ray, 8 workers x 1 threads (local); 1 retry, 0 failed``."""
    if evaluation.get("mode") != "ray":
        text = "in this process"
    else:
        text = (f"ray, {evaluation['workers']} workers x {evaluation['worker_threads']} threads "
                f"({evaluation.get('ray_address') or 'local'})")
    if evaluation.get("candidates"):
        text += f", {evaluation['candidates']} candidates"
    retries, failed = evaluation.get("retries", 0), evaluation.get("failed", 0)
    if retries or failed or evaluation.get("mode") == "ray":
        text += f"; {retries} {'retry' if retries == 1 else 'retries'}, {failed} failed"
    peaks = evaluation.get("peak_rss_mb") or {}
    if peaks.get("driver"):
        workers = [p for p in peaks.get("workers") or [] if p]
        text += f"; peak memory {peaks['driver']:.0f} MiB" + (
            f" (driver), {max(workers):.0f} MiB (largest worker)" if workers else "")
    return text


def format_summary(summary: dict) -> str:
    """The table printed at the end of a search."""
    llm = summary.get("llm") or {}
    rows = [
        ("operator", summary["operator"]),
        ("evaluations", f"{summary['evaluations']} / budget {summary['budget']} ({summary['stop_reason']})"),
        *([("population", f"{summary['population']} ({summary['population_note']})")]
          if summary.get("population_note") else []),
        ("best fitness", f"{summary['best_fitness']:.6g} (eval #{summary['best_index']}, {summary['best_operator']})"),
    ]
    rescore = summary.get("rescore")
    if rescore:
        rows.append(("re-scored", f"top {rescore['top']} on more tokens: best {rescore['best_rescored_fitness']:.6g} "
                                  f"(cheap winner was eval #{rescore['cheapest_winner_index']})"))
    if summary.get("uniform_fitness") is not None:
        rows.append(("uniform fitness", f"{summary['uniform_fitness']:.6g}"))
    rows += [
        ("wall time", f"{summary['wall_seconds']:.1f} s"),
        ("seconds per eval", f"{summary['seconds_per_eval']:.3f}"
                             + (f" ({summary['seconds_per_eval_without_refit']:.3f} without the "
                                f"{summary['refit_seconds_per_eval']:.3f} s refit)"
                                if "refit_seconds_per_eval" in summary else "")),
        ("cache hits", str(summary["cache_hits"])),
        *([("evaluation", evaluation_cell(summary["evaluation"]))] if summary.get("evaluation") else []),
        ("repairs", f"{summary['repairs']} (max move {summary['repair_max_distance']:.4f})"),
    ]
    if llm.get("calls"):
        rows += [
            ("LLM calls", f"{llm['calls']} ({llm['prompt_tokens']} + {llm['completion_tokens']} tokens, "
                          f"{llm.get('seconds', 0.0):.1f} s"
                          + (f"; {llm['replayed_calls']} answered from the log on resume" if llm.get("replayed_calls")
                             else "") + ")"),
            ("LLM valid/repaired/unusable", f"{llm['valid']} / {llm['repaired']} / {llm['unusable']}"),
            ("LLM duplicates/fallbacks", f"{llm.get('duplicates', 0)} / {llm['fallbacks']}"),
            ("evaluated from replies/fallback", " / ".join(_source_cell(summary, k) for k in ("reply", "fallback"))),
            ("LLM selections valid/repaired/unusable/fallbacks",
             " / ".join(str(llm.get(f"select_{k}", 0)) for k in ("valid", "repaired", "unusable", "fallbacks"))),
        ]
    rates = ", ".join(f"{r:.3f}" for r in summary["best_rates"])
    rows.append(("best rates", rates))
    if summary.get("model"):
        rows.append(("model", str(summary["model"].get("path", summary["model"]))))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
