"""Held-out loss and perplexity, token-weighted over all ranks, on the live DeepSpeed engine."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from ..data.collate import collate, to_device
from ..data.tokenize import TokenizedData
from ..runtime import dist


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """``module`` in eval mode inside, each submodule's own mode back after: a blanket ``.train()`` would turn on
    whatever was in eval mode before (a frozen part, or the whole model of a run that had not called
    ``.train()``), so dropout would depend on whether an evaluation had run."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def evaluate(engine: Any, data: TokenizedData, env: dist.DistEnv, micro: int, pad_id: int, side: str,
             on_batch: Callable[[], None] | None = None) -> dict[str, float]:
    """Rank r evaluates examples r, r+world, ...; every rank runs the same number of forward passes (ZeRO-3
    gathers parameters collectively), padding its shard with weight-0 batches. ``on_batch`` runs after each
    forward pass (the hang watchdog's progress beat). Data in named parts (a mixture's sources) is evaluated part
    by part, so each part's loss (``eval_loss/<name>``) comes from the same forward passes."""
    parts = data.parts or [("", np.arange(len(data)))]
    device = engine.device
    acc = torch.zeros(len(parts), 2, dtype=torch.float64, device=device)
    with eval_mode(engine.module), torch.no_grad():
        for p, (_, positions) in enumerate(parts):
            mine = positions[env.rank::env.world_size].tolist()
            per_rank = -(-len(positions) // env.world_size)
            n_batches = -(-per_rank // micro)
            for b in range(n_batches):
                idx = mine[b * micro:(b + 1) * micro]
                batch = collate(data, idx or [0], pad_id, side)
                loss_sum, n = engine(**to_device(batch, device))
                if idx:
                    acc[p] += torch.stack([loss_sum.detach().double(), n.detach().double()])
                if on_batch is not None:
                    on_batch()
    dist.all_reduce_sum(acc)
    sums = acc.cpu().tolist()
    loss = sum(s for s, _ in sums) / max(sum(n for _, n in sums), 1.0)
    out = {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": sum(n for _, n in sums)}
    if data.parts:
        out.update({f"eval_loss/{name}": s / max(n, 1.0) for (name, _), (s, n) in zip(parts, sums, strict=True)})
    return out
