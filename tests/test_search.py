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
from types import SimpleNamespace

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
    # Python callers read the argument's name, the command line its option
    assert "\n" not in str(err.value) and ("target=" in str(err.value) or "bounds=" in str(err.value))
    assert "--target" in err.value.cli_message() or "--bounds" in err.value.cli_message()


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
        return LLMOperator(backend, space, log_dir=run / "llm", n_crossover=2, n_mutation=2, retries=1,
                           prompt_version="v2")  # good_answer writes fractions

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
    op = LLMOperator(backend, SearchSpace([5] * 24, 0.3, (0.0, 0.8)), n_crossover=1, n_mutation=1, prompt_version="v2")
    for needle in ("24 decoder layers", "layer 0 is next to the token embeddings", "between 0 and 0.8",
                   "equal 0.3", "attention and MLP parameters", "lower is better"):
        assert needle in op.system
    uneven = LLMOperator(backend, SearchSpace([5, 6, 7], 0.3), n_crossover=1, n_mutation=1)
    assert "weighted" in uneven.system and "[5, 6, 7]" in uneven.system


# -- CLI input errors ----------------------------------------------------------------------------------

def _parse(argv):
    from selfprune.cli import build_parser

    return build_parser().parse_args(["search", *argv])


def _cli(argv, capsys) -> tuple[int, str]:
    """``selfprune search ARGV`` in this process: (exit code, stderr)."""
    from selfprune.cli import main

    try:
        code = main(["search", *argv])
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("argv,needle", [
    (["--target", "1.2"], "--target"),
    (["--target", "0.3", "--bounds", "0.5,0.8"], "--bounds"),
    (["--target", "0.3", "--bounds", "x"], "--bounds"),
    ([], "--target is required"),
    (["--target", "0.3", "--budget", "0"], "--budget"),
    (["--target", "0.3", "--seed-population", "owl,best"], "--seed-population"),
    (["--target", "0.3", "--rescore-top", "-1"], "--rescore-top"),
])
def test_cli_rejects_bad_input_in_one_line(argv, needle, tmp_path, capsys):
    code, err = _cli(argv + ["--out", str(tmp_path / "x")], capsys)
    assert code == 2 and needle in err and "\n" not in err
    assert not (tmp_path / "x").exists()


def test_cli_refuses_existing_out_and_empty_resume(tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    code, err = _cli(["--target", "0.3", "--out", str(tmp_path / "taken")], capsys)
    assert code == 2 and "--resume" in err
    code, err = _cli(["--resume", str(tmp_path / "taken")], capsys)
    assert code == 2 and "no search run" in err


def test_cli_config_has_every_setting():
    from selfprune.search.launch import build_config

    config = build_config(_parse(["--target", "0.3", "--operator", "owl", "--owl-lambda", "0.04,0.08"]))
    assert config["budget"] == 2 and config["fitness"]["split"] == "validation"
    for key in ("model", "criterion", "target", "bounds", "budget", "operator", "llm", "seed", "fitness",
                "calibration", "versions", "population", "crossovers", "mutations"):
        assert key in config
    assert build_config(_parse(["--target", "0.3"]))["budget"] == 430


# -- tiny model end to end --------------------------------------------------------------------------------

DATA_DIR = Path(os.environ.get("SELFPRUNE_DATA_DIR", "no-data-dir-set"))  # conftest.py sets it


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
    from selfprune.evaluation.perplexity import PerplexityEvaluator

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

    # resuming the finished run says so and touches nothing (no model load, no calibration, no save)
    from selfprune.search import run_is_finished

    config = json.loads((run / "config.json").read_text())
    assert run_is_finished(run, config) == json.loads((run / "summary.json").read_text())
    before = {p.name: p.stat().st_mtime_ns for p in [*run.iterdir(), *(run / "model").iterdir()]}
    capsys.readouterr()
    args = _parse(["--resume", str(run), "--no-progress"])
    assert args.func(args) == 0
    assert "finished" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in [*run.iterdir(), *(run / "model").iterdir()]} == before


def test_resume_may_move_the_llm_server_and_extend_the_budget():
    from selfprune.search.launch import apply_resume_overrides, build_config

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
        apply_resume_overrides(config, SimpleNamespace(rescore_top=None, rescore_windows=0, budget=None,
                                                       llm_base_url=None, llm_api_key_env=None))


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


# -- issue 12/8: honest counts, cache key, fitness names, budget vs population, finished runs -------------

