"""Loading dense models (hub id, local folder, GGUF file, or the embedded default) and pruned ones."""
from .loading import DEFAULT_HUB_ID, load_model, resolve_model_spec

__all__ = ["DEFAULT_HUB_ID", "load_model", "resolve_model_spec"]
