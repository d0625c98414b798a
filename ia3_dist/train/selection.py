"""Following a held-out metric from one evaluation to the next: ``train.early_stopping`` (stop when it no longer
improves) and ``checkpoint.keep_best`` (keep the checkpoint of its best evaluation outside the rotation).

Every rank holds the same tracker: the evaluation it follows is all-reduced, so every rank decides the same stop at
the same step without another collective. Its state rides in each checkpoint's meta.json (``selection``), so a
resumed run counts the evaluations without improvement from where it was, on any allocation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from ..config import RunConfig
from ..config.schema import lower_is_better
from ..errors import UsageError

META_KEY = "selection"
"""meta.json key: ``{"early_stopping": state, "keep_best": state, "stopped_early": reason}``."""


@dataclass
class Tracker:
    """The best value of one metric so far and the evaluations since it improved."""

    metric: str
    lower: bool
    min_delta: float = 0.0
    best: float | None = None
    best_step: int = 0
    bad: int = 0
    """Evaluations in a row without an improvement of more than ``min_delta``."""

    def update(self, step: int, value: float) -> bool:
        """Whether ``value`` at ``step`` is a new best. A non-finite value never is."""
        if not math.isfinite(value):
            self.bad += 1
            return False
        better = self.best is None or (self.best - value > self.min_delta if self.lower
                                       else value - self.best > self.min_delta)
        if better:
            self.best, self.best_step, self.bad = value, step, 0
            return True
        self.bad += 1
        return False

    def state(self) -> dict[str, Any]:
        return asdict(self)

    def restore(self, state: Any, where: str) -> None:
        """From a checkpoint's meta.json, checked field by field (a resume reads it before anything else)."""
        if not isinstance(state, dict) or state.get("metric") != self.metric:
            # Another metric (or none) followed before: start counting afresh.
            return
        best, step, bad = state.get("best"), state.get("best_step"), state.get("bad")
        ok = (best is None or (type(best) in (int, float) and math.isfinite(best))) \
            and type(step) is int and step >= 0 and type(bad) is int and bad >= 0
        if not ok:
            raise UsageError(f"{where}: '{META_KEY}' holds {str(state)[:200]}, not a tracker state (metric, best, "
                             f"best_step, bad); pick another checkpoint with train.resume=<path to a stepN dir>")
        self.best, self.best_step, self.bad = (float(best) if best is not None else None), step, bad


@dataclass
class Selection:
    """The run's trackers (either may be absent) and, once the run stopped early, why."""

    stopper: Tracker | None
    keeper: Tracker | None
    patience: int = 0
    stopped_early: str = ""

    @classmethod
    def of(cls, cfg: RunConfig) -> Selection:
        es, keep = cfg.train.early_stopping, cfg.checkpoint.keep_best
        stopper = Tracker(es.metric, lower_is_better(es.metric, es.mode), es.min_delta) if es.metric else None
        mode = es.mode if keep == es.metric else "auto"
        keeper = Tracker(keep, lower_is_better(keep, mode)) if keep else None
        return cls(stopper, keeper, es.patience)

    @property
    def active(self) -> bool:
        return self.stopper is not None or self.keeper is not None

    def restore(self, meta: dict[str, Any], where: str) -> None:
        saved = meta.get(META_KEY)
        if saved is None:
            return
        if not isinstance(saved, dict):
            raise UsageError(f"{where}: '{META_KEY}' is not an object; pick another checkpoint with "
                             f"train.resume=<path to a stepN dir>")
        if self.stopper is not None:
            self.stopper.restore(saved.get("early_stopping"), where)
        if self.keeper is not None:
            self.keeper.restore(saved.get("keep_best"), where)
        # The run's last checkpoint, resumed only to write an adapter its run did not get to write (see prepare).
        self.stopped_early = stopped_early(meta)

    def meta(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.stopper is not None:
            out["early_stopping"] = self.stopper.state()
        if self.keeper is not None:
            out["keep_best"] = self.keeper.state()
        if self.stopped_early:
            out["stopped_early"] = self.stopped_early
        return {META_KEY: out} if out else {}

    def after_eval(self, step: int, res: dict[str, float]) -> tuple[bool, bool, bool]:
        """``(new best to keep, new best of the early-stopping metric, stop now)`` after the evaluation at
        ``step``."""
        # An evaluation that did not compute a tracker's metric (benchmarks and held-out data on other schedules)
        # leaves that tracker as it was.
        keep = (self.keeper is not None and self.keeper.metric in res
                and self.keeper.update(step, float(res[self.keeper.metric])))
        best = stop = False
        if self.stopper is not None and self.stopper.metric in res:
            s = self.stopper
            best = s.update(step, float(res[s.metric]))
            if s.bad >= self.patience:
                stop = True
                # Non-finite evaluations count as no improvement, so a run may stop before any finite one.
                best_so_far = f"best {s.best:.6g} at step {s.best_step}" if s.best is not None else \
                    "no finite value yet"
                self.stopped_early = (f"{s.metric} has not improved by more than {s.min_delta:g} "
                                      f"for {s.bad} evaluation(s) (train.early_stopping.patience={self.patience}); "
                                      f"{best_so_far}, stopped at step {step}")
        return keep, best, stop


def stopped_early(meta: dict[str, Any]) -> str:
    """The reason a checkpoint's run stopped early, or ""."""
    saved = meta.get(META_KEY)
    reason = saved.get("stopped_early") if isinstance(saved, dict) else None
    return reason[:500] if isinstance(reason, str) else ""