def test_a_duplicate_reply_is_counted_once_under_duplicates(tmp_path):
    """The LLM repeats one valid candidate: the first reply is valid, every later one a duplicate, counted
    under the key the summary, its table and the report read."""
    from selfprune.evaluation.report import llm_section
    from selfprune.search import format_summary

    same = json.dumps({"rates": [0.2, 0.3, 0.4, 0.3]})
    backend = ScriptedBackend(lambda kind, call, seed, m: same)
    op = LLMOperator(backend, SPACE4, log_dir=tmp_path / "llm", retries=0, prompt_version="v2")
    problem = SearchProblem([1] * 4, lambda r: {"fitness": float(np.var(r))})
    summary = SearchRunner(tmp_path, SPACE4, problem, op, RunSettings(budget=3, population=3, seed=0),
                           progress=False).run()
    statuses = [c["status"] for c in read_jsonl(tmp_path / "llm" / "calls.jsonl")]
    assert statuses == ["valid", "duplicate", "duplicate"]
    llm = summary["llm"]
    assert llm["duplicates"] == 2 and "duplicate" not in llm and llm["valid"] == 1 and llm["fallbacks"] == 2
    import re

    assert re.search(r"LLM duplicates/fallbacks +2 / 2\n", format_summary(summary))
    run = {"summary": summary, "batches": read_jsonl(tmp_path / "proposals.jsonl"), "llm_calls": []}
    assert re.search(r"\| duplicates +\| +2 +\|", llm_section(run))
    old_run = {"summary": {"llm": {"calls": 3, "valid": 1, "duplicates": 0, "duplicate": 2}}, "batches": [],
               "llm_calls": []}  # a summary written before the fix
    assert re.search(r"\| duplicates +\| +2 +\|", llm_section(old_run)) and "| duplicate " not in llm_section(old_run)


def test_counts_of_runs_made_before_the_fix_are_folded_into_duplicates(tmp_path):
    from selfprune.search.runner import fold_llm_counts

    assert fold_llm_counts({"duplicate": 3, "duplicates": 1, "valid": 2, "note": "x"}) == {"duplicates": 4, "valid": 2}


