#!/usr/bin/env python
"""Start-up of a rank: process start to the first optimizer step (``startup_s``) and to the process's exit.

    python bench/bench_startup.py --rounds 5
    python bench/bench_startup.py --rounds 5 --root /tmp/before   # the same on another checkout (a git worktree)

Each round starts the tiny CPU config (``configs/tiny-cpu.yaml``, 2 optimizer steps, no checkpoint) as a fresh
``python launch.py`` process, one rank, and reads ``startup_s`` from its metrics.jsonl: imports, config, data (from
the token cache after the first round), model load, DeepSpeed engine, up to the first step. The wall time to exit
adds the adapter save and tear-down. Medians over the rounds; the first round is a warm-up (page cache, token
cache) and is not counted. Run both checkouts back to back on an idle box to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one(root: Path, out: Path) -> tuple[float, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "launch.py", "--config", "configs/tiny-cpu.yaml", f"output.dir={out}",
                           "train.max_steps=2", "checkpoint.at_end=false", "checkpoint.every=0"],
                          cwd=root, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(root)})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return next(r["startup_s"] for r in recs if "startup_s" in r), wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--root", type=Path, default=ROOT, help="checkout to run (default: this one)")
    a = ap.parse_args()
    starts, walls = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.rounds + 1):
            s, w = one(a.root, Path(tmp) / f"r{i}")
            print(f"round {i}{' (warm-up)' if i == 0 else ''}: startup_s {s:.2f}, wall to exit {w:.2f} s", flush=True)
            if i:
                starts.append(s)
                walls.append(w)
    print(json.dumps({"root": str(a.root), "rounds": a.rounds, "startup_s_median": round(statistics.median(starts), 2),
                      "wall_s_median": round(statistics.median(walls), 2)}))


if __name__ == "__main__":
    main()
