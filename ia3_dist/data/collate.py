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


def label_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat (row x position) indices of the positions whose next token is a label: the rows the LM head computes.
    Found here, on the host, where the batch is built (numpy: no device work and no device sync), instead of by a
    data-dependent ``nonzero`` on the device in every micro-step."""
    lab = labels.numpy()
    nxt = np.full(lab.shape, IGNORE_INDEX, dtype=lab.dtype)
    nxt[:, :-1] = lab[:, 1:]
    return torch.from_numpy(np.flatnonzero(nxt != IGNORE_INDEX))
