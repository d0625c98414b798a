"""Saving the IA3 adapter in PEFT format from a DeepSpeed engine, correct on every ZeRO stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from . import dist


def gather_trainable(peft_model: Any, is_main: bool) -> dict[str, torch.Tensor]:
    """Full fp32 values of the trainable parameters; every rank must call this (a collective under ZeRO-3).

    ``safe_get_full_fp32_param`` reads the optimizer's fp32 master copy where one exists (bf16/fp16, ZeRO-1/2/3)
    and gathers ZeRO-3 partitions, whatever ``stage3_param_persistence_threshold`` left unpartitioned. Plain fp32
    ZeRO-0 has no master copy: the module parameter is the value.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    out: dict[str, torch.Tensor] = {}
    for name, p in peft_model.named_parameters():
        if not p.requires_grad:
            continue
        full = safe_get_full_fp32_param(p)
        if full is None:
            if hasattr(p, "ds_id"):
                raise RuntimeError(f"could not gather ZeRO-3 parameter {name}")
            full = p.detach()
        if is_main:
            out[name] = full.detach().float().cpu().clone()
    return out


def save_adapter(peft_model: Any, out_dir: Path, is_main: bool, fixed: dict[str, torch.Tensor] | None = None,
                 state: dict[str, torch.Tensor] | None = None) -> Path:
    """Gather on all ranks, write on rank 0, then wait so no rank exits before the files exist. ``fixed``:
    parameter name -> mask of entries the forward pass holds at exactly 1.0 (``ia3.variant: paper``); they are
    written as 1.0 whatever the optimizer's weight decay did to the stored values, so the file is a plain IA3
    vector that ``PeftModel.from_pretrained`` loads. ``state``: vectors gathered earlier (:func:`gather_trainable`:
    the best evaluation's) instead of the model's current ones."""
    state = gather_trainable(peft_model, is_main) if state is None else dict(state)
    for name, mask in (fixed or {}).items():
        if name in state:
            state[name] = state[name].masked_fill(mask.view(state[name].shape).cpu(), 1.0)
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        peft_model.save_pretrained(str(out_dir), state_dict=state, safe_serialization=True)
    dist.barrier()
    return out_dir
