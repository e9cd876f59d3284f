"""LLaMA-style families: LLaMA (SmolLM2 is one), Mistral, Qwen2 (q/k/v biases) and Qwen3 (per-head q/k norms).

They share module names, so one adapter serves all; Qwen3's ``q_norm``/``k_norm`` act on ``head_dim``
and need no slicing, and Qwen2's q/k/v biases are sliced with their rows by the engine.
"""
from __future__ import annotations

from .base import ModelAdapter


class LlamaAdapter(ModelAdapter):
    model_type = "llama"
    pruned_class_name = "SelfPrunedLlamaForCausalLM"


class MistralAdapter(ModelAdapter):
    model_type = "mistral"
    pruned_class_name = "SelfPrunedMistralForCausalLM"


class Qwen2Adapter(ModelAdapter):
    model_type = "qwen2"
    pruned_class_name = "SelfPrunedQwen2ForCausalLM"


class Qwen3Adapter(ModelAdapter):
    model_type = "qwen3"
    pruned_class_name = "SelfPrunedQwen3ForCausalLM"
