"""Chat backends that carry out the evolutionary search's LLM operators.

Two kinds: any OpenAI-compatible HTTP server (OpenAI, vLLM, llama.cpp, Ollama, ...) through the
``openai`` SDK, and a chat model held in memory through transformers, which may be the very model
being pruned (true self-pruning). Both return a :class:`ChatResult` with the raw text and token
usage, so the search can log cost and parse the reply the same way whatever answered it.
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..errors import SelfpruneError, option

OPENAI_BASE_URL = "https://api.openai.com/v1"
OPENAI_HOST = "api.openai.com"
# Read when the caller names no variable, and then sent to OpenAI's own host only: a key must not leak to
# whatever server a base URL (or a resumed run's moved server) points at.
DEFAULT_KEY_ENV = "OPENAI_API_KEY"
# Sent to servers that need no key (a local llama.cpp or vLLM); the SDK refuses an empty one.
PLACEHOLDER_KEY = "none"
PREFLIGHT_TIMEOUT = 5.0  # seconds for check()'s GET /models: a live server answers that at once

# How messages name the settings a user can fix: the argument name for a Python caller, the flag on the
# command line (see errors.option).
SPEC = option("spec", "--llm")
BASE_URL = option("base_url", "--llm-base-url")
API_KEY_ENV = option("api_key_env", "--llm-api-key-env")
TIMEOUT = option("timeout", "--llm-timeout")
SPEC_FORMS = (f"openai:<model> (any OpenAI-compatible server; set {BASE_URL} for a local one), "
              "self (the model being pruned), or local:<hub id, model folder or .gguf file>")

_SECRET_QUERY = re.compile(r"key|token|secret|password|passwd|auth|sig", re.IGNORECASE)
_USERINFO_IN_TEXT = re.compile(r"(?<=://)[^/\s@]+@")


def redact_url(url: str | None) -> str | None:
    """``url`` without credentials, safe to print, log or save: no ``user:password@`` and no value of a query
    parameter that looks like a key (``?api_key=``, ``token``, ``sig``...)."""
    if not url:
        return url
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # unparseable: still drop anything that looks like user:password@
        return _USERINFO_IN_TEXT.sub("", url)
    netloc = parts.hostname or ""
    if ":" in netloc:  # IPv6
        netloc = f"[{netloc}]"
    if port is not None:
        netloc += f":{port}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, "***" if _SECRET_QUERY.search(k) else v) for k, v in pairs], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _scrub(text: str) -> str:
    """Credentials removed from any URL inside ``text`` (a server's or a library's message may echo one)."""
    return _USERINFO_IN_TEXT.sub("", text)


@dataclass
class ChatResult:
    text: str  # raw response text
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    structured: bool  # True when the backend enforced the JSON schema
    model: str


@runtime_checkable
class ChatBackend(Protocol):
    name: str

    def complete(
        self,
        messages: list[dict],
        *,
        json_schema: dict | None = None,
        max_tokens: int = 1024,
        temperature: float = 0.7,
        seed: int | None = None,
    ) -> ChatResult: ...


# Ways to ask for JSON, strongest first. A server that rejects one is asked the next way, and the
# backend remembers the first that worked so later calls do not pay for the rejections again.
#   json_schema:        the OpenAI form (OpenAI, vLLM, Ollama, llama.cpp's own llama-server).
#   json_object_schema: {"type": "json_object", "schema": ...}, how llama-cpp-python's server takes a
#                       schema (it answers "json_schema" with an HTTP 500 validation error); it compiles
#                       the schema to a grammar, so it is enforced (structure, enums, array lengths;
#                       not numeric minimum/maximum: replies held 456812972 for an integer in 0..80), so
#                       bounded integers are sent to it spelled out as enums (integer_ranges_as_enums).
#   json_object:        any JSON, schema not enforced.
#   text:               no constraint; the caller parses leniently (parsing.extract_json).
FORMAT_MODES = ("json_schema", "json_object_schema", "json_object", "text")
_ENFORCING_MODES = {"json_schema", "json_object_schema"}

# Servers (redacted base URLs) that have answered an HTTP request in this process. Retries are for a server
# that is known to be there (429, 5xx, a timeout or a dropped connection while it restarts); one that has
# never answered fails after one try, so that a wrong URL or being offline costs a second, not minutes.
_ANSWERED: set[str] = set()


class OpenAICompatibleBackend:
    """A chat model behind an OpenAI-compatible ``/v1/chat/completions`` endpoint.

    The SDK's own retries are off (``max_retries=0``) so that every failure goes through one place:
    timeouts, dropped connections, 429, 5xx and replies that are not an OpenAI API's (an HTML page, invalid
    JSON) are retried with exponential backoff once the server has answered; a server never reached fails at
    once, and so do a bad key (401/403) or an unknown model (404), since retrying cannot fix them. Whatever
    still fails becomes a one-line :class:`SelfpruneError` that names the server (without credentials) and
    the fix.

    The key: ``api_key_env=None`` reads ``OPENAI_API_KEY`` and sends it to https://api.openai.com only; any
    other server gets a key only from a variable the caller names (``api_key_env="MY_KEY"``), else a dummy.
    """

    retry_base_delay = 1.0  # seconds before the first retry; doubles each time
    retry_max_delay = 30.0

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key_env: str | None = None,
        timeout: float = 120.0,
        max_retries: int = 3,
    ):
        import openai

        if not model:
            raise SelfpruneError(f"no model name given for an OpenAI-compatible server: use {SPEC_FORMS}")
        self.model = model
        self.name = f"openai:{model}"
        real_url = (base_url or os.environ.get("OPENAI_BASE_URL") or OPENAI_BASE_URL).strip().rstrip("/")
        self.base_url = redact_url(real_url)  # what is shown and saved; the client alone holds the real one
        self.timeout = float(timeout)
        self.max_retries = max(0, int(max_retries))
        parts = urlsplit(real_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise SelfpruneError(
                f"LLM base URL {self.base_url!r} is not an http(s) URL: set {BASE_URL} to e.g. "
                "http://127.0.0.1:8080/v1"
            )
        on_openai = parts.hostname.lower() == OPENAI_HOST
        if on_openai and parts.scheme != "https":
            raise SelfpruneError(f"{self.base_url} is plain http: use {OPENAI_BASE_URL} so the key travels encrypted")
        self.api_key_env = api_key_env  # as the caller named it: None means "OpenAI's key, for OpenAI only"
        self._key_env = api_key_env or DEFAULT_KEY_ENV
        key = os.environ.get(self._key_env, "").strip()
        if api_key_env is None and not on_openai:
            key = ""  # the default key is OpenAI's: never sent elsewhere
        elif not key:
            fix = (f"or set {BASE_URL} to a local OpenAI-compatible server" if on_openai
                   else f"or leave {API_KEY_ENV} out for a server that needs no key")
            raise SelfpruneError(f"{self._key_env} is not set: export {self._key_env}=<key>, {fix}")
        if key and (parts.username or parts.password):
            # httpx turns user:password@ into a Basic Authorization header, which replaces the key's Bearer one.
            raise SelfpruneError(
                f"the LLM base URL carries credentials (user:password@) and a key is read from ${self._key_env}: "
                f"the URL's would replace the key, so remove them from {BASE_URL}"
            )
        self._key_sent = bool(key)
        self._client = openai.OpenAI(base_url=real_url, api_key=key or PLACEHOLDER_KEY, timeout=self.timeout,
                                     max_retries=0)
        # OpenAI itself takes json_schema; its fallback must not claim a schema it may silently ignore.
        self._modes = tuple(mode for mode in FORMAT_MODES if not (on_openai and mode == "json_object_schema"))
        self._mode_index = 0  # first of self._modes not yet known to be rejected by this server
        self._max_tokens_param = "max_tokens"

    def __repr__(self) -> str:
        return f"OpenAICompatibleBackend({self.model!r}, base_url={self.base_url!r})"

    @property
    def format_mode(self) -> str:
        """How this backend currently asks for JSON (see ``FORMAT_MODES``)."""
        return self._modes[self._mode_index]

    def start_at_format(self, mode: str) -> None:
        """Ask for JSON in ``mode`` first (``text``: no schema sent, no grammar: what constrained decoding costs
        is measured against it); a server that rejects it still moves on to the next mode."""
        if mode not in self._modes:
            raise SelfpruneError(f"unknown JSON format mode {mode!r}: use one of {', '.join(self._modes)}")
        self._mode_index = self._modes.index(mode)

    def check(self, timeout: float = PREFLIGHT_TIMEOUT) -> dict:
        """Preflight, before anything expensive: the server answers ``GET /models`` within ``timeout`` seconds
        as an OpenAI-compatible API, and serves ``self.model``.

        A model the server does not list is tried with a one-token completion, since servers differ in how they
        match names (llama.cpp serves its one model under any name, Ollama takes ``llama3`` for
        ``llama3:latest``, vLLM and OpenAI answer 404). Returns what was found: ``{"base_url", "models",
        "model_listed"}``; raises a one-line SelfpruneError otherwise.
        """
        models: list[str] = []
        try:
            raw = self._send(lambda: self._client.models.with_raw_response.list(timeout=timeout), "data",
                             retry_bad_replies=False, timeout=timeout)
            data = json.loads(raw.http_response.text)["data"]
            models = [str(entry["id"]) for entry in data if isinstance(entry, dict) and "id" in entry]
        except _NotFound:
            pass  # no /models here (some proxies): the probe below still tells whether the model is served
        listed = self.model in models
        if not listed:
            request = dict(model=self.model, messages=[{"role": "user", "content": "Say OK."}], temperature=0)
            request[self._max_tokens_param] = 1
            try:
                self._send(lambda: self._client.chat.completions.with_raw_response.create(**request), "choices",
                           retry_bad_replies=False)
            except _NotFound as missing:
                serves = f" (it lists {_preview_list(models)})" if models else ""
                raise SelfpruneError(self._not_found_message(missing.message) + serves) from None
            except _Rejected:
                pass  # the server knows the model and refused only this tiny request's form
        return {"base_url": self.base_url, "models": models, "model_listed": listed}

    def complete(
        self,
        messages: list[dict],
        *,
        json_schema: dict | None = None,
        max_tokens: int = 1024,
        temperature: float = 0.7,
        seed: int | None = None,
    ) -> ChatResult:
        started = time.perf_counter()
        mode_index = self._mode_index if json_schema is not None else self._modes.index("text")
        while True:
            mode = self._modes[mode_index]
            request = dict(model=self.model, messages=messages, temperature=temperature)
            request[self._max_tokens_param] = max_tokens
            if seed is not None:
                request["seed"] = seed
            if mode != "text":
                request["response_format"] = _response_format(mode, json_schema)
            try:
                raw = self._send(lambda: self._client.chat.completions.with_raw_response.create(**request),
                                 "choices", allow_format_rejection="response_format" in request)
            except _NotFound as missing:
                raise SelfpruneError(self._not_found_message(missing.message)) from None
            except _Rejected as rejected:
                if self._max_tokens_param == "max_tokens" and "max_completion_tokens" in rejected.message:
                    # Newer OpenAI models refuse max_tokens and name its replacement.
                    self._max_tokens_param = "max_completion_tokens"
                    continue
                if mode == "text":
                    raise SelfpruneError(self._fail(
                        f"the LLM server at {self.base_url} rejected the request (HTTP {rejected.status}): "
                        f"{rejected.message}"
                    )) from None
                mode_index += 1  # this way of asking for JSON is not supported here: try the next
                continue
            if json_schema is not None:
                self._mode_index = mode_index
            break
        response = raw.parse()
        choice = response.choices[0] if response.choices else None
        message = getattr(choice, "message", None)
        text = getattr(message, "content", None) or ""
        usage = response.usage
        return ChatResult(
            text=text,
            prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
            completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
            seconds=time.perf_counter() - started,
            structured=mode in _ENFORCING_MODES,
            model=getattr(response, "model", None) or self.model,
        )

    def _send(self, call, expected_list: str, allow_format_rejection: bool = False, retry_bad_replies: bool = True,
              timeout: float | None = None):
        """One raw API call whose JSON body must hold a list under ``expected_list``; transient failures are
        retried, the rest become SelfpruneError (or ``_Rejected`` / ``_NotFound`` for the caller to decide).
        A reply that is not an OpenAI API's is retried like a 5xx, unless ``retry_bad_replies`` is False (the
        preflight: there it means a wrong URL far more often than a server in trouble).

        A rejected request (400/422) raises ``_Rejected``: a different request may help. llama-cpp-python
        answers an unknown ``response_format`` with HTTP 500, so with ``allow_format_rejection`` a 5xx whose
        message names ``response_format`` counts as a rejection too, not as a transient failure. ``timeout`` is
        the one ``call`` was given, when not the backend's own, for the message.
        """
        import openai

        attempt = 0
        while True:
            try:
                raw = call()
                _ANSWERED.add(self.base_url)
                problem = _not_openai_reply(raw.http_response, expected_list)
                if problem is None:
                    return raw
                failure: Exception = _BadReply(problem)
                if not retry_bad_replies:
                    raise SelfpruneError(self._gave_up(failure, attempt + 1, timeout)) from None
            except (openai.BadRequestError, openai.UnprocessableEntityError) as exc:
                _ANSWERED.add(self.base_url)
                raise _Rejected(exc.status_code, _message(exc)) from None
            except openai.AuthenticationError:
                raise SelfpruneError(self._key_problem(401)) from None
            except openai.PermissionDeniedError:
                raise SelfpruneError(self._key_problem(403)) from None
            except openai.NotFoundError as exc:
                _ANSWERED.add(self.base_url)
                raise _NotFound(_message(exc)) from None
            except openai.APIConnectionError as exc:  # timeouts included
                if self.base_url not in _ANSWERED:  # never reached: wrong URL or offline, retries would not help
                    raise SelfpruneError(self._gave_up(exc, attempt + 1, timeout)) from None
                failure = exc
            except (openai.RateLimitError, openai.InternalServerError) as exc:
                _ANSWERED.add(self.base_url)
                if allow_format_rejection and isinstance(exc, openai.InternalServerError):
                    if "response_format" in _message(exc):
                        raise _Rejected(exc.status_code, _message(exc)) from None
                failure = exc
            except openai.APIStatusError as exc:  # any other 4xx: retrying would not help
                raise SelfpruneError(self._fail(
                    f"the LLM server at {self.base_url} failed (HTTP {exc.status_code}): {_message(exc)}"
                )) from None
            if attempt >= self.max_retries:
                raise SelfpruneError(self._gave_up(failure, attempt + 1, timeout)) from None
            time.sleep(self._backoff(attempt, failure))
            attempt += 1

    def _backoff(self, attempt: int, exc: Exception) -> float:
        """Exponential backoff, or the server's Retry-After when it sends one (429/503)."""
        delay = self.retry_base_delay * (2**attempt)
        response = getattr(exc, "response", None)
        retry_after = response.headers.get("retry-after") if response is not None else None
        try:
            delay = max(delay, float(retry_after))
        except (TypeError, ValueError):
            pass
        return min(delay, self.retry_max_delay)

    def _fail(self, message: str) -> str:
        return _scrub(" ".join(message.split()))

    def _not_found_message(self, detail: str) -> str:
        return self._fail(
            f"the LLM server at {self.base_url} has no model '{self.model}' (HTTP 404: {detail}): "
            f"fix the model in {SPEC} openai:<model> (see {self.base_url}/models), "
            "and check that the base URL ends in /v1"
        )

    def _key_problem(self, status: int) -> str:
        _ANSWERED.add(self.base_url)
        problem = "rejected the API key" if status == 401 else "refused access with the API key"
        if self._key_sent:
            return (
                f"the LLM server at {self.base_url} {problem} from ${self._key_env} (HTTP {status}): "
                f"set {self._key_env} to a valid key"
            )
        return (
            f"the LLM server at {self.base_url} needs an API key (HTTP {status}): name the variable that holds it "
            f"with {API_KEY_ENV} ({DEFAULT_KEY_ENV} is sent to {OPENAI_HOST} only)"
        )

    def _gave_up(self, exc: Exception, tries: int, timeout: float | None = None) -> str:
        import openai

        tried = f"{tries} {'try' if tries == 1 else 'tries'}"
        base_url_option = BASE_URL
        if isinstance(exc, _BadReply):
            return self._fail(
                f"the LLM server at {self.base_url} {exc.problem} ({tried}), not an OpenAI-compatible API: "
                f"check {base_url_option} (it usually ends in /v1)"
            )
        if isinstance(exc, openai.APITimeoutError):
            return self._fail(
                f"the LLM server at {self.base_url} did not answer within {timeout or self.timeout:g} s ({tried}): "
                f"check that it is not overloaded, or raise {TIMEOUT}"
            )
        if isinstance(exc, openai.APIConnectionError):
            return self._fail(
                f"cannot reach the LLM server at {self.base_url} ({_connection_reason(exc)}, {tried}): "
                f"start it or fix {base_url_option}"
            )
        if isinstance(exc, openai.RateLimitError):
            return self._fail(
                f"the LLM server at {self.base_url} kept rate-limiting requests (HTTP 429, {tried}): "
                f"{_message(exc)}; wait, or check the account's quota"
            )
        return self._fail(
            f"the LLM server at {self.base_url} kept failing (HTTP {exc.status_code}, {tried}): {_message(exc)}"
        )


