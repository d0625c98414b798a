"""The report printed before every run and by ``ia3-dist check``: data statistics and the resolved run shape."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..data.packing import efficiency
from ..data.report import data_lines
from ..data.sampler import plan_epoch
from ..data.template import HUMAN_ASSISTANT
from ..runtime import checkpoint as ckpt
from ..runtime import ds_config as dsc
from ..runtime import manifest
from .prepare import Prepared


def output_state(out: Path, resume_from: Path | None) -> str:
    """One line on the output dir: new, resumed, or what is there (and what a fresh start would do with it)."""
    if resume_from is not None:
        return f"{out}: resuming from {resume_from}"
    if not out.exists():
        return f"{out}: new"
    st = manifest.inspect(out)
    n = len(ckpt.complete_tags(out, st))
    line = f"{out}: exists, {n} checkpoint(s)"
    if st.results:
        line += f"; output.overwrite=true removes the earlier run's files ({manifest.few(st.results, 4)})"
    if st.foreign:
        line += f"; kept: {manifest.few(st.foreign, 4)} (not written by ia3-dist)"
    return line


def report(p: Prepared) -> str:
    """Data statistics and the resolved run shape."""
    d, cfg = p.data, p.cfg
    lines = [
        *([f"model: {p.support}"] if p.support else []),
        *data_lines(d, cfg),
        *([f"  held out for eval: {len(p.eval_data)} examples"] if p.eval_data is not None else []),
        f"batch: {cfg.train.micro_batch_size} micro x {cfg.train.grad_accum} accum x {p.env.world_size} ranks = "
        f"{p.layout.global_batch} global"
        + (f" (the accumulation follows train.global_batch_size={cfg.train.global_batch_size}; train.grad_accum is "
           f"not used)" if cfg.train.global_batch_size else "")
        + f"; {p.total_steps} optimizer steps; "
        f"{'length-grouped' if p.layout.group_by_length else 'plain'} micro-batches, "
        f"{layout_line(d.lengths, p.layout)}",
        f"deepspeed: ZeRO-{dsc.stage_of(p.ds_config)}, {cfg.train.precision}, "
        f"{'offload' if dsc.offloads(p.ds_config) else 'no offload'} ({cfg.deepspeed.config})",
        *([p.stage_note] if p.stage_note else []),
        f"output: {output_state(p.out, p.resume_from)}",
    ]
    if cfg.data.template == HUMAN_ASSISTANT and getattr(p.tokenizer, "chat_template", None):
        lines.append("note: the tokenizer ships a chat template; data.template=chat_template trains in it (the "
                     "format the model was tuned on), human_assistant is the reference recipe's")
    if dsc.stage_of(p.ds_config) == 0 and cfg.train.precision == "fp16":
        lines.append("note: ZeRO-0 in fp16 runs DeepSpeed's stage-0 mixed-precision optimizer, which checks every "
                     "gradient tensor for overflow on the host at every step (a device sync each; fp16's loss scaling "
                     "needs the check); bf16 needs none")
    warmup = cfg.train.warmup_steps
    if warmup >= p.total_steps:
        # HF Trainer takes it too; said, as the peak the config names is never reached.
        last = (p.total_steps - 1) / max(1, warmup)  # the schedule's factor at the last step (the first's is 0)
        lines.append(f"note: train.warmup_steps={warmup} is not below the run's {p.total_steps} optimizer steps: the "
                     f"learning rate never reaches train.lr (its last step's is {last:.3g} of it); lower "
                     f"train.warmup_steps to warm up and then decay")
    if p.tokenizer.pad_token == p.tokenizer.eos_token:
        lines.append("note: the tokenizer has no pad token of its own; padding uses eos (masked out of the loss)")
    return "\n".join(lines)


def layout_line(lengths: np.ndarray, layout: Any) -> str:
    """How full the rows will be: padding efficiency, or with packing the packing efficiency and rows per step."""
    if not layout.pack_length:
        return f"padding efficiency {padding_efficiency(lengths, layout):.1%}"
    eff, rows = efficiency(plan_epoch(lengths, layout, 0), lengths, layout.accum, layout.world, layout.pack_length)
    return (f"packed in rows of {layout.pack_length} tokens (data.pack_length), packing efficiency {eff:.1%}, "
            f"{rows:.1f} rows per step")


def padding_efficiency(lengths: np.ndarray, layout: Any) -> float:
    """Real tokens / padded tokens over epoch 0's micro-batches (what the run will compute on)."""
    real = padded = 0
    for step in plan_epoch(lengths, layout, 0):
        for mb in step:
            if mb:
                ls = lengths[mb]
                real += int(ls.sum())
                padded += int(ls.max()) * len(mb)
    return real / max(padded, 1)
