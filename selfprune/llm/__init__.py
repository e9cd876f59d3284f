"""LLM backends for the search's LLM operators, and lenient parsing of their replies."""
from .backends import (
    FORMAT_MODES,
    ChatBackend,
    ChatResult,
    OpenAICompatibleBackend,
    TransformersChatBackend,
    make_backend,
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
]