def _equal_weight_pruner():
    """A 4-layer Llama whose query head weighs exactly 8 MLP channels (2 x 12 x 48 = 8 x 3 x 48), pruned with
    heads and channels in proportion, keeping every KV head: rates just below and above 0.25 remove the same
    number of parameters with different shapes (no head and 28 channels, or 2 heads and 12 channels)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from selfprune.pruning import Pruner

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=12, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    return Pruner(model, criterion="magnitude", structure="proportional", gqa_policy="query", progress=False)


def test_candidates_with_equal_achieved_fractions_but_other_shapes_are_both_evaluated(tmp_path):
    import torch

    from selfprune.search.fitness import layer_shapes

    pruner = _equal_weight_pruner()
    a, b = [0.2499, 0.2501, 0.25, 0.25], [0.2501, 0.2499, 0.25, 0.25]
    assert pruner.achieved(a) == pruner.achieved(b)  # the old cache key cannot tell them apart
    assert layer_shapes(pruner, a)[:2] == ((4, 2, 36), (2, 2, 52)) and layer_shapes(pruner, b)[:2] == (
        (2, 2, 52), (4, 2, 36))
    ids = torch.arange(32).view(1, 32)

    def evaluate(rates):
        model, _ = pruner.build(rates)
        with torch.no_grad():
            return {"fitness": float(model(ids).logits.float().pow(2).mean())}

    space = SearchSpace(pruner.layer_params, 0.25)
    problem = SearchProblem(pruner.layer_params, evaluate, achieved=pruner.achieved,
                            shape_key=lambda r: layer_shapes(pruner, r))
    operator = FixedOperator("fixed", [Proposal(a, "a"), Proposal(b, "b"), Proposal(list(a), "a again")])
    summary = SearchRunner(tmp_path, space, problem, operator, RunSettings(budget=5, population=3),
                           progress=False).run()
    journal = read_jsonl(tmp_path / "journal.jsonl")
    assert [r["operator"] for r in journal] == ["a", "b"] and summary["cache_hits"] == 1
    assert journal[0]["fitness"] != journal[1]["fitness"]  # two models, two fitness values


def test_kl_fitness_is_named_in_every_prompt():
    """With the KL fitness, no prompt may call the fitness perplexity; with perplexity, none says KL."""
    import re

    for kind, name, other in (("kl", "KL divergence", "perplexity"), ("ppl", "perplexity", "KL divergence")):
        for version in ("v1", "v2"):
            seen = []
            backend = ScriptedBackend(lambda kind_, call, seed, m: seen.append(m) or good_answer(kind_, call, seed, m))
            op = LLMOperator(backend, SPACE4, n_crossover=1, n_mutation=1, retries=0, fitness=kind,
                             prompt_version=version)
            rng = np.random.default_rng(0)
            op.initial(2, rng, [])
            op.offspring([Member(i, SPACE4.uniform(), 0.5 + i) for i in range(3)], rng)
            operations = {("select" if "crossover_pairs" in m[-1]["content"] else re.split("[.:]", m[-1]["content"])[0])
                          for m in seen}
            assert operations == {"Initial population", "select", "Crossover", "Mutation"}
            assert name in op.system and other not in op.system
            for messages in seen:
                text = messages[-1]["content"]
                assert other not in text
                if not text.startswith("Initial"):
                    assert name in text  # the fitness values shown are labelled with what they measure
    assert "KL divergence of the pruned model's next-token distribution" in LLMOperator(
        ScriptedBackend(good_answer), SPACE4, fitness="kl").system


def test_the_run_config_passes_the_fitness_kind_to_the_llm_operator(tmp_path):
    from selfprune.search.launch import build_config, build_operator

    config = build_config(_parse(["--target", "0.3", "--operator", "llm", "--fitness", "kl"]))
    op = build_operator(config, SPACE4, SearchProblem([1] * 4, lambda r: {}), tmp_path, ScriptedBackend(good_answer))
    assert op.fitness_name == "KL divergence" and "KL divergence" in op.system


@pytest.mark.parametrize("operator,budget,population,offspring,sized,note", [
    ("evolution", 100, 30, 20, 30, None),
    ("llm", 50, 30, 20, 30, None),                      # exactly one generation: as asked
    ("llm", 40, 30, 20, 20, "population reduced to 20, leaving 20 children for evolution"),
    ("evolution", 12, 30, 20, 6, "population reduced to 6, leaving 6 children for evolution"),
    ("evolution", 12, 5, 20, 5, "the run evolves only 7 children"),
    ("llm", 1, 30, 20, 1, "budget 1 leaves no evaluation for evolution"),
    ("llm", 2, 2, 20, 1, "population reduced to 1, leaving 1 child for evolution"),
    ("random", 12, 30, 20, 30, None),                   # nothing evolves: the population is just a batch
    ("uniform", 1, 30, 20, 30, None),
])
def test_population_is_sized_to_the_budget_and_says_so(operator, budget, population, offspring, sized, note):
    from selfprune.search import size_population

    got, said = size_population(operator, budget, population, offspring)
    assert got == sized
    assert (said is None) if note is None else (note in said and "\n" not in said)


def test_a_small_budget_still_evolves_and_the_summary_says_why(tmp_path):
    """Budget 12 with the default population 30: before, all 12 evaluations went to the initial population."""
    from selfprune.search import budget_notes, format_summary
    from selfprune.search.launch import build_config

    config = build_config(_parse(["--target", "0.3", "--operator", "evolution", "--budget", "12"]))
    assert config["population"] == 6 and config["population_requested"] == 30
    assert budget_notes(config) == [config["population_note"]] and "reduced to 6" in config["population_note"]
    space, problem = quadratic_problem()
    settings = RunSettings(budget=config["budget"], population=config["population"], seed=0,
                           population_note=config["population_note"])
    summary = SearchRunner(tmp_path, space, problem, EvolutionOperator(space, 10, 10), settings,
                           seeds=[Proposal(space.uniform(), "seed:uniform")], progress=False).run()
    journal = read_jsonl(tmp_path / "journal.jsonl")
    assert len(journal) == 12 and sum(r["iteration"] == 1 for r in journal) == 6
    assert summary["population"] == 6 and summary["population_note"] == config["population_note"]
    assert "reduced to 6" in format_summary(summary)
    assert budget_notes(build_config(_parse(["--target", "0.3", "--operator", "evolution"]))) == []


def test_run_is_finished_reads_only_the_files(tmp_path):
    from selfprune.search import run_is_finished

    space, problem = quadratic_problem()
    config = {"budget": 20, "rescore": {"top": 0, "windows": 64}}
    assert run_is_finished(tmp_path / "run", config) is None  # nothing there
    saved = []

    def finalize(rates, directory):
        (directory / "model").mkdir(exist_ok=True)
        (directory / "model" / "config.json").write_text("{}")
        saved.append(rates)
        return {"path": str(directory / "model")}

    problem.finalize = finalize
    run = tmp_path / "run"
    summary = SearchRunner(run, space, problem, RandomOperator(space, 7), RunSettings(budget=20, population=5),
                           progress=False).run()
    assert run_is_finished(run, config) == json.loads((run / "summary.json").read_text()) == summary
    assert run_is_finished(run, {**config, "budget": 25}) is None               # extended: more to do
    assert run_is_finished(run, {**config, "budget": 12}) == summary           # less than done: nothing to do
    assert run_is_finished(run, {**config, "rescore": {"top": 3, "windows": 64}}) is None  # re-scoring asked
    (run / "model" / "config.json").unlink()
    assert run_is_finished(run, config) is None                                  # the model must be saved again
    assert run_is_finished(run, config, save_model=False) == summary
    (run / "summary.json").write_text('{"evaluations": 20, "bud')                  # torn summary: not finished
    assert run_is_finished(run, config, save_model=False) is None

    # a run that stopped before its budget because the operator had nothing new is finished too
    stale = tmp_path / "stale"
    one_shot = FixedOperator("uniform", [Proposal(space.uniform(), "uniform")])
    summary = SearchRunner(stale, space, problem, one_shot, RunSettings(budget=10, population=1), progress=False).run()
    assert summary["evaluations"] == 1 and run_is_finished(stale, {**config, "budget": 10}) == summary
    assert run_is_finished(stale, {**config, "budget": 11}) is None


# -- issue 12.2: a kill during an LLM batch repeats no call ------------------------------------------------

def flaky_answer(kind, call, seed, messages):
    """Deterministic in the seed: a third of the rate replies are unusable (so retries happen)."""
    if kind == "rates" and seed % 3 == 0:
        return "I would prune the middle layers."
    return good_answer(kind, call, seed, messages)


class KilledAt(ScriptedBackend):
    """Dies (like kill -9: nothing after it runs) on its ``die_at``-th call."""

    def __init__(self, answer, die_at):
        super().__init__(answer)
        self.die_at = die_at

    def complete(self, messages, **kwargs):
        if self.calls + 1 == self.die_at:
            raise KeyboardInterrupt
        return super().complete(messages, **kwargs)


def calls_view(run_dir):
    drop = ("time",)
    return [{k: v for k, v in c.items() if k not in drop} for c in read_jsonl(Path(run_dir) / "llm" / "calls.jsonl")]


def call_keys(run_dir):
    return [(c["iteration"], c["operator"], c["slot"], c["attempt"]) for c in calls_view(run_dir)]


def test_a_kill_inside_an_llm_batch_reuses_the_replies_already_logged(tmp_path):
    optimum = np.array([0.1, 0.2, 0.4, 0.5])
    problem = SearchProblem([1] * 4, lambda r: {"fitness": float(np.sum((np.asarray(r) - optimum) ** 2))})
    settings = RunSettings(budget=18, population=5, seed=3)

    def run(run_dir, backend):
        op = LLMOperator(backend, SPACE4, log_dir=run_dir / "llm", n_crossover=2, n_mutation=2, retries=1)
        return SearchRunner(run_dir, SPACE4, problem, op, settings, progress=False).run()

    straight = tmp_path / "straight"
    reference_backend = ScriptedBackend(flaky_answer)
    reference = run(straight, reference_backend)
    keys = call_keys(straight)
    assert len(keys) == len(set(keys)) == reference_backend.calls == reference["llm"]["calls"]
    assert reference["llm"]["unusable"] > 0 and reference["llm"]["replayed_calls"] == 0
    batch_starts = {}
    for number, (iteration, *_rest) in enumerate(keys, start=1):
        batch_starts.setdefault(iteration, number)

    # die inside the initial batch, inside a retry, and inside two offspring batches (after their selection)
    for die_at in (3, batch_starts[1] + 2, batch_starts[2] + 1, len(keys)):
        killed = tmp_path / f"killed-{die_at}"
        with pytest.raises(KeyboardInterrupt):
            run(killed, KilledAt(flaky_answer, die_at))
        logged = len(calls_view(killed))
        assert logged == die_at - 1
        resumed_backend = ScriptedBackend(flaky_answer)
        resumed = run(killed, resumed_backend)
        assert resumed_backend.calls == reference_backend.calls - logged  # only the missing calls were made
        assert call_keys(killed) == keys                                     # each call logged once, in order
        assert calls_view(killed) == calls_view(straight)
        assert journal_view(killed) == journal_view(straight)              # the same search
        replayed = logged - sum(1 for k in keys[:logged] if k[0] < keys[logged - 1][0])  # calls of the killed batch
        assert resumed["llm"]["replayed_calls"] == replayed > 0
        assert {k: v for k, v in resumed["llm"].items() if k not in ("replayed_calls", "seconds")} == {
            k: v for k, v in reference["llm"].items() if k not in ("replayed_calls", "seconds")}


def test_a_logged_reply_for_another_prompt_is_refused(tmp_path):
    problem = SearchProblem([1] * 4, lambda r: {"fitness": float(np.var(r))})
    settings = RunSettings(budget=6, population=4, seed=0)

    def operator(backend):
        return LLMOperator(backend, SPACE4, log_dir=tmp_path / "llm", n_crossover=1, n_mutation=1, retries=0)

    with pytest.raises(KeyboardInterrupt):
        SearchRunner(tmp_path, SPACE4, problem, operator(KilledAt(good_answer, 3)), settings, progress=False).run()
    lines = (tmp_path / "llm" / "calls.jsonl").read_text().splitlines()
    edited = json.loads(lines[1])
    edited["messages"][-1]["content"] += " (edited)"
    (tmp_path / "llm" / "calls.jsonl").write_text("\n".join([lines[0], json.dumps(edited)]) + "\n")
    with pytest.raises(SelfpruneError, match="holds another prompt for iteration 0, initial slot 1"):
        SearchRunner(tmp_path, SPACE4, problem, operator(ScriptedBackend(good_answer)), settings, progress=False).run()


LLM_KILL_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    from selfprune.llm import make_backend
    from selfprune.search import RunSettings, SearchProblem, SearchRunner, SearchSpace
    from selfprune.search.llm_operator import LLMOperator
    run_dir, base_url = sys.argv[1], sys.argv[2]
    space = SearchSpace([1, 1, 1, 1], 0.3)
    optimum = np.array([0.1, 0.2, 0.4, 0.5])
    problem = SearchProblem(space.layer_params, lambda r: {"fitness": float(np.sum((np.asarray(r) - optimum) ** 2))})
    backend = make_backend("openai:smollm2", base_url=base_url, api_key_env="SELFPRUNE_TEST_KEY", timeout=60)
    op = LLMOperator(backend, space, log_dir=f"{run_dir}/llm", n_crossover=1, n_mutation=1, retries=0, max_tokens=64)
    summary = SearchRunner(run_dir, space, problem, op, RunSettings(budget=5, population=3, seed=1),
                           progress=False).run()
    print(summary["llm"]["calls"], summary["llm"]["replayed_calls"])
""")


