"""Modeling code for selfprune's pruned models; a copy is written beside every pruned model's weights.

It imports only torch and transformers, so ``AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)`` works without selfprune installed. Each class is its family's stock model whose
decoder layers are resized, before the weights load, to the per-layer widths recorded in
``config.selfprune["layers"]`` (query heads, key-value heads, MLP width, and whether ``o_proj`` /
``down_proj`` carry a bias-compensation term).
"""
from __future__ import annotations

from torch import nn
from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM


def _linear_like(old: nn.Linear, in_features: int, out_features: int, bias: bool) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=bias, device=old.weight.device, dtype=old.weight.dtype)


def resize_layer(layer: nn.Module, head_dim: int, spec: dict) -> None:
    """Give one decoder layer the shapes in ``spec`` (fresh, uninitialised weights) and fix head counts."""
    attn, mlp = layer.self_attn, layer.mlp
    hidden = attn.q_proj.in_features
    n_q, n_kv, width = spec["num_attention_heads"], spec["num_key_value_heads"], spec["intermediate_size"]
    attn.q_proj = _linear_like(attn.q_proj, hidden, n_q * head_dim, attn.q_proj.bias is not None)
    attn.k_proj = _linear_like(attn.k_proj, hidden, n_kv * head_dim, attn.k_proj.bias is not None)
    attn.v_proj = _linear_like(attn.v_proj, hidden, n_kv * head_dim, attn.v_proj.bias is not None)
    o_bias = attn.o_proj.bias is not None or spec.get("o_proj_bias", False)
    attn.o_proj = _linear_like(attn.o_proj, n_q * head_dim, hidden, o_bias)
    attn.num_key_value_groups = n_q // n_kv
    mlp.gate_proj = _linear_like(mlp.gate_proj, hidden, width, mlp.gate_proj.bias is not None)
    mlp.up_proj = _linear_like(mlp.up_proj, hidden, width, mlp.up_proj.bias is not None)
    down_bias = mlp.down_proj.bias is not None or spec.get("down_proj_bias", False)
    mlp.down_proj = _linear_like(mlp.down_proj, width, hidden, down_bias)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = width


class _SelfPrunedMixin:
    """Resizes every decoder layer to the recorded pruned shapes right after the stock constructor."""

    def _apply_selfprune_shapes(self, config) -> None:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        specs = config.selfprune["layers"]
        if len(specs) != len(self.model.layers):
            raise ValueError(f"config.selfprune has {len(specs)} layer entries for {len(self.model.layers)} layers")
        for layer, spec in zip(self.model.layers, specs):
            resize_layer(layer, head_dim, spec)


class SelfPrunedLlamaForCausalLM(_SelfPrunedMixin, LlamaForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        self._apply_selfprune_shapes(config)


class SelfPrunedMistralForCausalLM(_SelfPrunedMixin, MistralForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        self._apply_selfprune_shapes(config)


class SelfPrunedQwen2ForCausalLM(_SelfPrunedMixin, Qwen2ForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        self._apply_selfprune_shapes(config)


class SelfPrunedQwen3ForCausalLM(_SelfPrunedMixin, Qwen3ForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        self._apply_selfprune_shapes(config)
