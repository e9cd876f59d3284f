"""LLM backends against a real llama.cpp server and the real SmolLM2, plus lenient JSON parsing.

Nothing is mocked: the HTTP tests talk to llama-cpp-python's OpenAI-compatible server on loopback
(``tests/llama_server.py``), the failure tests to real sockets, the transformers tests to the model.
"""
from __future__ import annotations

import json
import socket
import time

import pytest
import torch

from selfprune.errors import SelfpruneError
from selfprune.llm import (
    ChatBackend,
    OpenAICompatibleBackend,
    TransformersChatBackend,
    extract_json,
    make_backend,
)

from llama_server import free_port  # the llama_server fixture itself is registered in conftest.py

HELLO = [{"role": "user", "content": "Say hello in one short sentence."}]
# A prompt that does not ask for JSON: only an enforced schema can make the reply match.
STORY = [{"role": "user", "content": "Tell me a story about a cat."}]
RATES_SCHEMA = {
    "type": "object",
    "properties": {
        "rates": {"type": "array", "items": {"type": "number", "enum": [0.1, 0.2, 0.3]}, "minItems": 3, "maxItems": 3},
        "verdict": {"type": "string", "enum": ["keep", "prune"]},
    },
    "required": ["rates", "verdict"],
    "additionalProperties": False,
}


@pytest.fixture
def server_backend(llama_server, monkeypatch):
    monkeypatch.setenv("SELFPRUNE_TEST_KEY", llama_server.api_key)
    return OpenAICompatibleBackend("smollm2", base_url=llama_server.base_url, api_key_env="SELFPRUNE_TEST_KEY")


# --- OpenAI-compatible backend against llama.cpp ---------------------------------------------------


@pytest.mark.server
def test_completion_returns_text_and_token_usage(server_backend):
    result = server_backend.complete(HELLO, max_tokens=12, temperature=0)
    assert isinstance(server_backend, ChatBackend)
    assert server_backend.name == "openai:smollm2"
    assert result.text.strip()
    assert result.prompt_tokens > 5  # the chat template alone is several tokens
    assert 0 < result.completion_tokens <= 12
    assert result.seconds > 0
    assert result.structured is False


@pytest.mark.server
def test_json_schema_is_enforced_by_llama_cpp(server_backend):
    # llama-cpp-python rejects the OpenAI "json_schema" form (HTTP 500 naming response_format) but
    # compiles {"type": "json_object", "schema": ...} into a grammar; the backend falls back to that.
    result = server_backend.complete(STORY, json_schema=RATES_SCHEMA, max_tokens=60, temperature=0.8, seed=0)
    assert result.structured is True
    assert server_backend.format_mode == "json_object_schema"  # remembered for later calls
    data = json.loads(result.text)
    assert set(data) == {"rates", "verdict"}
    assert len(data["rates"]) == 3 and all(rate in (0.1, 0.2, 0.3) for rate in data["rates"])
    assert data["verdict"] in ("keep", "prune")


@pytest.mark.server
def test_unknown_model_name_is_served_by_the_loaded_model(llama_server, monkeypatch):
    # llama-cpp-python with one model ignores the requested name (it answers with its only model)
    # and echoes the name back, so a typo in the model name goes unnoticed on this server.
    monkeypatch.setenv("SELFPRUNE_TEST_KEY", llama_server.api_key)
    backend = make_backend("openai:no-such-model", base_url=llama_server.base_url, api_key_env="SELFPRUNE_TEST_KEY")
    result = backend.complete(HELLO, max_tokens=4, temperature=0)
    assert result.text and result.completion_tokens > 0
    assert result.model == "no-such-model"


@pytest.mark.server
def test_base_url_without_v1_fails_at_once_with_a_hint(llama_server, monkeypatch):
    monkeypatch.setenv("SELFPRUNE_TEST_KEY", llama_server.api_key)
    root = llama_server.base_url.removesuffix("/v1")
    backend = OpenAICompatibleBackend("smollm2", base_url=root, api_key_env="SELFPRUNE_TEST_KEY")
    started = time.monotonic()
    with pytest.raises(SelfpruneError, match=r"HTTP 404.*base URL ends in /v1"):
        backend.complete(HELLO, max_tokens=4)
    assert time.monotonic() - started < 5  # a 404 is not retried


