"""Stale build locks of torch's JIT extensions, removed so a start never waits on them for ever.

DeepSpeed loads some of its ops as torch JIT extensions at every start (on CPU ranks its shared-memory all-reduce
in ``init_distributed``, its CPU Adam when the optimizer is built; on GPUs FusedAdam and others where they are not
prebuilt). Each load takes torch's build lock, ``<extensions root>/<python>_<device>/<op>/lock``: a file created
with ``O_EXCL`` and removed when the load ends, for a check of a few milliseconds or a whole compile. A process
killed while it holds the lock (SIGKILL from a launcher's grace period, the OOM killer, a scheduler's kill) leaves
the file behind, and from then on every process that loads the op waits for it in a loop with no deadline:
every later run of that user on that filesystem hangs at start, before the hang watchdog is armed, with nothing in
its log.

The holder keeps the lock file open for as long as it holds it, and it is a process of the user that owns the file.
So a lock file that no process of ours has open is stale: on a local filesystem once it is :data:`LOCAL_STALE_S`
old (a lock just taken by another process, between the look for files and the look for holders, is younger); on a
network one (a home directory shared by the nodes), where the holder may be a process on another node, once it is
older than :data:`NETWORK_STALE_S`, longer than any compile takes. :class:`BuildLockSweeper` checks while a run
starts (the process group and the engine), where the loads happen.

A lock left by a process killed during an op's first compile, removed while ranks of a start already wait on it:
torch has those ranks import the op without building it, so they stop with an ImportError naming it (the next
start builds it). Without the removal they would wait for ever.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

LOCAL_STALE_S = 20.0
"""How old a build lock on a local filesystem with no holder must be to count as stale."""
NETWORK_STALE_S = 900.0
"""How old a build lock on a filesystem other hosts may share, with no holder on this host, must be to count as
stale."""
LOCAL_FS = ("ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "overlay", "zfs", "f2fs", "ramfs", "reiserfs", "jfs",
            "bcachefs")
"""Filesystem types only this host writes to (``/proc/mounts``). Any other (NFS, Lustre, GPFS, an autofs mount point,
a FUSE or cluster filesystem) may be shared: its holder may be a process on another node."""
POLL_S = 5.0


def extensions_root() -> Path:
    """Where torch builds JIT extensions: ``TORCH_EXTENSIONS_DIR``, else torch's default root (under
    ``XDG_CACHE_HOME`` where that is set, as HPC sites often set it to move caches off a small home quota)."""
    env = os.environ.get("TORCH_EXTENSIONS_DIR")
    if env:
        return Path(env)
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root())


def build_locks(root: Path) -> list[Path]:
    """The lock files under ``root``: one per op dir, in each interpreter and device's dir (torch's layout,
    ``py311_cu124/fused_adam/lock``) or directly under the root (``TORCH_EXTENSIONS_DIR`` as some builds set it)."""
    found = []
    for pattern in ("*/*/lock", "*/lock"):
        try:
            found.extend(p for p in root.glob(pattern) if p.is_file())
        except OSError:
            continue
    return found


def _open_by_us(paths: set[str]) -> set[str]:
    """Which of ``paths`` some process of this user has open (its ``/proc/<pid>/fd`` links)."""
    held: set[str] = set()
    uid = os.getuid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid != uid:
                continue
            fd_dir = f"/proc/{entry.name}/fd"
            for fd in os.listdir(fd_dir):
                try:
                    target = os.readlink(f"{fd_dir}/{fd}")
                except OSError:
                    continue
                if target in paths:
                    held.add(target)
        except OSError:
            continue  # gone, or not ours to read
    return held


def _fs_type(path: Path, mounts: str = "/proc/mounts") -> str:
    """The type of the filesystem ``path`` is on (the longest mount point that holds it)."""
    best, kind = "", ""
    try:
        real = os.path.realpath(path)
        with open(mounts, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mnt = parts[1].replace("\\040", " ")
                # >=: of two entries at one mount point the later is what is mounted there (an autofs trigger
                # and the NFS mount over it).
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, kind = mnt, parts[2]
    except OSError:
        return ""
    return kind


def sweep(root: Path | None = None, now: float | None = None) -> list[Path]:
    """Remove the stale build locks under ``root`` (default :func:`extensions_root`); returns those removed."""
    root = extensions_root() if root is None else root
    if sys.platform != "linux":
        return []  # no /proc to tell a held lock from a stale one
    locks = [p for p in build_locks(root) if _owned_by_us(p)]
    if not locks:
        return []
    held = _open_by_us({str(p.resolve()) for p in locks} | {str(p) for p in locks})
    removed = []
    now = time.time() if now is None else now
    for p in locks:
        if str(p) in held or str(p.resolve()) in held:
            continue
        try:
            st = p.stat()
        except OSError:
            continue
        if now - st.st_mtime < (LOCAL_STALE_S if _fs_type(p) in LOCAL_FS else NETWORK_STALE_S):
            continue
        try:
            again = p.stat()
            if (again.st_ino, again.st_mtime_ns) != (st.st_ino, st.st_mtime_ns):
                continue  # released and taken again since: a live lock
            p.unlink()
        except OSError:  # FileNotFoundError: another rank of this host removed it first
            continue
        removed.append(p)
    return removed


def _owned_by_us(p: Path) -> bool:
    try:
        return p.stat().st_uid == os.getuid()
    except OSError:
        return False


class BuildLockSweeper:
    """A thread that removes stale build locks (:func:`sweep`) every :data:`POLL_S` while a run starts; ``say``
    reports each one removed."""

    def __init__(self, say: Callable[[str], None], root: Path | None = None, poll_s: float = POLL_S) -> None:
        self.say, self.root, self.poll_s = say, root, poll_s
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def _once(self) -> None:
        try:
            for p in sweep(self.root):
                self.say(f"ia3-dist: note: removed {p}, a stale torch extension build lock (a process was killed while "
                         f"it loaded DeepSpeed's {p.parent.name} op); every start would have waited on it for ever")
        except Exception as e:  # noqa: BLE001 - a failed check must not stop the run; the load may still go through
            self.say(f"ia3-dist: note: could not check torch's extension build locks ({type(e).__name__}: {e})")

    def start(self) -> BuildLockSweeper:
        self._once()  # before the first load, so a lock left by an earlier run never delays this one

        def loop() -> None:
            while not self._done.wait(self.poll_s):
                self._once()

        self._thread = threading.Thread(target=loop, name="ia3-build-locks", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._done.set()
        if self._thread is not None:
            # Bounded: a sweep stuck on a hung mount must not keep a finished run from exiting (a daemon thread).
            self._thread.join(timeout=POLL_S)
