"""PNGs from metrics.jsonl: one run's loss and eval loss, learning rate, tokens/s and grad norm; or several runs'
loss, eval loss and tokens/s overlaid.

The run dirs read here (and by ``ia3-dist summary``) may come from elsewhere, so the files of a run dir are read as
untrusted (:mod:`..runtime.safe_io` and :func:`scan_metrics`: regular files only, never through a symlink, in
bounded time and memory, damaged lines skipped and counted), and every file the tools write goes through
:func:`..runtime.safe_io.write_file`, which never writes through a symlink.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import warnings
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ..config.schema import brief
from ..errors import UsageError
from ..runtime.safe_io import open_regular, write_file

MAX_LINE = 1 << 16
"""A metrics line is a few hundred bytes; a longer one is damage, skipped without being held whole."""
MAX_METRICS_BYTES = 64 << 20
"""Of a larger metrics.jsonl only the last this many bytes are read (some 150k logged steps)."""
MAX_RECORDS = 400_000
"""Records held at once over all the runs a command reads (about 1 KB each): beyond it each run keeps its last
``MAX_RECORDS // runs``, so a folder of many huge runs cannot exhaust memory."""
MAX_STEP = 1 << 62
PLOT_KEYS = ("loss", "eval_loss", "lr", "tokens_per_s", "grad_norm", "rewards/accuracies", "rewards/margins",
             "eval_rewards/accuracies", "eval_rewards/margins")
PLOT_MAX = 1e100
"""Values beyond this (and NaN, inf) are left out of a plot: no loss, lr or rate is that large."""
def note(msg: str) -> None:
    print(f"ia3-dist: note: {msg}", file=sys.stderr, flush=True)


# --- reading files of a run dir ---------------------------------------------------------------------------------


@dataclass
class Metrics:
    """What :func:`scan_metrics` read of one metrics.jsonl."""

    records: list[dict[str, Any]] = field(default_factory=list)
    bad: int = 0
    """Lines that are not a metric record (not UTF-8 JSON, not an object with an integer step, too long, too deep);
    a last line cut off mid-write (a live run) is not counted."""
    dropped: int = 0
    """Earlier records left out to stay within the record budget."""
    skipped_bytes: int = 0
    """Bytes at the start of a file over :data:`MAX_METRICS_BYTES` that were not read."""

    def describe(self, path: Path) -> str | None:
        """One line saying what was left out, or None."""
        parts = []
        if self.bad:
            parts.append(f"skipped {self.bad} bad line{'s' if self.bad != 1 else ''} in {brief(str(path))}")
        if self.skipped_bytes:
            size = f"{MAX_METRICS_BYTES >> 20} MiB" if MAX_METRICS_BYTES >= 1 << 20 else f"{MAX_METRICS_BYTES} bytes"
            parts.append(f"read only the last {size} of {brief(str(path))}")
        if self.dropped:
            parts.append(f"kept only the last {len(self.records)} records of {brief(str(path))}")
        return "; ".join(parts) or None


def _number(v: Any) -> bool:
    # Ints are bounded too: matplotlib and the table turn them into floats, and float() of a 4000-digit int raises.
    return isinstance(v, float) or (type(v) is int and -MAX_STEP <= v <= MAX_STEP)


def _record(line: bytes, keys: Collection[str] | None) -> dict[str, Any] | None:
    try:
        rec = json.loads(line.decode("utf-8"))
    except (ValueError, RecursionError):  # not UTF-8, not JSON, an int of over 4300 digits, deep nesting
        return None
    if not isinstance(rec, dict) or type(rec.get("step")) is not int or not 0 <= rec["step"] <= MAX_STEP:
        return None
    if keys is None:
        return rec
    # Only the numbers asked for: a few floats per record whatever the line held, and nothing a plot cannot draw.
    return {"step": rec["step"], **{k: rec[k] for k in keys if _number(rec.get(k))}}


