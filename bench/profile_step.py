#!/usr/bin/env python
"""Where a launcher step's time goes: torch.profiler over a few optimizer steps of one process, in-process.

    python bench/profile_step.py --model 1b4 --micro 8 --bf16 --ds zero2 [--set KEY=VALUE ...] [--out DIR]
    python bench/profile_step.py --model tiny --micro 1 --steps 2          # CPU: checks the script

Same model, data and global batch (8) as bench_train.py. Steps ``--warmup`` .. ``--warmup + --steps`` of the
launcher's own loop (``Trainer.step``) run under the profiler; printed: wall time per step, device busy time per
step (the union of its kernels' and copies' intervals, so busy / wall is how much of the step the accelerator
works), device operations (kernels, copies, memsets) and host syncs per step, and the top operators by host and
by device time. A Chrome trace goes to --out. The window also holds the loop's work between the profiled steps
(logging every step), which ``wall_ms`` leaves out: busy_fraction is an upper bound.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

HOST_SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero")
"""Operators that make the host wait for the device (a value read back, a data-dependent shape, a tensor used as a
bool). Counted on every machine: on CPU they cost nothing, but each one is a stall of the GPU queue there."""
SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpyAsync",
               "cudaMemcpy")


SYNC_READS = ("aten::_local_scalar_dense", "aten::nonzero")
"""One of these per host sync: a value read back (``.item()``, ``float()``, ``bool()`` of a tensor: an
``aten::is_nonzero`` wraps one) or a data-dependent shape."""
READS_ITS_OWN_STATE = ("aten::_fused_adamw_", "aten::_fused_adam_")
"""Kernels whose CPU form reads its step count from host memory; the CUDA form reads it on the device."""


def sync_sites(events: list) -> dict[str, int]:
    """Each host sync among a profile's events (``with_stack=True``), keyed by its three innermost Python frames
    outside torch (what asked for it), reads inside :data:`READS_ITS_OWN_STATE` left out."""
    where: dict[str, int] = {}
    for e in events:
        if e.name not in SYNC_READS:
            continue
        chain, p = [], e.cpu_parent
        while p is not None and p.name not in READS_ITS_OWN_STATE:
            chain.append(p.name)
            p = p.cpu_parent
        if p is not None:
            continue
        frames = [n for n in chain if ".py(" in n and not n.startswith("torch/")][:3]
        key = e.name.split("::")[1] + "  " + (" <- ".join(frames) or "(no Python frame)")
        where[key] = where.get(key, 0) + 1
    return where


def main() -> None:
    from bench_train import SHAPES, bench_records, build_model, grad_accum_for

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=list(SHAPES), default="tiny")
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--ds", default="zero2")
    ap.add_argument("--warmup", type=int, default=4, help="optimizer steps before the profiled ones")
    ap.add_argument("--steps", type=int, default=3, help="profiled optimizer steps")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--cache", default=os.environ.get("IA3_DIST_CACHE", str(Path.home() / ".cache" / "ia3-dist")))
    ap.add_argument("--work", default="/tmp/ia3-profile")
    ap.add_argument("--out", default=None, help="where the Chrome trace and summary JSON go")
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--stacks", action="store_true", help="print the Python stack of each host-sync operator")
    a = ap.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    cache, work = Path(a.cache), Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    os.environ["IA3_DIST_CACHE"] = str(cache)
    model = build_model(a.model, cache, a.bf16)
    data, _, _ = bench_records(None, 400, cache, work)

    from ia3_dist import cli
    from ia3_dist.train import loop

    cuda = torch.cuda.is_available()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    state: dict = {"calls": 0, "walls": []}
    orig = loop.Trainer.step

    def step(self, step_no, step_mbs):  # noqa: ANN001, ANN202
        state["calls"] += 1
        k = state["calls"]
        if not (a.warmup < k <= a.warmup + a.steps):
            return orig(self, step_no, step_mbs)
        if k == a.warmup + 1:
            # Python frames (with_stack) say where each sync comes from, over the whole window: between the
            # steps too, where the loop's own bookkeeping runs.
            state["prof"] = profile(activities=acts, record_shapes=False, with_stack=a.stacks)
            state["prof"].__enter__()
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = orig(self, step_no, step_mbs)
        if cuda:
            torch.cuda.synchronize()
        state["walls"].append(time.perf_counter() - t0)
        if k == a.warmup + a.steps:
            state["prof"].__exit__(None, None, None)
        return res

    loop.Trainer.step = step
    steps = a.warmup + a.steps + 1
    args = ["--config", str(ROOT / "configs" / "tiny-cpu.yaml"), f"model.path={model}", f"data.path={data}",
            f"output.dir={work / 'run'}", f"train.max_steps={steps}", f"train.micro_batch_size={a.micro}",
            f"train.grad_accum={grad_accum_for(a.micro, 1)}", "train.lr=3e-3", "train.log_every=1",
            "data.group_by_length=true", "data.unlabeled=keep", "checkpoint.at_end=false",
            f"train.precision={'bf16' if a.bf16 else 'fp32'}", "output.overwrite=true",
            f"deepspeed.config={a.ds}", *a.set]
    rc = cli.main(args, prog="launch.py")
    if rc:
        raise SystemExit(f"launcher exited {rc}")
    prof = state.get("prof")
    if prof is None:
        raise SystemExit("no step was profiled: raise --steps/--warmup below the run's steps")
    n = len(state["walls"])
    ev = prof.key_averages()
    dev_attr = "self_device_time_total" if hasattr(ev[0], "self_device_time_total") else "self_cuda_time_total"
    kernels = [e for e in prof.events() if getattr(e, "device_type", None) is not None
               and str(e.device_type).endswith("CUDA")]
    # Busy = the union of device intervals (kernels, copies, memsets): work on overlapping streams counts once.
    spans = sorted((e.time_range.start, e.time_range.end) for e in kernels)
    busy_us, end = 0.0, float("-inf")
    for a0, a1 in spans:
        if a1 > end:
            busy_us += a1 - max(a0, end)
            end = a1
    # The two torch.cuda.synchronize() per step around the timing are this script's own; cudaMemcpyAsync is a
    # sync only when it copies to pageable host memory, so it is reported as copies.
    syncs = {e.key: e.count / n - (2 if e.key == "cudaDeviceSynchronize" else 0) for e in ev
             if e.key in SYNC_EVENTS}
    wall = sum(state["walls"]) / n
    host_syncs = {e.key: e.count / n for e in ev if e.key in HOST_SYNC_OPS}
    summary = {"model": a.model, "micro": a.micro, "ds": a.ds, "set": a.set, "steps": n, "wall_ms": wall * 1e3,
               "device_busy_ms": busy_us / 1e3 / n if cuda else None,
               "busy_fraction": busy_us / 1e6 / n / wall if cuda else None,
               "device_ops_per_step": len(kernels) / n,
               "host_syncs_per_step": sum(host_syncs.values()), "host_sync_ops": host_syncs,
               "syncs_and_copies_per_step": syncs,
               "device": torch.cuda.get_device_name() if cuda else "cpu"}
    print("\nPROFILE " + json.dumps(summary))
    print(ev.table(sort_by="self_cpu_time_total", row_limit=a.rows))
    for where, count in sorted((sync_sites(prof.events()) if a.stacks else {}).items(), key=lambda kv: -kv[1]):
        print(f"{count / n:5.1f} per step  {where}")
    if cuda:
        print(ev.table(sort_by=dev_attr, row_limit=a.rows))
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        tag = f"{a.model}-{a.ds}-m{a.micro}" + "".join(f"-{s.split('=')[0].split('.')[-1]}" for s in a.set)
        (out / f"profile-{tag}.json").write_text(json.dumps(summary, indent=1))
        prof.export_chrome_trace(str(out / f"trace-{tag}.json"))


if __name__ == "__main__":
    main()
