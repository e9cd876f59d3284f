"""Gemma 3 (text) and Gemma 2: LLaMA's module names, plus what needs no slicing.

Per-head q/k norms (Gemma 3) act on ``head_dim``; the extra pre/post feed-forward norms act on the hidden
size; embedding scaling, logit soft-capping (Gemma 2) and sliding-window layers are untouched by removing
heads or channels. ``head_dim`` is explicit in their configs (256 for Gemma 3 270M, not hidden / heads).
Gemma 3 270M has one key-value head (MQA): see ``accounting.LayerGeometry.attention_options`` for what each
GQA policy can remove then.
"""
from __future__ import annotations

from .base import ModelAdapter


class Gemma3TextAdapter(ModelAdapter):
    model_type = "gemma3_text"
    pruned_class_name = "SelfPrunedGemma3ForCausalLM"


class Gemma2Adapter(ModelAdapter):
    model_type = "gemma2"
    pruned_class_name = "SelfPrunedGemma2ForCausalLM"
