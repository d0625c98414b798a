"""How many CPUs this process may really use: its affinity mask, capped by a cgroup CPU quota.

A container limited to 2 CPUs by quota still shows every host core in ``sched_getaffinity`` and ``cpu_count``;
sizing thread pools and tokenizer workers from those starts dozens of workers that share two cores."""

from __future__ import annotations

import math
import os
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


def usable_cpus(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    q = _quota(cgroup_root)
    return max(1, min(n, math.ceil(q)) if q else n)
