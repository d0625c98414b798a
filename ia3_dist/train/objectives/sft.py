"""``train.objective: sft``: the reference recipe's loss, the sum of token cross-entropies over the global batch's
label tokens (HF Trainer's ``num_items_in_batch`` normalisation), on padded or packed micro-batches."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ...data.collate import collate, label_positions
from ...data.packing import collate_packed, occupied, pack_step, step_micro_steps
from ...data.sampler import rank_slice
from ...models.loss import TokenSumLM
from ..evaluate import evaluate
from ..metrics import executed_flops, model_flops
from ..stats import StepStats


class SFT:
    name = "sft"

    def module(self, peft_model: Any, rows: Any, chunk_bytes: int, inputs: Any) -> torch.nn.Module:
        # Train mode from step 1, as HF Trainer's model.train(): from_pretrained (ZeRO 0-2) hands the model over in
        # eval mode, from_config (ZeRO-3) in train mode, and dropout and gradient checkpointing follow the mode.
        return TokenSumLM(peft_model, rows, chunk_bytes, inputs).train()

    def batches(self, tr: Any, step_mbs: list[list[int]]) -> tuple[list[dict[str, torch.Tensor]], list[bool]]:
        """Padded like the recipe's collator, or packed with ``data.packing``."""
        p, t = tr.p, tr.p.cfg.train
        mbs = rank_slice(step_mbs, p.env.rank, t.grad_accum)
        cap = p.layout.pack_length
        if cap:
            rows = pack_step(mbs, p.data.lengths, cap) if any(mbs) else mbs
            # Only the micro-steps some rank has a row in run (the loop ends the accumulation after the last);
            # the empty ones before it run a filler row, as a short last step does.
            n = step_micro_steps(step_mbs, p.data.lengths, cap, t.grad_accum, p.env.world_size, occupied(rows))
            rows = rows[:n]
            filler = next((r for r in rows if r), None) or [[next(mb for mb in step_mbs if mb)[0]]]
            out = [collate_packed(p.data, r if r else filler[:1], tr.pad_id, cap) for r in rows]
            real = [bool(r) for r in rows]
        else:
            filler = next(mb for mb in step_mbs if mb)[:1]
            out = [collate(p.data, mb if mb else filler, tr.pad_id, tr.side) for mb in mbs]
            real = [bool(mb) for mb in mbs]
        for b in out:
            b["label_pos"] = label_positions(b["labels"])
        return out, real

    def stats(self, tr: Any, batches: list[dict[str, torch.Tensor]], real: list[bool]) -> Any:
        """From the host copies of the batches (numpy: no device sync)."""
        s = StepStats(stop_requested=float(tr.stop.requested))
        sh = tr.shape
        for b, r in zip(batches, real, strict=True):
            if not r:
                # A filler (an empty micro-step: a short last step, or fewer packed rows than micro-steps) runs
                # its forward and backward at weight 0: compute spent, counted as padding and executed work.
                rows, seq = b["attention_mask"].shape
                labels = float(len(b["label_pos"]))
                chunked = labels if tr.chunk_rows and labels > tr.chunk_rows else 0.0
                s += StepStats(padded_tokens=float(rows * seq), rows=float(rows),
                               executed_flops=executed_flops(seq, rows, labels, sh, tr.recompute, chunked))
            else:
                mask = b["attention_mask"].numpy()
                rows, seq = mask.shape
                if "seq_ids" in b:  # packed: each document is a sequence of its own
                    seq_ids = b["seq_ids"].numpy()
                    lengths = np.concatenate([np.bincount(row[row > 0])[1:] for row in seq_ids])
                else:
                    lengths = mask.sum(1)
                labels = float(len(b["label_pos"]))
                chunked = labels if tr.chunk_rows and labels > tr.chunk_rows else 0.0  # as TokenSumLM
                s += StepStats(label_tokens=labels, real_tokens=float(mask.sum()), padded_tokens=float(rows * seq),
                               samples=float(len(lengths)), rows=float(rows), micro_batches=1.0,
                               flops=model_flops(lengths, sh.n_params, sh.n_layer, sh.hidden),
                               executed_flops=executed_flops(seq, rows, labels, sh, tr.recompute, chunked))
        return s

    def normaliser(self, glob: Any) -> float:
        # A global batch with no label token at all (possible with data.unlabeled=keep) has a zero gradient (the
        # optimizer still steps: momentum and weight decay, as HF's does); the reference recipe's loss is 0/0 there.
        return glob.label_tokens

    def term(self, engine: Any, batch: dict[str, torch.Tensor], real: bool) -> torch.Tensor:
        loss_sum, _ = engine(**batch)
        return loss_sum

    def setup(self, tr: Any) -> None:
        return None

    def window_metrics(self, micro_batches: float, reset: bool = True) -> dict[str, float]:
        return {}

    def evaluate(self, tr: Any, on_batch: Any) -> dict[str, float]:
        return evaluate(tr.engine, tr.p.eval_data, tr.p.env, tr.p.cfg.train.micro_batch_size, tr.pad_id, tr.side,
                        on_batch=on_batch)
