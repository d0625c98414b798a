"""The hang watchdog's thread: it fires only when armed and idle past its limit, dumps every thread's stack,
removes the job's shared-memory segments, leaves hung.json and exits 76; beats, an unarmed start and a checkpoint
save keep it quiet. In-process with the exit call recorded; the fault tests (slow tier) watch real processes die."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from ia3_dist.config import load_config
from ia3_dist.errors import EXIT_HUNG, UsageError
from ia3_dist.runtime.dist import DistEnv
from ia3_dist.runtime.watchdog import HUNG_FILE, Watchdog

ENV = DistEnv(0, 0, 2, 2)


def _segment(port: str, rank: str) -> Path:
    return Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_{rank}")


@pytest.mark.slow  # waits out real timeouts
def test_fires_after_the_limit_with_stacks_cleanup_and_marker(tmp_path: Path, capfd: pytest.CaptureFixture,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    port, other = "48123", "48124"
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", port)
    mine = [_segment(port, r) for r in ("0", "1")]
    theirs = _segment(other, "0")
    for f in [*mine, theirs]:
        f.write_bytes(b"x")
    (tmp_path / "rank0.pid").write_text(str(os.getpid()))
    exited = threading.Event()
    codes: list[int] = []
    wd = Watchdog(0.3, ENV, tmp_path, poll_s=0.02, exit_fn=lambda c: (codes.append(c), exited.set()))
    try:
        wd.start()
        wd.beat(1, arm=False)
        time.sleep(0.6)  # unarmed: the first step may take as long as it likes
        assert not exited.is_set()
        wd.beat(2)
        t0 = time.monotonic()
        assert exited.wait(5)
        took = time.monotonic() - t0
        assert codes == [EXIT_HUNG] and 0.3 <= took < 3, took  # + the 1 s it waits for peers to dump too
        err = capfd.readouterr().err
        assert "hang watchdog on rank 0: no progress" in err and "in optimizer step 2 (train)" in err
        # faulthandler's dump: this (main) thread, sleeping in the test, and the watchdog thread itself.
        assert err.count("(most recent call first)") >= 2 and "test_watchdog.py" in err, err
        assert json.loads((tmp_path / HUNG_FILE).read_text())["step"] == 2
        # The process ends with os._exit (no cleanup): rank 0 removes its pid file first, or the next job's trap
        # would signal whatever process gets that pid.
        assert not (tmp_path / "rank0.pid").exists()
        assert not any(f.exists() for f in mine) and theirs.exists()
    finally:
        wd.stop()
        for f in [*mine, theirs]:
            f.unlink(missing_ok=True)


@pytest.mark.slow  # waits out real timeouts
def test_beats_and_saves_keep_it_quiet(tmp_path: Path) -> None:
    codes: list[int] = []
    wd = Watchdog(0.3, ENV, tmp_path, poll_s=0.02, exit_fn=codes.append).start()
    try:
        wd.beat(1, arm=False)
        time.sleep(0.5)
        for step in range(2, 10):  # progress every 0.05 s
            wd.beat(step)
            time.sleep(0.05)
        with wd.saving(10):  # a save gets the long allowance
            time.sleep(0.5)
        for step in range(11, 14):
            wd.beat(step)
            time.sleep(0.05)
    finally:
        wd.stop()
    assert codes == [] and not (tmp_path / HUNG_FILE).exists()
    assert wd.slowest_s < 0.3 and wd.headroom() is None


SUSPENDED_CHILD = """
import os, sys, time
from ia3_dist.runtime.dist import DistEnv
from ia3_dist.runtime.watchdog import Watchdog
wd = Watchdog(1.5, DistEnv(0, 0, 1, 1), None, poll_s=0.05, exit_fn=os._exit).start()
wd.beat(1, arm=False)
wd.beat(2)
print("beating", flush=True)
t0 = time.monotonic()
while time.monotonic() - t0 < 5.0:  # a step of 0.15 s of this thread's CPU time, around the parent's stop
    c0 = time.thread_time()
    while time.thread_time() - c0 < 0.15:
        pass
    wd.beat(3)
