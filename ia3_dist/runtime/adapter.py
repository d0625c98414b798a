"""Saving the IA3 adapter in PEFT format from a DeepSpeed engine, correct on every ZeRO stage."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointWriteError
from . import dist, faults, manifest, safe_io


def gather_trainable(peft_model: Any, is_main: bool, engine: Any = None) -> dict[str, torch.Tensor]:
    """Full fp32 values of the trainable parameters; every rank must call this (a collective under ZeRO-3).

    ``safe_get_full_fp32_param`` reads the optimizer's fp32 master copy where DeepSpeed maps one (bf16/fp16,
    ZeRO-1/2/3) and gathers ZeRO-3 partitions, whatever ``stage3_param_persistence_threshold`` left unpartitioned.
    ZeRO-0 in bf16/fp16 keeps its masters in DeepSpeed's FP16 optimizers, which that function does not see: they
    are read from ``engine``'s optimizer (the module parameter is the master rounded to bf16, half a bf16 step off
    it: 2**-9 near 1.0). Plain fp32 ZeRO-0 has no master copy: the module parameter is the value.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    from .portable import _flat_slots

    slots = _flat_slots(engine) if engine is not None and getattr(engine, "optimizer", None) is not None else {}
    out: dict[str, torch.Tensor] = {}
    for name, p in peft_model.named_parameters():
        if not p.requires_grad:
            continue
        full = safe_get_full_fp32_param(p)
        if full is None and id(p) in slots:
            flat, off, n = slots[id(p)]
            full = flat.view(-1)[off:off + n].view(p.shape)
        elif full is None:
            if hasattr(p, "ds_id"):
                raise RuntimeError(f"could not gather ZeRO-3 parameter {name}")
            full = p.detach()
        if is_main:
            out[name] = full.detach().float().cpu().clone()
    return out


STEP_FILE = manifest.ADAPTER_STEP_FILE

NEW, OLD = ".new", ".old."
"""``adapter.new``: the adapter being written; ``adapter.old.<12 hex>``: the one it replaces, set aside under a
name no leftover can hold (``manifest.ADAPTER_ASIDE`` owns them) until it is removed."""


def save_adapter(peft_model: Any, out_dir: Path, is_main: bool, fixed: dict[str, torch.Tensor] | None = None,
                 state: dict[str, torch.Tensor] | None = None,
                 extra: Callable[[Path], None] | None = None, step: int = 0, vectors_step: int | None = None,
                 engine: Any = None, final: bool | None = None, base_weights: str | None = None) -> Path:
    """Gather on all ranks, write on rank 0, then every rank learns whether it succeeded. ``fixed``: parameter name
    -> mask of entries the forward pass holds at exactly 1.0 (``ia3.variant: paper``); they are written as 1.0
    whatever the optimizer's weight decay did to the stored values, so the file is a plain IA3 vector that
    ``PeftModel.from_pretrained`` loads. ``state``: vectors gathered earlier (:func:`gather_trainable`: the best
    evaluation's) instead of the model's current ones. ``extra(dir)``: rank 0 writes the other files of the
    adapter (tokenizer, template) there. ``step``: the run's last step (the ``save-adapter`` fault point's).
    ``vectors_step``: the step whose vectors are written, recorded in :data:`STEP_FILE` (none without it).
    ``engine``: the DeepSpeed engine, whose optimizer holds the fp32 masters (see :func:`gather_trainable`).
    ``final``: whether the run has ended (its last step, or early stopping) or only this invocation has
    (``train.stop_after_steps``), recorded beside the step for ``summary`` and ``sweep --local``.
    ``base_weights``: the fingerprint of the base weights the vectors were trained on
    (:func:`..models.files.weights_fingerprint`), recorded there too: ``generate``, ``chat``, ``export`` and
    ``eval`` refuse a base dir that holds other weights now.

    Atomic and durable: everything is written to ``<out_dir>.new``, flushed to stable storage, then renamed to
    ``out_dir`` (an adapter there already is set aside first, and removed after as far as it can be: an NFS
    client still holding one of its files keeps it). A reader (``generate``, an evaluation job, a tracker) never
    sees half an adapter, and a kill or a node crash leaves the earlier one or the new one whole. A write that
    fails on rank 0 (a full disk, a quota) raises :class:`.CheckpointWriteError` (exit 74) on every rank together,
    not on rank 0 alone with the others waiting for it."""
    state = gather_trainable(peft_model, is_main, engine) if state is None else dict(state)
    for name, mask in (fixed or {}).items():
        if name in state:
            state[name] = state[name].masked_fill(mask.view(state[name].shape).cpu(), 1.0)
    error: Exception | None = None
    record = None
    if vectors_step is not None:
        record = {"step": vectors_step, **({"final": final} if final is not None else {}),
                  **({"base_weights": base_weights} if base_weights is not None else {})}
    if is_main:
        try:
            _write(peft_model, out_dir, state, extra, step, record)
        except Exception as e:  # any failure to write (OSError, safetensors', a tokenizer's): all ranks leave
            error = e
    if dist.host_max(int(error is not None)):
        why = f"{type(error).__name__}: {error}" if error is not None else "rank 0 failed; its log says why"
        raise CheckpointWriteError(
            f"the adapter could not be written to {out_dir} ({why}). Free space there (or fix what the error "
            f"names), then resume with train.resume=auto: it continues from the last checkpoint and writes the "
            f"adapter (with checkpoint.at_end, the default, that is the last step: nothing is trained again)"
        ) from error
    return out_dir


