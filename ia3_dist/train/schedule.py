"""The learning-rate schedule: HF Trainer's ``get_{linear,cosine,constant}_schedule_with_warmup``, step for step.

DeepSpeed calls the factory with its *basic* torch optimizer (ZeRO wrappers share its param groups) and steps the
scheduler after every optimizer step, as HF Trainer does.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from ..config import TrainSection


def lr_lambda(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "linear":
            return max(0.0, (total - step) / max(1, total - warmup))
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return f


def lr_schedule(t: TrainSection, total_steps: int) -> Callable[[Optimizer], LambdaLR]:
    fn = lr_lambda(t.scheduler, t.warmup_steps, total_steps)
    return lambda opt: LambdaLR(opt, fn)
