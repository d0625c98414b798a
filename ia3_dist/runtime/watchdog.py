"""Hang watchdog: a thread in every rank that ends the job when training stops making progress.

Why a thread of our own: a rank whose peer froze (SIGSTOP, a dead node, a cut link) waits inside a collective that
no process-group timeout reaches on CPU (DeepSpeed's shared-memory all-reduce spins without a deadline; gloo TCP to
a silent peer waits for ever), and a rank stuck in Python never enters one. The main thread cannot be interrupted
in either case, so the watchdog acts from the side: it dumps every thread's Python stack to the rank's log, removes
the job's DeepSpeed shared-memory segments on this host, and exits the process with :data:`EXIT_HUNG`. The launcher
(deepspeed, torchrun, ``srun --kill-on-bad-exit``) then ends the other ranks, including a frozen one.

It is armed only after the first optimizer step of an invocation completes (model loading, compilation and warm-up
are excluded), and a checkpoint save gets a longer allowance (:data:`SAVE_ALLOWANCE`), so a slow filesystem is not
mistaken for a hang. Progress is a :meth:`Watchdog.beat`: one per optimizer step and one per eval batch. The time
a suspended job spends stopped (``scontrol suspend``, SIGSTOP of the whole process) is not idle time.
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import EXIT_HUNG
from . import dist, manifest

# A save writes the whole optimizer state per rank; allow it this multiple of the step timeout (at least 30 min).
SAVE_ALLOWANCE = 10.0
SAVE_FLOOR_S = 1800.0
HUNG_FILE = "hung.json"
BACKSTOP_S = 30.0
"""Past its wait for the peers, how long the firing watchdog's own writes may take before the process goes anyway."""
SUSPENDED_POLLS = 4
SUSPENDED_MIN_S = 2.0
"""A poll that comes this late (this many polls, and at least this many seconds past the due one) means the
process was stopped, not hung."""


