"""Training objectives: what a micro-batch's loss is, beside the loop that runs the steps (``train.objective``).

An objective owns its batches (collation on the host), the wrapper module the DeepSpeed engine runs, how a
micro-batch's output becomes its loss term, what normalises the step's sum of terms, its metrics and its held-out
evaluation. The loop (:mod:`..loop`) runs any of them the same way: every rank joins every micro-step, the step's
gradient is sum(terms) / normaliser over all ranks and micro-batches.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class Objective(Protocol):
    name: str

    def module(self, peft_model: Any, rows: Any, chunk_bytes: int, inputs: Any) -> torch.nn.Module:
        """The module the engine wraps (returns what :meth:`term` reads)."""

    def batches(self, tr: Any, step_mbs: list[list[int]]) -> tuple[list[dict[str, torch.Tensor]], list[bool]]:
        """This rank's micro-batches of the step, collated on the host, and which are real (an empty slot runs a
        copy of a real one at weight 0)."""

    def stats(self, tr: Any, batches: list[dict[str, torch.Tensor]], real: list[bool]) -> Any:
        """This rank's :class:`..loop.StepStats` of the step."""

    def normaliser(self, glob: Any) -> float:
        """What the step's summed terms are divided by (all ranks): label tokens (sft), micro-batches (pairs)."""

    def term(self, engine: Any, batch: dict[str, torch.Tensor], real: bool) -> torch.Tensor:
        """Forward one device micro-batch; its loss term (a scalar with gradient)."""

    def setup(self, tr: Any) -> None:
        """Before step 1 and before a checkpoint is loaded (the model is the run's starting point)."""

    def window_metrics(self, micro_batches: float) -> dict[str, float]:
        """Metrics of the steps since the last log line (every rank calls it: it may reduce)."""

    def evaluate(self, tr: Any, on_batch: Any) -> dict[str, float]:
        """Held-out metrics (every rank calls it)."""


def build(cfg: Any) -> Objective:
    """The objective ``train.objective`` names."""
    if cfg.train.objective == "sft":
        from .sft import SFT

        return SFT()
    from .preference import Preference

    return Preference(cfg.train)


def is_pairwise(cfg: Any) -> bool:
    """Whether ``cfg``'s objective trains on preference pairs."""
    return cfg.train.objective != "sft"
