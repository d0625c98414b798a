"""The Llama-style families: Llama (GQA), Qwen2 (GQA, biased q/k/v projections), Mistral (GQA, sliding window)
share one decoder block layout (``model.layers``, pre-norm, SwiGLU MLP) and PEFT's IA3 defaults differ only in
the attention projection Qwen2 scales. Their SiLU is already one kernel and transformers runs their attention
through SDPA, so the only speed-up to add is the last block's MLP at label rows."""

from __future__ import annotations

from torch import nn

from .base import Family
from .packed import rotary_inputs
from .rows import ScatterMLPRows


def last_rows(model: nn.Module) -> ScatterMLPRows:
    """The row selector on the last block of a Llama-style ``*ForCausalLM``."""
    return ScatterMLPRows(model.model.layers[-1])


def _family(model_type: str, name: str, attn: tuple[str, ...]) -> Family:
    return Family(model_type=model_type, name=name, target_modules=(*attn, "down_proj"),
                  feedforward_modules=("down_proj",), blocks="model.layers", checkpoint_prefix="model",
                  last_rows=last_rows, packed_inputs=rotary_inputs, dropout_probs=("attention_dropout",))


LLAMA = _family("llama", "Llama", ("k_proj", "v_proj"))
QWEN2 = _family("qwen2", "Qwen2", ("q_proj", "v_proj"))
MISTRAL = _family("mistral", "Mistral", ("k_proj", "v_proj"))