def _write(peft_model: Any, out_dir: Path, state: dict[str, torch.Tensor],
           extra: Callable[[Path], None] | None, step: int, record: dict[str, Any] | None = None) -> None:
    """Rank 0: the adapter into ``<out_dir>.new`` (``record``: its :data:`STEP_FILE`), flushed, then renamed to
    ``out_dir``."""
    staged = out_dir.with_name(out_dir.name + NEW)
    # A killed earlier write's leftovers: set aside (so a part that cannot be removed never blocks this write).
    for leftover in [staged, *set_aside(out_dir)]:
        _discard(leftover, out_dir)
    staged.mkdir()
    faults.hit("save-adapter", step, 0)
    peft_model.save_pretrained(str(staged), state_dict=state, safe_serialization=True)
    if extra is not None:
        extra(staged)
    if record is not None:
        (staged / STEP_FILE).write_text(json.dumps(record) + "\n", encoding="utf-8")
    safe_io.fsync_tree(staged)
    aside = None
    if safe_io.not_a_dir(out_dir):
        out_dir.unlink()  # not ours (the output-dir guard refuses one at the start): never followed
    elif out_dir.is_dir():
        aside = _aside_name(out_dir)
        os.rename(out_dir, aside)
    os.rename(staged, out_dir)
    safe_io.fsync(out_dir.parent, directory=True)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def set_aside(out_dir: Path) -> list[Path]:
    """The earlier adapters of ``out_dir`` set aside and not (yet) removed: a write in progress or cut off
    between its two renames (then ``<out_dir>.new`` is complete), or parts NFS kept."""
    aside = re.compile(re.escape(out_dir.name + OLD) + r"[0-9a-f]{12}")
    try:
        return sorted(e for e in out_dir.parent.iterdir() if aside.fullmatch(e.name))
    except OSError:
        return []


def _aside_name(out_dir: Path) -> Path:
    return out_dir.with_name(out_dir.name + OLD + secrets.token_hex(6))


def _discard(p: Path, out_dir: Path) -> None:
    """Remove ``p`` (a link or a file unlinked, never followed), a dir first renamed to a fresh aside name of
    ``out_dir``'s: what cannot be removed (NFS keeps a file another client holds open) stays there, out of the way."""
    if safe_io.not_a_dir(p):
        p.unlink()
    elif p.is_dir():
        if p.name == out_dir.name + NEW:
            gone = _aside_name(out_dir)
            os.rename(p, gone)
            p = gone
        shutil.rmtree(p, ignore_errors=True)
