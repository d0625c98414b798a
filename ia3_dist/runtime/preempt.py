"""SIGTERM / SIGUSR1 -> a flag the training loop all-reduces at every optimizer-step boundary, so every rank
stops at the same step, saves, and exits with EXIT_PREEMPTED (a scheduler can requeue)."""

from __future__ import annotations

import signal
from types import FrameType

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
