"""What a model family may contribute: exact speed-ups the generic training path applies by ``model_type``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ..loss import RowSelector


@dataclass(frozen=True)
class Family:
    model_type: str
    """``config.model_type`` of the models this entry describes."""
    fuse_activations: Callable[[nn.Module], int] | None = None
    """Swap activation modules for fused equivalents in place; returns how many were swapped."""
    last_rows: Callable[[nn.Module], RowSelector] | None = None
    """Install a row selector on the last block, so it computes only rows that predict a label."""
    attention: Callable[[nn.Module, str], int] | None = None
    """Switch the attention modules to an implementation (``model.attention``: ``sdpa`` or ``eager``)."""
