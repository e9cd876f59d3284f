"""Lenient JSON extraction from LLM replies.

Servers that cannot enforce a JSON schema (and small local models in particular) wrap their JSON in
prose or Markdown fences, leave trailing commas, write Python-style dicts or stop mid-object when they
hit the token limit. The search must still read every usable answer, and must never mistake a
fragment of a truncated answer for a whole one: a truncated object yields ``None``, not its inner
list.
"""
from __future__ import annotations

import json
import re
from typing import Iterator

_FENCE = re.compile(r"```[ \t]*(?:json5?|JSON)?[ \t]*\n?(.*?)```", re.DOTALL)
# Reasoning models (DeepSeek-R1, Qwen3, ...) may put their thoughts, braces and all, in the reply.
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_PY_LITERALS = {"True": "true", "False": "false", "None": "null"}
_OPENERS = {"{": "}", "[": "]"}


def extract_json(text: str) -> object | None:
    """Return the first JSON value found in ``text``, or ``None`` when nothing parses.

    Tried in order: the whole text; each ```json fenced block; the first balanced ``{...}`` or
    ``[...]`` that parses (after repairs for trailing commas, single-quoted strings, bare keys and
    Python's True/False/None).
    """
    if not isinstance(text, str):
        return None
    text = _THINK.sub("", text).strip()
    if not text:
        return None
    found = _loads(text)
    if found is not _MISSING:
        return found
    for block in _FENCE.findall(text):
        found = _first_object(block)
        if found is not _MISSING:
            return found
    found = _first_object(text)
    return None if found is _MISSING else found


_MISSING = object()


def _loads(candidate: str) -> object:
    """``json.loads``, then once more after repairs; ``_MISSING`` when neither works."""
    for attempt in (candidate, _repair(candidate)):
        try:
            return json.loads(attempt)
        except (json.JSONDecodeError, ValueError):
            continue
    return _MISSING


def _first_object(text: str) -> object:
    """The first balanced ``{...}``/``[...]`` span of ``text`` that parses.

    Scanning stops at the first opener that never closes: the reply was cut off, and any object
    nested inside it would be a misleading fragment.
    """
    for start, end in _balanced_spans(text):
        if end is None:
            return _MISSING
        found = _loads(text[start:end])
        if found is not _MISSING:
            return found
    return _MISSING


def _balanced_spans(text: str) -> Iterator[tuple[int, int | None]]:
    """Yield ``(start, end)`` for each opener in ``text``; ``end`` is ``None`` if it never closes."""
    start = _next_opener(text, 0)
    while start != -1:
        yield start, _matching_end(text, start)
        start = _next_opener(text, start + 1)


def _next_opener(text: str, pos: int) -> int:
    hits = [i for i in (text.find("{", pos), text.find("[", pos)) if i != -1]
    return min(hits) if hits else -1


def _matching_end(text: str, start: int) -> int | None:
    """Index one past the bracket closing ``text[start]``, skipping brackets inside strings."""
    stack = []
    in_string = False
    i = start
    while i < len(text):
        ch = text[i]
        if in_string:
            if ch == "\\":
                i += 1
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in _OPENERS:
            stack.append(_OPENERS[ch])
        elif ch in "}]":
            if not stack or stack.pop() != ch:
                return None  # mismatched brackets: not JSON we can trust
            if not stack:
                return i + 1
        i += 1
    return None


def _repair(text: str) -> str:
    """Rewrite common near-JSON into JSON, touching nothing inside double-quoted strings.

    Handles single-quoted strings, trailing commas before ``}``/``]``, bare identifier keys and
    Python's ``True``/``False``/``None``. An apostrophe inside a single-quoted string still breaks
    the result, which then simply fails to parse (safer than guessing).
    """
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == '"':
            end = _string_end(text, i, '"')
            out.append(text[i:end])
            i = end
        elif ch == "'":
            end = _string_end(text, i, "'")
            body = text[i + 1 : end - 1].replace("\\'", "'")
            out.append(json.dumps(body))
            i = end
        elif ch == ",":
            j = i + 1
            while j < n and text[j].isspace():
                j += 1
            if j < n and text[j] in "}]":
                i += 1  # trailing comma
            else:
                out.append(ch)
                i += 1
        elif ch.isalpha() or ch == "_":
            j = i
            while j < n and (text[j].isalnum() or text[j] == "_"):
                j += 1
            word = text[i:j]
            k = j
            while k < n and text[k].isspace():
                k += 1
            previous = next((piece.rstrip()[-1:] for piece in reversed(out) if piece.strip()), "")
            if k < n and text[k] == ":" and previous in ("{", ","):
                out.append(json.dumps(word))  # bare key
            else:
                out.append(_PY_LITERALS.get(word, word))
            i = j
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _string_end(text: str, start: int, quote: str) -> int:
    """Index one past the quote closing the string that opens at ``start`` (or the text's end)."""
    i = start + 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == quote:
            return i + 1
        i += 1
    return len(text)
