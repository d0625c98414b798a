"""Stale torch extension build locks (``runtime/build_locks.py``): a lock file left by a process killed while it
loaded a DeepSpeed JIT op made every later start wait for ever, before the hang watchdog is armed. Unit tier: which
locks count as stale (no holder among this user's processes, old enough for the filesystem). Slow tier: a real run
whose DeepSpeed ops load from an extensions dir holding such a lock starts and trains, and says what it removed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _util import ROOT, check, launch, metrics

from ia3_dist.runtime import build_locks
from ia3_dist.runtime.build_locks import LOCAL_STALE_S, NETWORK_STALE_S, BuildLockSweeper, sweep


def _lock(root: Path, op: str, age: float) -> Path:
    p = root / "py311_cpu" / op / "lock"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"")
    t = time.time() - age
    os.utime(p, (t, t))
    return p


def test_only_locks_no_process_holds_and_old_enough_are_removed(tmp_path: Path) -> None:
    stale = _lock(tmp_path, "deepspeed_shm_comm", LOCAL_STALE_S + 5)
    young = _lock(tmp_path, "fused_adam", 1.0)  # maybe just taken: the holder may not have been seen yet
    held = _lock(tmp_path, "cpu_adam", 3600.0)
    flat = tmp_path / "other_op" / "lock"  # an extensions root without the interpreter level
    flat.parent.mkdir()
    flat.write_bytes(b"")
    os.utime(flat, (time.time() - 3600, time.time() - 3600))
    # A live holder in another process, as torch's FileBaton keeps it: the fd open from creation to release.
    holder = subprocess.Popen([sys.executable, "-c", "import os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); "
                               "print('open', flush=True); time.sleep(60)", str(held)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        removed = sweep(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert sorted(removed) == sorted([stale, flat])
    assert not stale.exists() and not flat.exists() and young.exists() and held.exists()
    # Its holder gone, the old lock is stale too.
    assert sweep(tmp_path) == [held]


def test_a_network_filesystem_waits_for_a_holder_on_another_node(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """On NFS and the like a process on another node may hold the lock: no local holder says nothing until the
    lock is older than any compile."""
    monkeypatch.setattr(build_locks, "_fs_type", lambda _p: "nfs4")  # autofs, a FUSE or cluster filesystem alike
    compiling = _lock(tmp_path, "fused_adam", 300.0)
    left = _lock(tmp_path, "deepspeed_shm_comm", NETWORK_STALE_S + 60)
    assert sweep(tmp_path) == [left]
    assert compiling.exists()


def test_a_mount_point_listed_twice_is_what_is_mounted_last(tmp_path: Path) -> None:
    """An autofs trigger and the NFS mount over it share a mount point: the later line is the filesystem (the
    first one made a shared home look local, and a lock a compile on another node held was removed at 20 s)."""
    mounts = tmp_path / "mounts"
    mounts.write_text("/dev/sda1 / ext4 rw 0 0\nauto.home /home autofs rw 0 0\nfs:/home /home nfs4 rw 0 0\n"
                      "fs:/proj/a\\040b /proj/a\\040b lustre rw 0 0\n")
    assert build_locks._fs_type(Path("/home/u/.cache/torch_extensions"), str(mounts)) == "nfs4"
    assert build_locks._fs_type(Path("/proj/a b/ext"), str(mounts)) == "lustre"
    assert build_locks._fs_type(Path("/var/tmp"), str(mounts)) == "ext4"
    assert "nfs4" not in build_locks.LOCAL_FS and "autofs" not in build_locks.LOCAL_FS


def test_the_root_is_torchs_own(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """XDG_CACHE_HOME moves torch's default root (HPC sites set it to leave a small home quota alone)."""
    from torch.utils.cpp_extension import get_default_build_root

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert build_locks.extensions_root() == Path(get_default_build_root())
    assert str(build_locks.extensions_root()).startswith(str(tmp_path / "xdg"))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    assert build_locks.extensions_root() == tmp_path / "ext"


def test_the_sweeper_frees_a_process_waiting_on_a_stale_lock(tmp_path: Path) -> None:
    """torch's own FileBaton.wait, in another process, on a lock left behind: it returns once the sweeper runs (it
    would loop for ever)."""
    lock = _lock(tmp_path, "deepspeed_shm_comm", LOCAL_STALE_S + 5)
    waiter = subprocess.Popen([sys.executable, "-c", "import sys; from torch.utils.file_baton import FileBaton; "
                               "b = FileBaton(sys.argv[1]); assert not b.try_acquire(); print('waiting', flush=True); "
                               "b.wait(); print('through')", str(lock)], stdout=subprocess.PIPE, text=True)
    said: list[str] = []
    assert waiter.stdout.readline().strip() == "waiting"
    time.sleep(0.5)
    assert waiter.poll() is None  # still waiting: nothing else removes the lock
    sweeper = BuildLockSweeper(said.append, root=tmp_path, poll_s=0.2).start()
    try:
        assert waiter.communicate(timeout=60)[0].strip() == "through"
    finally:
        sweeper.stop()
        if waiter.poll() is None:
            waiter.kill()
    assert len(said) == 1 and str(lock) in said[0] and "deepspeed_shm_comm" in said[0]


@pytest.mark.slow
def test_a_run_starts_past_a_stale_lock_of_a_deepspeed_op(tmp_path: Path, demo_model: Path) -> None:
    """The real path: DeepSpeed's shared-memory op loads as a torch JIT extension in init_distributed, here from a
    copy of this machine's built extensions with the lock a killed load leaves. The run trains, and its log names
    the lock it removed."""
    from torch.utils.cpp_extension import _get_build_directory

    built = Path(_get_build_directory("deepspeed_shm_comm", False))
    if not (built / "deepspeed_shm_comm.so").exists():
        pytest.skip("DeepSpeed's shared-memory op was not built here yet (any earlier run builds it)")
    # With TORCH_EXTENSIONS_DIR set, torch builds each op directly under it: the built op copied there loads
    # without a compile (its ninja finds nothing to do).
    ext = tmp_path / "ext"
    shutil.copytree(built, ext / built.name, symlinks=True, ignore=shutil.ignore_patterns("lock", ".ninja_lock"))
    lock = ext / built.name / "lock"
    lock.write_bytes(b"")
    os.utime(lock, (time.time() - 3600, time.time() - 3600))
    out = tmp_path / "run"
    proc = check(launch(["--config", "configs/tiny-cpu.yaml", f"output.dir={out}", "train.max_steps=2"],
                        env={"TORCH_EXTENSIONS_DIR": str(ext)}, timeout=300))
    assert f"removed {lock}, a stale torch extension build lock" in proc.stderr, proc.stderr[-3000:]
    assert [r["step"] for r in metrics(out) if "loss" in r] == [1, 2]
    assert not lock.exists()
    assert ROOT.is_dir()
