"""What the pruning engine needs to know about a model family.

An adapter names the decoder layers and, inside each, the four attention projections and the three MLP
projections; it reads head counts and sizes from the config (never constants) and tells which class of
the pruned-model modeling file reloads the family.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class AttentionLinears:
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear


@dataclass(frozen=True)
class MLPLinears:
    gate: nn.Linear
    up: nn.Linear
    down: nn.Linear


class ModelAdapter:
    """Base adapter: a decoder-only model with separate q/k/v/o and gated MLP projections."""

    model_type: str = ""
    #: class name inside ``modeling_selfprune.py`` that reloads a pruned model of this family
    pruned_class_name: str = ""

    def __init__(self, model):
        self.model = model
        self.config = model.config

    # -- sizes, all from the config -------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return getattr(self.config, "num_key_value_heads", None) or self.num_heads

    @property
    def head_dim(self) -> int:
        return getattr(self.config, "head_dim", None) or self.hidden_size // self.num_heads

    @property
    def intermediate_size(self) -> int:
        return self.config.intermediate_size

    # -- modules ----------------------------------------------------------------------------------
    def decoder(self) -> nn.Module:
        """The module holding ``layers`` (``model.model`` for every family here)."""
        return self.model.model

    def layers(self) -> nn.ModuleList:
        return self.decoder().layers

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn

    def mlp(self, layer: nn.Module) -> nn.Module:
        return layer.mlp

    def attention_linears(self, layer: nn.Module) -> AttentionLinears:
        attn = self.attention(layer)
        return AttentionLinears(attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)

    def mlp_linears(self, layer: nn.Module) -> MLPLinears:
        mlp = self.mlp(layer)
        return MLPLinears(mlp.gate_proj, mlp.up_proj, mlp.down_proj)

    def attention_input(self, layer: nn.Module) -> nn.Module:
        """The module that receives the attention's input (calibration hooks it)."""
        return self.attention_linears(layer).q

    def mlp_input(self, layer: nn.Module) -> nn.Module:
        """The module that receives the MLP's input (calibration hooks it)."""
        return self.mlp_linears(layer).gate

    def set_attention_linears(self, attention: nn.Module, linears: AttentionLinears, num_heads: int,
                              num_kv_heads: int) -> None:
        """Install sliced projections in a (cloned) attention module and update its head bookkeeping."""
        attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj = linears.q, linears.k, linears.v, linears.o
        attention.num_key_value_groups = num_heads // num_kv_heads if num_kv_heads else 0

    def set_mlp_linears(self, mlp: nn.Module, linears: MLPLinears) -> None:
        """Install sliced projections in a (cloned) MLP module."""
        mlp.gate_proj, mlp.up_proj, mlp.down_proj = linears.gate, linears.up, linears.down
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = linears.down.in_features

    def layer_shape(self, layer: nn.Module) -> tuple[int, int, int]:
        """Current (query heads, key-value heads, MLP width) of a layer, read off its weights."""
        lin = self.attention_linears(layer)
        return (lin.q.out_features // self.head_dim, lin.k.out_features // self.head_dim,
                self.mlp_linears(layer).gate.out_features)
