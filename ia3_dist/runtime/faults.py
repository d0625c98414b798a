"""Fault injection for the fault tests, off unless ``IA3_DIST_FAULT`` is set.

``IA3_DIST_FAULT=<point>:<step>:<rank>[:<action>]`` makes that rank misbehave when it reaches ``point`` at optimizer
step ``step`` (1-based, the step in progress):

- points: ``step`` (start of the step, before its stats all-reduce), ``save-begin`` (before a checkpoint write),
  ``save`` (after this rank wrote its part, before the pointer moves), ``save-in-place`` (rank 0, its
  checkpoint complete as ``stepN.new`` and a ``stepN`` already there set aside as ``stepN.old``, before the new one
  goes into place), ``save-adapter`` (rank 0, the final adapter's ``adapter.new`` made, before anything is
  written into it; ``step`` is the run's last), ``trained`` (rank 0, after its work that follows training: the
  metrics plot, a tracker's upload of the adapter; ``step`` is the run's last), ``eval`` (after the step, before the
  evaluation due there), ``probe`` (the ``micro_batch_size: auto``
  probe; ``step`` is then the micro-batch being probed);
- actions: ``kill`` (SIGKILL itself, the default), ``spin`` (a Python loop that never ends: a rank stuck in data
  loading or a deadlock in Python), ``collective`` (an all-reduce on a side group the other ranks never join: a
  rank stuck inside a collective), ``fill`` (grow the file ``IA3_DIST_FAULT_FILL`` names until its filesystem
  is full: the next write there gets ENOSPC), ``inodes`` (as ``fill``, then empty files beside it until no
  inode is left: the next file or dir made there gets ENOSPC, as on a full inode quota), ``unwritable`` (move
  the file ``IA3_DIST_FAULT_FILL`` names aside to ``<name>.aside`` and make an empty dir in its place: the next
  write of it fails, as a log on a failing disk does), ``oom`` (raise
  ``torch.OutOfMemoryError``, as an allocation on a full GPU does), ``term`` (SIGTERM to itself, as a
  scheduler's preemption sends: the run checkpoints at this step and stops);
- ``grad:<step>:<rank>:nan`` (see :func:`poisoned`): every loss term of that step on that rank keeps its value and
  gets a NaN gradient, as an overflow in the backward pass would give.

Real processes do the real thing; the tests only pick where.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import torch

from . import dist

ENV = "IA3_DIST_FAULT"
FILL_ENV = "IA3_DIST_FAULT_FILL"
HOLD_ENV = "IA3_DIST_FAULT_HOLD_S"
RELEASE_ENV = "IA3_DIST_FAULT_RELEASE"
ACTIONS = ("kill", "spin", "collective", "fill", "inodes", "unwritable", "oom", "term", "hold", "nan")


def _spec() -> tuple[str, int, int, str] | None:
    raw = os.environ.get(ENV, "")
    if not raw:
        return None
    parts = raw.split(":")
    if len(parts) not in (3, 4) or parts[3:] and parts[3] not in ACTIONS:
        raise ValueError(f"{ENV}={raw!r}: expected <point>:<step>:<rank>[:{'|'.join(ACTIONS)}]")
    action = parts[3] if len(parts) == 4 else "kill"
    if (parts[0] == "grad") != (action == "nan"):
        raise ValueError(f"{ENV}={raw!r}: the grad point takes the nan action, and only it")
    return parts[0], int(parts[1]), int(parts[2]), action


_side_group: Any = None


def setup() -> None:
    """Every rank: create the side group a ``collective`` fault waits on (group creation is itself collective, so
    it happens up front on all ranks, not only on the faulty one)."""
    global _side_group
    s = _spec()
    if s is not None and s[3] == "collective":
        import torch.distributed as td

        _side_group = td.new_group(backend="gloo")


def hit(point: str, step: int, rank: int, stop: Any = None) -> None:
    """``stop``: the run's StopFlag, which ends a ``hold`` early."""
    s = _spec()
    if s is None or (s[0], s[1], s[2]) != (point, step, rank):
        return
    action = s[3]
    print(f"ia3-dist: {ENV}: {action} on rank {rank} at point {point!r}, step {step}", flush=True)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "spin":
        while True:
            time.sleep(0.01)
    elif action == "collective":
        dist.all_reduce_sum(torch.zeros(1), group=_side_group)
    elif action == "fill":
        _fill(Path(os.environ[FILL_ENV]))
    elif action == "inodes":
        _fill(Path(os.environ[FILL_ENV]))
        _use_inodes(Path(os.environ[FILL_ENV] + ".inodes"))
    elif action == "unwritable":
        target = Path(os.environ[FILL_ENV])
        target.rename(target.with_name(target.name + ".aside"))
        target.mkdir()
    elif action == "term":
        os.kill(os.getpid(), signal.SIGTERM)
    elif action == "hold":
        deadline = time.monotonic() + float(os.environ.get(HOLD_ENV, "120"))
        release = Path(os.environ[RELEASE_ENV]) if os.environ.get(RELEASE_ENV) else None
        while time.monotonic() < deadline and not (stop is not None and stop.requested) \
                and not (release is not None and release.exists()):
            time.sleep(0.05)
    elif action == "oom":
        raise torch.OutOfMemoryError(f"{ENV}: injected at micro-batch {step}")


def poisoned(loss: torch.Tensor, step: int, rank: int) -> torch.Tensor:
    """``loss`` itself, or under ``grad:<step>:<rank>:nan`` at that step and rank, a term of the same value whose
    gradient is NaN."""
    if _spec() != ("grad", step, rank, "nan"):
        return loss
    print(f"ia3-dist: {ENV}: NaN gradients on rank {rank} at step {step}", flush=True)
    return _NanGrad.apply(loss)


class _NanGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        return torch.full_like(g, float("nan"))


def _fill(path: Path) -> None:
    """Write zeros until the filesystem refuses (ENOSPC), and keep the file: the disk stays full. Unbuffered, so
    nothing is left to flush (and fail) on close."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for size in (1 << 20, 4096, 1):
            try:
                while os.write(fd, b"\0" * size):
                    pass
            except OSError:
                pass
    finally:
        os.close(fd)


def _use_inodes(d: Path, most: int = 1 << 16) -> None:
    """Empty files in ``d`` until the filesystem has no inode left (bounded: a filesystem with millions would take
    long; the tests mount one with few)."""
    d.mkdir()
    for i in range(most):
        try:
            os.close(os.open(d / str(i), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except OSError:
            return
