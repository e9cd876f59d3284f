"""LLM backends for the search's LLM operators, and lenient parsing of their replies."""
from .backends import (
    FORMAT_MODES,
    ChatBackend,
    ChatResult,
    OpenAICompatibleBackend,
    TransformersChatBackend,
    make_backend,
    preflight_backend,
    redact_url,
)
from .parsing import extract_json

__all__ = [
    "FORMAT_MODES",
    "ChatBackend",
    "ChatResult",
    "OpenAICompatibleBackend",
    "TransformersChatBackend",
    "extract_json",
    "make_backend",
    "preflight_backend",
    "redact_url",
]
