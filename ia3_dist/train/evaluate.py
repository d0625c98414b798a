"""Held-out loss and perplexity, token-weighted over all ranks, on the live DeepSpeed engine."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..data.collate import collate
from ..data.tokenize import TokenizedData
from ..runtime import dist


def evaluate(engine: Any, data: TokenizedData, env: dist.DistEnv, micro: int, pad_id: int, side: str,
             on_batch: Callable[[], None] | None = None) -> dict[str, float]:
    """Rank r evaluates examples r, r+world, ...; every rank runs the same number of forward passes (ZeRO-3
    gathers parameters collectively), padding its shard with weight-0 batches. ``on_batch`` runs after each
    forward pass (the hang watchdog's progress beat). Data in named parts (a mixture's sources) is evaluated part
    by part, so each part's loss (``eval_loss/<name>``) comes from the same forward passes."""
    parts = data.parts or [("", np.arange(len(data)))]
    device = engine.device
    acc = torch.zeros(len(parts), 2, dtype=torch.float64, device=device)
    was_training = engine.module.training
    engine.module.eval()
    with torch.no_grad():
        for p, (_, positions) in enumerate(parts):
            mine = positions[env.rank::env.world_size].tolist()
            per_rank = -(-len(positions) // env.world_size)
            n_batches = -(-per_rank // micro)
            for b in range(n_batches):
                idx = mine[b * micro:(b + 1) * micro]
                batch = collate(data, idx or [0], pad_id, side)
                loss_sum, n = engine(**{k: v.to(device) for k, v in batch.items()})
                if idx:
                    acc[p] += torch.stack([loss_sum.detach().double(), n.detach().double()])
                if on_batch is not None:
                    on_batch()
    if was_training:
        engine.module.train()
    dist.all_reduce_sum(acc)
    sums = acc.cpu().tolist()
    loss = sum(s for s, _ in sums) / max(sum(n for _, n in sums), 1.0)
    out = {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": sum(n for _, n in sums)}
    if data.parts:
        out.update({f"eval_loss/{name}": s / max(n, 1.0) for (name, _), (s, n) in zip(parts, sums, strict=True)})
    return out
