"""How many CPUs this process may really use: its affinity mask, capped by a cgroup CPU quota and by the CPUs
Slurm allocated to the job on this node.

A container limited to 2 CPUs by quota still shows every host core in ``sched_getaffinity`` and ``cpu_count``;
sizing thread pools and tokenizer workers from those starts dozens of workers that share two cores. Likewise a
Slurm cluster without CPU confinement (no ``task/cgroup`` or ``task/affinity`` plugin) lets a job with
``--cpus-per-task=1`` see every core of a node that other jobs share: ``SLURM_CPUS_ON_NODE`` says what it got."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path


def _quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by the cgroup quota (v2 ``cpu.max``, else v1 ``cpu.cfs_*``); None when unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def _slurm_cpus(environ: Mapping[str, str]) -> int | None:
    """CPUs Slurm allocated to this job on this node (shared by the ranks a launcher starts in one task, or by the
    tasks of one node under ``srun``); None outside Slurm or when unreadable."""
    try:
        n = int(environ.get("SLURM_CPUS_ON_NODE", ""))
    except ValueError:
        return None
    return n if n > 0 else None


def affinity() -> list[int]:
    """The CPUs this process may run on (every CPU where the OS has no affinity call)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def usable_cpus(cgroup_root: Path = Path("/sys/fs/cgroup"), environ: Mapping[str, str] | None = None,
                cores: list[int] | None = None) -> int:
    """``len(cores)`` (default: this process's affinity) capped by the cgroup quota and Slurm's allocation."""
    n = len(affinity() if cores is None else cores)
    q = _quota(cgroup_root)
    if q:
        n = min(n, math.ceil(q))
    s = _slurm_cpus(os.environ if environ is None else environ)
    return max(1, min(n, s) if s else n)
