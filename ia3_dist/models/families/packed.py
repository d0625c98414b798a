"""How each family sees a packed row (``data.packing``): one causal mask per document and positions that restart
at each document. The collator gives ``seq_ids`` (documents of a row numbered from 1, trailing padding 0) and
``position_ids``; a family turns them into the keyword arguments of its base model."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

PackedInputs = Callable[[torch.Tensor, torch.Tensor, torch.dtype], dict[str, Any]]
"""``(seq_ids, position_ids, dtype) -> base-model kwargs`` for a packed batch."""


def causal(t: int, device: torch.device) -> torch.Tensor:
    """The bool ``(T, T)`` causal mask: True where query t may see key s (s <= t)."""
    return torch.ones(t, t, dtype=torch.bool, device=device).tril()


def document_allowed(seq_ids: torch.Tensor) -> torch.Tensor:
    """The bool ``(rows, 1, T, T)`` mask of a packed batch: True where query t may see key s (same document,
    s <= t)."""
    same = seq_ids[:, :, None] == seq_ids[:, None, :]
    return (same & causal(seq_ids.shape[1], seq_ids.device))[:, None]


def additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask as eager attention adds it: 0 where allowed, the dtype's minimum elsewhere (transformers'
    ``eager_mask``)."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


def document_mask(seq_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive ``(rows, 1, T, T)`` mask of a packed batch (:func:`document_allowed`): what transformers'
    eager mask holds for one unpadded sequence, per document."""
    return additive(document_allowed(seq_ids), dtype)


def rescaled_rope(model_config: Any) -> tuple[str, int] | None:
    """``(rope_type, length)`` where the model's rotary frequencies are rebuilt from the batch's longest position
    once it passes ``length`` (transformers' ``dynamic`` and ``longrope`` types; per layer type too): a packed
    row's positions would then turn with frequencies chosen by the documents beside it. None where no layer's
    rope does so (the smallest such length where several do)."""
    params = getattr(model_config, "rope_parameters", None) or getattr(model_config, "rope_scaling", None)
    if not isinstance(params, dict):
        return None
    each = [params] if "rope_type" in params or "type" in params else \
        [p for p in params.values() if isinstance(p, dict)]
    out: tuple[str, int] | None = None
    for p in each:
        kind = p.get("rope_type", p.get("type"))
        if not isinstance(kind, str) or not ("dynamic" in kind or kind == "longrope"):
            continue
        length = (p.get("original_max_position_embeddings") if kind == "longrope" else None) \
            or getattr(model_config, "original_max_position_embeddings", None) \
            or getattr(model_config, "max_position_embeddings", None)
        if isinstance(length, int) and (out is None or length < out[1]):
            out = (kind, length)
    return out
