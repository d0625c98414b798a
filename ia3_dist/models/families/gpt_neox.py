"""GPT-NeoX (Pythia, RedPajama-INCITE...): fused ``query_key_value`` like Bloom, rotary positions, and by
default a parallel residual (``x + attn(ln1(x)) + mlp(ln2(x))``). Either residual form adds the MLP's output
itself, so the last block's MLP runs at label rows through the same scatter as the Llama-style blocks."""

from __future__ import annotations

from torch import nn

from .base import Family
from .masks import full_layout, rotary_packed, rotary_padded
from .rows import ScatterMLPRows


def last_rows(model: nn.Module) -> ScatterMLPRows:
    """The row selector on the last block of a ``GPTNeoXForCausalLM``."""
    return ScatterMLPRows(model.gpt_neox.layers[-1])


FAMILY = Family(model_type="gpt_neox", name="GPT-NeoX", target_modules=("query_key_value", "dense_4h_to_h"),
                feedforward_modules=("dense_4h_to_h",), blocks="gpt_neox.layers", checkpoint_prefix="gpt_neox",
                checkpoint_renames=(("lm_head.", "embed_out."),), last_rows=last_rows,
                packed_inputs=rotary_packed(full_layout),
                padded_inputs=rotary_padded(full_layout), dropout_probs=("attention_dropout",))
