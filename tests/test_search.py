"""Tests of the rate search: constraint repair, operators, dedup, resume after kill -9, LLM-output handling.

Everything here runs on synthetic fitness functions (no model), except the last test, which uses a tiny
random Llama and the real Pruner when those are available.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from selfprune.errors import SelfpruneError
from selfprune.io import read_jsonl
from selfprune.llm import ChatResult
from selfprune.search import (EvolutionOperator, FixedOperator, Member, Proposal, RandomOperator, RunSettings,
                              SearchProblem, SearchRunner, SearchSpace, crossover_one_point, crossover_uniform,
                              mutate_move, owl_rates, random_rates)
from selfprune.search.llm_operator import LLMOperator, PromptSet, classify_rates, classify_selection

REPO = Path(__file__).resolve().parents[1]
COMPARED = ("index", "iteration", "slot", "operator", "parents", "rates", "achieved", "fitness", "repair_distance")


def quadratic_problem(n=8, target=0.3, seed=3, achieved=None, calls=None):
    """Fitness = weighted squared distance to a known feasible non-uniform optimum."""
    space = SearchSpace([100 + 10 * i for i in range(n)], target)
    optimum = np.array(space.repair(target + 0.25 * np.sin(np.arange(n) + seed)).rates)

    def evaluate(rates):
        if calls is not None:
            calls.append(list(rates))
        return {"fitness": float(np.sum(space.weights * (np.asarray(rates) - optimum) ** 2)), "tokens": 10}

    return space, SearchProblem(space.layer_params, evaluate, achieved=achieved)


def journal_view(run_dir):
    return [{k: r[k] for k in COMPARED} for r in read_jsonl(Path(run_dir) / "journal.jsonl")]


# -- space ------------------------------------------------------------------------------------------

def test_repair_is_exact_and_within_bounds_on_random_and_edge_inputs():
    rng = np.random.default_rng(0)
    cases = 0
    for n in (1, 2, 3, 5, 24, 30):
        for trial in range(150):
            lo, hi = [(0.0, 0.8), (0.1, 0.5), (0.0, 0.3), (0.2, 0.95)][trial % 4]
            weights = rng.uniform(1, 50, n) if trial % 2 else np.full(n, 7.0)
            target = [lo + 1e-6, hi, (lo + hi) / 2, rng.uniform(lo + 1e-6, hi)][trial % 4]
            space = SearchSpace(weights, target, (lo, hi))
            scale = [1e-6, 0.05, 1.0, 1e3][trial % 4]
            raw = rng.normal(target, scale, n)
            if trial % 5 == 0:
                raw[:] = hi + 10  # everything far above the bound
            if trial % 7 == 0:
                raw[:] = -3.0     # everything far below
            repaired = space.repair(raw)
            x = np.array(repaired.rates)
            assert x.min() >= lo and x.max() <= hi
            assert abs(space.mean(x) - target) <= 1e-9
            assert repaired.max_abs == pytest.approx(np.abs(x - raw).max())
            # a feasible candidate is left where it is
            again = space.repair(x)
            assert again.max_abs <= 1e-12
            cases += 1
    assert cases == 6 * 150


def test_repair_keeps_the_shape_of_an_already_centred_candidate():
    space = SearchSpace([1] * 4, 0.3)
    rates = [0.1, 0.2, 0.4, 0.5]
    assert space.repair(rates).rates == pytest.approx(rates)
    shifted = space.repair([0.2, 0.3, 0.5, 0.6])  # the same shape, mean 0.4: shifted down by 0.1
    assert shifted.rates == pytest.approx(rates) and shifted.max_abs == pytest.approx(0.1)


@pytest.mark.parametrize("target,bounds", [(0.9, (0.0, 0.8)), (0.05, (0.1, 0.5)), (0.0, (0.0, 0.8)),
                                           (1.0, (0.0, 0.8)), (0.3, (0.5, 0.4)), (0.3, (-0.1, 0.8)),
                                           (0.3, (0.0, 1.0))])
def test_infeasible_target_or_bounds_is_a_clear_error(target, bounds):
    with pytest.raises(SelfpruneError) as err:
        SearchSpace([1, 1, 1], target, bounds)
    assert "\n" not in str(err.value) and ("--target" in str(err.value) or "--bounds" in str(err.value))


# -- numeric operators -------------------------------------------------------------------------------

def test_numeric_operators_keep_feasibility():
    rng = np.random.default_rng(1)
    space = SearchSpace(rng.uniform(1, 3, 16), 0.4, (0.05, 0.7))
    for _ in range(200):
        a = random_rates(space, rng, concentration=float(rng.uniform(0.2, 5)))
        b = random_rates(space, rng)
        assert space.is_feasible(a) and space.is_feasible(b)
        child = mutate_move(a, space, rng, step=float(rng.uniform(0.001, 0.2)))
        assert space.is_feasible(child)  # budget-preserving without help from the repair
        assert space.repair(child).max_abs <= 1e-9
        for cross in (crossover_uniform, crossover_one_point):
            mixed = cross(a, b, rng)
            assert all(m in (x, y) for m, x, y in zip(mixed, a, b))
            assert space.is_feasible(space.repair(mixed).rates)
    owl = owl_rates(space, rng.uniform(0, 0.05, 16), 0.08)
    assert space.is_feasible(owl)
    assert max(owl) - min(owl) <= 2 * 0.08 + 1e-9


def test_owl_prunes_outlier_layers_less():
    space = SearchSpace([1] * 4, 0.3)
    rates = owl_rates(space, [0.01, 0.04, 0.02, 0.03], lam=0.08)
    assert rates == pytest.approx([0.38, 0.22, 0.3 + 0.08 / 3, 0.3 - 0.08 / 3])
    assert np.mean(rates) == pytest.approx(0.3, abs=1e-12)


def test_evolution_operator_offspring_are_feasible_after_repair():
    rng = np.random.default_rng(2)
    space = SearchSpace([1] * 10, 0.5, (0.0, 0.8))
    op = EvolutionOperator(space, 5, 5, step=0.05)
    init = op.initial(8, rng, [Proposal(space.uniform(), "seed:uniform")])
    assert len(init) == 8 and init[0].operator == "seed:uniform"
    population = [Member(i, space.repair(p.rates).rates, float(i)) for i, p in enumerate(init)]
    children = op.offspring(population, rng)
    assert [c.operator for c in children] == ["evolution:crossover"] * 5 + ["evolution:mutation"] * 5
    for c in children:
        assert space.is_feasible(space.repair(c.rates).rates)
        assert all(p in range(8) for p in c.parents)


# -- the loop -----------------------------------------------------------------------------------------

def test_evolution_improves_over_uniform_within_budget(tmp_path):
    space, problem = quadratic_problem()
    op = EvolutionOperator(space, 10, 10)
    runner = SearchRunner(tmp_path / "evo", space, problem, op, RunSettings(budget=150, population=20, seed=0),
                          seeds=[Proposal(space.uniform(), "seed:uniform")], progress=False)
    summary = runner.run()
    assert summary["evaluations"] == 150
    assert summary["uniform_fitness"] == pytest.approx(problem.evaluate(space.uniform())["fitness"])
    assert summary["best_fitness"] < 0.5 * summary["uniform_fitness"]
    for record in read_jsonl(tmp_path / "evo" / "journal.jsonl"):
        assert space.is_feasible(record["rates"])
    best = json.loads((tmp_path / "evo" / "best.json").read_text())
    assert best["fitness"] == summary["best_fitness"]
    assert json.loads((tmp_path / "evo" / "summary.json").read_text())["evaluations"] == 150


def test_identical_models_are_never_evaluated_twice(tmp_path):
    # Coarse "achieved" rates (whole 0.05 steps) make many distinct rate vectors the same model.
    calls = []
    space, problem = quadratic_problem(n=4, calls=calls, achieved=lambda r: [round(v / 0.05) * 0.05 for v in r])
    op = EvolutionOperator(space, 10, 10, step=0.01)
    summary = SearchRunner(tmp_path / "dedup", space, problem, op, RunSettings(budget=60, population=10, seed=1),
                           seeds=[Proposal(space.uniform(), "seed:uniform")] * 3, progress=False).run()
    keys = [problem.key(r) for r in calls]
    assert len(keys) == len(set(keys)) == summary["evaluations"]
    assert summary["cache_hits"] >= 2  # the repeated seeds at least


def test_one_shot_baselines_use_one_evaluation(tmp_path):
    space, problem = quadratic_problem()
    uniform = FixedOperator("uniform", [Proposal(space.uniform(), "uniform")])
    summary = SearchRunner(tmp_path / "u", space, problem, uniform, RunSettings(budget=430, population=1),
                           progress=False).run()
    assert summary["evaluations"] == 1 and summary["best_rates"] == pytest.approx(space.uniform())


def test_random_search_and_budget_cap(tmp_path):
    space, problem = quadratic_problem()
    summary = SearchRunner(tmp_path / "r", space, problem, RandomOperator(space, 7),
                           RunSettings(budget=23, population=5, seed=4), progress=False).run()
    records = read_jsonl(tmp_path / "r" / "journal.jsonl")
    assert summary["evaluations"] == len(records) == 23
    assert [r["index"] for r in records] == list(range(23))


KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    import numpy as np
    from selfprune.search import EvolutionOperator, Proposal, RunSettings, SearchProblem, SearchRunner, SearchSpace
    space = SearchSpace([100 + 10 * i for i in range(8)], 0.3)
    optimum = np.array(space.repair(0.3 + 0.25 * np.sin(np.arange(8) + 3)).rates)
    def evaluate(rates):
        time.sleep(float(sys.argv[2]))
        return {"fitness": float(np.sum(space.weights * (np.asarray(rates) - optimum) ** 2))}
    problem = SearchProblem(space.layer_params, evaluate)
    runner = SearchRunner(sys.argv[1], space, problem, EvolutionOperator(space, 4, 4),
                          RunSettings(budget=48, population=8, seed=7),
                          seeds=[Proposal(space.uniform(), "seed:uniform")], progress=False)
    print(runner.run()["best_fitness"])
""")


