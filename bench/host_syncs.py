#!/usr/bin/env python
"""Host syncs per optimizer step, outside log steps: torch.profiler counts of the operators that make the host
wait for the device (``aten::_local_scalar_dense``: a value read back; ``aten::nonzero``: a data-dependent shape;
``aten::is_nonzero``: a tensor used as a bool), per ZeRO stage and precision, and where each one comes from (every
read Python code asks for in the window, between the steps too).

    python bench/host_syncs.py                  # tiny Bloom, micro-batch 8, ZeRO-0/1/2 x fp32/bf16 (~4 min CPU)
    python bench/host_syncs.py --model 1b4 --ds zero1 --bf16 --steps 5

Counted on every machine: on CPU these cost nothing, on a GPU each one drains the queue. Each configuration runs
bench/profile_step.py in a fresh process with logging off between the profiled steps (train.log_every=1000), so
the counts are what a step costs, not a log line. The site column separates the launcher's own (ia3_dist) from
DeepSpeed's and torch's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def profile(model: str, ds: str, bf16: bool, steps: int, extra: list[str]) -> tuple[dict, list[str]]:
    cmd = [sys.executable, str(ROOT / "bench" / "profile_step.py"), "--model", model, "--micro", "8", "--ds", ds,
           "--steps", str(steps), "--warmup", "2", "--stacks", "--set", "train.log_every=1000",
           *(["--bf16"] if bf16 else []), *[x for kv in extra for x in ("--set", kv)]]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("PROFILE "))
    sites = [ln.strip() for ln in proc.stdout.splitlines() if " per step  " in ln]
    return json.loads(line[len("PROFILE "):]), sites


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--ds", action="append", help="DeepSpeed configs (default zero0, zero1, zero2)")
    ap.add_argument("--bf16", action="store_true", help="only bf16 (default: fp32 and bf16)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    a = ap.parse_args()
    rows = []
    for ds in a.ds or ["zero0", "zero1", "zero2"]:
        for bf16 in ([True] if a.bf16 else [False, True]):
            summary, sites = profile(a.model, ds, bf16, a.steps, a.set)
            asked = sum(float(s.split()[0]) for s in sites)
            # The innermost frame outside torch says whose it is.
            ours = sum(float(s.split()[0]) for s in sites if s.split("  ")[-1].startswith("ia3_dist/"))
            rows.append((ds, "bf16" if bf16 else "fp32", summary["host_syncs_per_step"], asked, ours,
                         summary["wall_ms"], sites))
    print(f"\nhost syncs per optimizer step (model {a.model}, micro-batch 8, no log step in the window)")
    print(f"{'config':<8}{'prec':<6}{'profiler':>9}{'syncs':>7}{'launcher':>10}{'ms/step':>9}")
    for ds, prec, total, asked, ours, wall, _ in rows:
        print(f"{ds:<8}{prec:<6}{total:>9.1f}{asked:>7.1f}{ours:>10.1f}{wall:>9.1f}")
    print("profiler: the operators torch.profiler counts (aten::_local_scalar_dense, aten::nonzero, "
          "aten::is_nonzero);\nsyncs: the reads Python code asks for (a bool() of a tensor is one, which the "
          "profiler counts twice:\nis_nonzero and its _local_scalar_dense); reads a kernel makes inside itself "
          "are not among them (the CPU\nfused AdamW reads its step count from host memory per tensor; the CUDA "
          "kernel reads it on the device).")
    print("\nsites (count per step, operator, innermost non-torch frames):")
    for ds, prec, *_, sites in rows:
        print(f"{ds} {prec}:")
        for s in sites or ["(none)"]:
            print(f"  {s}")


if __name__ == "__main__":
    main()
