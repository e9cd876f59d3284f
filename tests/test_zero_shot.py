"""Zero-shot evaluation: local tasks build lm-eval's standard requests, evaluation runs end to end, bad input fails clearly.

Uses the shared data (``SELFPRUNE_DATA_DIR``, set by conftest.py) and a tiny random-weight LLaMA with a
byte-level tokenizer, so nothing is downloaded.
"""
from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import pytest

from selfprune.errors import SelfpruneError
from selfprune.cli import build_parser
from selfprune.evaluation import REPORTED_METRIC, TASKS, evaluate_zero_shot, format_table
from selfprune.evaluation.tasks import TASKS_DIR
from selfprune.evaluation.tasks.readers import LOCAL_FILES

DATA_DIR = Path(os.environ.get("SELFPRUNE_DATA_DIR", "no-data-dir-set"))
needs_data = pytest.mark.skipif(not (DATA_DIR / "boolq" / "dev.jsonl").is_file(), reason=f"no task data in {DATA_DIR}")

# lm-eval's standard task definitions, by path inside the installed package.
STANDARD_YAML = {
    "boolq": "super_glue/boolq/default.yaml",
    "piqa": "piqa/piqa.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "winogrande": "winogrande/default.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
}


def _jsonl_first(path: Path, where=lambda record: True) -> tuple[str, dict]:
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip() and where(json.loads(line)):
                return line, json.loads(line)
    raise AssertionError(f"no matching record in {path}")


def _arc_hub(raw: dict, stem_field: str) -> dict:
    choices = raw["question"]["choices"]
    return {
        "id": raw["id"],
        stem_field: raw["question"]["stem"],
        "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]},
        "answerKey": raw["answerKey"],
    }


def real_record(case: str) -> tuple[dict[str, str], dict]:
    """One real item of a task: its local file contents (relative path -> text) and the same item as the hub has it.

    The hub records are written out here independently of the package's readers, from the hub datasets' schemas.
    """
    if case == "boolq":
        line, raw = _jsonl_first(DATA_DIR / "boolq/dev.jsonl")
        assert raw["answer"] is False  # the first dev item; SuperGLUE has label 0 ("no") for it
        return {"boolq/dev.jsonl": line}, {"question": raw["question"], "passage": raw["passage"], "idx": 0, "label": 0}
    if case == "piqa":
        line, raw = _jsonl_first(DATA_DIR / "piqa/valid.jsonl")
        local = {"piqa/valid.jsonl": line, "piqa/valid-labels.lst": "0\n"}
        return local, {"goal": raw["goal"], "sol1": raw["sol1"], "sol2": raw["sol2"], "label": 0}
    if case == "hellaswag":
        with open(DATA_DIR / "hellaswag/hellaswag_val_full.txt", encoding="utf-8") as handle:
            lines = "".join(itertools.islice(handle, 6))
        # Rowan/hellaswag validation[0] (the fields lm-eval reads), which keeps ctx_b in lower case; lm-eval
        # capitalises it, and the local reader has to recover that split from the joined text.
        hub = {
            "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
            "label": "3",
            "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                        "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
        }  # fmt: skip
        return {"hellaswag/hellaswag_val_full.txt": lines}, hub
    if case == "winogrande":
        line, raw = _jsonl_first(DATA_DIR / "winogrande/dev.jsonl")
        return {"winogrande/dev.jsonl": line}, {k: raw[k] for k in ("sentence", "option1", "option2", "answer")}
    if case in ("arc_easy", "arc_challenge"):
        rel = LOCAL_FILES[case][0]
        line, raw = _jsonl_first(DATA_DIR / rel)
        return {rel: line}, _arc_hub(raw, "question")
    if case == "arc_easy_numeric_labels":
        rel = LOCAL_FILES["arc_easy"][0]
        line, raw = _jsonl_first(DATA_DIR / rel, lambda r: r["answerKey"].isdigit())
        return {rel: line}, _arc_hub(raw, "question")
    if case == "openbookqa":
        line, raw = _jsonl_first(DATA_DIR / "openbookqa/test.jsonl")
        return {"openbookqa/test.jsonl": line}, _arc_hub(raw, "question_stem")
    raise AssertionError(case)


def _requests(task) -> tuple[list[tuple], object]:
    task.set_config(key="num_fewshot", value=0)
    task.build_all_requests(limit=1)
    return [tuple(instance.args) for instance in task.instances], task.doc_to_target(task.eval_docs[0])


