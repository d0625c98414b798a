"""Run the launcher's real training path, then compute the trained engine's logits on a fixed probe batch.

Run as ``deepspeed --num_accelerators 2 tests/probe_train.py --config X [overrides]``; rank 0 writes
``<output.dir>/probe.pt`` with the input batch and the trained model's logits, to compare against
``PeftModel.from_pretrained(base, <output.dir>/adapter)``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ia3_dist.cli import _train_parser  # noqa: E402
from ia3_dist.config import load_config  # noqa: E402
from ia3_dist.data.collate import collate  # noqa: E402
from ia3_dist.train.run import run  # noqa: E402


def probe(p, res) -> None:
    batch = collate(p.data, list(range(4)), p.tokenizer.pad_token_id, p.tokenizer.padding_side)
    res.engine.module.eval()
    with torch.no_grad():
        # Every rank runs the forward: under ZeRO-3 it gathers parameters collectively.
        logits = res.peft_model(input_ids=batch["input_ids"].to(res.engine.device),
                                attention_mask=batch["attention_mask"].to(res.engine.device)).logits
    if p.env.is_main:
        torch.save({"batch": batch, "logits": logits.float().cpu()}, p.out / "probe.pt")


if __name__ == "__main__":
    args = _train_parser("probe_train.py").parse_args()
    run(load_config(args.config, args.overrides), on_trained=probe)