def scan_metrics(path: Path, keys: Collection[str] | None = None, keep: int = MAX_RECORDS) -> Metrics | None:
    """The records of a metrics.jsonl (None if there is none), each a JSON object with an integer ``step``;
    ``keys``: keep only these keys, and only number values. At most the last :data:`MAX_METRICS_BYTES` are read,
    a line at a time (at most :data:`MAX_LINE` bytes held), and at most the last ``keep`` records are kept.
    A file that is not a regular file is a UsageError."""
    fh = open_regular(path, missing_ok=True)
    if fh is None:
        return None
    out = Metrics()
    recs: collections.deque[dict[str, Any]] = collections.deque(maxlen=max(1, keep))
    total = 0
    try:
        with fh:
            size = os.fstat(fh.fileno()).st_size
            if size > MAX_METRICS_BYTES:
                out.skipped_bytes = size - MAX_METRICS_BYTES
                fh.seek(out.skipped_bytes - 1)
                _skip_line(fh, fh.readline(MAX_LINE + 1))  # the rest of the line the cut fell in
            while line := fh.readline(MAX_LINE + 1):
                if len(line) > MAX_LINE:
                    _skip_line(fh, line)
                    out.bad += 1
                    continue
                if not line.strip():
                    continue
                rec = _record(line, keys)
                if rec is None:
                    if line.endswith(b"\n"):  # only the last line can lack it: a live run is writing that one
                        out.bad += 1
                    continue
                recs.append(rec)
                total += 1
    except OSError as e:
        raise UsageError(f"{brief(str(path))}: cannot read it ({e.strerror or e})") from None
    out.records = list(recs)
    out.dropped = total - len(out.records)
    return out


def _skip_line(fh: IO[bytes], line: bytes) -> None:
    while line and not line.endswith(b"\n"):
        line = fh.readline(MAX_LINE + 1)


def last_step(path: Path) -> int | None:
    """The highest step ``path`` (a metrics.jsonl) logged; None with no file or no step."""
    steps = [r["step"] for r in read_metrics(path, ("step",)) if isinstance(r.get("step"), int)] \
        if path.is_file() else []
    return max(steps) if steps else None


def read_metrics(path: Path, keys: Collection[str] | None = None, keep: int = MAX_RECORDS) -> list[dict]:
    """:func:`scan_metrics` for a run that must have metrics; what was skipped is said on stderr in one line."""
    got = scan_metrics(path, keys, keep)
    if got is None:
        raise UsageError(f"{brief(str(path))}: no metrics.jsonl (give a run's output dir)")
    msg = got.describe(path)
    if msg:
        note(msg)
    return got.records


# --- writing --------------------------------------------------------------------------------------------------------


def save_figure(fig: Any, out: Path, what: str = "", fix: str = "give another path", **kw: Any) -> Path:
    """``fig`` as a PNG at exactly ``out`` (see :func:`write_file`; matplotlib given a path without an extension
    would write ``out.png`` instead), then closed."""
    import matplotlib.pyplot as plt

    def draw(fh: IO[bytes]) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # numpy overflow notes from tick maths: not ours to say
            try:
                fig.savefig(fh, format="png", **kw)
            except (ValueError, ArithmeticError) as e:
                # The data are filtered to what matplotlib can draw (see _points); this keeps any case missed an
                # exit 2 rather than a traceback.
                raise UsageError(f"{what}{brief(str(out))}: cannot draw the plot ({type(e).__name__}: "
                                 f"{brief(str(e))})") from None

    try:
        return write_file(out, draw, what, fix=fix)
    finally:
        plt.close(fig)