def test_resume_after_kill_9_reproduces_the_uninterrupted_run(tmp_path):
    script = tmp_path / "search_job.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def run(run_dir, delay):
        return subprocess.run([sys.executable, str(script), str(run_dir), str(delay)], env=env, check=True,
                              capture_output=True, text=True, timeout=120)

    run(tmp_path / "straight", 0)
    reference = journal_view(tmp_path / "straight")
    assert len(reference) == 48

    killed = tmp_path / "killed"
    for stop_after in (9, 30):  # kill twice, mid-iteration
        proc = subprocess.Popen([sys.executable, str(script), str(killed), "0.03"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while len(read_jsonl(killed / "journal.jsonl")) < stop_after and time.time() < deadline:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        done = len(read_jsonl(killed / "journal.jsonl"))
        assert stop_after <= done < 48
    out = run(killed, 0)
    assert journal_view(killed) == reference  # nothing lost, nothing redone, same continuation
    assert float(out.stdout.strip().splitlines()[-1]) == json.loads(
        (tmp_path / "straight" / "summary.json").read_text())["best_fitness"]


# -- LLM operator ---------------------------------------------------------------------------------------

SPACE4 = SearchSpace([1, 1, 1, 1], 0.3, (0.0, 0.8))


@pytest.mark.parametrize("text,status", [
    ('{"rates": [0.2, 0.3, 0.4, 0.3]}', "valid"),
    ('Sure! Here it is:\n```json\n{"rates": [0.2, 0.3, 0.4, 0.3],}\n```', "valid"),
    ("[0.2, 0.3, 0.4, 0.3]", "valid"),
    ('{"rates": [0.2, 0.3, 0.4, 0.3001]}', "valid"),        # 3-decimal rounding noise is fine
    ('{"rates": [0.1, 0.1, 0.1, 0.1]}', "repaired"),          # wrong mean
    ('{"rates": [0.0, 0.9, 0.3, 0.0]}', "repaired"),          # above the bound
    ('{"rates": [20, 30, 40, 30]}', "repaired"),              # percentages
    ('{"rates": [0.2, 0.3, 1.2, 0.3]}', "unusable"),          # 1.2 is no fraction of a layer
    ('{"rates": [0.3, 2.5e15, 0.3, 0.3]}', "unusable"),       # absurd: projecting it would be the repair's pick
    ('{"rates": [0.5, -0.2, 0.4, 0.3]}', "unusable"),         # negative
    ('{"rates": [0.3, 279.5, 21.6, 17.3]}', "unusable"),      # neither fractions nor percentages
    ('{"rates": [30.1, 0.26, 0.35, 0.29]}', "unusable"),      # fractions with one stray value, not percentages
    ('{"rates": [0, 30, 60, 30]}', "repaired"),               # percentages with an unpruned layer
    ('{"rates": [0.2, 0.3, 0.4]}', "unusable"),               # wrong length
    ('{"rates": [0.2, "high", 0.4, 0.3]}', "unusable"),       # non-numeric
    ('{"rates": [0.2, NaN, 0.4, 0.3]}', "unusable"),          # not finite
    ('{"rates": [0.2, 0.3, 0.4, 0.3', "unusable"),            # truncated
    ("I think layer 3 should be pruned more.", "unusable"),   # no JSON
    ('{"answer": "none"}', "unusable"),
])
def test_llm_output_classification(text, status):
    verdict = classify_rates(text, SPACE4)
    assert verdict.status == status
    if status != "unusable":
        assert len(verdict.rates) == 4 and SPACE4.is_feasible(SPACE4.repair(verdict.rates).rates)
    else:
        assert verdict.rates is None and verdict.reason


def test_selection_classification():
    ids = [3, 5, 8]
    assert classify_selection('{"crossover_pairs": [[3, 5]], "mutation_parents": [8, 3]}', ids, 1, 2)[0] == "valid"
    status, pairs, parents, _ = classify_selection(
        '{"crossover_pairs": [[3, 99], [5, 8]], "mutation_parents": [8]}', ids, 2, 2)
    assert status == "repaired" and pairs == [[5, 8]] and parents == [8]
    assert classify_selection("no idea", ids, 1, 1)[0] == "unusable"


class ScriptedBackend:
    """A ChatBackend stand-in: answers from a function of (prompt kind, call number, seed)."""

    name = "scripted"

    def __init__(self, answer):
        self.answer = answer
        self.calls = 0

    def complete(self, messages, *, json_schema=None, max_tokens=1024, temperature=0.7, seed=None):
        self.calls += 1
        kind = "select" if "crossover_pairs" in messages[-1]["content"] else "rates"
        text = self.answer(kind, self.calls, seed, messages)
        return ChatResult(text, 100, 20, 0.0, json_schema is not None, "scripted")


def good_answer(kind, call, seed, messages):
    """Valid answers that differ from call to call (deterministic in the seed the operator passes)."""
    if kind == "select":
        ids = [int(line.split(":")[0][3:]) for line in messages[-1]["content"].splitlines() if line.startswith("id ")]
        return json.dumps({"crossover_pairs": [[ids[0], ids[1]], [ids[1], ids[2]]], "mutation_parents": ids[:2]})
    rng = np.random.default_rng(seed)
    rates = np.round(SPACE4.repair(0.3 + rng.uniform(-0.2, 0.2, 4)).rates, 3)
    return json.dumps({"rates": rates.tolist()})


def test_prompt_versions_inherit_unchanged_templates():
    v1, v2 = PromptSet("v1"), PromptSet("v2")
    assert v2.paths["system"] == v1.paths["system"] and v2.paths["system"].name == "v1_system.txt"
    assert v2.paths["initial"].name == "v2_initial.txt" and v1.paths["initial"].name == "v1_initial.txt"
    with pytest.raises(SelfpruneError, match="unknown prompt version 'v9'"):
        PromptSet("v9")


def test_v2_initial_prompts_extend_each_other_for_prefix_caches():
    """Each initial-population prompt starts with the whole previous one's candidate list, so a prefix cache
    (llama.cpp, vLLM, OpenAI) only processes the new candidate and the closing instruction."""
    seen = []
    backend = ScriptedBackend(lambda kind, call, seed, m: seen.append(m[-1]["content"])
                              or good_answer(kind, call, seed, m))
    op = LLMOperator(backend, SPACE4, prompt_version="v2", retries=0)
    op.initial(6, np.random.default_rng(0), [Proposal(SPACE4.uniform(), "seed:uniform")])
    assert len(seen) == 5
    for before, after in zip(seen, seen[1:]):
        stable = before.split("\n\nPropose candidate")[0]
        assert after.startswith(stable + "\n[") and len(after) > len(before)


def test_llm_operator_falls_back_after_retries_and_counts(tmp_path):
    space, problem = SPACE4, SearchProblem([1, 1, 1, 1], lambda r: {"fitness": float(np.var(r))})
    backend = ScriptedBackend(lambda kind, call, seed, m: "sorry, I cannot do that")
    op = LLMOperator(backend, space, log_dir=tmp_path / "run" / "llm", n_crossover=2, n_mutation=2, retries=2)
    summary = SearchRunner(tmp_path / "run", space, problem, op, RunSettings(budget=10, population=4, seed=0),
                           progress=False).run()
    llm = summary["llm"]
    # iteration 0: 4 initial; iterations 1 and 2: 1 selection + 4 children each (the last batch is only
    # partly evaluated: budget 10); every answer is tried 1 + 2 times, then replaced by the numeric operator
    assert llm["valid"] == llm["repaired"] == 0
    assert llm["fallbacks"] == 12 and llm["select_fallbacks"] == 2
    assert summary["evaluations"] == 10
    assert llm["unusable"] == 3 * llm["fallbacks"]
    assert llm["select_unusable"] == 3 * llm["select_fallbacks"] and llm["select_fallbacks"] >= 1
    journal = read_jsonl(tmp_path / "run" / "journal.jsonl")
    assert all(r["operator"].endswith(":fallback") for r in journal)
    calls = read_jsonl(tmp_path / "run" / "llm" / "calls.jsonl")
    assert len(calls) == backend.calls == llm["calls"]
    assert {c["status"] for c in calls} == {"unusable"} and all(c["messages"] for c in calls)


def test_llm_operator_search_is_logged_and_resumable(tmp_path):
    space = SPACE4
    optimum = np.array([0.1, 0.2, 0.4, 0.5])
    problem = SearchProblem([1, 1, 1, 1], lambda r: {"fitness": float(np.sum((np.asarray(r) - optimum) ** 2))})

    def make_op(run, backend):
        return LLMOperator(backend, space, log_dir=run / "llm", n_crossover=2, n_mutation=2, retries=1)

    straight = tmp_path / "straight"
    backend = ScriptedBackend(good_answer)
    summary = SearchRunner(straight, space, problem, make_op(straight, backend),
                           RunSettings(budget=20, population=6, seed=5), progress=False).run()
    assert summary["llm"]["valid"] >= 6 and summary["llm"]["unusable"] == 0
    reference = journal_view(straight)

    # crash in the middle of an evaluation (like kill -9 after the journal line of eval 12), then resume
    crashed = tmp_path / "crashed"
    count = {"n": 0}

    def crashing(rates):
        count["n"] += 1
        if count["n"] == 13:
            raise KeyboardInterrupt
        return problem.evaluate(rates)

    with pytest.raises(KeyboardInterrupt):
        SearchRunner(crashed, space, SearchProblem([1] * 4, crashing), make_op(crashed, ScriptedBackend(good_answer)),
                     RunSettings(budget=20, population=6, seed=5), progress=False).run()
    calls_before = len(read_jsonl(crashed / "llm" / "calls.jsonl"))
    resumed_backend = ScriptedBackend(good_answer)
    resumed = SearchRunner(crashed, space, problem, make_op(crashed, resumed_backend),
                           RunSettings(budget=20, population=6, seed=5), progress=False).run()
    assert journal_view(crashed) == reference
    # the batches already proposed were not asked from the LLM again
    assert calls_before + resumed_backend.calls == backend.calls
    assert resumed["llm"]["calls"] == summary["llm"]["calls"]


def test_llm_prompts_state_the_problem():
    backend = ScriptedBackend(good_answer)
    op = LLMOperator(backend, SearchSpace([5] * 24, 0.3, (0.0, 0.8)), n_crossover=1, n_mutation=1)
    for needle in ("24 decoder layers", "layer 0 is next to the token embeddings", "between 0 and 0.8",
                   "equal 0.3", "attention and MLP parameters", "lower is better"):
        assert needle in op.system
    uneven = LLMOperator(backend, SearchSpace([5, 6, 7], 0.3), n_crossover=1, n_mutation=1)
    assert "weighted" in uneven.system and "[5, 6, 7]" in uneven.system


# -- CLI input errors ----------------------------------------------------------------------------------

def _parse(argv):
    import argparse

    from selfprune.search.cli_search import add_search_parser

    parser = argparse.ArgumentParser(prog="selfprune")
    add_search_parser(parser.add_subparsers())
    return parser.parse_args(["search", *argv])


@pytest.mark.parametrize("argv,needle", [
    (["--target", "1.2"], "--target"),
    (["--target", "0.3", "--bounds", "0.5,0.8"], "--bounds"),
    (["--target", "0.3", "--bounds", "x"], "--bounds"),
    ([], "--target is required"),
    (["--target", "0.3", "--budget", "0"], "--budget"),
    (["--target", "0.3", "--seed-population", "owl,best"], "--seed-population"),
    (["--target", "0.3", "--rescore-top", "-1"], "--rescore-top -1 is too small"),
])
def test_cli_rejects_bad_input_in_one_line(argv, needle, tmp_path):
    args = _parse(argv + ["--out", str(tmp_path / "x")])
    with pytest.raises(SelfpruneError) as err:
        args.func(args)
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "x").exists()


def test_cli_refuses_existing_out_and_empty_resume(tmp_path):
    (tmp_path / "taken").mkdir()
    args = _parse(["--target", "0.3", "--out", str(tmp_path / "taken")])
    with pytest.raises(SelfpruneError, match="--resume"):
        args.func(args)
    args = _parse(["--resume", str(tmp_path / "taken")])
    with pytest.raises(SelfpruneError, match="no search run"):
        args.func(args)


def test_cli_config_has_every_setting():
    from selfprune.search.cli_search import build_config

    config = build_config(_parse(["--target", "0.3", "--operator", "owl", "--owl-lambda", "0.04,0.08"]))
    assert config["budget"] == 2 and config["fitness"]["split"] == "validation"
    for key in ("model", "criterion", "target", "bounds", "budget", "operator", "llm", "seed", "fitness",
                "calibration", "versions", "population", "crossovers", "mutations"):
        assert key in config
    assert build_config(_parse(["--target", "0.3"]))["budget"] == 430


# -- tiny model end to end --------------------------------------------------------------------------------

DATA_DIR = Path(os.environ.get("SELFPRUNE_DATA_DIR", "/work/shared/data"))


def _tiny_model_dir(folder: Path) -> Path:
    """A random 4-layer Llama with a byte-level tokenizer, saved like any hub model."""
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import byte_tokenizer

    tokenizer = byte_tokenizer()
    vocab = tokenizer.get_vocab()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         eos_token_id=vocab["</s>"], pad_token_id=vocab["</s>"])
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return _tiny_model_dir(tmp_path_factory.mktemp("tiny"))


