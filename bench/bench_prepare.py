#!/usr/bin/env python
"""``ia3-dist prepare`` at scale: time and peak RSS of tokenizing N records into the token cache, and the peak RSS
per rank of a training run that reads that cache, against the same run on 1,000 records.

    python bench/bench_prepare.py --records 100000 300000 [1000000] [--num-proc 0] [--ranks 2] [--json out.json]

Data: the shared Alpaca records made distinct with a numbered suffix on instruction and output (so nothing is
deduplicated), written as JSONL into --work (never into the repo). Each prepare runs as its own process
(``python -m ia3_dist prepare``); its peak RSS is the largest of that process and its tokenizer workers. Each
training run is ``deepspeed --num_accelerators R launch.py`` on the tiny demo Bloom for 3 steps with
``data.require_prepared=true``; its peak RSS is the worst rank's (metrics.jsonl). ``--old-worktree DIR`` also
times and measures the tokenization of the previous code (an ``ia3_dist`` checkout there) in-process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "alpaca_zh_demo.json"
TINY = ROOT / "configs" / "tiny-cpu.yaml"


def synthetic(path: Path, n: int) -> Path:
    if path.exists():
        return path
    base = json.loads(SHARED.read_text(encoding="utf-8"))
    tmp = path.with_suffix(".part")
    with open(tmp, "w", encoding="utf-8") as fh:
        for i in range(n):
            r = base[i % len(base)]
            fh.write(json.dumps({**r, "instruction": f"{r['instruction']} #{i}", "output": f"{r['output']} ({i})"},
                                ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def measured(cmd: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run ``cmd`` in a wrapper process that reports the peak RSS (GiB) of its descendants; returns the result,
    the wall time and that peak."""
    wrapper = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
               "print('PEAK_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
               "sys.exit(r.returncode)")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", wrapper, *cmd], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    peak = next(int(ln.split()[1]) for ln in proc.stderr.splitlines() if ln.startswith("PEAK_KIB"))
    return proc, wall, peak / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, nargs="+", default=[100_000, 300_000])
    ap.add_argument("--num-proc", type=int, default=0)
    ap.add_argument("--ranks", type=int, default=2, help="training ranks (0: no training runs)")
    ap.add_argument("--work", default="/tmp/ia3-bench-prepare")
    ap.add_argument("--cache", default=os.environ.get("IA3_DIST_CACHE", str(Path.home() / ".cache" / "ia3-dist")))
    ap.add_argument("--json", help="write all results here")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    os.environ["IA3_DIST_CACHE"] = a.cache
    sys.path.insert(0, str(ROOT))
    from ia3_dist.train.demo import ensure_assets

    model = ensure_assets(a.cache, pretrained=False) / "model"
    common = ["--config", str(TINY), f"model.path={model}", f"data.cache_dir={work / 'cache'}",
              f"data.num_proc={a.num_proc}", "data.require_prepared=true", "data.group_by_length=true"]
    rows = []
    for n in [1000, *a.records]:
        data = synthetic(work / f"records-{n}.jsonl", n)
        proc, wall, peak = measured([sys.executable, "-m", "ia3_dist", "prepare", *common, f"data.path={data}"])
        line = next(ln for ln in proc.stdout.splitlines() if "tokenized in" in ln or "from cache" in ln)
        row = {"records": n, "jsonl_mib": data.stat().st_size / 2**20, "prepare_s": wall, "prepare_peak_gib": peak,
               "report": line.strip()}
        if a.ranks:
            out = work / f"run-{n}"
            launcher = ([str(Path(sys.executable).parent / "deepspeed"), f"--num_accelerators={a.ranks}"]
                        if a.ranks > 1 else [sys.executable])
            proc, wall, _ = measured([*launcher, "launch.py", *common, f"data.path={data}", f"output.dir={out}",
                                      "train.max_steps=3", "train.log_every=1", "checkpoint.at_end=false",
                                      "output.overwrite=true"])
            assert "from cache" in proc.stdout and "tokenized in" not in proc.stdout, proc.stdout[-2000:]
            recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
            row["train_peak_rss_gib"] = max(r["peak_rss_gb"] for r in recs if "peak_rss_gb" in r)
            row["train_s"] = wall
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0]
    print(f"\n{os.cpu_count()} cores (shared), tiny Bloom, data.num_proc={a.num_proc}, {a.ranks} training ranks")
    print(f"{'records':>10}{'JSONL MiB':>11}{'prepare s':>11}{'rec/s':>9}{'prep peak GiB':>15}"
          f"{'train RSS/rank GiB':>20}{'vs 1k':>8}")
    for r in rows:
        tr = r.get("train_peak_rss_gib")
        train = f"{tr:>20.2f}{tr - base['train_peak_rss_gib']:>+8.2f}" if tr else ""
        print(f"{r['records']:>10,}{r['jsonl_mib']:>11.1f}{r['prepare_s']:>11.1f}{r['records'] / r['prepare_s']:>9.0f}"
              f"{r['prepare_peak_gib']:>15.2f}{train}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