def _chat_requests(server) -> int:
    """Chat requests the server answered (a first request may be rejected while the backend finds the
    server's way of enforcing JSON: those answer 500 and are not counted)."""
    return server.log_path.read_text(errors="replace").count('"POST /v1/chat/completions HTTP/1.1" 200')


def test_sigkill_during_llm_batches_against_a_real_server_repeats_no_call(tmp_path, llama_server):
    """A real process talking to the real llama.cpp server is killed (SIGKILL) inside the initial batch and
    again inside an offspring batch; the resumed run makes only the calls that had not returned."""
    script = tmp_path / "llm_search.py"
    script.write_text(LLM_KILL_SCRIPT)
    run = tmp_path / "run"
    calls = run / "llm" / "calls.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO), "SELFPRUNE_TEST_KEY": llama_server.api_key}
    command = [sys.executable, str(script), str(run), llama_server.base_url]
    requests_before = _chat_requests(llama_server)
    kills = 0
    for in_batch in (lambda c: len(c) >= 2,                                   # 2 of the initial slots answered
                     lambda c: any(r["iteration"] == 1 and r["operator"] != "select" for r in c)):
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 240
        while not in_batch(read_jsonl(calls)) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        kills += 1
        batches = {b["iteration"] for b in read_jsonl(run / "proposals.jsonl")}
        iteration = max(r["iteration"] for r in read_jsonl(calls))
        assert iteration not in batches  # killed inside the batch: its proposals were never written
    logged_before_resume = len(read_jsonl(calls))
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    total_calls, replayed = (int(v) for v in done.stdout.split())
    records = read_jsonl(calls)
    keys = [(c["iteration"], c["operator"], c["slot"], c["attempt"]) for c in records]
    assert len(keys) == len(set(keys)) == total_calls  # every call logged once, and counted once
    assert replayed >= 1 and len(read_jsonl(run / "journal.jsonl")) == 5
    assert all(c["response"] is not None and c["prompt_tokens"] > 0 for c in records)
    # The server answered each logged call once, plus at most the one in flight at each kill.
    requests = _chat_requests(llama_server) - requests_before
    assert len(records) <= requests <= len(records) + kills
    assert logged_before_resume < len(records)


