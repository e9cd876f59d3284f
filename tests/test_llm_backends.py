"""LLM backends against a real llama.cpp server and the real SmolLM2, plus lenient JSON parsing.

Nothing is mocked: the HTTP tests talk to llama-cpp-python's OpenAI-compatible server on loopback
(``tests/llama_server.py``), the failure tests to real sockets, the transformers tests to the model.
"""
from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from selfprune.errors import SelfpruneError
from selfprune.llm import (
    ChatBackend,
    OpenAICompatibleBackend,
    TransformersChatBackend,
    backends,
    extract_json,
    make_backend,
    preflight_backend,
    redact_url,
)

from llama_server import default_gguf, free_port  # the llama_server fixture itself is registered in conftest.py

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


SECRET = "sk-secret-0123456789"


@pytest.fixture(autouse=True)
def fresh_server_memory(monkeypatch):
    """Which servers answered before decides whether failures are retried: start each test knowing none."""
    monkeypatch.setattr(backends, "_ANSWERED", set())


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
    monkeypatch.setenv("OPENAI_API_KEY", llama_server.api_key)  # the right key, but only OpenAI gets this one
    wrong = OpenAICompatibleBackend("smollm2", base_url=llama_server.base_url, api_key_env="SELFPRUNE_WRONG_KEY")
    with pytest.raises(SelfpruneError, match=r"rejected the API key from \$SELFPRUNE_WRONG_KEY \(HTTP 401\)"):
        wrong.complete(HELLO, max_tokens=4)
    # A variable the caller named but did not set is an error before any request.
    with pytest.raises(SelfpruneError, match=r"^SELFPRUNE_UNSET_KEY is not set: export SELFPRUNE_UNSET_KEY=<key>"):
        OpenAICompatibleBackend("smollm2", base_url=llama_server.base_url, api_key_env="SELFPRUNE_UNSET_KEY")
    # No variable named: nothing is sent, and the server's 401 says how to name one.
    unnamed = OpenAICompatibleBackend("smollm2", base_url=llama_server.base_url)
    with pytest.raises(SelfpruneError, match=r"needs an API key \(HTTP 401\): name the variable that holds it "
                                             r"with api_key_env= \(OPENAI_API_KEY is sent to api.openai.com only\)"):
        unnamed.complete(HELLO, max_tokens=4)


@pytest.mark.server
def test_oversized_prompt_is_reported_with_the_servers_reason(server_backend):
    too_long = [{"role": "user", "content": "word " * 3000}]  # n_ctx is 2048
    with pytest.raises(SelfpruneError, match=r"rejected the request \(HTTP 400\).*context"):
        server_backend.complete(too_long, max_tokens=4)


# --- failures that need no server -----------------------------------------------------------------


def test_unreachable_server_fails_after_one_try_within_a_second():
    base_url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    backend = OpenAICompatibleBackend("m", base_url=base_url, timeout=2, max_retries=3)
    started = time.monotonic()
    with pytest.raises(SelfpruneError) as caught:
        backend.complete(HELLO)
    message = str(caught.value)
    assert f"cannot reach the LLM server at {base_url} (connection refused, 1 try): start it or fix base_url" in message
    assert "--" not in message and "\n" not in message  # the Python API names its own arguments
    assert time.monotonic() - started < 1.5  # no retries for a server that never answered


@contextlib.contextmanager
def raises_on_the_command_line(pattern: str):
    """The error as the CLI prints it (flags, not Python argument names) must match ``pattern``."""
    with pytest.raises(SelfpruneError) as caught:
        yield caught
    assert re.search(pattern, caught.value.cli_message()), caught.value.cli_message()


def test_silent_server_that_never_answered_times_out_once():
    # A socket that accepts connections (kernel backlog) but never answers.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        base_url = f"http://127.0.0.1:{silent.getsockname()[1]}/v1"
        backend = OpenAICompatibleBackend("m", base_url=base_url, timeout=0.3, max_retries=3)
        started = time.monotonic()
        with raises_on_the_command_line(r"did not answer within 0.3 s \(1 try\).*raise --llm-timeout$"):
            backend.complete(HELLO)
        assert time.monotonic() - started < 1.5


