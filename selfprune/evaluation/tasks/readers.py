"""Readers that turn the local copies of the zero-shot sets into the records of lm-eval's standard datasets.

Each reader is a task's ``custom_dataset``: lm-eval calls it with the task's metadata (the data directory
arrives as ``data_dir`` through the TaskManager's metadata) and gets a ``DatasetDict`` whose rows have the
fields of the hub dataset the standard task reads (``aps/super_glue`` boolq, ``baber/piqa``,
``Rowan/hellaswag``, ``allenai/winogrande``, ``allenai/ai2_arc``, ``allenai/openbookqa``). Converting the
*data* rather than rewriting the prompts keeps the task definitions line for line equal to lm-eval's.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

# Files each task reads, relative to the data directory (the first one is reported as the task's source).
LOCAL_FILES = {
    "boolq": ("boolq/dev.jsonl",),
    "piqa": ("piqa/valid.jsonl", "piqa/valid-labels.lst"),
    "hellaswag": ("hellaswag/hellaswag_val_full.txt",),
    "winogrande": ("winogrande/dev.jsonl",),
    "arc_easy": ("arc_easy/ARC-Easy-Test.jsonl",),
    "arc_challenge": ("arc_challenge/ARC-Challenge-Test.jsonl",),
    "openbookqa": ("openbookqa/test.jsonl",),
}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _paths(task: str, data_dir) -> list[Path]:
    return [Path(data_dir) / name for name in LOCAL_FILES[task]]


def _split(name: str, rows: list[dict]):
    import datasets

    return datasets.DatasetDict({name: datasets.Dataset.from_list(rows)})


# ---------------------------------------------------------------- record converters (local -> hub schema)


def boolq_record(raw: dict, index: int) -> dict:
    """BoolQ dev has ``answer: bool``; SuperGLUE's boolq has the same items with ``label`` 0/1 (1 = yes)."""
    return {"question": raw["question"], "passage": raw["passage"], "idx": index, "label": int(bool(raw["answer"]))}


def piqa_record(raw: dict, label: str) -> dict:
    """PIQA keeps labels in a separate file, one 0/1 a line in item order."""
    return {"goal": raw["goal"], "sol1": raw["sol1"], "sol2": raw["sol2"], "label": int(label)}


def winogrande_record(raw: dict) -> dict:
    """The dev file already has the hub's fields, with ``answer`` "1"/"2" (``dev-labels.lst`` repeats it)."""
    return {"sentence": raw["sentence"], "option1": raw["option1"], "option2": raw["option2"], "answer": str(raw["answer"])}


def arc_record(raw: dict) -> dict:
    """AI2's files nest choices under ``question``; the hub's ai2_arc has flat ``question``/``choices`` columns.

    Labels stay as they are ("A".."E" or "1".."5"): the standard task takes ``choices.label.index(answerKey)``.
    """
    choices = raw["question"]["choices"]
    return {
        "id": raw["id"],
        "question": raw["question"]["stem"],
        "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]},
        "answerKey": raw["answerKey"],
    }


def openbookqa_record(raw: dict) -> dict:
    """Same shape as ARC in AI2's files; the hub's ``main`` config calls the question ``question_stem``."""
    record = arc_record(raw)
    record["question_stem"] = record.pop("question")
    return record


# A HellaSwag context ends with ctx_b, a sentence start that the dataset keeps in lower case ("... roof. he");
# lm-eval capitalises it. The text form joins ctx_a and ctx_b, so ctx_b is taken to be a lower-case tail
# after the last sentence end (or after the activity label), which holds for the ActivityNet items.
_LOWER_TAIL = re.compile(r"^(?P<head>.*[.!?:])\s(?P<tail>[a-z][^.!?]*)$", re.DOTALL)


def hellaswag_record(lines: list[str], index: int) -> dict:
    """One item of the 6-line text form: ``label: context``, gold (0-3), four endings.

    The text is already preprocessed the way lm-eval's ``process_docs`` does it, which makes a second pass a
    no-op, so the only difference left is how ctx_a and ctx_b are split (see ``_LOWER_TAIL``).
    """
    head, gold, *endings = lines
    activity_label, _, ctx = head.partition(": ")
    match = _LOWER_TAIL.match(ctx)
    ctx_a, ctx_b = (match["head"], match["tail"]) if match else (ctx, "")
    return {
        "ind": index,
        "activity_label": activity_label,
        "ctx_a": ctx_a,
        "ctx_b": ctx_b,
        "ctx": f"{ctx_a} {ctx_b}".strip(),
        "endings": endings,
        "source_id": "",
        "split": "val",
        "split_type": "",
        "label": str(int(gold)),
    }


# ---------------------------------------------------------------- custom_dataset entry points


def boolq(data_dir, **_):
    (path,) = _paths("boolq", data_dir)
    return _split("validation", [boolq_record(raw, i) for i, raw in enumerate(_jsonl(path))])


def piqa(data_dir, **_):
    items, labels = _paths("piqa", data_dir)
    raws, golds = _jsonl(items), _lines(labels)
    if len(raws) != len(golds):
        raise ValueError(f"{labels.name} has {len(golds)} labels for the {len(raws)} items of {items.name}")
    return _split("validation", [piqa_record(raw, gold) for raw, gold in zip(raws, golds)])


def hellaswag(data_dir, **_):
    (path,) = _paths("hellaswag", data_dir)
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise ValueError(f"{path} has {len(lines)} lines, not a multiple of 6 (label: context, gold, 4 endings)")
    rows = [hellaswag_record(lines[i : i + 6], i // 6) for i in range(0, len(lines), 6)]
    return _split("validation", rows)


def winogrande(data_dir, **_):
    (path,) = _paths("winogrande", data_dir)
    return _split("validation", [winogrande_record(raw) for raw in _jsonl(path)])


def arc_easy(data_dir, **_):
    (path,) = _paths("arc_easy", data_dir)
    return _split("test", [arc_record(raw) for raw in _jsonl(path)])


def arc_challenge(data_dir, **_):
    (path,) = _paths("arc_challenge", data_dir)
    return _split("test", [arc_record(raw) for raw in _jsonl(path)])


def openbookqa(data_dir, **_):
    (path,) = _paths("openbookqa", data_dir)
    return _split("test", [openbookqa_record(raw) for raw in _jsonl(path)])
