"""Saving the IA3 adapter in PEFT format from a DeepSpeed engine, correct on every ZeRO stage."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import dist, safe_io


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


NEW, OLD = ".new", ".old"
"""``adapter.new``: the adapter being written; ``adapter.old``: the one it replaces, between the two renames."""


def save_adapter(peft_model: Any, out_dir: Path, is_main: bool, fixed: dict[str, torch.Tensor] | None = None,
                 state: dict[str, torch.Tensor] | None = None,
                 extra: Callable[[Path], None] | None = None) -> Path:
    """Gather on all ranks, write on rank 0, then wait so no rank exits before the files exist. ``fixed``:
    parameter name -> mask of entries the forward pass holds at exactly 1.0 (``ia3.variant: paper``); they are
    written as 1.0 whatever the optimizer's weight decay did to the stored values, so the file is a plain IA3
    vector that ``PeftModel.from_pretrained`` loads. ``state``: vectors gathered earlier (:func:`gather_trainable`:
    the best evaluation's) instead of the model's current ones. ``extra(dir)``: rank 0 writes the other files of
    the adapter (tokenizer, template) there.

    Atomic and durable: everything is written to ``<out_dir>.new``, flushed to stable storage, then renamed to
    ``out_dir`` (an adapter there already goes to ``<out_dir>.old`` first, removed after). A reader (``generate``,
    an evaluation job, a tracker) never sees half an adapter, and a kill or a node crash leaves the earlier one or
    the new one whole; a resume writes it again."""
    state = gather_trainable(peft_model, is_main) if state is None else dict(state)
    for name, mask in (fixed or {}).items():
        if name in state:
            state[name] = state[name].masked_fill(mask.view(state[name].shape).cpu(), 1.0)
    if is_main:
        staged, old = out_dir.with_name(out_dir.name + NEW), out_dir.with_name(out_dir.name + OLD)
        for leftover in (staged, old):  # a killed earlier write's
            _remove(leftover)
        staged.mkdir(parents=True)
        peft_model.save_pretrained(str(staged), state_dict=state, safe_serialization=True)
        if extra is not None:
            extra(staged)
        safe_io.fsync_tree(staged)
        if out_dir.is_symlink() or (os.path.lexists(out_dir) and not out_dir.is_dir()):
            out_dir.unlink()  # not ours (the output-dir guard refuses one at the start): never followed
        elif out_dir.is_dir():
            os.rename(out_dir, old)
        os.rename(staged, out_dir)
        safe_io.fsync(out_dir.parent, directory=True)
        _remove(old)
    dist.barrier()
    return out_dir


def _remove(p: Path) -> None:
    if p.is_symlink() or (os.path.lexists(p) and not p.is_dir()):
        p.unlink()
    elif p.is_dir():
        shutil.rmtree(p)
