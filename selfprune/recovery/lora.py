"""LoRA through peft on the attention and MLP projections, merged back so the saved model keeps the pruned
shapes and carries no adapter."""
from __future__ import annotations

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def attach_lora(model, rank: int, alpha: float | None = None, dropout: float = 0.0):
    """Wrap ``model`` in a peft model whose only trainable weights are rank-``rank`` adapters."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, lora_dropout=dropout,
                        target_modules=LORA_TARGETS, bias="none")
    return get_peft_model(model, config)


def merge_lora(peft_model):
    """Fold the adapters into the projection weights and return the plain model (same class, same shapes)."""
    return peft_model.merge_and_unload()
