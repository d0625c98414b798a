"""Attention masks for the rotary families (Llama, Qwen2, Mistral, GPT-NeoX), built on the device in the form
transformers passes through as is: a 4-D mask (a dict of them by layer type, for models that mix full and
sliding-window layers).

Given a 2-D padding mask, or packed positions and no mask, transformers' own mask code reads device tensors back to
the host to decide what to build: whether the padding mask is all ones (``fast_all``, twice per forward pass) and
where packed positions restart (``find_packed_sequence_indices``). Each read stops the GPU queue, in every forward
pass: 8 to 16 host syncs per optimizer step at the reference recipe's accumulation. The host knows both answers
where it builds the batch (:func:`...data.collate.to_device` leaves out an all-ones mask), so the mask here is
built from tensor operations alone. What it holds is what transformers builds: key ``s`` visible to query ``t``
when ``s <= t``, ``s`` is not padding (or is in ``t``'s document, packed) and, on a sliding-window layer,
``t - s < window``; a bool mask for SDPA, an additive one (0 or the dtype's minimum) for eager attention. Other
implementations (flash-attention, which reads packed positions as variable-length sequences) keep transformers'
own path."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .packed import PackedInputs, additive, causal, document_allowed

MaskLayout = Callable[[Any, torch.Tensor], "torch.Tensor | dict[str, torch.Tensor] | None"]
"""``(model config, allowed) -> the attention_mask argument``: how a family's base model takes the ``(rows, 1, T,
T)`` bool mask ``allowed``; None where the config asks for a pattern built here would not reproduce."""

PaddedInputs = Callable[[torch.Tensor, torch.Tensor | None, torch.dtype], dict[str, Any]]
"""``(input_ids, 2-D padding mask or None where no row is padded, dtype) -> base-model kwargs`` for a padded
batch."""

BUILT_FOR = ("sdpa", "eager")
"""The attention implementations whose masks this module builds."""


def windowed(allowed: torch.Tensor, window: int) -> torch.Tensor:
    """``allowed`` where the key is also within ``window`` positions of the query (transformers'
    ``sliding_window_overlay``: ``s > t - window``)."""
    t = allowed.shape[-1]
    pos = torch.arange(t, device=allowed.device)
    return allowed & ((pos[:, None] - pos[None, :]) < window)


def full_layout(_config: Any, allowed: torch.Tensor) -> torch.Tensor:
    """Llama, GPT-NeoX: every layer attends causally over the whole sequence."""
    return allowed


def window_layout(config: Any, allowed: torch.Tensor) -> torch.Tensor:
    """Mistral: every layer within ``config.sliding_window`` when it is set (transformers then builds its sliding
    mask for all layers)."""
    window = getattr(config, "sliding_window", None)
    return allowed if window is None else windowed(allowed, window)


def layer_types_layout(config: Any, allowed: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """Qwen2: one mask per kind of layer in ``config.layer_types`` (a model given the dict picks each layer's);
    None for a kind other than full and sliding attention."""
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if not kinds <= {"full_attention", "sliding_attention"}:
        return None
    return {k: windowed(allowed, config.sliding_window) if k == "sliding_attention" else allowed for k in kinds}


def _for_implementation(mask: torch.Tensor | dict[str, torch.Tensor], impl: str, dtype: torch.dtype
                        ) -> torch.Tensor | dict[str, torch.Tensor]:
    """The bool ``mask`` as ``impl`` takes it: as is for SDPA, additive for eager (transformers' ``eager_mask``)."""
    if isinstance(mask, dict):
        return {k: _for_implementation(v, impl, dtype) for k, v in mask.items()}  # type: ignore[misc]
    return mask if impl == "sdpa" else additive(mask, dtype)


def _impl(model: nn.Module) -> str | None:
    return getattr(model.config, "_attn_implementation", None)


def rotary_padded(layout: MaskLayout) -> Callable[[nn.Module], PaddedInputs]:
    """A padded batch's inputs: the 4-D causal-and-padding mask; causal only where no row is padded. Not no mask
    there: transformers then builds position ids and reads them back to look for packed documents (one sync per
    forward pass either way). The price on GPUs: SDPA with an explicit mask runs its memory-efficient kernel, not
    the flash one that ``is_causal`` allows (see the README's GPU notes)."""

    def setup(model: nn.Module) -> PaddedInputs:
        def inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, dtype: torch.dtype
                   ) -> dict[str, Any]:
            impl = _impl(model)
            if impl in BUILT_FOR:
                rows, t = input_ids.shape
                tril = causal(t, input_ids.device)
                allowed = (tril.expand(rows, 1, t, t) if attention_mask is None else
                           (tril[None] & attention_mask.bool()[:, None, :])[:, None])
                mask = layout(model.config, allowed)
                if mask is not None:
                    return {"attention_mask": _for_implementation(mask, impl, dtype)}  # type: ignore[arg-type]
            return {"attention_mask": attention_mask}

        return inputs

    return setup


def rotary_packed(layout: MaskLayout) -> Callable[[nn.Module], PackedInputs]:
    """A packed batch's inputs: positions that restart at each document (the rotary embedding sees each
    document's own) and the 4-D per-document causal mask. Implementations this module does not build for get no
    mask: transformers then finds the documents from the positions itself (flash-attention reads them as
    variable-length sequences)."""

    def setup(model: nn.Module) -> PackedInputs:
        def inputs(seq_ids: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype) -> dict[str, Any]:
            impl = _impl(model)
            if impl in BUILT_FOR:
                mask = layout(model.config, document_allowed(seq_ids))
                if mask is not None:
                    return {"attention_mask": _for_implementation(mask, impl, dtype),  # type: ignore[arg-type]
                            "position_ids": position_ids}
            # Flash reads packed documents from the positions only in a one-row batch (the preflight refuses
            # packing with flash at micro-batch > 1): with more rows it would attend across documents.
            assert not ("flash" in str(impl) and seq_ids.shape[0] > 1), f"packed rows under {impl}: one row only"
            return {"attention_mask": None, "position_ids": position_ids}

        return inputs

    return setup
