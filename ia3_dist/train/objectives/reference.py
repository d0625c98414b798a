"""DPO's reference log-probabilities: each pair's chosen and rejected answer under the model the run starts from,
computed once before step 1 (and before a checkpoint is loaded, so a resumed run computes them on the same
starting point), every rank its shard of the pairs.

For a fresh adapter the starting model is the base itself (IA3 vectors of exactly 1.0 scale nothing), for
``ia3.init_from`` the base with that adapter: in both cases the reference TRL computes with the adapter disabled or
with a frozen copy, without a second model in memory. The result is kept beside the token cache, named by the
data, the base model's files, the starting adapter and the precision, so a resume or a second run over the same
data reads it instead of computing it again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...data.cache import cache_root
from ...data.collate import pair_batch, to_device
from ...data.sampler import plan_epoch, rank_slice, strided_batches
from ...data.tokens import TokenizedData
from ...models.loss import row_sums
from ...runtime import dist
from ..evaluate import eval_mode

VERSION = 5  # 4: the training split in the first epoch's micro-batches; 5: summed by row_sums on the device
"""Bumped when the stored values change meaning (2: summed in the training dtype; 3: batched as training)."""


def _files_digest(h: Any, path: Path, content: bool) -> None:
    """Names, sizes and modification times of a model dir's files (``content``: their bytes, for small adapter
    files)."""
    if not path.is_dir():
        h.update(str(path).encode())
        return
    for f in sorted(x for x in path.iterdir() if x.is_file()):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        if content and st.st_size <= 64 << 20:
            h.update(f.read_bytes())


def adapter_digest(path: Path) -> str:
    """The content of a starting adapter (``ia3.init_from``): its files' names, sizes and bytes, not their times
    (a copy is the same adapter)."""
    h = hashlib.sha256()
    if not path.is_dir():
        h.update(str(path).encode())
    else:
        for f in sorted(x for x in path.iterdir() if x.is_file()):
            h.update(f"{f.name}:{f.stat().st_size}\n".encode())
            if f.stat().st_size <= 64 << 20:
                h.update(f.read_bytes())
    return h.hexdigest()[:32]


def reference_key(p: Any, data: TokenizedData, batches: list[list[int]] | None = None) -> str:
    """What the reference depends on: the examples (cache and rows), the base model's files (names, sizes, times)
    and weights (``base_weights``, by content: other weights copied in with their times kept, ``cp -p``), the
    starting adapter, precision, attention implementation and the batches the pairs are scored in (their padding,
    and in a low precision their sums, follow them): the micro-batch size, and ``batches``, the training split's
    first-epoch micro-batches, as a set of sets (which rank runs one, and in what order, changes nothing: a run
    resumed on another allocation whose micro-batches hold the same pairs reads the table)."""
    composition = None
    if batches is not None:
        c = hashlib.sha256(json.dumps(sorted(sorted(mb) for mb in batches if mb)).encode())
        composition = c.hexdigest()
    key = {"v": VERSION, "model_key": p.meta.get("model_key"), "base_weights": p.meta.get("base_weights"),
           "data": Path(data.cache_file).stem, "precision": p.cfg.train.precision,
           "attention": p.cfg.model.attention, "ia3": p.meta.get("ia3"), "micro": p.cfg.train.micro_batch_size,
           "batches": composition}
    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode())
    rows = data.rows if data.rows is not None else np.arange(len(data) * 2)
    h.update(np.ascontiguousarray(rows, dtype=np.int64).tobytes())
    # The dir the weights load from: for a hub model its snapshot (a hub name alone would keep the table of the
    # weights its branch named when the table was written).
    _files_digest(h, p.weights_dir or Path(p.model_path), content=False)
    if p.cfg.ia3.init_from:
        _files_digest(h, Path(p.cfg.ia3.init_from), content=True)
    return h.hexdigest()[:32]


def _read(path: Path, n: int) -> np.ndarray | None:
    """The stored table if it is one: (n, 2) float64, finite; anything else is recomputed."""
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    if arr.shape != (n, 2) or arr.dtype != np.float64 or not np.isfinite(arr).all():
        return None
    return arr


def reference_logps(tr: Any, data: TokenizedData, split: str) -> np.ndarray:
    """``(pairs, 2)`` float64: summed log-probs of each pair's chosen and rejected answer. Every rank calls this
    (ZeRO-3 gathers parameters in each forward, so every rank runs the same number of them)."""
    p, engine = tr.p, tr.engine
    n = len(data)
    world, micro = p.env.world_size, p.cfg.train.micro_batch_size
    if split == "train":
        # The first epoch's micro-batches as training runs them (shuffled, length-grouped: the same plan), so
        # their padding and sums are the step's and the first step's margins are exactly 0 in any precision.
        plan = plan_epoch(data.lengths, p.layout, 0)
        every = [mb for st in plan for mb in st]
        mine = [mb for st in plan for mb in rank_slice(st, p.env.rank, p.layout.accum)]
    else:
        # The evaluation's own batches (Preference.evaluate).
        every = [mb for r in range(world) for mb in strided_batches(n, r, world, micro)]
        mine = strided_batches(n, p.env.rank, world, micro)
    # Every pair is scored once; every rank runs as many forward passes (an empty slot: a filler batch, not
    # written).
    path = cache_root(p.cfg.data) / "reference" / f"{reference_key(p, data, every)}.npy"
    have = torch.tensor([0.0 if _read(path, n) is None else 1.0], dtype=torch.float64)
    # Every rank must take the same branch: read only when all of them can.
    if dist.all_reduce_sum(have.to(engine.device)).item() == p.env.world_size:
        got = _read(path, n)
        dist.print0(p.env, f"dpo reference: {n} {split} pairs' log-probs read from {path}")
        return got
    table = torch.zeros((n, 2), dtype=torch.float64)
    with eval_mode(engine.module), torch.no_grad():
        for idx in mine:
            b = pair_batch(data, idx or [0], tr.pad_id, "")
            d = to_device({name: b[name] for name in ("input_ids", "attention_mask", "pos", "target", "row_gather")},
                          engine.device)
            gather = d.pop("row_gather")
            lp = engine(**d)
            rows = len(b["n_answer"])
            # Summed on the device, in the dtype and by the op the training step sums with: a pair whose policy is
            # still the reference then has a margin of exactly 0, as in TRL, where both come from one forward pass.
            sums = row_sums(lp.detach(), gather).double().cpu()
            if idx:
                m = rows // 2
                table[torch.as_tensor(idx)] = torch.stack([sums[:m], sums[m:]], 1)
    table = dist.all_reduce_sum(table.to(engine.device)).cpu()
    out = table.numpy()
    if p.env.local_rank == 0:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
            np.save(tmp, out)
            os.replace(tmp, path)
        except OSError as e:  # a read-only cache costs a recomputation on resume, nothing else
            print(f"warning: dpo reference not cached at {path} ({e.strerror or e})", flush=True)
    dist.print0(p.env, f"dpo reference: {n} {split} pairs' log-probs computed (before step 1)")
    return out