class _Rejected(Exception):
    """The server refused this request as malformed or unsupported (not a transient failure)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class _NotFound(Exception):
    """HTTP 404: no such model, or no such endpoint under this base URL."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class _BadReply(Exception):
    """HTTP 200 with something that is not an OpenAI API's reply (an HTML page, invalid JSON, other JSON)."""

    def __init__(self, problem: str):
        super().__init__(problem)
        self.problem = problem


def _not_openai_reply(response, expected_list: str) -> str | None:
    """What is wrong with a 2xx reply that should be OpenAI JSON holding a list under ``expected_list``,
    e.g. "answered an HTML page", or None when it is fine."""
    text = response.text
    try:
        data = json.loads(text)
    except ValueError:
        return f"answered {_describe_body(text)}"
    if not isinstance(data, dict) or not isinstance(data.get(expected_list), list):
        keys = ", ".join(map(str, list(data)[:5])) if isinstance(data, dict) else type(data).__name__
        return f"answered JSON without a '{expected_list}' list ({keys or 'empty'})"
    if not all(isinstance(item, dict) for item in data[expected_list]):
        return f"answered JSON whose '{expected_list}' are not objects"
    return None


_TITLE = re.compile(r"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)


def _describe_body(text: str) -> str:
    """A short, printable account of a body that is not JSON."""
    stripped = text.strip()
    if not stripped:
        return "an empty body"
    if stripped.startswith("<") and re.search(r"<(!doctype html|html|head|body|title)\b", stripped[:2000], re.I):
        title = _TITLE.search(stripped)
        return "an HTML page" + (f" ('{' '.join(title.group(1).split())[:60]}')" if title else "")
    return f"invalid JSON ('{' '.join(stripped.split())[:60]}')"


def _preview_list(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _response_format(mode: str, schema: dict) -> dict:
    if mode == "json_schema":
        name = re.sub(r"[^A-Za-z0-9_-]", "_", str(schema.get("title") or "response"))[:64]
        return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
    if mode == "json_object_schema":
        return {"type": "json_object", "schema": integer_ranges_as_enums(schema)}
    return {"type": "json_object"}


# Largest integer range spelled out as an enum; a wider one keeps its minimum/maximum (not enforced there).
MAX_ENUM_RANGE = 1000


def integer_ranges_as_enums(schema):
    """``schema`` with every ``{"type": "integer", "minimum": a, "maximum": b}`` replaced by
    ``{"type": "integer", "enum": [a, ..., b]}``: the form a grammar that ignores numeric bounds still enforces
    (llama-cpp-python 0.3's). Ranges wider than MAX_ENUM_RANGE are left as they are."""
    if isinstance(schema, list):
        return [integer_ranges_as_enums(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: integer_ranges_as_enums(value) for key, value in schema.items()}
    low, high = out.get("minimum"), out.get("maximum")
    if (out.get("type") == "integer" and "enum" not in out and isinstance(low, int) and isinstance(high, int)
            and 0 <= high - low <= MAX_ENUM_RANGE):
        del out["minimum"], out["maximum"]
        out["enum"] = list(range(low, high + 1))
    return out


def _message(exc: Exception) -> str:
    """The server's own error message, on one line."""
    body = getattr(exc, "body", None)
    message = None
    if isinstance(body, dict):
        error = body.get("error", body)
        message = error.get("message") if isinstance(error, dict) else error
        if message is None and "detail" in body:  # FastAPI validation errors (llama-cpp-python)
            message = body["detail"]
    elif isinstance(body, str) and body.strip():
        try:
            json.loads(body)
        except ValueError:
            message = _describe_body(body)  # an HTML error page says little in its first 300 characters
    text = str(message if message is not None else getattr(exc, "message", exc))
    return _scrub(" ".join(text.split())[:300])


def _connection_reason(exc: Exception) -> str:
    """A short cause for a connection failure, e.g. 'connection refused'."""
    cause = exc.__cause__ or exc.__context__
    while cause is not None and (cause.__cause__ or cause.__context__) is not None and not str(cause):
        cause = cause.__cause__ or cause.__context__
    detail = str(cause or exc).lower()
    if "refused" in detail:
        return "connection refused"
    if ("name or service not known" in detail or "nodename nor servname" in detail or "name resolution" in detail
            or "no address associated" in detail):
        return "unknown host"
    if "unreachable" in detail:
        return "network unreachable"
    if "ssl" in detail or "certificate" in detail:
        return "TLS error: " + " ".join(str(cause).split())[:120]
    return " ".join(str(cause or exc).split())[:120] or "connection failed"


class TransformersChatBackend:
    """A chat model already in memory (transformers), e.g. the model being pruned itself.

    No JSON enforcement is possible without constrained decoding, so ``structured`` is always False
    and callers parse the reply leniently. Token counts are exact: they are counted on the tensors.

    Like llama.cpp's server, it keeps the key/value cache of the previous call and reuses the part of the new
    prompt that starts the same way (the system prompt, the candidates listed so far), so only the new tokens
    are computed: the search's prompts are written to share long prefixes.
    """

    def __init__(self, model, tokenizer, name: str, prefix_cache: bool = True):
        if not getattr(tokenizer, "chat_template", None):
            raise SelfpruneError(_no_chat_template(name))
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.prefix_cache = prefix_cache
        self._cached_ids = None  # the tokens whose keys/values self._cache holds
        self._cache = None
        self.reused_tokens = 0  # prompt tokens taken from the cache over all calls (for the record)

    def __repr__(self) -> str:
        return f"TransformersChatBackend(name={self.name!r})"

    def complete(
        self,
        messages: list[dict],
        *,
        json_schema: dict | None = None,
        max_tokens: int = 1024,
        temperature: float = 0.7,
        seed: int | None = None,
    ) -> ChatResult:
        import torch

        started = time.perf_counter()
        inputs = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        from ..offload import input_device

        device = input_device(self.model)
        inputs = {key: value.to(device) for key, value in inputs.items()}
        prompt_tokens = int(inputs["input_ids"].shape[1])
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id
        settings = dict(max_new_tokens=max_tokens, pad_token_id=pad_id)
        if self.prefix_cache:
            settings["return_dict_in_generate"] = True
            past = self._take_cache(inputs["input_ids"][0])
            if past is not None:
                settings["past_key_values"] = past
        if temperature > 0:
            settings.update(do_sample=True, temperature=float(temperature))
        else:
            # Greedy; clear the sampling knobs a model's generation_config may carry so that
            # transformers does not warn that they are ignored.
            settings.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        # Seeding here must not shift the random stream of whoever called us (the search, calibration).
        fork_devices = [device] if device.type == "cuda" else []
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.random.fork_rng(devices=fork_devices, enabled=seed is not None), torch.inference_mode():
                if seed is not None:
                    torch.manual_seed(seed)
                output = self.model.generate(**inputs, **settings)
        finally:
            self.model.train(was_training)
        if self.prefix_cache:
            sequence = output.sequences[0]
            past = output.past_key_values
            if past is not None and past.get_seq_length() > 0:
                # the cache covers every token but the last one generated
                self._cache, self._cached_ids = past, sequence[: past.get_seq_length()].clone()
        else:
            sequence = output[0]
        new_tokens = sequence[prompt_tokens:]
        text = self.tokenizer.decode(new_tokens, skip_special_tokens=True)
        return ChatResult(
            text=text,
            prompt_tokens=prompt_tokens,
            completion_tokens=int(new_tokens.shape[0]),
            seconds=time.perf_counter() - started,
            structured=False,
            model=getattr(getattr(self.model, "config", None), "_name_or_path", "") or self.name,
        )

    def _take_cache(self, ids):
        """The previous call's cache cropped to the prefix it shares with ``ids`` (leaving at least one token
        to run), or None. Either way the backend forgets it: generate() extends it in place."""
        past, cached_ids, self._cache, self._cached_ids = self._cache, self._cached_ids, None, None
        if past is None:
            return None
        n = min(len(cached_ids), len(ids) - 1)
        differs = (cached_ids[:n].to(ids.device) != ids[:n]).nonzero()
        shared = int(differs[0, 0]) if len(differs) else max(n, 0)
        if shared == 0:
            return None
        surplus = past.get_seq_length() - shared
        if surplus > 0:
            past.crop(-surplus)  # a negative count removes that many tokens (transformers 4.x and 5.x)
        self.reused_tokens += shared
        return past


def make_backend(
    spec: str,
    *,
    base_url: str | None = None,
    api_key_env: str | None = None,
    self_model=None,
    self_tokenizer=None,
    timeout: float = 120.0,
) -> ChatBackend:
    """Build the backend named by ``spec`` (see ``spec_forms``).

    ``api_key_env=None`` means the default: ``OPENAI_API_KEY``, sent to https://api.openai.com only. Pass the
    variable's name (even ``"OPENAI_API_KEY"``) to send its key to another server; store what the user named,
    not the default, so that a resumed run decides the same way.
    """
    kind, model = _parse_spec(spec)
    if kind == "openai":
        return OpenAICompatibleBackend(model, base_url=base_url, api_key_env=api_key_env, timeout=timeout)
    if kind == "self":
        if self_model is None or self_tokenizer is None:
            raise SelfpruneError(f"{SPEC} self needs the model being pruned, and none was loaded")
        return TransformersChatBackend(self_model, self_tokenizer, name="self")
    from ..models import load_model

    loaded, tokenizer = load_model(model, device="auto")
    return TransformersChatBackend(loaded, tokenizer, name=f"local:{model}")


def preflight_backend(
    spec: str,
    *,
    base_url: str | None = None,
    api_key_env: str | None = None,
    model: str | None = None,
    timeout: float = 120.0,
    check_timeout: float = PREFLIGHT_TIMEOUT,
) -> dict:
    """Check what can be checked about an LLM backend before loading or calibrating anything; raise a one-line
    SelfpruneError on the first problem.

    ``openai:<model>``: the key is there where one is needed, the server answers ``GET /models`` within
    ``check_timeout`` seconds as an OpenAI-compatible API, and serves the model (``OpenAICompatibleBackend.check``).
    ``self``: the model being pruned (``model``, as given to the loader) has a chat template, when it is a local
    folder or .gguf file. ``local:<x>``: a local ``x`` exists and has a chat template; hub ids are left to the
    loader. Returns what was checked (``{"kind": ..., ...}``).
    """
    kind, target = _parse_spec(spec)
    if kind == "openai":
        backend = OpenAICompatibleBackend(target, base_url=base_url, api_key_env=api_key_env, timeout=timeout)
        return {"kind": kind, **backend.check(timeout=check_timeout)}
    target = model if kind == "self" else target
    path = _local_model_path(target)
    if path is None:
        return {"kind": kind, "model": target, "checked": False}  # a hub id or the default: the loader decides
    if not path.exists():
        where = "model being pruned" if kind == "self" else f"{SPEC} local: model"
        raise SelfpruneError(f"the {where} {path} does not exist: give a model folder, a .gguf file or a hub id")
    if _has_chat_template(path) is False:
        raise SelfpruneError(_no_chat_template(f"{kind}:{path}" if kind == "local" else f"self ({path})"))
    return {"kind": kind, "model": str(path), "checked": True}


def _parse_spec(spec: str | None) -> tuple[str, str]:
    """``("openai", model)``, ``("self", "")`` or ``("local", location)``."""
    spec = (spec or "").strip()
    kind, _, rest = spec.partition(":")
    if kind in ("openai", "local") and rest.strip():
        return kind, rest.strip()
    if spec == "self":
        return "self", ""
    raise SelfpruneError(f"unknown {SPEC} '{spec}': use {SPEC_FORMS}")


def _local_model_path(location: str | None) -> Path | None:
    """The path ``location`` names when it is a local model (as the loader reads it), else None (a hub id)."""
    if not location or location == "default":
        return None
    path = Path(location).expanduser()
    if path.suffix == ".gguf" or path.exists() or location.startswith((".", "/", "~")):
        return path
    return None


def _has_chat_template(path: Path) -> bool | None:
    """Whether a model folder or .gguf file carries a chat template, read from its small files only; None when
    that cannot be told without loading it."""
    if path.is_file() and path.suffix == ".gguf":
        from ..models.gguf_metadata import read_metadata

        try:
            return "tokenizer.chat_template" in read_metadata(path)
        except Exception:  # an unreadable GGUF is the loader's to report
            return None
    if not path.is_dir():
        return None
    if (path / "chat_template.jinja").is_file() or (path / "chat_template.json").is_file():
        return True
    tokenizer_config = path / "tokenizer_config.json"
    if not tokenizer_config.is_file():
        return None
    try:
        return bool(json.loads(tokenizer_config.read_text()).get("chat_template"))
    except (OSError, ValueError, AttributeError):
        return None


def _no_chat_template(name: str) -> str:
    return (f"{name} has no chat template, so it cannot run the search's LLM operators: "
            f"use {SPEC} local:<a chat model> or {SPEC} openai:<model>")
