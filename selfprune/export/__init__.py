"""Export to serving formats: GGUF for llama.cpp (dense and pruned models, f32 / f16 / quantized)."""
from .gguf_export import DEFAULT_FFN_MULTIPLE, OUTTYPES, check_gguf_file, export_gguf, layer_shapes, quantize_gguf

__all__ = ["DEFAULT_FFN_MULTIPLE", "OUTTYPES", "check_gguf_file", "export_gguf", "layer_shapes", "quantize_gguf"]
