"""selfprune: structured pruning of LLMs with per-layer rates found by an LLM-driven evolutionary search."""
__version__ = "0.1.0"

from .errors import SelfpruneError  # noqa: E402


def __getattr__(name):
    # Lazy public API: `import selfprune` stays fast and does not import torch until it is needed.
    if name in ("prune", "Pruner", "PruneReport"):
        from . import pruning

        return getattr(pruning, name)
    if name == "CalibrationConfig":
        from .calibration import CalibrationConfig

        return CalibrationConfig
    if name in ("save_pruned", "load_pruned"):
        from . import pruned_format

        return getattr(pruned_format, name)
    if name == "load":
        return _load
    if name == "load_model":
        from .models import load_model

        return load_model
    if name in ("perplexity", "PerplexityEvaluator"):   # the function, not a submodule: none is named so
        from .evaluation import perplexity as module

        return getattr(module, name)
    raise AttributeError(name)


def _load(path, dtype: str = "float32", device: str = "cpu", device_map=None):
    """Load a pruned (or dense) model folder; returns ``(model, tokenizer)``."""
    from .models import load_model

    return load_model(str(path), dtype=dtype, device=device, device_map=device_map)


__all__ = ["SelfpruneError", "prune", "Pruner", "PruneReport", "CalibrationConfig", "save_pruned", "load",
           "load_model", "perplexity", "PerplexityEvaluator", "__version__"]
