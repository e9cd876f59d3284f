"""Loading dense models (hub id, local folder, GGUF file, or the embedded default) and pruned ones."""
from .loading import DEFAULT_HUB_ID, load_model, resolve_model_spec
from .peek import config_context_length, context_length, model_config_dict

__all__ = ["DEFAULT_HUB_ID", "config_context_length", "context_length", "load_model", "model_config_dict",
           "resolve_model_spec"]
