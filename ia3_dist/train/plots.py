"""PNGs from metrics.jsonl: one run's loss and eval loss, learning rate, tokens/s and grad norm; or several runs'
loss, eval loss and tokens/s overlaid."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import UsageError


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        raise UsageError(f"{path}: no metrics.jsonl (give a run's output dir)")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UsageError(f"{path}:{n}: invalid JSON ({e.msg})") from None
    return out


def plot_metrics(metrics: Path, out: Path) -> Path | None:
    """Write the PNG; None when there is nothing to plot."""
    recs = read_metrics(metrics)
    train = [r for r in recs if "loss" in r]
    evals = [r for r in recs if "eval_loss" in r]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)

    def series(rs: list[dict], key: str) -> tuple[list[int], list[float]]:
        pts = [(r["step"], r[key]) for r in rs if r.get(key) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    ax[0, 0].plot(*series(train, "loss"), label="train loss")
    if evals:
        ax[0, 0].plot(*series(evals, "eval_loss"), "o-", label="eval loss")
    ax[0, 0].set_title("loss")
    ax[0, 0].legend()
    ax[0, 1].plot(*series(train, "lr"))
    ax[0, 1].set_title("learning rate")
    ax[1, 0].plot(*series(train, "tokens_per_s"))
    ax[1, 0].set_title("real tokens/s")
    ax[1, 1].plot(*series(train, "grad_norm"))
    ax[1, 1].set_title("grad norm")
    for a in ax.flat:
        a.set_xlabel("optimizer step")
        a.grid(alpha=0.3)
    fig.suptitle(str(metrics.parent))
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def overlay_figure(runs: list[tuple[str, list[dict]]]) -> Any:
    """One figure, three panels (train loss, eval loss, real tokens/s), one line per run labelled by its name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(16, 5), constrained_layout=True)
    panels = (("loss", "train loss", "-"), ("eval_loss", "eval loss", "o-"), ("tokens_per_s", "real tokens/s", "-"))
    for a, (key, title, style) in zip(ax, panels, strict=True):
        for i, (name, recs) in enumerate(runs):
            pts = [(r["step"], r[key]) for r in recs if r.get(key) is not None]
            if pts:
                # One colour per run across the panels, whatever panels a run has lines in.
                a.plot([p[0] for p in pts], [p[1] for p in pts], style, color=f"C{i % 10}", label=name)
        a.set_title(title)
        a.set_xlabel("optimizer step")
        a.grid(alpha=0.3)
        if a.get_lines():
            a.legend(fontsize="small")
    return fig


def plot_runs(dirs: list[Path], out: Path) -> Path:
    """Write the overlay of several runs' metrics.jsonl, each labelled by its run dir."""
    runs = []
    for d in dirs:
        recs = read_metrics(d / "metrics.jsonl")
        if not any("loss" in r or "eval_loss" in r for r in recs):
            raise UsageError(f"{d}/metrics.jsonl has no logged steps yet")
        runs.append((str(d), recs))
    import matplotlib.pyplot as plt

    fig = overlay_figure(runs)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
