#!/usr/bin/env python
"""Peak host RSS per rank of a ~160M-parameter Bloom on 2 CPU ranks under ZeRO-0, ZeRO-3 and ZeRO-3 offload,
against what ``ia3-dist plan --cpu`` predicts for the same run.

    python bench/bench_memory.py                      # 160M Bloom, 2 ranks, 4 optimizer steps each
    python bench/bench_memory.py --steps 8 --json out.json
    python bench/bench_memory.py --model llama-70m --ranks 1 --configs zero0 --accum 1 --steps 3   # a Llama

Each run is a real ``deepspeed --num_accelerators 2 launch.py`` on the shared Alpaca sample (else the demo
records), micro-batch 1, sequence cap 256 (the reference recipe's). The launcher logs the worst rank's peak RSS
once the engine is ready (loading) and over the whole run (training); both are printed with their ratio to
ZeRO-0 and the plan's error. ZeRO-3 runs use the launcher's default there, train.lean_host_memory on; add
``--no-lean`` to see glibc's default allocator policy instead.

``--zero3-loaders`` measures only the ZeRO-3 load, both ways, on the same model and 2 ranks: ia3-dist's loader
against transformers' own (``from_pretrained`` under ``HfDeepSpeedConfig``, where rank 0 reads the whole state
dict). It prints each rank's peak RSS growth during the load (the kernel's high-water mark, reset just before)
and the bytes its read syscalls returned (tests/probe_zero_load.py, which also checks every parameter).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_train import bench_records, build_model, run_launcher  # noqa: E402

CONFIGS = ("zero0", "zero3", "zero3_offload")


def run(model: Path, data: Path, ds: str, steps: int, out: Path, extra: list[str], ranks: int = 2) -> dict:
    """``ranks`` x micro-batch 1 x accumulation 8 / ranks (global batch 8, unless ``extra`` sets
    train.grad_accum) on ``ds``; peaks from the worst rank."""
    r = run_launcher(model, data, steps, out, ranks, False, 1, [f"deepspeed.config={ds}", *extra])
    recs = r["metrics"]
    return {"config": ds, "peak_rss_gib": max(x["peak_rss_gb"] for x in recs),
            "load_peak_rss_gib": recs[-1]["load_peak_rss_gb"], "tokens_per_s": r["tokens_per_s"],
            "losses": [x["loss"] for x in recs if "loss" in x]}


def compare_loaders(model: Path, work: Path, json_out: str | None) -> None:
    """Both ZeRO-3 loaders on 2 ranks, load only: peak RSS growth and bytes read per rank."""
    import subprocess

    out = work / "loaders.json"
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_accelerators=2", "tests/probe_zero_load.py",
           str(out), f"{model}:fp32", f"{model}:fp32:hf"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"probe failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    results = json.loads(out.read_text())
    gib = 2**30
    print(f"\nZeRO-3 load of {model.name} ({results[0]['weight_bytes'] / gib:.2f} GiB of fp32 weights), 2 CPU ranks")
    print(f"{'loader':<28}{'peak RSS growth per rank (GiB)':>32}{'read syscalls per rank (GiB)':>30}")
    for r in results:
        name = "transformers from_pretrained" if r["loader"] == "hf" else "ia3-dist zero3_load"
        growth = " / ".join(f"{x / gib:.2f}" for x in r["rss_growth"])
        reads = " / ".join(f"{x / gib:.2f}" for x in r["syscall_bytes"])
        print(f"{name:<28}{growth:>32}{reads:>30}")
    print("(ia3-dist: growth while its loader fills the partitions, after zero.Init built them; transformers: "
          "build and load, one call. transformers reads safetensors through mmap: its bytes show in RSS, not in "
          "read syscalls)")
    if json_out:
        Path(json_out).write_text(json.dumps({"model": str(model), "loaders": results}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="160m")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--records", type=int, default=200)
    ap.add_argument("--no-lean", action="store_true", help="train.lean_host_memory=false on every run")
    ap.add_argument("--ranks", type=int, default=2, help="CPU ranks per run")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="DeepSpeed configs, comma-separated")
    ap.add_argument("--accum", type=int, default=0, help="micro-batches per step (default: global batch 8)")
    ap.add_argument("--cache", default=os.environ.get("IA3_DIST_CACHE", str(Path.home() / ".cache" / "ia3-dist")))
    ap.add_argument("--work", default="/tmp/ia3-bench-memory")
    ap.add_argument("--json", help="write all results here")
    ap.add_argument("--zero3-loaders", action="store_true",
                    help="only the ZeRO-3 load: ia3-dist's loader against transformers' from_pretrained")
    a = ap.parse_args()

    cache, work = Path(a.cache), Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    os.environ["IA3_DIST_CACHE"] = str(cache)
    model = build_model(a.model, cache)
    if a.zero3_loaders:
        compare_loaders(model, work, a.json)
        return
    data, _, _ = bench_records(None, a.records, cache, work)
    extra = (["train.lean_host_memory=false"] if a.no_lean else []) + ([f"train.grad_accum={a.accum}"] if a.accum
                                                                       else [])
    results = [run(model, data, ds, a.steps, work / ds, extra, a.ranks) for ds in a.configs.split(",")]

    from ia3_dist.config import load_config
    from ia3_dist.tools.plan import plan

    cfg = load_config(ROOT / "configs" / "tiny-cpu.yaml", [f"model.path={model}", "train.micro_batch_size=1",
                                                           "data.max_length=256"])
    _, info = plan(cfg, 1, a.ranks, 1e6, cpu=True)
    base = results[0]
    family = json.loads((model / "config.json").read_text())["model_type"]
    print(f"\n{a.model} {family} ({info['n_params'] / 1e6:.1f}M params), {a.ranks} CPU rank(s) on {os.cpu_count()} "
          f"cores, fp32, "
          f"micro-batch 1, seq <= 256, {a.steps} steps; framework RSS {info['overhead_gib']:.2f} GiB "
          f"(plan, measured in-process)")
    print(f"{'config':<15}{'peak RSS':>10}{'vs zero0':>10}{'load peak':>11}{'vs zero0':>10}{'plan':>8}{'error':>8}"
          f"{'tok/s':>8}   GiB per rank (worst rank)")
    for r in results:
        pred = info["rows"][r["config"]]["total_gib"]
        r["plan_gib"] = pred
        print(f"{r['config']:<15}{r['peak_rss_gib']:>10.2f}{r['peak_rss_gib'] / base['peak_rss_gib']:>10.2f}"
              f"{r['load_peak_rss_gib']:>11.2f}{r['load_peak_rss_gib'] / base['load_peak_rss_gib']:>10.2f}"
              f"{pred:>8.2f}{(pred - r['peak_rss_gib']) / r['peak_rss_gib']:>+8.0%}{r['tokens_per_s']:>8.1f}")
    diff = max(abs(x - y) / abs(y) for r in results for x, y in zip(r["losses"], base["losses"], strict=True))
    print(f"per-step losses of the configs agree within {diff:.1e} (relative)")
    if a.json:
        Path(a.json).write_text(json.dumps({"model": a.model, "family": family, "ranks": a.ranks,
                                            "n_params": info["n_params"], "plan_overhead_gib": info["overhead_gib"],
                                            "results": results}, indent=1))


if __name__ == "__main__":
    main()
