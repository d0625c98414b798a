#!/usr/bin/env python
"""End to end: the reference recipe and the launcher as whole processes, start-up included, back to back.

    python bench/bench_e2e.py --model 100m --steps 20 --rounds 2
    python bench/bench_e2e.py --model 100m --steps 20 --set train.micro_batch_size=auto

Each side is timed from spawning its process to its exit (imports, model load, tokenization, training, saving):
what a user waits for. Both run the same number of optimizer steps of global batch 8 on the same model and
records; the launcher runs ``configs/bloom-1b4-zh.yaml`` (the recipe's settings) with only the model, data,
precision (fp32 on CPU, as the reference there) and step count overridden, plus any ``--set``. The figure is real
tokens per wall-clock second, since the two sides' orders (and so their tokens) differ slightly; rounds alternate
the sides so drift on a shared box hits both.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_train import SHAPES, bench_records, build_model  # noqa: E402


def timed(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[1]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return wall, proc


def reference(model: Path, data: Path, steps: int, work: Path, bf16: bool) -> dict:
    out = work / "reference.json"
    wall, _ = timed([sys.executable, str(ROOT / "bench" / "reference_recipe.py"), "--model", str(model), "--data",
                     str(data), "--steps", str(steps), "--warmup", "0", "--out", str(out)]
                    + (["--bf16"] if bf16 else []))
    r = json.loads(out.read_text())
    return {"side": "reference", "wall_s": wall, "tokens": r["real_tokens"], "train_s": r["seconds"]}


def launcher(model: Path, data: Path, steps: int, work: Path, bf16: bool, extra: list[str]) -> dict:
    out = work / "launcher"
    wall, proc = timed([sys.executable, "launch.py", "--config", str(ROOT / "configs" / "bloom-1b4-zh.yaml"),
                        f"model.path={model}", f"data.path={data}", f"output.dir={out}", "output.overwrite=true",
                        f"train.max_steps={steps}", "train.log_every=1", "checkpoint.every=0",
                        "checkpoint.at_end=false", f"train.precision={'bf16' if bf16 else 'fp32'}", *extra])
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    steps_ = [r for r in recs if "loss" in r]
    tokens = sum(r["tokens_per_s"] * r["step_time_s"] for r in steps_)
    startup = next((r["startup_s"] for r in recs if "startup_s" in r), None)
    auto = next((ln.strip() for ln in proc.stdout.splitlines() if "micro_batch_size=auto" in ln), "")
    return {"side": "ia3-dist", "wall_s": wall, "tokens": tokens, "train_s": sum(r["step_time_s"] for r in steps_),
            "startup_s": startup, "auto": auto}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=list(SHAPES), default="100m")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--records", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--cache", default=os.environ.get("IA3_DIST_CACHE", str(Path.home() / ".cache" / "ia3-dist")))
    ap.add_argument("--work", default="/tmp/ia3-bench-e2e")
    ap.add_argument("--json", help="write all results here")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="launcher override (repeatable)")
    a = ap.parse_args()

    cache, work = Path(a.cache), Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    os.environ["IA3_DIST_CACHE"] = str(cache)
    model = build_model(a.model, cache, a.bf16)
    data, source, n = bench_records(None, a.records, cache, work)
    rows = []
    for i in range(a.rounds):
        sides = [lambda: reference(model, data, a.steps, work, a.bf16),
                 lambda: launcher(model, data, a.steps, work, a.bf16, a.set)]
        pair = [f() for f in (sides if i % 2 == 0 else sides[::-1])]
        ref, ours = sorted(pair, key=lambda r: r["side"] != "reference")
        ratio = (ours["tokens"] / ours["wall_s"]) / (ref["tokens"] / ref["wall_s"])
        rows.append({"round": i + 1, "reference": ref, "ia3_dist": ours, "ratio": ratio})
        print(f"round {i + 1}: reference {ref['wall_s']:.1f} s wall ({ref['tokens'] / ref['wall_s']:.1f} tok/s), "
              f"ia3-dist {ours['wall_s']:.1f} s wall ({ours['tokens'] / ours['wall_s']:.1f} tok/s, start-up "
              f"{ours['startup_s']} s) -> {ratio:.2f}x", flush=True)
    print(f"\nmodel {a.model}, {source} ({n} records), {a.steps} steps of global batch 8, "
          f"{'bf16' if a.bf16 else 'fp32'}, {os.cpu_count()} cores; launcher overrides: {a.set or 'none'}")
    if rows[0]["ia3_dist"]["auto"]:
        print(rows[0]["ia3_dist"]["auto"])
    print(f"end-to-end ratio (real tokens per wall second, launcher / reference): median "
          f"{statistics.median(r['ratio'] for r in rows):.2f}x over {len(rows)} round(s): "
          + ", ".join(f"{r['ratio']:.2f}x" for r in rows))
    if a.json:
        Path(a.json).write_text(json.dumps({"model": a.model, "steps": a.steps, "set": a.set, "rounds": rows},
                                           indent=1))


if __name__ == "__main__":
    main()
