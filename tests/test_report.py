"""The run report, built from real search runs on a tiny random Llama.

The run folders are written by the search's own code (config from ``build_config``, ``SearchRunner`` with
the real ``Pruner`` and a perplexity fitness on a local text file, the best model saved by
``save_pruned``); ``ppl.json`` and ``speed.json`` come from the ``selfprune ppl`` / ``speed`` commands.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import byte_tokenizer
from selfprune.cli import main
from selfprune.errors import SelfpruneError
from selfprune.evaluation.report import build_report
from selfprune.io import atomic_write_json, read_jsonl
from selfprune.evaluation.perplexity import PerplexityEvaluator
from selfprune.pruned_format import save_pruned
from selfprune.pruning import Pruner
from selfprune.search import Proposal, RunSettings, SearchProblem, SearchRunner, SearchSpace
from selfprune.cli import build_parser
from selfprune.search.launch import build_config, build_operator
from selfprune.search.runner import create_run_dir

torch.set_num_threads(1)
PNG = b"\x89PNG\r\n\x1a\n"
TEXT = ("The quick brown fox jumps over the lazy dog. Pruning removes whole heads and channels. " * 40)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 4-layer Llama (GQA) saved with its tokenizer, plus a small text file to score it on."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny")
    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         eos_token_id=len(tokenizer) - 1, pad_token_id=len(tokenizer) - 1)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder / "dense")
    tokenizer.save_pretrained(folder / "dense")
    (folder / "text.txt").write_text(TEXT)
    return {"model": model, "tokenizer": tokenizer, "dir": folder / "dense", "text": folder / "text.txt"}


def run_search(tiny, run_dir: Path, operator: str, budget: int, backend=None, extra=(), rescore_top=0) -> dict:
    """A real search run on the tiny model, laid out on disk exactly as ``selfprune search`` does."""
    args = build_parser().parse_args(["search", "--model", str(tiny["dir"]), "--target", "0.3", "--criterion", "magnitude",
                              "--operator", operator, "--budget", str(budget), "--population", "4",
                              "--offspring", "2", "--seq-len", "32", "--fitness-windows", "4",
                              "--fitness-dataset", "ptb", "--out", str(run_dir), *extra])
    config = build_config(args)
    config["fitness"]["dataset"] = str(tiny["text"])  # what the fitness below really scores
    create_run_dir(run_dir, config)
    pruner = Pruner(tiny["model"], tiny["tokenizer"], criterion="magnitude", progress=False)
    evaluator = PerplexityEvaluator(tiny["tokenizer"], str(tiny["text"]), "test", 32, 4, 8)

    def fitness(rates):
        result = evaluator(pruner.build(rates)[0])
        return {"fitness": result["ppl"], "tokens": result["tokens"], "seconds": result["seconds"]}

    def finalize(rates, directory):
        pruned, report = pruner.build(rates)
        save_pruned(pruned, tiny["tokenizer"], Path(directory) / "model", overwrite=True)
        return {"path": str(Path(directory) / "model"), "achieved_rate": report.achieved_rate}

    finer = PerplexityEvaluator(tiny["tokenizer"], str(tiny["text"]), "test", 32, 8, 8)

    def rescore(rates):
        result = finer(pruner.build(rates)[0])
        return {"fitness": result["ppl"], "tokens": result["tokens"]}

    space = SearchSpace(pruner.layer_params, config["target"], config["bounds"])
    problem = SearchProblem(pruner.layer_params, fitness, achieved=pruner.achieved, finalize=finalize,
                            rescore=rescore)
    op = build_operator(config, space, problem, run_dir, backend)
    seeds = [] if operator == "llm" else [Proposal(space.uniform(), "seed:uniform")]
    settings = RunSettings(budget, config["population"], config["seed"], rescore_top=rescore_top)
    return SearchRunner(run_dir, space, problem, op, settings, seeds=seeds, progress=False).run()


def test_report_of_an_evolution_run_with_ppl_and_speed(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    summary = run_search(tiny, run, "evolution", budget=7, rescore_top=3)
    assert summary["evaluations"] == 7 and (run / "model" / "config.json").is_file()
    assert len(summary["rescore"]["candidates"]) == 3
    # results measured afterwards, saved in the run folder under the documented names
    assert main(["ppl", "--model", str(run / "model"), "--dataset", str(tiny["text"]), "--seq-len", "32",
                 "--out", str(run / "ppl.json")]) == 0
    threads = torch.get_num_threads()
    assert main(["speed", "--model", str(run / "model"), "--baseline", str(tiny["dir"]), "--sweep", "1x16",
                 "--decode-tokens", "2", "--prompt-len", "4", "--repeats", "1", "--warmup", "0",
                 "--out", str(run / "speed.json")]) == 0
    torch.set_num_threads(threads)
    capsys.readouterr()

    assert main(["report", str(run)]) == 0
    out = run / "report"
    assert "report.md" in capsys.readouterr().out
    for png in ("rates.png", "fitness.png"):
        assert (out / png).read_bytes().startswith(PNG) and (out / png).stat().st_size > 5000
    text = (out / "report.md").read_text()
    assert f"{summary['best_fitness']:.6g}" in text and f"eval #{summary['best_index']}" in text
    assert "| candidates scored | in this process |" in text  # the runner's pool: where candidates were scored
    rescored = summary["rescore"]
    assert (f"top 3: best {rescored['best_rescored_fitness']:.6g} (cheap winner was eval "
            f"#{rescored['cheapest_winner_index']})") in text
    assert "![per-layer rates](rates.png)" in text and "![fitness over evaluations](fitness.png)" in text
    best = json.loads((run / "best.json").read_text())
    assert all(f"| {i} | {r:.4f} |" in text for i, r in enumerate(best["rates"]))  # the per-layer table
    assert "| seed:uniform | 1 |" in text and "evolution:" in text  # the per-operator table
    ppl = json.loads((run / "ppl.json").read_text())
    assert f"{ppl['ppl']:.5g}" in text
    speed = json.loads((run / "speed.json").read_text())
    assert f"{speed['prefill'][0]['ideal_ratio']:.3f}" in text and "prefill 1x16 (ms)" in text
    assert "No `eval*.json` in the run folder" in text and "no LLM operator" in text
    assert '"criterion": "magnitude"' in text and '"budget": 7' in text  # the exact settings

    # --out elsewhere: the same report, other folder
    assert build_report(run, tmp_path / "elsewhere") == tmp_path / "elsewhere" / "report.md"
    assert (tmp_path / "elsewhere" / "fitness.png").is_file()


def test_report_counts_the_llm_operators_answers(tiny, tmp_path):
    """The LLM operator run on the tiny model itself (``--llm self``): its answers are garbage, so every slot
    is logged as unusable and filled by the numeric fallback, and the report says so."""
    from selfprune.llm import make_backend

    backend = make_backend("self", self_model=tiny["model"], self_tokenizer=tiny["tokenizer"])
    run = tmp_path / "llm-run"
    summary = run_search(tiny, run, "llm", budget=4, backend=backend,
                         extra=["--llm", "self", "--llm-retries", "0", "--llm-max-tokens", "8"])
    calls = read_jsonl(run / "llm" / "calls.jsonl")
    report = build_report(run)
    text = report.read_text()
    section = text.split("## LLM operator")[1].split("##")[0]
    assert f"| calls | {summary['llm']['calls']} |" in section
    assert f"| fallbacks | {summary['llm']['fallbacks']} |" in section
    statuses = {c["status"] for c in calls}
    assert all(s in section for s in statuses) and f"| {len(calls)} |" in section
    assert f"{summary['best_fitness']:.6g}" in text


def test_a_folder_that_is_not_a_run_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(SelfpruneError, match="not a search run directory"):
        build_report(tmp_path)
    with pytest.raises(SelfpruneError, match="is not a folder"):
        build_report(tmp_path / "missing")
    atomic_write_json(tmp_path / "config.json", {"operator": "evolution"})
    (tmp_path / "journal.jsonl").write_text("")
    with pytest.raises(SelfpruneError, match="no evaluation yet"):
        build_report(tmp_path)
    assert main(["report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("selfprune report: error:") and "\n" not in err
