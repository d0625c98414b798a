"""What one optimizer step needs to know about the whole global batch, agreed by every rank in one collective."""

from __future__ import annotations

from dataclasses import astuple, dataclass, fields

import torch

from ..runtime import dist


@dataclass
class StepStats:
    """What one optimizer step needs to know about the whole global batch. It travels as one float64 all-reduce
    (sum over ranks), so every rank agrees on the loss normaliser and on whether to stop."""

    label_tokens: float = 0.0
    """Tokens that carry a label (the loss normaliser of the global batch)."""
    real_tokens: float = 0.0
    """Non-padding tokens."""
    padded_tokens: float = 0.0
    """Tokens computed on, padding included."""
    samples: float = 0.0
    """Examples (packed: documents, not rows)."""
    stop_requested: float = 0.0
    """> 0 when a signal reached any rank."""
    flops: float = 0.0
    """Training FLOPs by the 6N convention plus attention (see :func:`model_flops`)."""
    executed_flops: float = 0.0
    """FLOPs the step actually executes (see :func:`executed_flops`)."""
    rows: float = 0.0
    """Rows computed on (equal to samples unpacked; two per pair with a preference objective)."""
    micro_batches: float = 0.0
    """Micro-batches that hold examples (the preference objectives' normaliser)."""

    def all_reduce(self) -> StepStats:
        """On the host (a gloo group on GPU jobs): the step's scale and stop decision never wait for the device."""
        t = torch.tensor(astuple(self), dtype=torch.float64)
        return StepStats(*dist.host_all_reduce_sum(t).tolist())

    def __iadd__(self, other: StepStats) -> StepStats:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self
