"""Model families behind one interface: the pruning engine only ever talks to a ``ModelAdapter``."""
from __future__ import annotations

from ..errors import SelfpruneError
from .base import ModelAdapter
from .gemma import Gemma2Adapter, Gemma3TextAdapter
from .llama import LlamaAdapter, MistralAdapter, Qwen2Adapter, Qwen3Adapter
from .phi3 import Phi3Adapter

ADAPTERS: tuple[type[ModelAdapter], ...] = (LlamaAdapter, MistralAdapter, Qwen2Adapter, Qwen3Adapter,
                                            Gemma3TextAdapter, Gemma2Adapter, Phi3Adapter)
SUPPORTED_FAMILIES = tuple(cls.model_type for cls in ADAPTERS)


def get_adapter(model) -> ModelAdapter:
    """The adapter for ``model``'s family, or a one-line error listing the supported ones."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for cls in ADAPTERS:
        if cls.model_type == model_type:
            return cls(model)
    raise SelfpruneError(
        f"unsupported architecture {model_type!r}: selfprune supports {', '.join(SUPPORTED_FAMILIES)} "
        "(add an adapter in selfprune/adapters/ for another family)"
    )


__all__ = ["ADAPTERS", "SUPPORTED_FAMILIES", "ModelAdapter", "get_adapter"]
