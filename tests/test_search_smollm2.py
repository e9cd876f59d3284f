"""A real search on SmolLM2 with a tiny budget, with the LLM operator served by a real llama.cpp server."""
from __future__ import annotations

import json

import pytest

from llama_server import free_port
from selfprune.cli import main

pytestmark = pytest.mark.integration

TINY = ["--target", "0.3", "--fitness-windows", "2", "--calib-samples", "8", "--no-progress", "--device", "cpu"]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_llm_operator_search_against_a_real_server(tmp_path, smol_dir, llama_server, monkeypatch, capsys):
    monkeypatch.setenv("SELFPRUNE_TEST_KEY", llama_server.api_key)
    out = tmp_path / "run"
    code = main(["search", "--model", smol_dir, *TINY, "--operator", "llm", "--llm", "openai:smollm2",
                 "--llm-base-url", llama_server.base_url, "--llm-api-key-env", "SELFPRUNE_TEST_KEY",
                 "--budget", "4", "--population", "2", "--offspring", "2", "--llm-max-tokens", "400",
                 "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    journal = read_jsonl(out / "journal.jsonl")
    assert summary["evaluations"] == len(journal) == 4
    # Every candidate meets the constraint exactly, whatever the small model wrote.
    for record in journal:
        assert abs(sum(record["rates"]) / len(record["rates"]) - 0.3) < 1e-9
        assert all(0 <= r <= 0.8 for r in record["rates"])
    calls = read_jsonl(out / "llm" / "calls.jsonl")
    assert calls, "the LLM operator made no call"
    assert all(c["prompt_tokens"] > 0 and "messages" in c and "response" in c for c in calls)
    llm = summary["llm"]
    assert llm["calls"] == len(calls)
    # Every candidate-producing reply is classified once; parent-selection replies are counted apart.
    candidate_calls = [c for c in calls if c["operator"] != "select"]
    assert llm["valid"] + llm["repaired"] + llm["unusable"] + llm["duplicates"] == len(candidate_calls)
    assert {c["status"] for c in candidate_calls} <= {"valid", "repaired", "unusable", "duplicate"}
    assert summary["best_fitness"] == min(r["fitness"] for r in journal)
    assert (out / "model" / "config.json").is_file()
    assert "best fitness" in printed.out


def test_search_with_the_server_down_says_so_in_one_line(tmp_path, smol_dir, capsys):
    port = free_port()
    code = main(["search", "--model", smol_dir, *TINY, "--operator", "llm", "--llm", "openai:smollm2",
                 "--llm-base-url", f"http://127.0.0.1:{port}/v1", "--llm-timeout", "2", "--budget", "4",
                 "--population", "2", "--offspring", "2", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and "cannot reach the LLM server" in err and str(port) in err
