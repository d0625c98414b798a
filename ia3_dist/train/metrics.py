"""Rank-0 metrics: a tqdm bar and ``metrics.jsonl`` (one JSON object per logged step), fed to the trackers."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..runtime.hostmem import peak_rss_gib
from .trackers import Trackers

# Dense peak TFLOP/s of one device by name fragment (bf16/fp16 tensor cores; fp32 uses TF32 where it exists).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0, "A10G": 125.0,
               "V100": 125.0, "L4": 121.0, "T4": 65.0}


def device_peak_tflops(configured: float) -> float | None:
    if configured > 0:
        return configured
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for k, v in PEAK_TFLOPS.items():
            if k in name:
                return v
    return None


def peak_memory_gb(device: torch.device) -> float:
    """Max allocated on a GPU; peak RSS of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return peak_rss_gib()


def model_flops(lengths: torch.Tensor, n_params: int, n_layer: int, hidden: int) -> float:
    """Training FLOPs by the usual convention: 6 N per token plus attention, 12 L h T per token of a length-T
    sequence (forward + backward), on real tokens. MFU is reported against this. It is what full fine-tuning would
    need, not what IA3 executes (see :func:`executed_flops`): a comparable figure across tools, not a measure of
    how busy the device was."""
    lf = lengths.double()
    return float((6.0 * n_params * lf + 12.0 * n_layer * hidden * lf * lf).sum())


@dataclass(frozen=True)
class Shape:
    """What the FLOP counts need to know about the model."""

    n_params: int
    """All parameters (the 6N convention)."""
    linear_params: int
    """Weights of the blocks' matmuls (every nn.Linear but the LM head)."""
    n_layer: int
    hidden: int
    vocab: int


def executed_flops(seq_len: int, n_seqs: int, label_rows: float, shape: Shape, recompute: bool,
                   chunked_rows: float = 0.0) -> float:
    """FLOPs a micro-batch of ``n_seqs`` rows padded to ``seq_len`` actually executes in an IA3 step.

    Forward: every block matmul on every position, padding included (2 x linear params per token), attention
    scores and values (4 L h T^2 per row), and the LM head only on label rows (2 h V each). Backward: the frozen
    base computes no weight gradients, only gradients of activations: the same matmul FLOPs again for the blocks
    and the head, twice the attention forward. Gradient checkpointing adds one more forward of the blocks; a chunked
    loss (``train.loss_chunk_mib``) one more head forward over its rows. IA3's elementwise scalings, norms and
    the softmax are not counted."""
    tokens = float(seq_len * n_seqs)
    linear = 2.0 * shape.linear_params * tokens
    attn = 4.0 * shape.n_layer * shape.hidden * float(seq_len) ** 2 * n_seqs
    head = 2.0 * shape.hidden * shape.vocab
    total = (linear + attn + head * label_rows) + (linear + 2.0 * attn + head * label_rows)
    if recompute:
        total += linear + attn
    return total + head * chunked_rows


class MetricsLog:
    """Rank 0 writes each line to metrics.jsonl and hands the same line to the trackers (``output.report_to``)."""

    def __init__(self, path: Path | None, total_steps: int, enabled: bool, initial: int = 0,
                 trackers: Trackers | None = None) -> None:
        from tqdm.auto import tqdm

        self.enabled = enabled
        self.path = path
        self.trackers = trackers if trackers is not None else Trackers()
        # disable=None: tqdm draws the bar on a terminal only; the per-log lines are written either way.
        self.bar = tqdm(total=total_steps, initial=initial, disable=None if enabled else True, desc="train",
                        unit="step", dynamic_ncols=True, mininterval=1.0)

    def step(self) -> None:
        self.bar.update(1)

    def log(self, rec: dict[str, Any]) -> None:
        if not self.enabled:
            return
        # 7 significant digits, not decimals: a grad norm of 3e-5 or a warmup lr of 2e-7 keeps its value.
        rec = {k: (float(f"{v:.7g}") if isinstance(v, float) and math.isfinite(v) else v) for k, v in rec.items()}
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(rec) + "\n")
        self.trackers.log(rec)
        short = {k: rec[k] for k in ("loss", "lr", "grad_norm", "tokens_per_s", "eval_loss", "eval_ppl") if k in rec}
        self.bar.set_postfix(short, refresh=False)
        self.bar.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in
                                {"step": rec.get("step"), **short}.items()))

    def close(self) -> None:
        self.bar.close()
