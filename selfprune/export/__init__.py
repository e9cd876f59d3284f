"""GGUF export for llama.cpp and llama.cpp's quantizer."""
from .gguf_export import (DEFAULT_FFN_MULTIPLE, OUTTYPES, check_gguf_file, export_gguf, layer_shapes, quantize_gguf,
                          ties_embeddings)
from .quantize import ImportanceMatrix, parse_tensor_types

__all__ = ["DEFAULT_FFN_MULTIPLE", "OUTTYPES", "ImportanceMatrix", "check_gguf_file", "export_gguf", "layer_shapes",
           "parse_tensor_types", "quantize_gguf", "ties_embeddings"]
