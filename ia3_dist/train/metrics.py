"""Rank-0 metrics: a tqdm bar and ``metrics.jsonl`` (one JSON object per logged step), fed to the trackers."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from ..runtime.hostmem import peak_rss_gib
from .trackers import Trackers

PEAK_TFLOPS: dict[str, tuple[float, float, float | None]] = {
    "GH200": (989.0, 67.0, 495.0), "H200": (989.0, 67.0, 495.0), "H100 PCIe": (756.0, 51.0, 378.0),
    "H100 NVL": (835.0, 60.0, 418.0),
    "H100": (989.0, 67.0, 495.0), "H800": (989.0, 67.0, 495.0), "A100": (312.0, 19.5, 156.0),
    "A800": (312.0, 19.5, 156.0), "L40S": (362.0, 91.6, 183.0), "L40": (181.0, 90.5, 90.5),
    "A10G": (125.0, 31.2, 62.5), "A10": (125.0, 31.2, 62.5), "L4": (121.0, 30.3, 60.0),
    "V100": (125.0, 15.7, None), "T4": (65.0, 8.1, None)}
"""Dense peak TFLOP/s of one device by its name (``torch.cuda.get_device_name``, matched as a whole word, in this
order: "H100 PCIe" before "H100", "L40S" before "L40" and "L4"; a Grace Hopper is a "GH200"): (bf16/fp16
tensor cores, fp32, TF32 or None where there is none). An fp32 run's matmuls run in TF32 only where torch is told
to (:func:`tf32_matmuls`; off by default), else at the fp32 peak."""


def tf32_matmuls() -> bool:
    """Whether CUDA fp32 matmuls run in TF32 (``torch.set_float32_matmul_precision("high")``, or the backend's own
    ``fp32_precision``)."""
    return torch.get_float32_matmul_precision() != "highest" \
        or getattr(torch.backends.cuda.matmul, "fp32_precision", "none") == "tf32"


def device_peak_tflops(configured: float, precision: str = "bf16", name: str | None = None) -> float | None:
    """``train.peak_tflops`` when set, else the peak of this GPU (or of the device called ``name``) for
    ``precision`` (:data:`PEAK_TFLOPS`); None on CPU or an unknown device (no MFU is logged)."""
    import re

    if configured > 0:
        return configured
    if name is None:
        if not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name()
    for k, (half, fp32, tf32) in PEAK_TFLOPS.items():
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(k)}(?![A-Za-z0-9])", name):
            if precision in ("bf16", "fp16"):
                return half
            return tf32 if tf32 is not None and tf32_matmuls() else fp32
    return None


def peak_memory_gb(device: torch.device) -> float:
    """Max allocated on a GPU; peak RSS of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return peak_rss_gib()


def model_flops(lengths: torch.Tensor | np.ndarray, n_params: int, n_layer: int, hidden: int) -> float:
    """Training FLOPs by the usual convention: 6 N per token plus attention, 12 L h T per token of a length-T
    sequence (forward + backward), on real tokens. MFU is reported against this. It is what full fine-tuning would
    need, not what IA3 executes (see :func:`executed_flops`): a comparable figure across tools, not a measure of
    how busy the device was."""
    # numpy: the loop calls this on host tensors every micro-step, where a torch reduction's .item() is a sync.
    lf = np.asarray(lengths, dtype=np.float64)
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


MAX_LINE = 1 << 20
"""A metrics line is a few hundred bytes; a longer one is damage, and is skipped without being held whole."""