@pytest.mark.server
def test_wrong_or_missing_key_fails_at_once_naming_the_variable(llama_server, monkeypatch):
    monkeypatch.setenv("SELFPRUNE_WRONG_KEY", "not-the-key")
    monkeypatch.delenv("SELFPRUNE_UNSET_KEY", raising=False)
    wrong = OpenAICompatibleBackend("smollm2", base_url=llama_server.base_url, api_key_env="SELFPRUNE_WRONG_KEY")
    with pytest.raises(SelfpruneError, match=r"rejected the API key from \$SELFPRUNE_WRONG_KEY \(HTTP 401\)"):
        wrong.complete(HELLO, max_tokens=4)
    # On loopback a missing key is fine until the server asks for one.
    unset = OpenAICompatibleBackend("smollm2", base_url=llama_server.base_url, api_key_env="SELFPRUNE_UNSET_KEY")
    with pytest.raises(SelfpruneError, match=r"needs an API key \(HTTP 401\): export SELFPRUNE_UNSET_KEY"):
        unset.complete(HELLO, max_tokens=4)


@pytest.mark.server
def test_oversized_prompt_is_reported_with_the_servers_reason(server_backend):
    too_long = [{"role": "user", "content": "word " * 3000}]  # n_ctx is 2048
    with pytest.raises(SelfpruneError, match=r"rejected the request \(HTTP 400\).*context"):
        server_backend.complete(too_long, max_tokens=4)


# --- failures that need no server -----------------------------------------------------------------


def test_unreachable_server_fails_quickly_after_bounded_retries():
    base_url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    backend = OpenAICompatibleBackend("m", base_url=base_url, timeout=2, max_retries=2)
    backend.retry_base_delay = 0.05
    started = time.monotonic()
    with pytest.raises(SelfpruneError) as caught:
        backend.complete(HELLO)
    message = str(caught.value)
    assert f"cannot reach the LLM server at {base_url} (connection refused, 3 tries)" in message
    assert "--llm-base-url" in message and "\n" not in message
    assert time.monotonic() - started < 5


def test_silent_server_times_out_and_says_so():
    # A socket that accepts connections (kernel backlog) but never answers.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        base_url = f"http://127.0.0.1:{silent.getsockname()[1]}/v1"
        backend = OpenAICompatibleBackend("m", base_url=base_url, timeout=0.3, max_retries=1)
        backend.retry_base_delay = 0.05
        started = time.monotonic()
        with pytest.raises(SelfpruneError, match=r"did not answer within 0.3 s \(2 tries\)"):
            backend.complete(HELLO)
        assert time.monotonic() - started < 5


def test_missing_openai_key_for_the_real_host_names_the_variable(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(SelfpruneError, match=r"OPENAI_API_KEY is not set: export OPENAI_API_KEY="):
        make_backend("openai:gpt-4o")


@pytest.mark.parametrize("spec", ["", "gpt-4o", "openai:", "local:", "anthropic:claude", "SELF"])
def test_bad_spec_lists_the_accepted_forms(spec):
    with pytest.raises(SelfpruneError, match=r"unknown --llm .*openai:<model>.*self.*local:"):
        make_backend(spec)


def test_self_without_a_model_is_an_error():
    with pytest.raises(SelfpruneError, match="--llm self needs the model being pruned"):
        make_backend("self")


# --- lenient JSON extraction ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ('{"rates": [0.1, 0.2]}', {"rates": [0.1, 0.2]}),
        ('Sure! Here it is:\n```json\n{"rates": [0.1, 0.2]}\n```\nHope this helps.', {"rates": [0.1, 0.2]}),
        ("```\n[0.5, 0.25]\n```", [0.5, 0.25]),
        ('The new rates are {"rates": [0.1, 0.2]} as requested.', {"rates": [0.1, 0.2]}),
        ('{"rates": [0.1, 0.2,], "ok": true,}', {"rates": [0.1, 0.2], "ok": True}),
        ("{'rates': [0.1, 0.2], 'note': 'fine'}", {"rates": [0.1, 0.2], "note": "fine"}),
        ("{rates: [0.1], done: True, why: None}", {"rates": [0.1], "done": True, "why": None}),
        ('{"note": "it\'s {fine}", "x": 1}', {"note": "it's {fine}", "x": 1}),
        ('I think {x} works; final answer: {"x": 2}', {"x": 2}),
        ('<think>maybe {"x": 0}?</think>{"x": 3}', {"x": 3}),
        ('[1, 2] then {"a": 1}', [1, 2]),
    ],
)
def test_extract_json_recovers_usable_answers(text, expected):
    assert extract_json(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "no json here at all",
        '{"rates": [0.1, 0.2], "note": ',  # truncated: the inner list must not be returned
        '```json\n{"rates": [0.1, 0.2\n```',
        '{"a": [1, 2}',  # mismatched brackets
        "{'a': 'don't'}",  # an apostrophe inside single quotes cannot be repaired safely
    ],
)
def test_extract_json_returns_none_when_nothing_parses(text):
    assert extract_json(text) is None


