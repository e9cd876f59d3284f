"""Search for per-layer pruning rates: Self-Pruner's LLM-driven evolution and its baselines.

Modules: :mod:`.space` (the constraint and its repair), :mod:`.operators` (numeric operators and
heuristics), :mod:`.llm_operator` (the LLM operators), :mod:`.runner` (loop, journal, resume),
:mod:`.launch` (a run's config and composition, behind ``selfprune search``); ``fitness`` scores a candidate. Importing this package does
not import torch.
"""
from .operators import (EvolutionOperator, FixedOperator, Member, Operator, Proposal, RandomOperator, accept_all,
                        crossover_one_point, crossover_uniform, mutate_move, novel_rates, owl_rates, random_rates,
                        tournament, uniform_rates)
from .runner import (RunSettings, SearchProblem, SearchRunner, budget_notes, format_summary, iteration_rng,
                     run_is_finished, size_population)
from .space import Repair, SearchSpace, parse_bounds


def __getattr__(name):
    if name in ("LLMOperator", "classify_rates", "classify_selection"):
        from . import llm_operator

        return getattr(llm_operator, name)
    raise AttributeError(name)


__all__ = [
    "EvolutionOperator", "FixedOperator", "LLMOperator", "Member", "Operator", "Proposal", "RandomOperator",
    "Repair", "RunSettings", "SearchProblem", "SearchRunner", "SearchSpace", "accept_all", "budget_notes",
    "classify_rates", "classify_selection", "crossover_one_point", "crossover_uniform", "format_summary",
    "iteration_rng", "mutate_move", "novel_rates", "owl_rates", "parse_bounds", "random_rates", "run_is_finished",
    "size_population", "tournament", "uniform_rates",
]