# -- prompt version v3: whole percentages under a schema (issue 14, part 2) ------------------------------------

@pytest.mark.parametrize("text,status,rates", [
    ('{"rates": [20, 30, 40, 30]}', "valid", [0.2, 0.3, 0.4, 0.3]),
    ('{"rates": [20, 30, 40, 31]}', "valid", [0.2, 0.3, 0.4, 0.31]),     # as close as whole percentages get
    ('{"rates": [20, 30, 40, 34]}', "repaired", [0.2, 0.3, 0.4, 0.34]),  # mean 31: the repair moves it
    ('{"rates": [20, 90, 0, 10]}', "repaired", [0.2, 0.9, 0.0, 0.1]),    # 90 is above the bound 80
    ('{"rates": [0, 1, 0, 1]}', "repaired", [0.0, 0.01, 0.0, 0.01]),     # whole numbers are percentages
    ('{"rates": [0.2, 0.35, 0.4, 0.25]}', "repaired", [0.2, 0.35, 0.4, 0.25]),  # fractions despite the prompt
    ('{"rates": [20, 456812972, 40, 30]}', "unusable", None),           # what an unenforced range gave
    ('{"rates": [20, -5, 40, 30]}', "unusable", None),
    ('{"rates": [20, 30, 40]}', "unusable", None),
])
def test_percent_replies_are_read_as_percentages(text, status, rates):
    verdict = classify_rates(text, SPACE4, percent=True)
    assert verdict.status == status
    if rates is None:
        assert verdict.rates is None and ("percentage" in verdict.reason or "expected 4" in verdict.reason)
    else:
        assert verdict.rates == pytest.approx(rates)
    if status == "repaired" and "0.35" in text:
        assert "fractions instead of percentages" in verdict.reason


