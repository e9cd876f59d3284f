"""Chat backends that carry out the evolutionary search's LLM operators.

Two kinds: any OpenAI-compatible HTTP server (OpenAI, vLLM, llama.cpp, Ollama, ...) through the
``openai`` SDK, and a chat model held in memory through transformers, which may be the very model
being pruned (true self-pruning). Both return a :class:`ChatResult` with the raw text and token
usage, so the search can log cost and parse the reply the same way whatever answered it.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from typing import Protocol, runtime_checkable
from urllib.parse import urlparse

from ..errors import SelfpruneError

OPENAI_BASE_URL = "https://api.openai.com/v1"
# Sent to servers that need no key (a local llama.cpp or vLLM); the SDK refuses an empty one.
PLACEHOLDER_KEY = "sk-no-key-needed"
SPEC_FORMS = (
    "openai:<model> (any OpenAI-compatible server; set --llm-base-url for a local one), "
    "self (the model being pruned), or local:<hub id, model folder or .gguf file>"
)


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
#                       not numeric minimum/maximum).
#   json_object:        any JSON, schema not enforced.
#   text:               no constraint; the caller parses leniently (parsing.extract_json).
FORMAT_MODES = ("json_schema", "json_object_schema", "json_object", "text")
_ENFORCING_MODES = {"json_schema", "json_object_schema"}


class OpenAICompatibleBackend:
    """A chat model behind an OpenAI-compatible ``/v1/chat/completions`` endpoint.

    The SDK's own retries are off (``max_retries=0``) so that every failure goes through one place:
    connection errors, timeouts, 429 and 5xx are retried with exponential backoff; a bad key (401/403)
    or an unknown model (404) fails at once, since retrying cannot fix them. Whatever still fails
    becomes a one-line :class:`SelfpruneError` that names the server and the fix.
    """

    retry_base_delay = 1.0  # seconds before the first retry; doubles each time
    retry_max_delay = 30.0

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 120.0,
        max_retries: int = 3,
    ):
        import openai

        if not model:
            raise SelfpruneError(f"no model name given for the OpenAI-compatible backend: use {SPEC_FORMS}")
        self.model = model
        self.name = f"openai:{model}"
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or OPENAI_BASE_URL).rstrip("/")
        self.api_key_env = api_key_env
        self.timeout = float(timeout)
        self.max_retries = max(0, int(max_retries))
        on_openai = urlparse(self.base_url).hostname == urlparse(OPENAI_BASE_URL).hostname
        key = os.environ.get(api_key_env, "").strip()
        self._key_given = bool(key)
        if not key:
            if on_openai:
                raise SelfpruneError(
                    f"{api_key_env} is not set: export {api_key_env}=<your OpenAI key>, "
                    "or point --llm-base-url at a local OpenAI-compatible server"
                )
            # Local and self-hosted servers usually need no key; a server that does answers 401,
            # which is reported with the variable's name.
            key = PLACEHOLDER_KEY
        self._client = openai.OpenAI(base_url=self.base_url, api_key=key, timeout=self.timeout, max_retries=0)
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
                response = self._create_with_retries(request)
            except _Rejected as rejected:
                if self._max_tokens_param == "max_tokens" and "max_completion_tokens" in rejected.message:
                    # Newer OpenAI models refuse max_tokens and name its replacement.
                    self._max_tokens_param = "max_completion_tokens"
                    continue
                if mode == "text":
                    raise SelfpruneError(
                        f"the LLM server at {self.base_url} rejected the request "
                        f"(HTTP {rejected.status}): {rejected.message}"
                    ) from None
                mode_index += 1  # this way of asking for JSON is not supported here: try the next
                continue
            if json_schema is not None:
                self._mode_index = mode_index
            break
        choice = response.choices[0] if response.choices else None
        text = (choice.message.content if choice is not None else None) or ""
        usage = response.usage
        return ChatResult(
            text=text,
            prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
            completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
            seconds=time.perf_counter() - started,
            structured=mode in _ENFORCING_MODES,
            model=response.model or self.model,
        )

    def _create_with_retries(self, request: dict):
        """One chat completion; transient failures are retried, the rest become SelfpruneError.

        A rejected request (400/422) raises ``_Rejected``: ``complete`` decides whether a different
        request helps. llama-cpp-python answers an unknown ``response_format`` with HTTP 500, so a 5xx
        whose message names ``response_format`` counts as a rejection too, not as a transient failure.
        """
        import openai

        attempt = 0
        while True:
            try:
                return self._client.chat.completions.create(**request)
            except (openai.BadRequestError, openai.UnprocessableEntityError) as exc:
                raise _Rejected(exc.status_code, _message(exc)) from None
            except openai.AuthenticationError:
                raise SelfpruneError(self._key_problem(401)) from None
            except openai.PermissionDeniedError:
                raise SelfpruneError(self._key_problem(403)) from None
            except openai.NotFoundError as exc:
                raise SelfpruneError(
                    f"the LLM server at {self.base_url} has no model '{self.model}' (HTTP 404: {_message(exc)}): "
                    f"fix the model in --llm openai:<model> (see {self.base_url}/models), "
                    "and check that the base URL ends in /v1"
                ) from None
            except (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError) as exc:
                if isinstance(exc, openai.InternalServerError) and "response_format" in request:
                    if "response_format" in _message(exc):
                        raise _Rejected(exc.status_code, _message(exc)) from None
                if attempt >= self.max_retries:
                    raise SelfpruneError(self._gave_up(exc, attempt + 1)) from None
                time.sleep(self._backoff(attempt, exc))
                attempt += 1
            except openai.APIStatusError as exc:  # any other 4xx: retrying would not help
                raise SelfpruneError(
                    f"the LLM server at {self.base_url} failed (HTTP {exc.status_code}): {_message(exc)}"
                ) from None

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

    def _key_problem(self, status: int) -> str:
        problem = "rejected the API key" if status == 401 else "refused access with the API key"
        if self._key_given:
            return (
                f"the LLM server at {self.base_url} {problem} from ${self.api_key_env} (HTTP {status}): "
                f"set {self.api_key_env} to a valid key"
            )
        return f"the LLM server at {self.base_url} needs an API key (HTTP {status}): export {self.api_key_env}=<key>"

    def _gave_up(self, exc: Exception, tries: int) -> str:
        import openai

        tried = f"{tries} {'try' if tries == 1 else 'tries'}"
        if isinstance(exc, openai.APITimeoutError):
            return (
                f"the LLM server at {self.base_url} did not answer within {self.timeout:g} s ({tried}): "
                "check that it is not overloaded, or raise --llm-timeout"
            )
        if isinstance(exc, openai.APIConnectionError):
            return (
                f"cannot reach the LLM server at {self.base_url} ({_connection_reason(exc)}, {tried}): "
                "start it or fix --llm-base-url"
            )
        if isinstance(exc, openai.RateLimitError):
            return (
                f"the LLM server at {self.base_url} kept rate-limiting requests (HTTP 429, {tried}): "
                f"{_message(exc)}; wait, or check the account's quota"
            )
        return f"the LLM server at {self.base_url} kept failing (HTTP {exc.status_code}, {tried}): {_message(exc)}"


class _Rejected(Exception):
    """The server refused this request as malformed or unsupported (not a transient failure)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _response_format(mode: str, schema: dict) -> dict:
    if mode == "json_schema":
        name = re.sub(r"[^A-Za-z0-9_-]", "_", str(schema.get("title") or "response"))[:64]
        return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
    if mode == "json_object_schema":
        return {"type": "json_object", "schema": schema}
    return {"type": "json_object"}