@needs_data
@pytest.mark.parametrize("case", [*TASKS, "arc_easy_numeric_labels"])
def test_local_task_builds_the_standard_requests(case, tmp_path):
    """Same record: our local task (from the local file) and lm-eval's standard task (from the hub record) agree."""
    import datasets
    from lm_eval import tasks as lm_eval_tasks
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    name = case.removesuffix("_numeric_labels")
    files, hub_record = real_record(case)
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text, encoding="utf-8")
    local_manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata={"data_dir": str(tmp_path)})
    (local,) = local_manager.load([name])["tasks"].values()

    # The standard task, unchanged but for reading the one hub record instead of downloading its dataset.
    standard_config = load_yaml(Path(lm_eval_tasks.__file__).parent / STANDARD_YAML[name], resolve_func=True)
    splits = {standard_config.get(k) for k in ("training_split", "validation_split", "test_split")} - {None}
    standard_config["custom_dataset"] = lambda **_: datasets.DatasetDict(
        {split: datasets.Dataset.from_list([hub_record]) for split in splits}
    )
    (standard,) = TaskManager(include_defaults=False).load([standard_config])["tasks"].values()

    local_requests, local_target = _requests(local)
    standard_requests, standard_target = _requests(standard)
    assert local_requests == standard_requests
    assert local_target == standard_target
    assert set(local.aggregation()) == set(standard.aggregation())
    assert REPORTED_METRIC[name] in local.aggregation()
    assert len(local_requests) == len(local.doc_to_choice(local.eval_docs[0]))


def byte_tokenizer():
    """A byte-level tokenizer (256 symbols + eos) that encodes any text without a download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {symbol: i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["</s>"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", bos_token="</s>", pad_token="</s>")


@pytest.fixture(scope="module")
def tiny_model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval(), tokenizer


@needs_data
def test_evaluate_zero_shot_on_a_tiny_model(tiny_model):
    model, tokenizer = tiny_model
    results = evaluate_zero_shot(model, tokenizer, "piqa,winogrande", limit=10, data_dir=DATA_DIR, batch_size=8)
    assert list(results["tasks"]) == ["piqa", "winogrande"]
    for name, row in results["tasks"].items():
        assert row["metric"] == REPORTED_METRIC[name]
        assert 0.0 <= row["value"] <= 1.0 and row["n"] == 10
        assert row["stderr"] is not None and row["stderr"] >= 0
        assert row["source"] == f"local:{DATA_DIR / LOCAL_FILES[name][0]}"
    assert results["average"] == pytest.approx(sum(r["value"] for r in results["tasks"].values()) / 2)
    assert results["limit"] == 10 and results["seed"] == 0 and results["lm_eval_version"]
    assert results["settings"]["source"] == "local"
    json.dumps(results)  # JSON-serialisable as is
    table = format_table(results)
    assert "| piqa | acc_norm |" in table and "| winogrande | acc |" in table
    assert "average" in table and "first 10 items" in table


def test_reported_metrics_follow_the_papers():
    assert set(REPORTED_METRIC) == set(TASKS)
    assert {t for t, m in REPORTED_METRIC.items() if m == "acc"} == {"boolq", "winogrande"}
    assert set(REPORTED_METRIC.values()) == {"acc", "acc_norm"}


def test_unknown_task_lists_the_known_ones(tiny_model):
    with pytest.raises(SelfpruneError) as error:
        evaluate_zero_shot(*tiny_model, "piqa,mmlu", data_dir=DATA_DIR if DATA_DIR.is_dir() else None)
    message = str(error.value)
    assert "'mmlu'" in message and "\n" not in message
    assert all(task in message for task in TASKS)


def test_missing_local_file_is_named(tiny_model, tmp_path):
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "valid.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\n')
    with pytest.raises(SelfpruneError, match=r"missing data file .*valid-labels\.lst for task piqa"):
        evaluate_zero_shot(*tiny_model, ["piqa"], data_dir=tmp_path, source="local")


def test_inconsistent_local_file_fails_in_one_line(tiny_model, tmp_path):
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "valid.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\n')
    (tmp_path / "piqa" / "valid-labels.lst").write_text("0\n1\n")
    with pytest.raises(SelfpruneError, match=r"could not read the local data for task piqa .*has 2 labels") as error:
        evaluate_zero_shot(*tiny_model, ["piqa"], data_dir=tmp_path, source="local")
    assert "\n" not in str(error.value)


def test_local_source_needs_a_data_dir(tiny_model, monkeypatch):
    monkeypatch.delenv("SELFPRUNE_DATA_DIR", raising=False)
    with pytest.raises(SelfpruneError, match="needs a data directory"):
        evaluate_zero_shot(*tiny_model, "boolq", source="local")


def test_eval_subcommand_rejects_bad_tasks_before_loading_a_model(tmp_path):
    args = build_parser().parse_args(["eval", "--model", str(tmp_path), "--tasks", "boolq,nope", "--data-dir", str(tmp_path)])
    assert args.limit is None and args.source == "auto" and args.batch_size == 8
    with pytest.raises(SelfpruneError, match="unknown task 'nope': choose from boolq, piqa"):
        args.func(args)