class RecordingBackend(ScriptedBackend):
    """ScriptedBackend that also keeps each call's messages and JSON schema."""

    def __init__(self, answer):
        super().__init__(answer)
        self.requests = []

    def complete(self, messages, *, json_schema=None, **kwargs):
        self.requests.append((messages, json_schema))
        return super().complete(messages, json_schema=json_schema, **kwargs)


def percent_answer(kind, call, seed, messages):
    """Usable v3 answers: whole percentages for rates, known ids for parent picks."""
    if kind == "select":
        return good_answer(kind, call, seed, messages)
    rng = np.random.default_rng(seed)
    return json.dumps({"rates": [int(v) for v in rng.integers(10, 50, 4)]})


def test_v3_asks_for_bounded_whole_percentages_and_known_ids():
    from selfprune.search.llm_operator import DEFAULT_PROMPT_VERSION

    assert DEFAULT_PROMPT_VERSION == "v3"
    backend = RecordingBackend(percent_answer)
    space = SearchSpace([1] * 4, 0.3, (0.05, 0.8))
    op = LLMOperator(backend, space, n_crossover=1, n_mutation=1, retries=0)
    for needle in ("whole number from 5 to 80", "must be 30", "4 decoder layers"):
        assert needle in op.system
    initial = op.initial(2, np.random.default_rng(0), [])
    population = [Member(7, [0.1, 0.2, 0.4, 0.5], 50.0), Member(9, [0.3, 0.3, 0.3, 0.3], 60.0),
                  Member(11, [0.2, 0.2, 0.4, 0.4], 70.0)]
    children = op.offspring(population, np.random.default_rng(1))
    kinds = [m[-1]["content"].split(".")[0] for m, _ in backend.requests]
    assert kinds == ["Initial population", "Initial population", "Parent selection", "Crossover", "Mutation"]
    rates_schema = backend.requests[0][1]["properties"]["rates"]
    assert rates_schema == {"type": "array", "items": {"type": "integer", "minimum": 5, "maximum": 80},
                            "minItems": 4, "maxItems": 4}
    picks = backend.requests[2][1]["properties"]
    assert picks["mutation_parents"]["items"]["enum"] == [7, 9, 11]
    assert picks["crossover_pairs"]["items"]["items"]["enum"] == [7, 9, 11]
    crossover_prompt = backend.requests[3][0][-1]["content"]
    assert "[10, 20, 40, 50]" in crossover_prompt and "[30, 30, 30, 30]" in crossover_prompt
    for proposal in initial + children:
        assert proposal.operator.startswith("llm:") and not proposal.operator.endswith(":fallback")
        assert all(0 <= r <= 1 for r in proposal.rates) and proposal.rates != [0.0] * 4
    assert op.take_counts().get("unusable", 0) == 0


def test_integer_ranges_are_sent_as_enums_only_where_the_grammar_ignores_bounds():
    """llama-cpp-python's server (json_object_schema) enforces enums but not minimum/maximum: bounded integers
    become enums there; the json_schema form (OpenAI, vLLM, llama-server) keeps the standard bounds."""
    from selfprune.llm.backends import _response_format
    from selfprune.search.llm_operator import percent_rates_schema

    schema = percent_rates_schema(SearchSpace([1] * 30, 0.3, (0.0, 0.8)))
    original = json.dumps(schema)
    sent = _response_format("json_object_schema", schema)
    items = sent["schema"]["properties"]["rates"]["items"]
    assert items == {"type": "integer", "enum": list(range(0, 81))}
    assert sent["schema"]["properties"]["rates"]["minItems"] == sent["schema"]["properties"]["rates"]["maxItems"] == 30
    strict = _response_format("json_schema", schema)["json_schema"]["schema"]
    assert strict["properties"]["rates"]["items"] == {"type": "integer", "minimum": 0, "maximum": 80}
    assert json.dumps(schema) == original  # the caller's schema is not changed


