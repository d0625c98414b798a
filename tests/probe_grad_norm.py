"""Run the launcher's real training path from step 0, then compute step 1's gradient norm by hand.

Run as ``python tests/probe_grad_norm.py --config X [overrides]`` (one process) with ``IA3_TEST_PROBE=<file>``: the
step's micro-batches (as the sampler draws them) go through a fresh model with the initial IA3 vectors in plain
PyTorch, and the norm of the gradient of (sum of token losses / label tokens) is written to that file as JSON, to
compare with the ``grad_norm`` the run logged for step 1.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ia3_dist.cli import _train_parser  # noqa: E402
from ia3_dist.config import load_config  # noqa: E402
from ia3_dist.data.collate import collate  # noqa: E402
from ia3_dist.data.sampler import iter_steps, rank_slice  # noqa: E402
from ia3_dist.models.ia3 import apply_ia3  # noqa: E402
from ia3_dist.models.load import load_base_model  # noqa: E402
from ia3_dist.models.loss import TokenSumLM  # noqa: E402
from ia3_dist.train.run import run  # noqa: E402


def probe(p, res) -> None:
    assert p.env.world_size == 1 and res.start_step == 0
    _, _, step_mbs = next(iter_steps(p.data.lengths, p.layout, p.total_steps, 0))
    mbs = [mb for mb in rank_slice(step_mbs, 0, p.cfg.train.grad_accum) if mb]
    torch.manual_seed(p.cfg.train.seed)
    model = TokenSumLM(apply_ia3(load_base_model(p.cfg.model, p.model_path, "fp32"), p.cfg.ia3))
    labels = 0
    for mb in mbs:
        loss_sum, n = model(**collate(p.data, mb, p.tokenizer.pad_token_id, p.tokenizer.padding_side))
        loss_sum.backward()
        labels += int(n)
    grads = [q.grad for q in model.parameters() if q.requires_grad]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=torch.float64) for g in grads]))
    Path(os.environ["IA3_TEST_PROBE"]).write_text(json.dumps({"grad_norm_step1": float(norm) / labels,
                                                              "ia3_tensors": len(grads)}))


if __name__ == "__main__":
    args = _train_parser("probe_grad_norm.py").parse_args()
    run(load_config(args.config, args.overrides), on_trained=probe)