def test_missing_openai_key_for_the_real_host_names_the_variable(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(SelfpruneError, match=r"OPENAI_API_KEY is not set: export OPENAI_API_KEY="):
        make_backend("openai:gpt-4o")


@pytest.mark.parametrize("spec", ["", "gpt-4o", "openai:", "local:", "anthropic:claude", "SELF"])
def test_bad_spec_lists_the_accepted_forms(spec):
    with pytest.raises(SelfpruneError, match=r"unknown spec= .*openai:<model>.*self.*local:"):
        make_backend(spec)
    with raises_on_the_command_line(r"unknown --llm .*set --llm-base-url for a local one.*self.*local:"):
        make_backend(spec)
    with pytest.raises(SelfpruneError, match=r"unknown spec= "):
        preflight_backend(spec)


def test_self_without_a_model_is_an_error():
    with pytest.raises(SelfpruneError, match="^spec= self needs the model being pruned"):
        make_backend("self")
    with raises_on_the_command_line("^--llm self needs the model being pruned"):
        make_backend("self")


# --- a scripted OpenAI-like server on loopback: what the backend sends, and servers that answer wrongly ------


class ScriptedServer:
    """A real HTTP server in a thread that records each request's path and Authorization header and answers
    ``/models`` and ``/chat/completions`` as told by ``reply`` ("openai", "html", "garbage", "other_json",
    "slow_chat"). Like vLLM, it answers 404 for a model it does not list."""

    def __init__(self, reply: str = "openai", models=("served-model",), delay: float = 0.0):
        self.reply, self.models, self.delay = reply, list(models), delay
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def do_GET(self):
                self._answer(None)

            def do_POST(self):
                self._answer(json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}"))

            def _answer(self, body):
                server.requests.append((self.path, self.headers.get("Authorization")))
                status, kind, payload = server.respond(self.path, body)
                if kind == "slow":
                    time.sleep(server.delay)
                    kind = "application/json"
                data = payload.encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", kind)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def respond(self, path: str, body: dict | None) -> tuple[int, str, str]:
        if self.reply == "html":
            return 200, "text/html", "<!DOCTYPE html><html><head><title>Router login</title></head></html>"
        if self.reply == "garbage":
            return 200, "application/json", "{'choices': oops"
        if self.reply == "other_json":
            return 200, "application/json", json.dumps({"status": "ok", "version": 3})
        if path.endswith("/models"):
            return 200, "application/json", json.dumps(
                {"object": "list", "data": [{"id": name, "object": "model"} for name in self.models]})
        if body.get("model") not in self.models:
            return 404, "application/json", json.dumps(
                {"error": {"message": f"The model `{body.get('model')}` does not exist.", "type": "NotFoundError"}})
        completion = {
            "id": "c1", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "OK"}}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 1, "total_tokens": 8},
        }
        return 200, "slow" if self.reply == "slow_chat" else "application/json", json.dumps(completion)

    def chat_requests(self) -> int:
        return sum(path.endswith("/chat/completions") for path, _ in self.requests)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_default_openai_key_is_never_sent_to_another_host(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with ScriptedServer() as server:
        backend = make_backend("openai:served-model", base_url=server.base_url)  # no key variable named
        backend.check()
        assert backend.complete(HELLO, max_tokens=4).text == "OK"
        sent = [auth for _, auth in server.requests]
    assert len(sent) == 2 and all(auth == "Bearer none" for auth in sent)


@pytest.mark.parametrize("named", ["OPENAI_API_KEY", "SELFPRUNE_PROXY_KEY"])
def test_an_explicitly_named_key_variable_is_sent(monkeypatch, named):
    monkeypatch.setenv(named, SECRET)
    with ScriptedServer() as server:
        backend = make_backend("openai:served-model", base_url=server.base_url, api_key_env=named)
        backend.complete(HELLO, max_tokens=4)
        assert server.requests == [("/v1/chat/completions", f"Bearer {SECRET}")]


def test_openai_over_plain_http_is_refused_before_any_request(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    with pytest.raises(SelfpruneError, match=r"http://api.openai.com/v1 is plain http: use https://api.openai.com/v1"):
        make_backend("openai:gpt-4o", base_url="http://api.openai.com/v1")


@pytest.mark.parametrize(
    "url, shown",
    [
        ("http://user:sk-abc@127.0.0.1:1/v1", "http://127.0.0.1:1/v1"),
        ("https://sk-abc@example.com/v1", "https://example.com/v1"),
        ("http://u:p@[::1]:8080/v1/", "http://[::1]:8080/v1/"),
        ("https://host/v1?api-key=sk-abc&region=eu", "https://host/v1?api-key=***&region=eu"),
        ("http://127.0.0.1:8080/v1", "http://127.0.0.1:8080/v1"),
        (None, None),
    ],
)
def test_redact_url_strips_credentials(url, shown):
    assert redact_url(url) == shown


def test_credentials_in_the_base_url_appear_in_no_message_or_repr():
    base_url = f"http://user:{SECRET}@127.0.0.1:{free_port()}/v1"
    backend = make_backend("openai:m", base_url=base_url)
    assert SECRET not in repr(backend) and SECRET not in backend.base_url
    with pytest.raises(SelfpruneError) as caught:
        backend.complete(HELLO)
    assert SECRET not in str(caught.value) and "http://127.0.0.1:" in str(caught.value)
    with pytest.raises(SelfpruneError) as caught:
        preflight_backend("openai:m", base_url=base_url)
    assert SECRET not in str(caught.value) and "user" not in str(caught.value)


def test_credentials_in_the_url_and_a_named_key_are_refused_as_a_pair(monkeypatch):
    # httpx would send the URL's user:password as Basic auth in place of the key's Bearer header.
    monkeypatch.setenv("SELFPRUNE_PROXY_KEY", "sk-key")
    with pytest.raises(SelfpruneError, match=r"carries credentials \(user:password@\) and a key is read from "
                                             r"\$SELFPRUNE_PROXY_KEY: .* remove them from base_url=$") as caught:
        make_backend("openai:m", base_url=f"http://user:{SECRET}@127.0.0.1:1/v1", api_key_env="SELFPRUNE_PROXY_KEY")
    assert SECRET not in str(caught.value)


@pytest.mark.parametrize(
    "reply, what",
    [
        ("html", r"answered an HTML page \('Router login'\)"),
        ("garbage", r"answered invalid JSON \('\{'choices': oops'\)"),
        ("other_json", r"answered JSON without a 'choices' list \(status, version\)"),
    ],
)
def test_a_server_that_is_not_an_openai_api_is_retried_then_named_in_one_line(reply, what):
    with ScriptedServer(reply) as server:
        backend = make_backend("openai:served-model", base_url=server.base_url)
        backend.max_retries, backend.retry_base_delay = 2, 0.01
        with pytest.raises(SelfpruneError) as caught:
            backend.complete(HELLO, json_schema=RATES_SCHEMA)
        assert server.chat_requests() == 3  # a failing server: retried like a 5xx
    message = caught.value.cli_message()
    assert re.match(rf"the LLM server at {re.escape(server.base_url)} {what} \(3 tries\), not an "
                    r"OpenAI-compatible API: check --llm-base-url \(it usually ends in /v1\)$", message), message


@pytest.mark.parametrize("reply", ["html", "other_json"])
def test_preflight_names_a_server_that_is_not_an_openai_api_at_once(reply):
    with ScriptedServer(reply) as server:
        with pytest.raises(SelfpruneError, match=r"answered .* \(1 try\), not an OpenAI-compatible API: check "):
            preflight_backend("openai:served-model", base_url=server.base_url)
        assert server.requests[0][0] == "/v1/models" and len(server.requests) == 1


def test_timeouts_of_a_server_that_answered_before_are_retried():
    with ScriptedServer("slow_chat", delay=1.0) as server:
        backend = make_backend("openai:served-model", base_url=server.base_url, timeout=0.3)
        backend.max_retries, backend.retry_base_delay = 1, 0.01
        backend.check()  # the server answers /models at once
        with pytest.raises(SelfpruneError, match=r"did not answer within 0.3 s \(2 tries\)"):
            backend.complete(HELLO)
        assert server.chat_requests() == 2


# --- preflight -------------------------------------------------------------------------------------------


def test_preflight_of_an_unreachable_server_fails_in_a_second():
    port = free_port()
    started = time.monotonic()
    with raises_on_the_command_line(rf"cannot reach the LLM server at http://127.0.0.1:{port}/v1 "
                                    r"\(connection refused, 1 try\): start it or fix --llm-base-url$"):
        preflight_backend("openai:m", base_url=f"http://127.0.0.1:{port}/v1")
    assert time.monotonic() - started < 3


def test_preflight_of_a_silent_server_gives_up_after_its_own_short_timeout():
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        base_url = f"http://127.0.0.1:{silent.getsockname()[1]}/v1"
        started = time.monotonic()
        with pytest.raises(SelfpruneError, match=r"did not answer within 0.5 s \(1 try\)"):
            preflight_backend("openai:m", base_url=base_url, timeout=120, check_timeout=0.5)
        assert time.monotonic() - started < 2


def test_preflight_needs_the_openai_key_before_anything_else(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with raises_on_the_command_line(r"^OPENAI_API_KEY is not set: export OPENAI_API_KEY=<key>, or set "
                                    r"--llm-base-url to a local OpenAI-compatible server$"):
        preflight_backend("openai:gpt-4o")


def test_preflight_finds_a_model_the_server_does_not_serve():
    with ScriptedServer(models=["served-model", "other-model"]) as server:
        assert preflight_backend("openai:served-model", base_url=server.base_url)["model_listed"] is True
        assert server.chat_requests() == 0  # a listed model needs no probe
        with pytest.raises(SelfpruneError, match=r"has no model 'typo-model' \(HTTP 404: The model `typo-model` does "
                                                 r"not exist.\): fix the model in spec= openai:<model> .*"
                                                 r"\(it lists served-model, other-model\)$"):
            preflight_backend("openai:typo-model", base_url=server.base_url)


@pytest.mark.server
def test_preflight_against_llama_cpp(llama_server, monkeypatch):
    monkeypatch.setenv("SELFPRUNE_TEST_KEY", llama_server.api_key)
    listed = preflight_backend("openai:smollm2", base_url=llama_server.base_url, api_key_env="SELFPRUNE_TEST_KEY")
    assert listed["models"], "llama.cpp lists its model"
    # llama.cpp serves its one model under any name: an unlisted name passes the one-token probe.
    assert listed["model_listed"] is (listed["models"] == ["smollm2"])
    served = preflight_backend(f"openai:{listed['models'][0]}", base_url=llama_server.base_url,
                               api_key_env="SELFPRUNE_TEST_KEY")
    assert served["model_listed"] is True
    with pytest.raises(SelfpruneError, match=r"rejected the API key from \$OPENAI_API_KEY \(HTTP 401\)"):
        monkeypatch.setenv("OPENAI_API_KEY", "wrong")
        preflight_backend("openai:smollm2", base_url=llama_server.base_url, api_key_env="OPENAI_API_KEY")


def test_preflight_of_local_models_checks_the_path_and_chat_template(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(SelfpruneError, match=rf"the spec= local: model {re.escape(str(missing))} does not exist"):
        preflight_backend(f"local:{missing}")
    plain = tmp_path / "base-model"
    plain.mkdir()
    (plain / "config.json").write_text("{}")
    (plain / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 2048}))
    with raises_on_the_command_line(r"has no chat template.*use --llm local:<a chat model>"):
        preflight_backend("self", model=str(plain))
    (plain / "chat_template.jinja").write_text("{{ messages }}")
    assert preflight_backend(f"local:{plain}")["checked"] is True
    assert preflight_backend("local:HuggingFaceTB/SmolLM2-135M-Instruct")["checked"] is False  # left to the loader
    assert preflight_backend("self", model="default")["checked"] is False
    gguf = default_gguf()
    if gguf is not None:  # the packaged GGUF carries its chat template in its metadata
        assert preflight_backend(f"local:{gguf}")["checked"] is True


@pytest.mark.parametrize("with_template", [False, True])
def test_preflight_reads_the_chat_template_from_gguf_metadata(tmp_path, with_template):
    from gguf import GGUFWriter

    path = tmp_path / "model.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["<s>", "a", "b"])  # a string array before the key looked for
    writer.add_token_scores([0.0, 1.0, 2.0])
    if with_template:
        writer.add_chat_template("{% for m in messages %}{{ m.content }}{% endfor %}")
    writer.add_uint32("general.file_type", 0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    if with_template:
        assert preflight_backend(f"local:{path}")["checked"] is True
    else:
        with pytest.raises(SelfpruneError, match=rf"local:{re.escape(str(path))} has no chat template"):
            preflight_backend(f"local:{path}")


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
