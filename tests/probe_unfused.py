"""DeepSpeed's ``FP16_UnfusedOptimizer.step`` (ZeRO-0's optimizer in bf16) against ``runtime/ds_syncs.unfused_step``
on two optimizers built alike by DeepSpeed itself (one rank, gloo): bf16 parameters in two param groups with their
own learning rates, gradients drawn per step (one missing at one step: DeepSpeed's zero-gradient case), the
overflow check off as the launcher configures it. Per clip setting and step, both sides' returns, gradient norms,
bf16 parameters and fp32 masters go to ``sys.argv[1]`` (``torch.save``) for the test to compare.

Run as ``python tests/probe_unfused.py OUT.pt PORT`` (one process).
"""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import torch

SIZES = (5, 7, 3, 11)
STEPS = 4
CLIPS = (0.0, 1e-3, 100.0)  # off; active at every step (norms are ~5); never reached (the factor clamps at 1)


def main() -> None:
    out, port = sys.argv[1], sys.argv[2]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    from ia3_dist.runtime import ds_syncs

    deepspeed.init_distributed(dist_backend="gloo")
    theirs = ds_syncs.originals()["unfused_step"]
    # What the optimizer reads of the engine: bf16.check_grad_overflow off (the launcher's default).
    engine = SimpleNamespace(_config=SimpleNamespace(bfloat16_config=SimpleNamespace(check_grad_overflow=False)),
                             enable_backward_allreduce=True)

    def build(clip: float) -> tuple[list[torch.nn.Parameter], FP16_UnfusedOptimizer]:
        g = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(n, generator=g).to(torch.bfloat16)) for n in SIZES]
        opt = torch.optim.AdamW([{"params": ps[:2]}, {"params": ps[2:], "lr": 1e-2}], lr=3e-3)
        return ps, FP16_UnfusedOptimizer(opt, deepspeed=engine, low_precision_dtype=torch.bfloat16, clip_grad=clip,
                                         verbose=False)

    rows = []
    for clip in CLIPS:
        sides = {"ours": build(clip), "theirs": build(clip)}
        assert ds_syncs._unfused_on_device(sides["ours"][1])
        for step in range(STEPS):
            g = torch.Generator().manual_seed(100 + step)
            grads = [torch.randn(n, generator=g).to(torch.bfloat16) for n in SIZES]
            row = {"clip": clip, "step": step}
            for name, (ps, opt) in sides.items():
                for i, (p, gr) in enumerate(zip(ps, grads)):
                    p.grad = None if (step == 1 and i == 2) else gr.clone()
                ret = (ds_syncs.unfused_step if name == "ours" else theirs)(opt)
                row[name] = {"returned": ret, "norm": float(opt._global_grad_norm),
                             "params": [p.detach().clone() for p in ps],
                             "masters": [q.detach().clone() for grp in opt.fp32_groups for q in grp],
                             "masters_grads_cleared": all(q.grad is None for grp in opt.fp32_groups for q in grp)}
            rows.append(row)
    torch.save(rows, out)
    deepspeed.comm.destroy_process_group()


if __name__ == "__main__":
    main()