print("quiet through the stop; now hung", flush=True)
time.sleep(30)
"""


@pytest.mark.slow  # waits out a real suspension and a real timeout
def test_a_suspended_job_is_not_hung_and_a_hang_after_it_still_fires() -> None:
    """SIGSTOP of the whole process for 3 s (a suspended Slurm job) with a 1.5 s limit, in the middle of a step:
    the monotonic clock runs on through the stop, and without telling the two apart every rank would exit 76 as the
    job continues, before the step ends. After the stop, a real hang still ends the process with 76."""
    import signal
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", SUSPENDED_CHILD], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=Path(__file__).resolve().parents[1])
    try:
        assert child.stdout is not None and child.stdout.readline() == "beating\n"
        time.sleep(0.5)
        child.send_signal(signal.SIGSTOP)
        time.sleep(3.0)
        child.send_signal(signal.SIGCONT)
        out, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert "quiet through the stop; now hung" in out, err
    assert child.returncode == EXIT_HUNG and "hang watchdog on rank 0: no progress for 2 s" in err, err


def test_headroom_warns_when_a_step_nears_the_limit() -> None:
    wd = Watchdog(30.0, ENV)
    wd.beat(1, arm=False)
    wd.beat(2)
    wd._last -= 12.0  # a 12 s step under a 30 s limit
    wd.beat(3)
    assert wd.headroom() is not None and "train.hang_timeout_s=30" in wd.headroom()
    assert Watchdog(0.0, ENV).start()._thread is None  # 0 is off: no thread


@pytest.mark.parametrize("value, ok", [(0, True), (1, True), (600, True), (0.5, False), (-1, False),
                                       (float("nan"), False)])
def test_hang_timeout_bounds(tmp_path: Path, value: float, ok: bool) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("model: {path: m}\ndata: {path: d}\n")
    if ok:
        assert load_config(f, [f"train.hang_timeout_s={value}"]).train.hang_timeout_s == value
    else:
        with pytest.raises(UsageError, match="train.hang_timeout_s"):
            load_config(f, [f"train.hang_timeout_s={value}"])


def test_hold_fault_ends_on_the_stop_flag_the_release_file_or_its_deadline(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """IA3_DIST_FAULT=...:hold (what the Slurm tests use to signal a run at a known step) stalls only the named
    point, step and rank, and ends when the run's stop flag is set, the release file appears, or the deadline
    passes."""
    from ia3_dist.runtime import faults
    from ia3_dist.runtime.preempt import StopFlag

    release = tmp_path / "release"
    monkeypatch.setenv("IA3_DIST_FAULT", "step:4:0:hold")
    monkeypatch.setenv("IA3_DIST_FAULT_RELEASE", str(release))
    monkeypatch.setenv("IA3_DIST_FAULT_HOLD_S", "0.3")
    t0 = time.monotonic()
    faults.hit("step", 3, 0)
    faults.hit("step", 4, 1)
    assert time.monotonic() - t0 < 0.2  # another step or rank: no hold
    faults.hit("step", 4, 0)
    assert 0.3 <= time.monotonic() - t0 < 2  # the deadline
    monkeypatch.setenv("IA3_DIST_FAULT_HOLD_S", "60")
    for end in ("stop", "release"):
        stop = StopFlag()

        def later(end: str = end, stop: StopFlag = stop) -> None:
            time.sleep(0.2)
            if end == "stop":
                stop.signame = "SIGUSR1"
            else:
                release.touch()

        threading.Thread(target=later).start()
        t0 = time.monotonic()
        faults.hit("step", 4, 0, stop)
        assert 0.2 <= time.monotonic() - t0 < 5, end


@pytest.mark.slow  # waits out real timeouts
def test_a_firing_watchdog_that_blocks_still_exits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its own writes can block (hung.json on the hung filesystem that caused the stall, a stream lock the stuck
    main thread holds): a backstop ends the process anyway, not the job's time limit."""
    from ia3_dist.runtime import watchdog

    monkeypatch.setattr(watchdog, "BACKSTOP_S", 0.5)
    release = threading.Event()
    monkeypatch.setattr(Watchdog, "_mark", lambda self, *a: release.wait(30))  # a write that never returns
    exited = threading.Event()
    codes: list[int] = []
    wd = Watchdog(0.2, ENV, tmp_path, poll_s=0.02, exit_fn=lambda c: (codes.append(c), exited.set()))
    try:
        wd.start()
        wd.beat(2)
        t0 = time.monotonic()
        assert exited.wait(10)
        assert codes == [EXIT_HUNG] and time.monotonic() - t0 < 5
    finally:
        release.set()
        wd.stop()
