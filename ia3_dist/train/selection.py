"""Following a held-out metric from one evaluation to the next: ``train.early_stopping`` (stop when it no longer
improves) and ``checkpoint.keep_best`` (keep the checkpoint of its best evaluation outside the rotation).

Every rank holds the same tracker: the evaluation it follows is all-reduced, so every rank decides the same stop at
the same step without another collective. Its state rides in each checkpoint's meta.json (``selection``), so a
resumed run counts the evaluations without improvement from where it was, on any allocation.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..config.schema import EVAL_METRICS, lower_is_better
from ..errors import UsageError
from .benchmarks import include_digest

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
        """Whether ``value`` at ``step`` is a new best: better than every evaluation before, by any amount (the
        vectors ``final: best`` writes are the best evaluation's). Patience counts as HF's EarlyStoppingCallback
        does: an evaluation better than the best so far by more than ``min_delta`` starts it afresh, any other
        (a smaller gain too, which still becomes the best) counts against it. A non-finite value is never the
        best."""
        if not math.isfinite(value):
            self.bad += 1
            return False
        gain = math.inf if self.best is None else (self.best - value if self.lower else value - self.best)
        self.bad = 0 if gain > self.min_delta else self.bad + 1
        if gain > 0:
            self.best, self.best_step = value, step
            return True
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


HELDOUT_KEY, BENCH_KEY = "eval_key", "bench_key"
"""meta.json keys: what the run's held-out evaluations and its benchmarks measured at the save."""
BENCH_PREFIX = "tasks+files "
"""How a benchmark key starts. Keys that start otherwise digested ``eval.include``'s path, not its files: a resume
cannot compare them and leaves them unchecked."""


def measured_keys(cfg: RunConfig, eval_data: Any) -> dict[str, str]:
    """What the evaluations measure, for meta.json: the held-out data (``none``; the ``data.eval_ratio`` split;
    ``data.eval_path``'s token cache key, which follows its content, the tokenizer and the template) and the
    benchmarks (a digest of ``eval.tasks``, ``eval.limit`` and the content of the ``eval.include`` tasks and their
    data files)."""
    if eval_data is None:
        held = "none"
    elif cfg.data.eval_path:
        held = f"data.eval_path tokens {Path(eval_data.cache_file).name[:16]}"
    else:
        # The count alone: with the training data and the seed a resume keeps, it fixes which examples.
        held = f"{len(eval_data)} examples held out of the training data"
    bench = "none"
    if cfg.eval.tasks:
        include = Path(cfg.eval.include) if cfg.eval.include else None
        spec = {"tasks": sorted(cfg.eval.tasks), "limit": cfg.eval.limit,
                "include": include_digest(include) if include is not None and include.is_dir() else None}
        bench = BENCH_PREFIX + hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    return {HELDOUT_KEY: held, BENCH_KEY: bench}


def check_measured(cfg: RunConfig, saved: dict[str, Any], now: dict[str, str], where: str) -> str:
    """A resume whose evaluations measure other data than the saved run's: a UsageError where a tracker carries
    a best value over from the saved run (the comparisons would mix the two; raised before any process group),
    else the note the resume line adds (the earlier eval lines of metrics.jsonl measured the other data).
    Checkpoints from before these keys were recorded resume unchecked."""
    changed = {k: (saved[k], now[k]) for k in (HELDOUT_KEY, BENCH_KEY)
               if isinstance(saved.get(k), str) and saved[k] != now[k]
               and not (k == BENCH_KEY and saved[k] != "none" and not saved[k].startswith(BENCH_PREFIX))}
    if not changed:
        return ""
    held_out = EVAL_METRICS[cfg.train.objective]
    state = saved.get(META_KEY) if isinstance(saved.get(META_KEY), dict) else {}
    for key, field, metric in (("train.early_stopping.metric", "early_stopping", cfg.train.early_stopping.metric),
                               ("checkpoint.keep_best", "keep_best", cfg.checkpoint.keep_best)):
        kind = HELDOUT_KEY if metric in held_out else BENCH_KEY
        tracked = state.get(field)
        if not metric or kind not in changed or not isinstance(tracked, dict) or tracked.get("metric") != metric:
            continue
        if tracked.get("best") is None and not tracked.get("bad"):
            continue  # nothing measured yet: nothing carried over
        was, is_now = changed[kind]
        what, keys = (("held-out data", "data.eval_ratio or data.eval_path, and that file") if kind == HELDOUT_KEY
                      else ("benchmarks", "eval.tasks, eval.limit and eval.include"))
        best = tracked.get("best")
        so_far = f"{best:.6g} at step {tracked.get('best_step')}" if isinstance(best, (int, float)) else "none yet"
        raise UsageError(f"{where}: {key} follows {metric}, and the {what} changed since this checkpoint was saved "
                         f"({was}; now {is_now}): its best so far ({so_far}) and its count of evaluations without "
                         f"improvement were measured on the other, so the run would compare the two. Resume with "
                         f"the saved run's {keys}, or resume without {key} (set it to ''), or start a new run")
    parts = [f"the {'held-out data' if k == HELDOUT_KEY else 'benchmarks'} changed since the save ({a}; now {b})"
             for k, (a, b) in changed.items()]
    return f"; {' and '.join(parts)}: the earlier evaluations in metrics.jsonl measured the saved run's"


def stopped_early(meta: dict[str, Any]) -> str:
    """The reason a checkpoint's run stopped early, or ""."""
    saved = meta.get(META_KEY)
    reason = saved.get("stopped_early") if isinstance(saved, dict) else None
    return reason[:500] if isinstance(reason, str) else ""
