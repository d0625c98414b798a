"""What a model family contributes: the facts the generic code needs about it (IA3 modules, where its decoder
blocks are, how checkpoints name its weights) and the exact speed-ups the training path applies by ``model_type``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..loss import RowSelector
from .masks import PaddedInputs
from .packed import PackedInputs


@dataclass(frozen=True)
class Family:
    model_type: str
    """``config.model_type`` of the models this entry describes."""
    name: str = ""
    """How the family is called in messages (e.g. ``Llama``)."""
    target_modules: tuple[str, ...] = ()
    """IA3's default target modules for the family: PEFT's (a test checks they still agree), named here so the
    preflight can say what IA3 will scale."""
    feedforward_modules: tuple[str, ...] = ()
    """The subset of :attr:`target_modules` that IA3 scales on its input (PEFT's default)."""
    blocks: str = ""
    """Dotted path from the ``*ForCausalLM`` model to the list of decoder blocks (``model.layers``)."""
    checkpoint_prefix: str = ""
    """The base model's attribute name, which saved checkpoints put before its weights' keys
    (``model.layers.0...``) and some publishers leave out (bigscience's Bloom: ``h.0...``)."""
    checkpoint_renames: tuple[tuple[str, str], ...] = ()
    """``(our parameter-name prefix, the checkpoints' prefix)`` pairs where transformers renames weights on load:
    GPT-NeoX's head is ``lm_head`` in the model and ``embed_out`` in every saved checkpoint."""
    fuse_activations: Callable[[nn.Module], int] | None = None
    """Swap activation modules for fused equivalents in place; returns how many were swapped."""
    last_rows: Callable[[nn.Module], RowSelector] | None = None
    """Install a row selector on the last block, so it computes only rows that predict a label."""
    attention: Callable[[nn.Module, str], int] | None = None
    """Switch the attention modules to an implementation (``model.attention``: ``sdpa`` or ``eager``)."""
    dropout_probs: tuple[str, ...] = ()
    """Module attributes holding a dropout probability the family applies functionally (``F.dropout(p=...)``), not
    through an ``nn.Dropout``: what disabling dropout must zero besides the ``nn.Dropout`` modules."""
    packed_inputs: Callable[[nn.Module], PackedInputs] | None = None
    """Prepare the model for packed rows (``data.packing``) and return how a packed batch becomes its base model's
    keyword arguments (see :mod:`.packed`). None: the family cannot be packed exactly."""
    padded_inputs: Callable[[nn.Module], PaddedInputs] | None = None
    """How a padded batch becomes its base model's keyword arguments (see :mod:`.masks`). None: the 2-D padding
    mask as is."""

    def block_list(self, model: nn.Module) -> nn.ModuleList:
        """The decoder blocks of a ``*ForCausalLM`` of this family, in order."""
        mod = model
        for part in self.blocks.split("."):
            mod = getattr(mod, part)
        return mod  # type: ignore[return-value]


class BatchInputs:
    """How a collated batch becomes its base model's keyword arguments: padded (``attention_mask`` left out where
    no row is padded, see :func:`...data.collate.to_device`) or packed (``seq_ids`` and ``position_ids``)."""

    def __init__(self, padded: PaddedInputs | None = None, packed: PackedInputs | None = None) -> None:
        self.padded = padded
        self.packed = packed

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, seq_ids: torch.Tensor | None,
                 position_ids: torch.Tensor | None, dtype: torch.dtype) -> dict[str, Any]:
        if seq_ids is not None:
            if self.packed is None:
                raise ValueError("a packed batch reached a model that was not set up for packing (data.packing)")
            return self.packed(seq_ids, position_ids, dtype)
        if self.padded is not None:
            return self.padded(input_ids, attention_mask, dtype)
        # The 2-D mask the model has always had: all ones where the batch left it out (no row padded).
        return {"attention_mask": torch.ones_like(input_ids) if attention_mask is None else attention_mask}