# --- transformers backend with the real SmolLM2 ---------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    """The default model, run on one thread: on a shared 2-core machine two torch threads that
    compete with other processes generate several times slower than one."""
    from selfprune.models import load_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield load_model("default")
    finally:
        torch.set_num_threads(threads)


@pytest.mark.integration
def test_self_backend_generates_with_exact_token_counts(smollm2):
    model, tokenizer = smollm2
    backend = make_backend("self", self_model=model, self_tokenizer=tokenizer)
    assert isinstance(backend, ChatBackend) and backend.name == "self"
    result = backend.complete(HELLO, json_schema=RATES_SCHEMA, max_tokens=8, temperature=0)
    assert result.text.strip()
    assert result.structured is False  # no constrained decoding here
    prompt_ids = tokenizer.apply_chat_template(HELLO, add_generation_prompt=True, return_dict=False)
    assert result.prompt_tokens == len(prompt_ids)
    assert 0 < result.completion_tokens <= 8
    # Decoding drops special tokens (an end-of-turn token), so re-encoding may give one fewer.
    reencoded = len(tokenizer(result.text, add_special_tokens=False)["input_ids"])
    assert result.completion_tokens - 1 <= reencoded <= result.completion_tokens
    assert backend.complete(HELLO, max_tokens=8, temperature=0).text == result.text  # greedy is deterministic


@pytest.mark.integration
def test_seeded_sampling_repeats_and_leaves_the_global_rng_alone(smollm2):
    model, tokenizer = smollm2
    backend = TransformersChatBackend(model, tokenizer, name="local:default")
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = backend.complete(STORY, max_tokens=6, temperature=1.0, seed=7)
    second = backend.complete(STORY, max_tokens=6, temperature=1.0, seed=7)
    assert first.text == second.text and first.text.strip()
    assert torch.equal(torch.rand(1), expected_next)


@pytest.mark.integration
def test_model_without_chat_template_cannot_be_self(smollm2):
    model, tokenizer = smollm2
    saved = tokenizer.chat_template
    tokenizer.chat_template = None
    try:
        with pytest.raises(SelfpruneError, match="has no chat template"):
            make_backend("self", self_model=model, self_tokenizer=tokenizer)
    finally:
        tokenizer.chat_template = saved


@pytest.mark.integration
def test_self_backend_reuses_the_prompt_prefix_it_shares_with_the_last_call(smollm2):
    """Like llama.cpp's server: a prompt that starts like the previous one only computes its new tokens, and
    the reply is the one a backend without the cache gives."""
    model, tokenizer = smollm2
    system = {"role": "system", "content": "You list numbers. " * 20}
    first = [system, {"role": "user", "content": "Candidates so far:\n[0.1, 0.2]\n\nPropose one more."}]
    second = [system, {"role": "user", "content": "Candidates so far:\n[0.1, 0.2]\n[0.3, 0.4]\n\nPropose one more."}]
    ids = [tokenizer.apply_chat_template(m, add_generation_prompt=True, return_dict=False) for m in (first, second)]
    shared = next(i for i, (a, b) in enumerate(zip(*ids)) if a != b)
    assert shared > 100  # the system prompt and the first candidate

    cached = TransformersChatBackend(model, tokenizer, name="self")
    cached.complete(first, max_tokens=4, temperature=0)
    assert cached.reused_tokens == 0
    reply = cached.complete(second, max_tokens=6, temperature=0)
    assert cached.reused_tokens >= shared
    fresh = TransformersChatBackend(model, tokenizer, name="self", prefix_cache=False)
    assert reply.text == fresh.complete(second, max_tokens=6, temperature=0).text
    assert reply.prompt_tokens == len(ids[1])  # usage still counts the whole prompt
    assert fresh.reused_tokens == 0
