"""Padding micro-batches exactly as the reference recipe's ``DataCollatorForSeq2Seq(padding=True)`` does."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .tokenize import IGNORE_INDEX, TokenizedData


def collate(data: TokenizedData, idx: Sequence[int], pad_id: int, padding_side: str = "right"
            ) -> dict[str, torch.Tensor]:
    """Pad like ``DataCollatorForSeq2Seq(padding=True)``: pad id / mask 0 / label -100 on the tokenizer's side."""
    rows = [data.example(i) for i in idx]
    width = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for j, (i_, m_, l_) in enumerate(rows):
        n = len(i_)
        sl = slice(width - n, width) if padding_side == "left" else slice(0, n)
        ids[j, sl] = torch.tensor(i_)
        mask[j, sl] = torch.tensor(m_)
        labels[j, sl] = torch.tensor(l_)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Host batch -> device; an all-ones ``attention_mask`` is left out. Whether a batch is padded is known here,
    on the host, for free; on the device, a model would have to read the mask back to learn it (transformers'
    mask code does, for the rotary families: a host sync in every forward pass). A model then takes a missing mask
    as no padding. On CUDA through pinned memory, asynchronously: a copy from pageable memory would make the host
    wait for it before queueing the forward pass."""
    # numpy: the host copy's values, read without a tensor op (one would look like a sync to the profiler probes).
    batch = {k: v for k, v in batch.items() if k != "attention_mask" or not v.numpy().all()}
    if device.type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


def label_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat (row x position) indices of the positions whose next token is a label: the rows the LM head computes.
    Found here, on the host, where the batch is built (numpy: no device work and no device sync), instead of by a
    data-dependent ``nonzero`` on the device in every micro-step."""
    lab = labels.numpy()
    nxt = np.full(lab.shape, IGNORE_INDEX, dtype=lab.dtype)
    nxt[:, :-1] = lab[:, 1:]
    return torch.from_numpy(np.flatnonzero(nxt != IGNORE_INDEX))


def collate_pairs(data: TokenizedData, idx: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Preference pairs ``idx`` as one batch, the chosen rows first and then the rejected ones in the same order,
    right-padded to the longest (TRL's ``DataCollatorForPreference`` layout): row ``k`` and row ``k + len(idx)``
    are pair ``k``'s two sides. ``pair_index``: each pair's index in ``data`` (for its reference log-probs)."""
    seq = data.sequence_rows(idx).reshape(-1, 2)
    b = collate(data, [*seq[:, 0].tolist(), *seq[:, 1].tolist()], pad_id, "right")
    b["pair_index"] = torch.as_tensor(np.asarray(idx, dtype=np.int64))
    return b


def pair_batch(data: TokenizedData, idx: list[int], pad_id: int, nll: str) -> dict[str, torch.Tensor]:
    """The pairs ``idx`` collated, plus the flat positions the head computes (``pos``: where the next token is an
    answer label, and with ``nll`` = ``all`` every position of a chosen row whose next token is real, ORPO's NLL;
    ``answer``: the chosen rows' labels), the token each predicts, its row, and which of the terms it belongs to.
    All found on the host."""
    b = collate_pairs(data, idx, pad_id)
    ids, mask, lab = b["input_ids"].numpy(), b["attention_mask"].numpy(), b["labels"].numpy()
    rows, width = ids.shape
    m = rows // 2
    nxt_lab = np.full(lab.shape, IGNORE_INDEX, dtype=lab.dtype)
    nxt_lab[:, :-1] = lab[:, 1:]
    is_label = nxt_lab != IGNORE_INDEX
    chosen = np.zeros((rows, 1), dtype=bool)
    chosen[:m] = True
    if nll == "all":
        nxt_mask = np.zeros(mask.shape, dtype=bool)
        nxt_mask[:, :-1] = mask[:, 1:] > 0
        is_nll = nxt_mask & chosen
    elif nll == "answer":
        is_nll = is_label & chosen
    else:
        is_nll = np.zeros(mask.shape, dtype=bool)
    keep = is_label | is_nll
    pos = np.flatnonzero(keep)
    nxt_ids = np.zeros(ids.shape, dtype=ids.dtype)
    nxt_ids[:, :-1] = ids[:, 1:]
    row = pos // width
    # Each row's positions as a (rows, most per row) index into the kept values, padded with len(pos) (a zero
    # appended to them): a row's sum is then a gather and a sum over a fixed shape, the same bits on every device
    # and in every pass (the reference's and the step's), where index_add on a GPU adds in atomics' order.
    counts = np.bincount(row, minlength=rows)
    gather = np.full((rows, max(int(counts.max(initial=0)), 1)), len(pos), dtype=np.int64)
    gather[row, np.arange(len(pos)) - np.repeat(np.cumsum(counts) - counts, counts)] = np.arange(len(pos))
    out = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"],
           "pos": torch.from_numpy(pos), "target": torch.from_numpy(nxt_ids.reshape(-1)[pos]),
           "row": torch.from_numpy(row), "row_gather": torch.from_numpy(gather),
           "is_label": torch.from_numpy(is_label.reshape(-1)[pos]),
           "is_nll": torch.from_numpy(is_nll.reshape(-1)[pos]),
           "n_answer": torch.from_numpy(is_label.sum(1).astype(np.float64)),
           "pair_index": b["pair_index"]}
    return out