def test_llm_operator_runs_on_the_self_backend(tiny_model_dir, tmp_path):
    """The operator works with the real in-memory backend (a random model: every answer is unusable)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from selfprune.llm import make_backend

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    backend = make_backend("self", self_model=model, self_tokenizer=tokenizer)
    op = LLMOperator(backend, SPACE4, log_dir=tmp_path / "llm", n_crossover=1, n_mutation=1, retries=0,
                     max_tokens=8)
    problem = SearchProblem([1, 1, 1, 1], lambda r: {"fitness": float(np.var(r))})
    summary = SearchRunner(tmp_path, SPACE4, problem, op, RunSettings(budget=4, population=2, seed=0),
                           progress=False).run()
    assert summary["evaluations"] == 4
    calls = read_jsonl(tmp_path / "llm" / "calls.jsonl")
    assert len(calls) == summary["llm"]["calls"] == 5  # 2 initial, 1 selection, 1 crossover, 1 mutation
    assert all(c["completion_tokens"] <= 8 and c["prompt_tokens"] > 100 for c in calls)
    assert summary["llm"]["fallbacks"] + summary["llm"]["valid"] + summary["llm"]["repaired"] == 4


@pytest.mark.skipif(not (DATA_DIR / "ptb").is_dir(), reason="needs the local ptb / c4 copies")
def test_tiny_model_search_end_to_end(tiny_model_dir, tmp_path, capsys):
    model_dir = tiny_model_dir
    run = tmp_path / "run"
    common = ["--model", str(model_dir), "--target", "0.3", "--criterion", "flap", "--seq-len", "32",
              "--fitness-windows", "4", "--fitness-dataset", "ptb", "--calib-samples", "8",
              "--data-dir", str(DATA_DIR), "--device", "cpu", "--no-progress"]
    args = _parse(common + ["--operator", "evolution", "--budget", "6", "--population", "4", "--offspring", "2",
                            "--seed-population", "uniform,owl", "--out", str(run)])
    assert args.func(args) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["evaluations"] == 6 and summary["best_fitness"] <= summary["uniform_fitness"]
    journal = read_jsonl(run / "journal.jsonl")
    assert [r["operator"] for r in journal[:2]] == ["seed:uniform", "seed:owl"]
    assert all(abs(np.mean(r["rates"]) - 0.3) < 1e-9 for r in journal)  # all 4 layers have the same size
    assert "best fitness" in capsys.readouterr().out

    import selfprune
    from selfprune.perplexity import PerplexityEvaluator

    pruned, tokenizer = selfprune.load(run / "model")
    ev = PerplexityEvaluator(tokenizer, "ptb", "validation", 32, 4, 8, str(DATA_DIR))
    assert ev(pruned)["ppl"] == pytest.approx(summary["best_fitness"], rel=1e-4)

    # extending the finished run with --resume --budget reuses all 6 evaluations
    args = _parse(["--resume", str(run), "--budget", "8", "--no-progress"])
    assert args.func(args) == 0
    journal2 = read_jsonl(run / "journal.jsonl")
    assert len(journal2) == 8 and journal2[:6] == journal

    # multi-fidelity added on resume: the 3 best are scored on 12 windows, the best of those is saved
    args = _parse(["--resume", str(run), "--rescore-top", "3", "--rescore-windows", "12", "--no-progress"])
    assert args.func(args) == 0
    summary = json.loads((run / "summary.json").read_text())
    rescored = summary["rescore"]["candidates"]
    top3 = sorted(journal2, key=lambda r: (r["fitness"], r["index"]))[:3]
    assert [r["index"] for r in rescored] == [r["index"] for r in top3]
    assert [r["fitness"] for r in rescored] == [r["fitness"] for r in top3]
    chosen = min(rescored, key=lambda r: r["rescored_fitness"])
    assert summary["best_index"] == chosen["index"] and summary["rescore"]["best_rescored_fitness"] == chosen[
        "rescored_fitness"]
    assert read_jsonl(run / "rescore.jsonl") == rescored and len(read_jsonl(run / "journal.jsonl")) == 8
    pruned, tokenizer = selfprune.load(run / "model")
    ev12 = PerplexityEvaluator(tokenizer, "ptb", "validation", 32, 12, 8, str(DATA_DIR))
    assert ev12(pruned)["ppl"] == pytest.approx(chosen["rescored_fitness"], rel=1e-4)
    assert json.loads((run / "best.json").read_text())["index"] == chosen["index"]


def test_resume_may_move_the_llm_server_and_extend_the_budget():
    from selfprune.search.cli_search import apply_resume_overrides, build_config

    config = build_config(_parse(["--target", "0.3", "--operator", "llm", "--llm", "openai:x",
                                  "--llm-base-url", "http://127.0.0.1:1/v1", "--budget", "10"]))
    assert not apply_resume_overrides(config, _parse(["--resume", "run"]))
    moved = _parse(["--resume", "run", "--llm-base-url", "http://127.0.0.1:2/v1", "--llm-api-key-env", "MY_KEY",
                    "--budget", "20"])
    assert apply_resume_overrides(config, moved)
    assert config["llm"]["base_url"] == "http://127.0.0.1:2/v1" and config["llm"]["api_key_env"] == "MY_KEY"
    assert config["budget"] == 20
    assert config["rescore"] == {"top": 0, "windows": 64}
    assert apply_resume_overrides(config, _parse(["--resume", "run", "--rescore-top", "5"]))
    assert config["rescore"] == {"top": 5, "windows": 64}
    with pytest.raises(SelfpruneError, match="--rescore-windows 0 is too small"):
        apply_resume_overrides(config, _parse(["--resume", "run", "--rescore-windows", "0"]))


def test_rescoring_picks_the_best_of_the_top_on_the_finer_fitness_and_is_not_repeated_on_resume(tmp_path):
    """The cheap fitness is the true one plus noise; re-scoring the top 5 with the true one must pick the
    truly best of those five, which here is not the cheap winner."""
    optimum = np.array([0.1, 0.2, 0.4, 0.5])
    noise = {}

    def true_fitness(r):
        return float(np.sum((np.asarray(r) - optimum) ** 2))

    def cheap(r):
        key = tuple(np.round(r, 9))
        noise.setdefault(key, np.random.default_rng(len(noise)).normal(0, 0.2))
        return {"fitness": true_fitness(r) + noise[key]}

    calls = []
    problem = SearchProblem([1, 1, 1, 1], cheap,
                            rescore=lambda r: calls.append(r) or {"fitness": true_fitness(r), "tokens": 7})
    settings = RunSettings(budget=30, population=10, seed=0, rescore_top=5)

    def run():
        return SearchRunner(tmp_path, SPACE4, problem, RandomOperator(SPACE4, 10), settings, progress=False).run()

    summary = run()
    journal = read_jsonl(tmp_path / "journal.jsonl")
    top5 = sorted(journal, key=lambda r: (r["fitness"], r["index"]))[:5]
    truly_best = min(top5, key=lambda r: true_fitness(r["rates"]))
    assert truly_best["index"] != top5[0]["index"]  # the noise fooled the cheap fitness
    assert summary["best_index"] == truly_best["index"] and summary["rescore"]["cheapest_winner_index"] == top5[0][
        "index"]
    assert summary["best_rates"] == truly_best["rates"] and len(calls) == 5 and summary["rescore"]["tokens"] == 35
    assert run()["best_index"] == truly_best["index"] and len(calls) == 5  # resume: read from rescore.jsonl
