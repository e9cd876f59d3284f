"""Modeling code for selfprune's pruned models; a copy is written beside every pruned model's weights.

It imports only torch and transformers, so ``AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)`` works without selfprune installed. Each class is its family's stock model whose
decoder layers are resized, before the weights load, to the per-layer widths recorded in
``config.selfprune["layers"]`` (query heads, key-value heads, MLP width, and whether ``o_proj`` /
``down_proj`` carry a bias-compensation term). The kept head/channel indices are provenance, not needed
to rebuild the model: they live in ``selfprune_indices.json`` beside the weights (older folders keep them
in config.json, which this file ignores either way).
"""
from __future__ import annotations

from torch import nn
from transformers import (Gemma2ForCausalLM, Gemma3ForCausalLM, LlamaForCausalLM, MistralForCausalLM,
                          Phi3ForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM)


def _linear_like(old: nn.Linear, in_features: int, out_features: int, bias: bool) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=bias, device=old.weight.device, dtype=old.weight.dtype)


class LayerConfig:
    """The model's config as one pruned layer sees it: its own head counts, everything else read live from
    the model's config. Phi-3's attention takes its query width from ``config.num_attention_heads``."""

    def __init__(self, config, **overrides):
        self.__dict__["_base"] = config
        self.__dict__.update(overrides)

    def __getattr__(self, name):
        if name.startswith("__") or name == "_base":
            raise AttributeError(name)
        return getattr(self._base, name)


def layer_config(config, num_heads: int, num_kv_heads: int) -> LayerConfig:
    return LayerConfig(config, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads)


def _resize_fused_layer(layer: nn.Module, head_dim: int, spec: dict, config) -> None:
    """Phi-3: ``qkv_proj`` holds query, key and value rows; ``gate_up_proj`` gate and up rows."""
    attn, mlp = layer.self_attn, layer.mlp
    hidden = attn.qkv_proj.in_features
    n_q, n_kv, width = spec["num_attention_heads"], spec["num_key_value_heads"], spec["intermediate_size"]
    attn.qkv_proj = _linear_like(attn.qkv_proj, hidden, (n_q + 2 * n_kv) * head_dim, attn.qkv_proj.bias is not None)
    o_bias = attn.o_proj.bias is not None or spec.get("o_proj_bias", False)
    attn.o_proj = _linear_like(attn.o_proj, n_q * head_dim, hidden, o_bias)
    attn.num_key_value_heads = n_kv
    attn.num_key_value_groups = n_q // n_kv if n_kv else 0
    attn.config = layer_config(config, n_q, n_kv)
    mlp.gate_up_proj = _linear_like(mlp.gate_up_proj, hidden, 2 * width, mlp.gate_up_proj.bias is not None)
    down_bias = mlp.down_proj.bias is not None or spec.get("down_proj_bias", False)
    mlp.down_proj = _linear_like(mlp.down_proj, width, hidden, down_bias)


def resize_layer(layer: nn.Module, head_dim: int, spec: dict, config=None) -> None:
    """Give one decoder layer the shapes in ``spec`` (fresh, uninitialised weights) and fix head counts."""
    attn, mlp = layer.self_attn, layer.mlp
    if hasattr(attn, "qkv_proj"):
        return _resize_fused_layer(layer, head_dim, spec, config)
    hidden = attn.q_proj.in_features
    n_q, n_kv, width = spec["num_attention_heads"], spec["num_key_value_heads"], spec["intermediate_size"]
    attn.q_proj = _linear_like(attn.q_proj, hidden, n_q * head_dim, attn.q_proj.bias is not None)
    attn.k_proj = _linear_like(attn.k_proj, hidden, n_kv * head_dim, attn.k_proj.bias is not None)
    attn.v_proj = _linear_like(attn.v_proj, hidden, n_kv * head_dim, attn.v_proj.bias is not None)
    o_bias = attn.o_proj.bias is not None or spec.get("o_proj_bias", False)
    attn.o_proj = _linear_like(attn.o_proj, n_q * head_dim, hidden, o_bias)
    attn.num_key_value_groups = n_q // n_kv if n_kv else 0
    mlp.gate_proj = _linear_like(mlp.gate_proj, hidden, width, mlp.gate_proj.bias is not None)
    mlp.up_proj = _linear_like(mlp.up_proj, hidden, width, mlp.up_proj.bias is not None)
    down_bias = mlp.down_proj.bias is not None or spec.get("down_proj_bias", False)
    mlp.down_proj = _linear_like(mlp.down_proj, width, hidden, down_bias)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = width


class _SelfPrunedMixin:
    """Resizes every decoder layer to the recorded pruned shapes right after the stock constructor."""

    def __init__(self, config):
        super().__init__(config)  # the family's stock model, built from the dense sizes
        self._apply_selfprune_shapes(config)

    def _apply_selfprune_shapes(self, config) -> None:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        specs = config.selfprune["layers"]
        if len(specs) != len(self.model.layers):
            raise ValueError(f"config.selfprune has {len(specs)} layer entries for {len(self.model.layers)} layers")
        for layer, spec in zip(self.model.layers, specs):
            resize_layer(layer, head_dim, spec, config)


class SelfPrunedLlamaForCausalLM(_SelfPrunedMixin, LlamaForCausalLM):
    pass


class SelfPrunedMistralForCausalLM(_SelfPrunedMixin, MistralForCausalLM):
    pass


class SelfPrunedQwen2ForCausalLM(_SelfPrunedMixin, Qwen2ForCausalLM):
    pass


class SelfPrunedQwen3ForCausalLM(_SelfPrunedMixin, Qwen3ForCausalLM):
    pass


class SelfPrunedGemma3ForCausalLM(_SelfPrunedMixin, Gemma3ForCausalLM):
    pass


class SelfPrunedGemma2ForCausalLM(_SelfPrunedMixin, Gemma2ForCausalLM):
    pass


class SelfPrunedPhi3ForCausalLM(_SelfPrunedMixin, Phi3ForCausalLM):
    pass
