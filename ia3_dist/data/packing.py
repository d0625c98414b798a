"""Exact sequence packing (``data.packing``): the examples a rank trains on in one optimizer step are laid end to end
in rows of ``data.pack_length`` tokens, each example (a *document*) attending only to itself, with positions that
restart at each document.

Which examples form a step never changes (the sampler decides that, packed or not); packing only changes their
layout across the rank's ``grad_accum`` micro-steps. The loss is a sum over label tokens divided by the global
batch's label count, so that re-layout is exact up to float summation order. Labels never cross a document: the
first token of every document carries no label, as in an unpacked row, where it is never a target either.

A micro-step's tensors are ``rows x pack_length``: the width is fixed for the run and the row count is at most the
micro-batch's example count, so a compiled step sees a bounded set of shapes (the loop compiles packed runs'
blocks shape-generic, so the row count does not recompile them).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..errors import UsageError
from .sampler import rank_slice
from .tokenize import IGNORE_INDEX, TokenizedData

ROW_ALIGN = 64
"""``data.pack_length: auto`` picks a multiple of this (tensor-core and cache-line friendly widths)."""
AUTO_STEPS = 256
"""Steps of epoch 0 the ``auto`` choice simulates (enough for a stable estimate, cheap on millions of records)."""


def first_fit(lengths: Sequence[int], cap: int) -> list[list[int]]:
    """Positions ``0..len(lengths)-1`` packed into bins of at most ``cap`` tokens, first-fit decreasing (longest
    first, ties in order): deterministic, and within 11/9 of the fewest bins. A length over ``cap`` is an error
    (the preflight refuses such a ``data.pack_length`` before anything runs)."""
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = int(lengths[i])
        if n > cap:
            raise ValueError(f"an example of {n} tokens does not fit a packed row of {cap}")
        for b, r in enumerate(room):
            if n <= r:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(cap - n)
    return bins


def pack_step(micro_batches: list[list[int]], lengths: np.ndarray, cap: int) -> list[list[list[int]]]:
    """One rank's micro-batches of one step (example indices) -> as many micro-batches of packed *rows* (each row a
    list of example indices). The rows are spread evenly (the first micro-steps take one more when they do not
    divide); a micro-step with no row is an empty list, which the loop fills with a zero-weight row as it does for
    a short last batch."""
    examples = [i for mb in micro_batches for i in mb]
    rows = [[examples[j] for j in b] for b in first_fit([int(lengths[i]) for i in examples], cap)]
    q, r = divmod(len(rows), len(micro_batches))
    out, at = [], 0
    for k in range(len(micro_batches)):
        n = q + (k < r)
        out.append(rows[at:at + n])
        at += n
    return out


def occupied(rows: list[list[list[int]]]) -> int:
    """How many micro-steps of :func:`pack_step`'s result hold a row (they come first: rows are spread from the
    first micro-step on)."""
    return sum(1 for mb in rows if mb)


def step_micro_steps(step: list[list[int]], lengths: np.ndarray, cap: int, accum: int, world: int,
                     own: int | None = None) -> int:
    """The micro-steps every rank runs in ``step`` (the sampler's micro-batches of all ranks): up to the last one
    that any rank has a row in, at least one. The micro-steps after it would be filler rows at weight 0 on every
    rank: not run, the accumulation ends there. Every rank packs every rank's slice here (a step's examples, a few
    milliseconds), so they agree without a collective. ``own``: this rank's count, when known (a full one ends
    the search)."""
    if own is not None and own >= accum:
        return accum
    n = 1
    for r in range(world):
        mbs = rank_slice(step, r, accum)
        if any(mbs):
            n = max(n, occupied(pack_step(mbs, lengths, cap)))
            if n >= accum:
                break
    return n


def collate_packed(data: TokenizedData, rows: Sequence[Sequence[int]], pad_id: int, cap: int
                   ) -> dict[str, torch.Tensor]:
    """Rows of ``cap`` tokens. ``attention_mask`` marks the documents' tokens (it counts real tokens; the model
    gets the per-document mask its family builds from ``seq_ids``); ``seq_ids`` numbers the documents of a row from
    1 (0: the padding at its end, a segment of its own); ``position_ids`` restart at 0 in every segment."""
    n = len(rows)
    ids = np.full((n, cap), pad_id, dtype=np.int64)
    mask = np.zeros((n, cap), dtype=np.int64)
    labels = np.full((n, cap), IGNORE_INDEX, dtype=np.int64)
    pos = np.zeros((n, cap), dtype=np.int64)
    seq = np.zeros((n, cap), dtype=np.int64)
    for j, row in enumerate(rows):
        at = 0
        for d, i in enumerate(row, start=1):
            i_, m_, l_ = data.example(i)
            k = len(i_)
            ids[j, at:at + k] = i_
            mask[j, at:at + k] = m_
            labels[j, at:at + k] = l_
            # The first token is never a target unpacked (labels shift left by one); packed, it would be the
            # target of the previous document's last token.
            labels[j, at] = IGNORE_INDEX
            pos[j, at:at + k] = np.arange(k)
            seq[j, at:at + k] = d
            at += k
        pos[j, at:] = np.arange(cap - at)
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
            "labels": torch.from_numpy(labels), "position_ids": torch.from_numpy(pos),
            "seq_ids": torch.from_numpy(seq)}


def efficiency(steps: list[list[list[int]]], lengths: np.ndarray, accum: int, world: int, cap: int
               ) -> tuple[float, float]:
    """(real tokens / row slots, rows per optimizer step) over ``steps`` (the sampler's plan). The micro-steps every
    rank runs end at the last one any rank has a row in (:func:`step_micro_steps`); before it, a micro-step left
    without a row on a rank runs a filler row at weight 0 (:mod:`..train.objectives.sft`), and its slots count, as
    its compute does."""
    real = slots = 0
    for step in steps:
        n = step_micro_steps(step, lengths, cap, accum, world)
        for r in range(world):
            mbs = rank_slice(step, r, accum)
            if not any(mbs):
                slots += n * cap  # a rank without examples this step: a filler per micro-step run
                continue
            real += sum(int(lengths[i]) for mb in mbs for i in mb)
            slots += sum(max(1, len(mb)) for mb in pack_step(mbs, lengths, cap)[:n]) * cap
    return real / max(slots, 1), slots / cap / max(len(steps), 1)


def choose_pack_length(steps: list[list[list[int]]], lengths: np.ndarray, accum: int, world: int) -> int:
    """``data.pack_length: auto``: over the first :data:`AUTO_STEPS` steps of the plan, the width (a multiple of
    :data:`ROW_ALIGN`, at least the longest example) with the best packing efficiency; a wider row must gain more
    than half a point to be chosen (attention work grows with the row on the masked path)."""
    longest = int(lengths.max())
    base = -(-longest // ROW_ALIGN) * ROW_ALIGN
    sample = steps[:AUTO_STEPS]
    per_rank = max((sum(len(mb) for mb in rank_slice(s, r, accum)) for s in sample for r in range(world)), default=1)
    best, best_eff = base, efficiency(sample, lengths, accum, world, base)[0]
    width = base * 2
    while width <= max(base, per_rank * longest) and width <= 16 * base:
        eff = efficiency(sample, lengths, accum, world, width)[0]
        if eff > best_eff + 0.005:
            best, best_eff = width, eff
        width *= 2
    return best


def check_pack_length(cap: int, lengths: np.ndarray, key: str = "data.pack_length") -> None:
    longest = int(lengths.max()) if len(lengths) else 0
    if cap < longest:
        raise UsageError(f"{key} is {cap} but the longest example has {longest} tokens (data.max_length "
                         f"truncates to at most that); set {key} to at least {longest}, or auto")
