"""Model-family facts keyed by ``model_type`` (as PEFT keys its IA3 defaults): named shapes for planning without
weights, and the exact speed-ups each family supports. Generic code asks this registry, never a class name."""

from __future__ import annotations

from typing import Any

from torch import nn

from ...config import ModelSection
from ...config.archs import ARCHS
from ...errors import UsageError
from ..load import decoder_blocks
from ..loss import RowSelector
from . import bloom
from .base import Family

FAMILIES: dict[str, Family] = {f.model_type: f for f in (bloom.FAMILY,)}


def family_of(model_config: Any) -> Family | None:
    return FAMILIES.get(getattr(model_config, "model_type", None))


def arch_config(name: str) -> Any:
    """The HF config of a named architecture (``model.arch``), built from :data:`ARCHS` without the network."""
    from transformers import AutoConfig

    if name not in ARCHS:
        raise UsageError(f"model.arch {name!r}: unknown; known: {', '.join(ARCHS)}")
    model_type, fields = ARCHS[name]
    return AutoConfig.for_model(model_type, **fields)


def apply_speedups(model: nn.Module, section: ModelSection, gradient_checkpointing: bool) -> RowSelector | None:
    """The family's exact speed-ups that ``model.*`` enables; returns the last-block row selector, if any
    (off under gradient checkpointing, whose recomputation sees every row)."""
    fam = family_of(model.config)
    if fam is None:
        return None
    if section.fused_gelu and fam.fuse_activations is not None:
        fam.fuse_activations(model)
    if fam.attention is not None:
        kind = section.attention
        if kind == "auto":
            import torch

            kind = "sdpa" if torch.cuda.is_available() else "eager"
        fam.attention(model, kind)
    if section.last_mlp_at_labels and not gradient_checkpointing and fam.last_rows is not None:
        return fam.last_rows(model)
    return None



def last_block(model: nn.Module) -> nn.Module | None:
    blocks = decoder_blocks(model)
    return blocks[-1] if blocks else None
