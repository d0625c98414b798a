"""SIGTERM / SIGUSR1 -> a flag the training loop all-reduces at every optimizer-step boundary, so every rank
stops at the same step, saves, and exits with EXIT_PREEMPTED (a scheduler can requeue)."""

from __future__ import annotations

import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType

from ..errors import EXIT_PREEMPTED

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopFlag:
    def __init__(self) -> None:
        self.signame: str | None = None
        self._old: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signame is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Only set a flag: saving from inside a handler could interrupt a collective mid-flight.
        self.signame = signal.Signals(signum).name

    def install(self) -> StopFlag:
        for s in SIGNALS:
            self._old[s] = signal.signal(s, self._handle)
        return self

    def uninstall(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()


class WhileMeeting:
    """A signal while the ranks meet (the process group's rendezvous): nothing has trained, so nothing is to save,
    and the main thread may wait there far past any grace time (a peer that exited at its own checks never
    arrives; its launcher sends the others SIGTERM, then SIGKILL 30 s later). Python runs a signal's handler only
    when the main thread is back in Python, which a wait inside the rendezvous never is; the C-level handler still
    writes the signal's number to the wakeup fd, which a thread of ours reads. A meeting that ends within
    ``grace_s`` of the signal (or of its start, for a signal that came while the run loaded) leaves it to the
    first step boundary, where every rank stops together; past that, the thread calls ``on_stop`` (rank 0 puts
    back the run a start over set aside and says it was preempted) and exits 75, as a preemption before the first
    step does (well inside a launcher's 30 s from SIGTERM to SIGKILL)."""

    def __init__(self, stop: StopFlag, on_stop: Callable[[str], None], poll_s: float = 0.2,
                 grace_s: float = 10.0) -> None:
        self.stop, self.on_stop, self.poll_s, self.grace_s = stop, on_stop, poll_s, grace_s
        self._seen: tuple[str, float] | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="ia3-dist-start-signal", daemon=True)
        self._pair: tuple[socket.socket, socket.socket] | None = None
        self._old_fd = -1

    def __enter__(self) -> WhileMeeting:
        try:
            r, w = socket.socketpair()
            w.setblocking(False)
            self._old_fd = signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)
            self._pair = (r, w)
        except (ValueError, OSError):  # not the main thread (a run started from a test's thread): the flag alone
            self._pair = None
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()  # one acting now finishes (and exits) before the main thread goes on
        if self._pair is not None:
            signal.set_wakeup_fd(self._old_fd)
            for sock in self._pair:
                sock.close()

    def _signalled(self) -> str | None:
        if self.stop.requested:
            return self.stop.signame
        if self._pair is None:
            return None
        ready, _, _ = select.select([self._pair[0]], [], [], 0)
        if not ready:
            return None
        for num in self._pair[0].recv(64):
            if num in SIGNALS:
                return signal.Signals(num).name
        return None

    def _watch(self) -> None:
        while not self._done.wait(self.poll_s):
            if self._seen is None:
                name = self._signalled()
                if name is not None:
                    self._seen = (name, time.monotonic())
            if self._seen is not None and time.monotonic() - self._seen[1] >= self.grace_s:
                name = self._seen[0]
                try:
                    self.on_stop(name)
                finally:
                    print(f"ia3-dist: stopped by {name} while the ranks met, before the first step: nothing to "
                          f"save; resume with train.resume=auto", file=sys.stderr, flush=True)
                    os._exit(EXIT_PREEMPTED)
