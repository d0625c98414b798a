"""Rank-0 metrics: a tqdm bar and ``metrics.jsonl`` (one JSON object per logged step)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class MetricsLog:
    def __init__(self, path: Path | None, total_steps: int, enabled: bool, initial: int = 0) -> None:
        from tqdm.auto import tqdm

        self.enabled = enabled
        self.path = path
        # disable=None: tqdm draws the bar on a terminal only; the per-log lines are written either way.
        self.bar = tqdm(total=total_steps, initial=initial, disable=None if enabled else True, desc="train",
                        unit="step", dynamic_ncols=True, mininterval=1.0)
        self.history: list[dict[str, Any]] = []
        self.tb = None
        if enabled and path is not None:
            try:  # TensorBoard event files when tensorboard is installed; metrics.jsonl is the record either way
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(path.parent / "tensorboard"))
            except ImportError:
                self.tb = None

    def step(self) -> None:
        self.bar.update(1)

    def log(self, rec: dict[str, Any]) -> None:
        if not self.enabled:
            return
        rec = {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in rec.items()}
        self.history.append(rec)
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, rec["step"])
        short = {k: rec[k] for k in ("loss", "lr", "grad_norm", "tokens_per_s", "eval_loss", "eval_ppl") if k in rec}
        self.bar.set_postfix(short, refresh=False)
        self.bar.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in
                                {"step": rec.get("step"), **short}.items()))

    def close(self) -> None:
        self.bar.close()
        if self.tb is not None:
            self.tb.close()
