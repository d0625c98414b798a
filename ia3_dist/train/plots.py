"""PNG of a run's metrics.jsonl: loss and eval loss, learning rate, tokens/s, grad norm."""

from __future__ import annotations

import json
from pathlib import Path

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