def _message(exc: Exception) -> str:
    """The server's own error message, on one line."""
    body = getattr(exc, "body", None)
    message = None
    if isinstance(body, dict):
        error = body.get("error", body)
        message = error.get("message") if isinstance(error, dict) else error
        if message is None and "detail" in body:  # FastAPI validation errors (llama-cpp-python)
            message = body["detail"]
    text = str(message if message is not None else getattr(exc, "message", exc))
    return " ".join(text.split())[:300]


def _connection_reason(exc: Exception) -> str:
    """A short cause for a connection failure, e.g. 'connection refused'."""
    cause = exc.__cause__ or exc.__context__
    while cause is not None and (cause.__cause__ or cause.__context__) is not None and not str(cause):
        cause = cause.__cause__ or cause.__context__
    detail = str(cause or exc).lower()
    if "refused" in detail:
        return "connection refused"
    if "name or service not known" in detail or "nodename nor servname" in detail or "name resolution" in detail:
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
            raise SelfpruneError(
                f"{name} has no chat template, so it cannot run the search's LLM operators: "
                "use --llm local:<a chat model> or --llm openai:<model>"
            )
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
        device = next(self.model.parameters()).device
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
    api_key_env: str = "OPENAI_API_KEY",
    self_model=None,
    self_tokenizer=None,
    timeout: float = 120.0,
) -> ChatBackend:
    """Build the backend named by ``spec`` (the CLI's ``--llm`` value); see ``SPEC_FORMS``."""
    spec = (spec or "").strip()
    kind, _, rest = spec.partition(":")
    if kind == "openai" and rest.strip():
        return OpenAICompatibleBackend(rest.strip(), base_url=base_url, api_key_env=api_key_env, timeout=timeout)
    if spec == "self":
        if self_model is None or self_tokenizer is None:
            raise SelfpruneError("--llm self needs the model being pruned, and none was loaded: pass --model")
        return TransformersChatBackend(self_model, self_tokenizer, name="self")
    if kind == "local" and rest.strip():
        import torch

        from ..models import load_model

        device = "cuda" if torch.cuda.is_available() else "cpu"
        model, tokenizer = load_model(rest.strip(), device=device)
        return TransformersChatBackend(model, tokenizer, name=f"local:{rest.strip()}")
    raise SelfpruneError(f"unknown --llm '{spec}': use {SPEC_FORMS}")