@pytest.mark.server
def test_v3_replies_from_the_real_llama_server_are_usable(llama_server, monkeypatch):
    """SmolLM2 on llama.cpp, asked through the schema: every reply is whole percentages within the bounds, one per
    layer (8 layers keep the replies short: grammar-constrained sampling costs ~0.2-1 s per token here)."""
    from selfprune.llm import OpenAICompatibleBackend

    monkeypatch.setenv("SELFPRUNE_TEST_KEY", llama_server.api_key)
    backend = OpenAICompatibleBackend("smollm2", base_url=llama_server.base_url, api_key_env="SELFPRUNE_TEST_KEY")
    space = SearchSpace([1] * 8, 0.3, (0.0, 0.8))
    op = LLMOperator(backend, space, retries=0)
    proposals = op.initial(2, np.random.default_rng(0), [])
    counts = op.take_counts()
    assert backend.format_mode == "json_object_schema"
    assert counts["calls"] == 2 and counts.get("unusable", 0) == 0 and counts.get("fallbacks", 0) == 0
    for proposal in proposals:
        assert proposal.operator == "llm:initial" and len(proposal.rates) == 8
        assert all(0 <= r <= 0.8 and round(100 * r) == pytest.approx(100 * r) for r in proposal.rates)


# -- the ablation: the LLM operator with random replies (issue 14, part 3) -------------------------------------

def test_ablation_sends_the_llm_operators_prompts_and_answers_with_random_valid_candidates(tmp_path):
    from selfprune.search.llm_operator import RandomReplyOperator

    space = SearchSpace([1] * 4, 0.3, (0.0, 0.8))
    problem = SearchProblem([1] * 4, lambda r: {"fitness": float(np.var(r))})
    settings = dict(n_crossover=2, n_mutation=2, retries=1)
    llm_backend = RecordingBackend(percent_answer)
    llm = LLMOperator(llm_backend, space, log_dir=tmp_path / "llm" / "llm", **settings)
    ablation = RandomReplyOperator(space, log_dir=tmp_path / "random" / "llm", **settings)
    assert ablation.system == llm.system
    first_llm = llm.initial(1, np.random.default_rng(0), [])
    first_random = ablation.initial(1, np.random.default_rng(0), [])
    random_calls = read_jsonl(tmp_path / "random" / "llm" / "calls.jsonl")
    assert random_calls[0]["messages"] == llm_backend.requests[0][0]  # the very same prompt
    assert first_random[0].rates != first_llm[0].rates

    summary = SearchRunner(tmp_path / "run", space, problem, RandomReplyOperator(space, log_dir=tmp_path / "run" / "llm",
                                                                                  **settings),
                           RunSettings(budget=12, population=4, seed=0), progress=False).run()
    assert summary["operator"] == "llm-random"
    journal = read_jsonl(tmp_path / "run" / "journal.jsonl")
    assert all(r["operator"].startswith("llm-random:") for r in journal)
    calls = read_jsonl(tmp_path / "run" / "llm" / "calls.jsonl")
    assert len(calls) == summary["llm"]["calls"] and summary["llm"]["unusable"] == 0
    picks = [json.loads(c["response"]) for c in calls if c["operator"] == "select"]
    assert picks and all(len(p["crossover_pairs"]) == 2 and len(p["mutation_parents"]) == 2 for p in picks)
    sources = summary["sources"]
    assert sources["reply"]["evaluations"] + sources.get("fallback", {"evaluations": 0})["evaluations"] == 12
    # a random reply is a feasible candidate up to the rounding to whole percentages
    for c in calls:
        if c["operator"] != "select":
            rates = np.array(json.loads(c["response"])["rates"]) / 100
            assert space.repair(rates).max_abs <= 0.01


