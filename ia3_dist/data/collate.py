"""Padding micro-batches exactly as the reference recipe's ``DataCollatorForSeq2Seq(padding=True)`` does."""

from __future__ import annotations

from collections.abc import Sequence

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