def label(text: str, limit: int = 160) -> str:
    """Text for a legend or title: short (the middle cut: a run dir differs at its end), printable, and literal
    (matplotlib reads ``$...$`` as math, and a bad expression raises only when the figure is drawn)."""
    text = brief(text)
    if len(text) > limit:
        text = text[: limit // 2 - 2] + "..." + text[-(limit // 2 - 1):]
    return text.replace("$", r"\$")


def _points(recs: list[dict], key: str) -> tuple[list[int], list[float]]:
    # Finite and far from float's limits: matplotlib's tick maths on values near 1e308 overflows and raises.
    pts = [(r["step"], float(r[key])) for r in recs if type(r.get("step")) is int and _number(r.get(key))]
    return [p[0] for p in pts if abs(p[1]) <= PLOT_MAX], [p[1] for p in pts if abs(p[1]) <= PLOT_MAX]


# --- figures --------------------------------------------------------------------------------------------------------


def plot_metrics(metrics: Path, out: Path, what: str = "") -> Path | None:
    """Write the PNG at ``out`` (``what``: how an error names it, e.g. ``--out ``); None when there is nothing to
    plot."""
    recs = read_metrics(metrics, ("step", *PLOT_KEYS))
    train = [r for r in recs if "loss" in r]
    evals = [r for r in recs if "eval_loss" in r]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = any("rewards/accuracies" in r for r in train)
    fig, ax = plt.subplots(2, 3 if pairs else 2, figsize=(16 if pairs else 11, 7), constrained_layout=True)
    ax[0, 0].plot(*_points(train, "loss"), label="train loss")
    if evals:
        ax[0, 0].plot(*_points(evals, "eval_loss"), "o-", label="eval loss")
    ax[0, 0].set_title("loss")
    ax[0, 0].legend()
    ax[0, 1].plot(*_points(train, "lr"))
    ax[0, 1].set_title("learning rate")
    ax[1, 0].plot(*_points(train, "tokens_per_s"))
    ax[1, 0].set_title("real tokens/s")
    ax[1, 1].plot(*_points(train, "grad_norm"))
    ax[1, 1].set_title("grad norm")
    if pairs:  # preference objectives: TRL's reward metrics, train and held-out
        for row, key, title in ((0, "rewards/accuracies", "pair accuracy"), (1, "rewards/margins", "reward margin")):
            ax[row, 2].plot(*_points(train, key), label="train")
            if any(f"eval_{key}" in r for r in evals):
                ax[row, 2].plot(*_points(evals, f"eval_{key}"), "o-", label="eval")
            ax[row, 2].set_title(title)
            ax[row, 2].legend()
    for a in ax.flat:
        a.set_xlabel("optimizer step")
        a.grid(alpha=0.3)
    fig.suptitle(label(str(metrics.parent), 120))
    return save_figure(fig, out, what, fix="give another --out", dpi=100)


def overlay_figure(runs: list[tuple[str, list[dict]]]) -> Any:
    """One figure, three panels (train loss, eval loss, real tokens/s), one line per run labelled by its name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(16, 5), constrained_layout=True)
    panels = (("loss", "train loss", "-"), ("eval_loss", "eval loss", "o-"), ("tokens_per_s", "real tokens/s", "-"))
    for a, (key, title, style) in zip(ax, panels, strict=True):
        for i, (name, recs) in enumerate(runs):
            xs, ys = _points(recs, key)
            if xs:
                # One colour per run across the panels, whatever panels a run has lines in.
                a.plot(xs, ys, style, color=f"C{i % 10}", label=label(name))
        a.set_title(title)
        a.set_xlabel("optimizer step")
        a.grid(alpha=0.3)
        if a.get_lines():
            a.legend(fontsize="small")
    return fig


def plot_runs(dirs: list[Path], out: Path, what: str = "") -> Path:
    """Write the overlay of several runs' metrics.jsonl, each labelled by its run dir."""
    runs = []
    keep = MAX_RECORDS // max(1, len(dirs))
    for d in dirs:
        recs = read_metrics(d / "metrics.jsonl", ("step", *PLOT_KEYS), keep)
        if not any("loss" in r or "eval_loss" in r for r in recs):
            raise UsageError(f"{brief(str(d))}/metrics.jsonl has no logged steps yet")
        runs.append((str(d), recs))
    return save_figure(overlay_figure(runs), out, what, fix="give another --out", dpi=100)
