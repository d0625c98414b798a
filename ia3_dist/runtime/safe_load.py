"""Loading checkpoints without running code from them.

DeepSpeed loads its checkpoint files with ``torch.load(weights_only=False)``: a full unpickler, so a ``.pt`` file
whose pickle has a malicious ``__reduce__`` runs that code the moment a run resumes from it. Checkpoints get copied
between clusters and shared, so they are untrusted input. Two defences, both on an explicit allow-list of the few
non-tensor types DeepSpeed's states hold (everything else in them is tensors, numbers, strings and containers):

- before the process group starts, every ``.pt`` file of the checkpoint is scanned (pickle opcodes only, nothing
  is executed) and one with any other global is refused with exit 2 naming the file;
- the engine's checkpoint loader is replaced by ``torch.load(weights_only=True)`` under the same allow-list, so a
  file swapped in after the scan still cannot construct anything else.
"""

from __future__ import annotations

import importlib
from functools import cache
from pathlib import Path
from typing import Any

import torch

from ..errors import UsageError

# Non-tensor types found in DeepSpeed 0.19 checkpoints of ZeRO 0-3 (fp32/bf16/fp16, with and without offload):
# plain data holders, none of which runs code when rebuilt.
ALLOWED_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


@cache
def allowed_objects() -> list[Any]:
    out = []
    for name in ALLOWED_GLOBALS:
        module, _, attr = name.rpartition(".")
        out.append(getattr(importlib.import_module(module), attr))
    return out


def check_file(path: Path) -> None:
    """Refuse ``path`` if its pickle names any global outside torch's safe set and :data:`ALLOWED_GLOBALS`."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as e:  # not a zip archive, truncated, unreadable: torch raises several types
        raise UsageError(f"checkpoint file {path}: unreadable ({type(e).__name__}: {str(e)[:200]}); resume from "
                         f"another checkpoint (train.resume=<dir>) or start over") from None
    unexpected = sorted(set(names) - set(ALLOWED_GLOBALS))
    if unexpected:
        raise UsageError(f"checkpoint file {path}: holds objects of types {', '.join(unexpected[:5])}, which a "
                         f"checkpoint of ours never contains; refusing to load it (loading could run code from it). "
                         f"Use a checkpoint you trust")


def check_checkpoint_dir(ckpt: Path) -> None:
    """Scan every ``.pt`` file of a checkpoint dir (all ranks' files: each rank checks the whole checkpoint)."""
    files = sorted(ckpt.glob("*.pt"))
    if not files:
        raise UsageError(f"checkpoint {ckpt}: no .pt files; resume from another checkpoint")
    for f in files:
        check_file(f)


def safe_torch_load(path: str, map_location: Any = None) -> Any:
    """``torch.load`` as DeepSpeed's checkpoint engine calls it, but with the restricted unpickler."""
    with torch.serialization.safe_globals(allowed_objects()):
        return torch.load(path, map_location=map_location, weights_only=True)


def harden(engine: Any) -> None:
    """Make ``engine.load_checkpoint`` read files through :func:`safe_torch_load`."""
    ce = getattr(engine, "checkpoint_engine", None)
    if ce is None or not hasattr(ce, "load"):
        raise RuntimeError("DeepSpeed engine has no checkpoint_engine.load to harden; refusing to resume")
    ce.load = safe_torch_load