def trim_metrics(path: Path, upto: int, eval_pending: bool = False) -> str | None:
    """On resume, keep the lines of ``metrics.jsonl`` up to step ``upto`` (a killed run may have logged steps it
    never saved), rewritten atomically and streamed (never held whole); ``eval_pending``: the checkpoint's
    evaluation of step ``upto`` runs again first, so a line of it already there (an attempt that ran it and was
    killed before its next checkpoint) goes. The file is the run's own output but may be damaged: a last line cut
    off by a kill or a full disk is dropped, any other line that is not a JSON object with an integer ``step`` (or
    is over :data:`MAX_LINE` bytes) is skipped, and nothing raises, since this runs after the ranks have met.
    Returns one line saying what was dropped, or None."""
    if not path.is_file():
        return None
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(path, "rb") as src, open(tmp, "wb") as dst:
            bad, torn, _ = _scan(src, upto, dst, upto if eval_pending else None)
        os.replace(tmp, path)
    except OSError as e:
        # A full disk (what may have cut the line) or a read-only dir: cut the file after its last kept line
        # instead, which needs no space, so the next line logged starts on a line of its own.
        tmp.unlink(missing_ok=True)
        try:
            with open(path, "rb") as src:
                # The put-off evaluation's lines come last in their step: cut before them too.
                end = _scan(src, upto, None, upto if eval_pending else None)[2]
                src.seek(max(end - 1, 0))
                ends_line = end == 0 or src.read(1) == b"\n"
            os.truncate(path, end)
            if not ends_line:
                # The last kept record lost its newline to the kill: the next line logged would join it.
                with open(path, "ab") as fh:
                    fh.write(b"\n")
        except OSError:
            pass
        return f"{path}: could not rewrite it ({e.strerror or e}); cut it after its last record up to step {upto}"
    notes = ([f"dropped its last line ({torn}), cut off mid-write"] if torn else []) + \
        ([f"skipped {bad} line(s) that are not metric records"] if bad else [])
    return f"{path}: {'; '.join(notes)}" if notes else None


def _scan(src: IO[bytes], upto: int, dst: IO[bytes] | None, no_eval_at: int | None = None
          ) -> tuple[int, int, int]:
    """Copy the records up to step ``upto`` from ``src`` to ``dst``, less the evaluation lines (no training
    ``loss``) of step ``no_eval_at``: (bad lines, the torn last line's number or 0, the offset in ``src`` just
    after the last record kept)."""
    bad, torn, n, kept_end = 0, 0, 0, 0
    while line := src.readline(MAX_LINE + 1):
        n += 1
        if len(line) > MAX_LINE:
            while line and not line.endswith(b"\n"):  # the rest of it, a bounded piece at a time
                line = src.readline(MAX_LINE + 1)
            bad += 1
            continue
        if not line.strip():
            continue
        rec = _record(line)
        if rec is None:
            # Only the last line can lack its newline: that one was cut off mid-write.
            if line.endswith(b"\n"):
                bad += 1
            else:
                torn = n
            continue
        if rec["step"] == no_eval_at and "loss" not in rec:
            continue
        if rec["step"] <= upto:
            if dst is not None:
                dst.write(line if line.endswith(b"\n") else line + b"\n")
            kept_end = src.tell()
    return bad, torn, kept_end


def _record(line: bytes) -> dict[str, Any] | None:
    try:
        rec = json.loads(line.decode("utf-8"))
    except (ValueError, RecursionError):  # not UTF-8, not JSON, an int of more than 4300 digits, deep nesting
        return None
    ok = isinstance(rec, dict) and type(rec.get("step")) is int
    return rec if ok else None


CONSOLE = ("loss", "lr", "grad_norm", "rewards/accuracies", "rewards/margins", "tokens_per_s", "eval_loss", "eval_ppl",
           "eval_rewards/accuracies")
"""What a metrics line shows on the console (everything goes to metrics.jsonl)."""


class MetricsLog:
    """Rank 0 writes each line to metrics.jsonl and hands the same line to the trackers (``output.report_to``)."""

    def __init__(self, path: Path | None, total_steps: int, enabled: bool, initial: int = 0,
                 trackers: Trackers | None = None) -> None:
        from tqdm.auto import tqdm

        self.enabled = enabled
        self.path = path
        self.error: OSError | None = None
        """The first failed write of ``path`` (then no more are tried)."""
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
        if self.path is not None and self.error is None:
            try:
                with open(self.path, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(rec) + "\n")
            except OSError as e:
                # Not raised here, on rank 0 alone (the others would wait for it in the next collective): the next
                # checkpoint fails on every rank with it, and the resume logs these steps again.
                self.error = e
                self.bar.write(f"ia3-dist: {self.path} could not be written ({e.strerror or e}); the next "
                               f"checkpoint stops the run (exit 74)")
        self.trackers.log(rec)
        short = {k: rec[k] for k in CONSOLE if k in rec}
        short.update({k: v for k, v in rec.items() if "/" in k and "," in k})  # benchmarks: task/metric,filter
        self.bar.set_postfix(short, refresh=False)
        self.bar.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in
                                {"step": rec.get("step"), **short}.items()))

    def close(self) -> None:
        self.bar.close()
