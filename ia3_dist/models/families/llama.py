"""The Llama-style families: Llama (GQA), Qwen2 (GQA, biased q/k/v projections), Mistral (GQA, sliding window)
share one decoder block layout (``model.layers``, pre-norm, SwiGLU MLP) and PEFT's IA3 defaults differ only in
the attention projection Qwen2 scales. Their SiLU is already one kernel and transformers runs their attention
through SDPA, so the only speed-up to add is the last block's MLP at label rows."""

from __future__ import annotations

from torch import nn

from .base import Family
from .masks import MaskLayout, full_layout, layer_types_layout, rotary_packed, rotary_padded, window_layout
from .rows import ScatterMLPRows


def last_rows(model: nn.Module) -> ScatterMLPRows:
    """The row selector on the last block of a Llama-style ``*ForCausalLM``."""
    return ScatterMLPRows(model.model.layers[-1])


def _family(model_type: str, name: str, attn: tuple[str, ...], masks: MaskLayout) -> Family:
    return Family(model_type=model_type, name=name, target_modules=(*attn, "down_proj"),
                  feedforward_modules=("down_proj",), blocks="model.layers", checkpoint_prefix="model",
                  last_rows=last_rows, packed_inputs=rotary_packed(masks), padded_inputs=rotary_padded(masks),
                  dropout_probs=("attention_dropout",))


# How each takes a 4-D mask: Llama one for all layers; Mistral one, sliding when config.sliding_window is set;
# Qwen2 one per kind of layer in config.layer_types (full and sliding-window layers mixed).
LLAMA = _family("llama", "Llama", ("k_proj", "v_proj"), full_layout)
QWEN2 = _family("qwen2", "Qwen2", ("q_proj", "v_proj"), layer_types_layout)
MISTRAL = _family("mistral", "Mistral", ("k_proj", "v_proj"), window_layout)
