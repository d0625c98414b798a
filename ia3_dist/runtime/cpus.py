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


def usable_cpus(cgroup_root: Path = Path("/sys/fs/cgroup"), environ: Mapping[str, str] | None = None) -> int:
    """CPUs for this node's work (e.g. tokenizer processes): the affinity mask capped by the cgroup quota and by
    Slurm's allocation on this node."""
    n = len(affinity())
    q = _quota(cgroup_root)
    if q:
        n = min(n, math.ceil(q))
    s = _slurm_cpus(os.environ if environ is None else environ)
    return max(1, min(n, s) if s else n)


def rank_share(local_world: int, cores: list[int] | None = None, cgroup_root: Path = Path("/sys/fs/cgroup"),
               environ: Mapping[str, str] | None = None) -> int:
    """CPU threads for one of ``local_world`` ranks on this node.

    Outside Slurm the usable CPUs are split between the local ranks. Under Slurm the affinity mask is the job's
    CPUs (one task per node running a launcher), this task's own CPUs (``srun`` one task per rank with
    task/affinity or task/cgroup), or the whole node (a cluster that confines nothing); the node's allocation,
    ``SLURM_CPUS_ON_NODE``, is split between the local ranks in every case, and a rank never gets more than its
    mask."""
    n = len(affinity() if cores is None else cores)
    q = _quota(cgroup_root)
    if q:
        n = min(n, math.ceil(q))
    s = _slurm_cpus(os.environ if environ is None else environ)
    if s is None:
        return max(1, n // local_world)
    return max(1, min(n, s // local_world))


def mask_is_allocation(cores: list[int], environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``cores`` are this job's own CPUs, so pinning ranks to slices of them stays inside the job: false
    where Slurm allocated fewer CPUs on this node than the mask shows (nothing confines the job, and which cores
    are its own is unknown)."""
    s = _slurm_cpus(os.environ if environ is None else environ)
    return s is None or s >= len(cores)
