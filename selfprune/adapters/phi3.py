"""Phi-3: one fused ``qkv_proj`` (query rows, then key rows, then value rows) and one fused
``gate_up_proj`` (gate rows, then up rows).

The engine scores and slices separate q/k/v and gate/up projections; this adapter hands it row views of
the fused weights (sharing their storage) and writes the sliced parts back fused, in the same order.
Phi-3's attention reads its query width from ``config.num_attention_heads``, so a pruned layer gets a
config view with its own head counts (``modeling_selfprune.layer_config``).
"""
from __future__ import annotations

import torch
from torch import nn

from .base import AttentionLinears, MLPLinears, ModelAdapter


def _row_view(linear: nn.Linear, start: int, stop: int) -> nn.Linear:
    """An ``nn.Linear`` whose weight (and bias) are rows ``start:stop`` of ``linear``'s, without copying."""
    view = nn.Linear(linear.in_features, stop - start, bias=linear.bias is not None, device="meta")
    view.weight = nn.Parameter(linear.weight.detach()[start:stop], requires_grad=False)
    if linear.bias is not None:
        view.bias = nn.Parameter(linear.bias.detach()[start:stop], requires_grad=False)
    return view


def fuse_rows(parts: list[nn.Linear]) -> nn.Linear:
    """One ``nn.Linear`` whose output rows are ``parts``' rows, in order."""
    weight = torch.cat([p.weight.detach() for p in parts])
    has_bias = parts[0].bias is not None
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=parts[0].weight.requires_grad)
    if has_bias:
        fused.bias = nn.Parameter(torch.cat([p.bias.detach() for p in parts]), requires_grad=parts[0].weight.requires_grad)
    return fused


class Phi3Adapter(ModelAdapter):
    model_type = "phi3"
    pruned_class_name = "SelfPrunedPhi3ForCausalLM"

    def attention_linears(self, layer: nn.Module) -> AttentionLinears:
        attn = self.attention(layer)
        q_width = attn.o_proj.in_features
        kv_width = (attn.qkv_proj.out_features - q_width) // 2
        qkv = attn.qkv_proj
        return AttentionLinears(_row_view(qkv, 0, q_width), _row_view(qkv, q_width, q_width + kv_width),
                                _row_view(qkv, q_width + kv_width, q_width + 2 * kv_width), attn.o_proj)

    def mlp_linears(self, layer: nn.Module) -> MLPLinears:
        mlp = self.mlp(layer)
        width = mlp.down_proj.in_features
        return MLPLinears(_row_view(mlp.gate_up_proj, 0, width), _row_view(mlp.gate_up_proj, width, 2 * width),
                          mlp.down_proj)

    def attention_input(self, layer: nn.Module) -> nn.Module:
        return self.attention(layer).qkv_proj

    def mlp_input(self, layer: nn.Module) -> nn.Module:
        return self.mlp(layer).gate_up_proj

    def set_attention_linears(self, attention: nn.Module, linears: AttentionLinears, num_heads: int,
                              num_kv_heads: int) -> None:
        from ..modeling_selfprune import layer_config

        attention.qkv_proj = fuse_rows([linears.q, linears.k, linears.v])
        attention.o_proj = linears.o
        attention.num_key_value_heads = num_kv_heads
        attention.num_key_value_groups = num_heads // num_kv_heads if num_kv_heads else 0
        attention.config = layer_config(self.config, num_heads, num_kv_heads)

    def set_mlp_linears(self, mlp: nn.Module, linears: MLPLinears) -> None:
        mlp.gate_up_proj = fuse_rows([linears.gate, linears.up])
        mlp.down_proj = linears.down