def test_summary_counts_the_llms_own_candidates_apart_from_the_fallback(tmp_path):
    """Replies usable only in every other call: the journal, the summary's sources and the printed table agree."""
    from selfprune.search import format_summary

    backend = ScriptedBackend(lambda kind, call, seed, m: percent_answer(kind, call, seed, m) if call % 2 else "no")
    op = LLMOperator(backend, SPACE4, log_dir=tmp_path / "llm", n_crossover=2, n_mutation=2, retries=0)
    problem = SearchProblem([1] * 4, lambda r: {"fitness": float(np.var(r))})
    summary = SearchRunner(tmp_path, SPACE4, problem, op, RunSettings(budget=12, population=4, seed=0),
                           progress=False).run()
    journal = read_jsonl(tmp_path / "journal.jsonl")
    fallback = [r for r in journal if r["operator"].endswith(":fallback")]
    own = [r for r in journal if not r["operator"].endswith(":fallback")]
    assert fallback and own
    sources = summary["sources"]
    assert sources["fallback"]["evaluations"] == len(fallback) and sources["reply"]["evaluations"] == len(own)
    assert sources["reply"]["best_fitness"] == min(r["fitness"] for r in own)
    assert sources["fallback"]["best_fitness"] == min(r["fitness"] for r in fallback)
    assert f"{len(own)} (best " in format_summary(summary)


@pytest.mark.skipif(not (DATA_DIR / "ptb").is_dir(), reason="needs the local ptb / c4 copies")
def test_ablation_search_end_to_end_on_a_tiny_model(tiny_model_dir, tmp_path, capsys):
    """``selfprune search --operator llm-random`` on a real (tiny) model, its report, and a resume that extends it."""
    from selfprune.cli import main
    from selfprune.search.llm_operator import LLMOperator as Operator

    run = tmp_path / "run"
    common = ["--model", str(tiny_model_dir), "--target", "0.3", "--criterion", "magnitude", "--seq-len", "32",
              "--fitness-windows", "4", "--fitness-dataset", "ptb", "--data-dir", str(DATA_DIR), "--device", "cpu",
              "--no-progress"]
    assert main(["search", *common, "--operator", "llm-random", "--budget", "6", "--population", "4",
                 "--offspring", "2", "--out", str(run), "--no-save-model"]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["operator"] == "llm-random" and config["llm"]["spec"] is None and config["seed_population"] == []
    summary = json.loads((run / "summary.json").read_text())
    assert summary["operator"] == "llm-random" and summary["evaluations"] == 6
    journal = read_jsonl(run / "journal.jsonl")
    assert all(r["operator"].startswith("llm-random:") for r in journal)
    calls = read_jsonl(run / "llm" / "calls.jsonl")
    assert len(calls) == summary["llm"]["calls"] >= 6
    space = SearchSpace([1] * 4, 0.3, (0.0, 0.8))  # the tiny model's 4 decoder layers have the same size
    assert calls[0]["messages"][0]["content"] == Operator(None, space).system  # the LLM operator's prompts
    assert sum(s["evaluations"] for s in summary["sources"].values()) == 6
    out = capsys.readouterr().out
    assert "evaluated from replies/fallback" in out

    assert main(["report", str(run)]) == 0
    report = (run / "report" / "report.md").read_text()
    assert "Evaluated candidates by where they came from" in report and "| reply |" in report

    assert main(["search", "--resume", str(run), "--budget", "8", "--no-progress", "--no-save-model"]) == 0
    assert read_jsonl(run / "journal.jsonl")[:6] == journal and len(read_jsonl(run / "journal.jsonl")) == 8


def test_the_llm_destination_is_resolved_once_and_a_resume_keeps_it(monkeypatch, capsys):
    """$OPENAI_BASE_URL decides where an openai: operator's requests go when the run is made; it is recorded,
    and a resume in a shell with another value (or none) keeps sending them there, saying so."""
    from selfprune.search.launch import apply_resume_overrides, build_config

    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:7/v1")
    config = build_config(_parse(["--target", "0.3", "--operator", "llm", "--llm", "openai:x", "--budget", "10"]))
    assert config["llm"]["base_url"] == "http://127.0.0.1:7/v1"
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:8/v1")
    assert not apply_resume_overrides(config, _parse(["--resume", "run"]))
    assert config["llm"]["base_url"] == "http://127.0.0.1:7/v1"
    assert "go to http://127.0.0.1:7/v1" in capsys.readouterr().err
    monkeypatch.delenv("OPENAI_BASE_URL")
    assert not apply_resume_overrides(config, _parse(["--resume", "run"]))
    assert config["llm"]["base_url"] == "http://127.0.0.1:7/v1"
    default = build_config(_parse(["--target", "0.3", "--operator", "llm", "--llm", "openai:x", "--budget", "10"]))
    assert default["llm"]["base_url"] == "https://api.openai.com/v1"
    local = build_config(_parse(["--target", "0.3", "--operator", "llm", "--llm", "self", "--budget", "10"]))
    assert local["llm"]["base_url"] is None
    # a run made before destinations were recorded gets the one its environment gives, recorded on resume
    old = default | {"llm": default["llm"] | {"base_url": None}}
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    assert apply_resume_overrides(old, _parse(["--resume", "run"]))
    assert old["llm"]["base_url"] == "http://127.0.0.1:9/v1"
