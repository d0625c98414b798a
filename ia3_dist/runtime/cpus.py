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


def _cpu_list_size(text: str) -> int:
    """CPUs in a kernel CPU list such as ``0-3,8,10-11``; ValueError when it is not one."""
    n = 0
    for part in text.strip().split(","):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


def host_cpus(root: Path = Path("/sys/fs/cgroup")) -> int:
    """The CPUs this machine (or container) lets the job's processes use: the cgroup's cpuset (v2
    ``cpuset.cpus.effective``, v1 ``cpuset/cpuset.effective_cpus``), else every CPU the OS counts. Unlike the
    affinity mask, a launcher's per-rank binding does not narrow it."""
    for f in (root / "cpuset.cpus.effective", root / "cpuset" / "cpuset.effective_cpus"):
        try:
            n = _cpu_list_size(f.read_text())
        except (OSError, ValueError):
            continue
        if n > 0:
            return n
    return os.cpu_count() or 1


def _bound_per_rank(mask: int, local_world: int, host: int, environ: Mapping[str, str]) -> bool:
    """Whether a launcher already bound this rank to its own CPUs (``deepspeed --bind_cores_to_rank``: numactl
    gives each local rank a disjoint slice and sets OMP_NUM_THREADS to its size). Both signs are required: a mask
    that only looks small (``numactl --cpunodebind=0 deepspeed ...`` puts every rank on one socket's cores) has
    no OMP_NUM_THREADS of its size, and a user's own OMP_NUM_THREADS alone says nothing about the mask."""
    try:
        omp = int(environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        return False
    return local_world > 1 and omp == mask < host and mask * local_world <= host


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
               environ: Mapping[str, str] | None = None, host: int | None = None) -> int:
    """CPU threads for one of ``local_world`` ranks on this node.

    Outside Slurm the usable CPUs are split between the local ranks, unless the launcher already bound each rank
    to its own CPUs (:func:`_bound_per_rank`; ``host``: :func:`host_cpus` by default): then the mask is the
    rank's share. A cgroup quota is the whole container's, split between the local ranks either way. Under
    Slurm the affinity mask is the job's CPUs (one task per node running a launcher), this task's own CPUs
    (``srun`` one task per rank with task/affinity or task/cgroup), or the whole node (a cluster that confines
    nothing); the node's allocation, ``SLURM_CPUS_ON_NODE``, is split between the local ranks in every case, and
    a rank never gets more than its mask, nor, where a launcher's ranks share one mask (``LOCAL_RANK`` set, no
    per-rank binding), more than its slice of it."""
    e = os.environ if environ is None else environ
    mask = len(affinity() if cores is None else cores)
    q = _quota(cgroup_root)
    s = _slurm_cpus(e)
    bound = _bound_per_rank(mask, local_world, host_cpus(cgroup_root) if host is None else host, e)
    if s is None:
        share = mask if bound else mask // local_world
        return max(1, min(share, math.ceil(q) // local_world) if q else share)
    # The quota, as outside Slurm, is the container's: every local rank draws on it.
    n = min(mask, math.ceil(q) // local_world) if q else mask
    if "LOCAL_RANK" in e and not bound:
        # A launcher's ranks (torchrun, deepspeed: it sets LOCAL_RANK) share this task's one mask, which may be
        # narrower than the node's allocation (numactl --cpunodebind=0 torchrun ...): split it too.
        n = min(n, mask // local_world)
    return max(1, min(n, s // local_world))


def node_cpus(local_world: int, cores: list[int] | None = None, cgroup_root: Path = Path("/sys/fs/cgroup"),
              environ: Mapping[str, str] | None = None, host: int | None = None) -> int:
    """The CPUs this node's ``local_world`` ranks have together: Slurm's allocation on the node where there is one,
    else the affinity mask (a launcher's per-rank binding counts each rank's slice: :func:`_bound_per_rank`), both
    capped by a cgroup quota. A rank's own mask under ``srun`` one task per rank is its share, not the node's."""
    e = os.environ if environ is None else environ
    mask = len(affinity() if cores is None else cores)
    s = _slurm_cpus(e)
    if s is not None:
        n = s
    else:
        bound = _bound_per_rank(mask, local_world, host_cpus(cgroup_root) if host is None else host, e)
        n = mask * local_world if bound else mask
    q = _quota(cgroup_root)
    return max(1, min(n, math.ceil(q)) if q else n)


def mask_is_allocation(cores: list[int], environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``cores`` are this job's own CPUs, so pinning ranks to slices of them stays inside the job: false
    where Slurm allocated fewer CPUs on this node than the mask shows (nothing confines the job, and which cores
    are its own is unknown)."""
    s = _slurm_cpus(os.environ if environ is None else environ)
    return s is None or s >= len(cores)