class Watchdog:
    """``timeout_s`` <= 0 makes every method a no-op (train.hang_timeout_s: 0)."""

    def __init__(self, timeout_s: float, env: dist.DistEnv, out: Path | None = None, poll_s: float | None = None,
                 exit_fn: Callable[[int], object] = os._exit) -> None:
        self.timeout_s = float(timeout_s)
        # os._exit: the main thread is stuck where no exception reaches it, and atexit handlers could block on a
        # peer. Replaceable only so the unit tier can watch it fire in-process.
        self._exit = exit_fn
        self.env = env
        self.out = out
        self.poll_s = poll_s if poll_s is not None else min(5.0, max(self.timeout_s / 20.0, 0.05))
        self.step = 0
        """The optimizer step in progress (1-based), as the last beat said."""
        self.phase = "loading"
        self.slowest_s = 0.0
        """Longest gap between two beats so far (the headroom check in :meth:`headroom`)."""
        self._armed = False
        self._last = time.monotonic()
        self._allowance = self.timeout_s
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.timeout_s > 0

    def start(self) -> Watchdog:
        if self.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="ia3-dist-watchdog", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join(timeout=self.poll_s * 4 + 1)
            self._thread = None

    def beat(self, step: int, phase: str = "train", arm: bool = True) -> None:
        """Progress: ``step`` is the step now in progress. ``arm`` starts the clock (the first beat after the
        first completed step)."""
        now = time.monotonic()
        with self._lock:
            if self._armed:
                self.slowest_s = max(self.slowest_s, now - self._last)
            self._last = now
            self.step, self.phase = step, phase
            self._armed = self._armed or arm

    @contextmanager
    def saving(self, step: int) -> Iterator[None]:
        """A checkpoint save: the allowance grows to ``max(SAVE_ALLOWANCE x timeout, SAVE_FLOOR_S)``."""
        with self._lock:
            prev_phase = self.phase
            self._allowance = max(self.timeout_s * SAVE_ALLOWANCE, SAVE_FLOOR_S)
            self.phase = f"saving checkpoint step{step}"
            self._last = time.monotonic()
        try:
            yield
        finally:
            with self._lock:
                self._allowance = self.timeout_s
                self.phase = prev_phase
                self._last = time.monotonic()

    def headroom(self) -> str | None:
        """A warning when the slowest step so far came within a third of the timeout (a slow but healthy run
        would be killed as hung), else None."""
        if self.enabled and self.slowest_s > self.timeout_s / 3:
            return (f"train.hang_timeout_s={self.timeout_s:g}: the slowest step so far took {self.slowest_s:.0f} s, "
                    f"more than a third of it; raise train.hang_timeout_s so a slow step is not taken for a hang")
        return None

    # -- the thread -------------------------------------------------------------------------------------------

    def _watch(self) -> None:
        prev = time.monotonic()
        while not self._done.wait(self.poll_s):
            now = time.monotonic()
            gap, prev = now - prev, now
            with self._lock:
                if gap > max(SUSPENDED_POLLS * self.poll_s, self.poll_s + SUSPENDED_MIN_S):
                    # This thread slept far past its poll: the whole process was stopped (a suspended job,
                    # SIGSTOP), and the monotonic clock ran on. A hung peer never stops our thread, so that time
                    # is nobody's hang: without this, every rank would exit 76 the moment the job continues.
                    # Never past now: a beat after the process continued has already restarted the clock.
                    self._last = min(now, self._last + gap - self.poll_s)
                idle = now - self._last
                fire = self._armed and idle > self._allowance
                allowance, step, phase = self._allowance, self.step, self.phase
            if fire:
                self._fire(idle, allowance, step, phase)
                return

    def _fire(self, idle: float, allowance: float, step: int, phase: str) -> None:
        """Stacks to the log, shared memory removed, marker written, process gone: nothing here may block on a
        peer (no collective, no barrier)."""
        msg = (f"ia3-dist: hang watchdog on rank {self.env.rank}: no progress for {idle:.0f} s (limit "
               f"{allowance:.0f} s, train.hang_timeout_s={self.timeout_s:g}) in optimizer step {step} ({phase}); "
               f"Python stacks of every thread follow; exiting with code {EXIT_HUNG} (resume with "
               f"train.resume=auto)")
        # A backstop: what follows may itself block (the stream locks a main thread stuck writing to a full log
        # pipe holds; the output dir on the hung filesystem that caused all this); the process still goes.
        backstop = threading.Timer(2 * self.poll_s + BACKSTOP_S, self._exit, (EXIT_HUNG,))
        backstop.daemon = True
        backstop.start()
        try:
            os.write(2, (msg + "\n").encode())  # the fd, not sys.stderr: no lock another thread may hold
            sys.stdout.flush()
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            sys.stderr.flush()
            dist.remove_shm_segments(every_rank=True)
            self._mark(step, phase, idle)
            if self.env.is_main and self.out is not None:
                # os._exit skips the run's own cleanup: a pid file left behind names a pid another process may get.
                (self.out / manifest.PID_FILE).unlink(missing_ok=True)
            # Peers idle since about the same moment fire within a poll or two. Leaving at once would close our
            # connections under them, and they would end on a gloo "connection closed" error instead of writing
            # their own stacks: stay that long, so every rank that can still run dumps where it was.
            time.sleep(2 * self.poll_s + 1.0)
        finally:
            backstop.cancel()
            self._exit(EXIT_HUNG)

    def _mark(self, step: int, phase: str, idle: float) -> None:
        """``hung.json`` in the output dir for job scripts whose launcher does not pass our exit code on
        (torchrun exits 1, srun reports the highest code of its tasks). The first rank to fire creates it; the
        others leave it be (O_EXCL), so ranks never write the same file."""
        if self.out is None:
            return
        try:
            fd = os.open(self.out / HUNG_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError:
            return
        with os.fdopen(fd, "w") as f:
            json.dump({"rank": self.env.rank, "step": step, "phase": phase, "idle_s": round(idle, 1),
                       "exit_code": EXIT_HUNG}, f)
