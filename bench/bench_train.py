#!/usr/bin/env python
"""Reference recipe vs ia3-dist, side by side, in one invocation: same model, same data, same global batch (8).

    python bench/bench_train.py --model 100m --steps 10            # CPU, ~106M-parameter Bloom
    python bench/bench_train.py --model tiny --steps 30
    python bench/bench_train.py --model 1b4 --steps 20 --bf16      # GPU, bloom-1b4-zh shape

Models are built locally from their config (random weights, `save_pretrained` once, cached) with the embedded demo
tokenizer; data is ../shared/data/alpaca_zh_demo.json where present, else the demo records. Each side runs in its
own process. Prints each side's real tokens/s and the ratio, padding efficiency, peak memory, tokenization time;
on CPU also a large fp32 matmul's FLOP/s for scale, and with --two-ranks the 2-rank launcher against 1 process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data" / "alpaca_zh_demo.json"
SHAPES = {  # name: (vocab, hidden, layers, heads)
    "tiny": (1200, 128, 4, 4),
    "100m": (46145, 768, 10, 12),
    "160m": (46145, 1024, 9, 16),
    "1b4": (46145, 2048, 24, 16),
    "7b1": (250880, 4096, 30, 32),
}
LLAMA_SHAPES = {  # name: (vocab, hidden, layers, heads, kv heads, intermediate): GQA, gated MLP, untied head
    "llama-70m": (46145, 512, 8, 8, 2, 1408),
    # Llama-3.2-1B's block (hidden 2048, 16 layers, 32 heads, 8 kv heads, intermediate 8192) on the Chinese
    # vocabulary the shared data tokenizes with: the rotary families' GPU row (their masks are built on the device).
    "llama-1b": (46145, 2048, 16, 32, 8, 8192),
}


def build_model(name: str, cache: Path, bf16: bool = False) -> Path:
    import torch
    from transformers import AutoTokenizer, BloomConfig, BloomForCausalLM, LlamaConfig, LlamaForCausalLM

    from ia3_dist.train.demo import ensure_assets

    d = cache / f"bench-{name}"
    if (d / "config.json").exists():  # published by the rename below: complete
        return d
    demo = ensure_assets(str(cache), pretrained=False)  # its tokenizer only: the same without 800 CPU steps
    if name in LLAMA_SHAPES:
        vocab, hidden, layers, heads, kv, inter = LLAMA_SHAPES[name]
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                          num_key_value_heads=kv, intermediate_size=inter, tie_word_embeddings=False)
        cls = LlamaForCausalLM
    else:
        vocab, hidden, layers, heads = SHAPES[name]
        cfg = BloomConfig(vocab_size=vocab, hidden_size=hidden, n_layer=layers, n_head=heads)
        cls = BloomForCausalLM
    torch.manual_seed(0)
    # Built in the stored dtype: an fp32 bloom-7b1 then cast would take 28 GB, which this process's allocator kept
    # reserved while the rows' own processes ran.
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if bf16 else torch.float32)
    try:
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = cls(cfg)
    finally:
        torch.set_default_dtype(dtype)
    # Into a temp dir renamed into place: a build killed mid-save (a timed-out row) leaves no half model that the
    # next run would take for a built one (transformers writes config.json first).
    tmp = cache / f".bench-{name}.{os.getpid()}.tmp"
    model.save_pretrained(str(tmp), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(demo / "model")).save_pretrained(str(tmp))
    shutil.rmtree(d, ignore_errors=True)  # an unfinished build from before this rename existed
    os.replace(tmp, d)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return d


def run_child(cmd: list[str], log: Path) -> tuple[int, str]:
    """``cmd`` with its stdout and stderr written to ``log`` as they come (a row killed by its timeout still shows
    how far each side got); returns its exit code and the log's last 3,000 characters."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT).returncode
    return rc, log.read_text(errors="replace")[-3000:]


def stack_versions() -> dict[str, str | None]:
    """What the figures were measured on: the device machine runs its image's torch, not this checkout's pin."""
    import importlib.metadata as md

    import torch

    def version(name: str) -> str | None:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    return {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": version("triton"),
            "deepspeed": version("deepspeed"), "transformers": version("transformers"), "peft": version("peft")}


def matmul_gflops(threads: int, n: int = 2048, reps: int = 10) -> float:
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


GLOBAL_BATCH = 8  # the reference recipe's: micro-batch 1 x accumulation 8
WARMUP_STEPS = 2  # optimizer steps left out of the timing on both sides (allocator and cache warm-up)


def grad_accum_for(micro: int, nproc: int) -> int:
    """Accumulation that keeps the reference's global batch; a split that cannot is refused, never shrunk."""
    if micro < 1 or GLOBAL_BATCH % (micro * nproc):
        raise SystemExit(f"micro-batch {micro} x {nproc} rank(s) does not divide the reference's global batch of "
                         f"{GLOBAL_BATCH}; choose --micro among 1, 2, 4, 8 (with --two-ranks: 2, 4, 8)")
    return GLOBAL_BATCH // (micro * nproc)


def run_launcher(model: Path, data: Path, steps: int, out: Path, nproc: int, bf16: bool, micro: int,
                 extra: list[str], warmup: int = WARMUP_STEPS, log: Path | None = None) -> dict:
    """The launcher on the same model, data and global batch 8, length-grouped micro-batches. Records whose
    prompt alone fills max_length stay in (data.unlabeled=keep), as the reference's Dataset.map keeps them: both
    sides process the same examples."""
    args = ["--config", str(ROOT / "configs" / "tiny-cpu.yaml"), f"model.path={model}", f"data.path={data}",
            f"output.dir={out}", f"train.max_steps={steps}", f"train.micro_batch_size={micro}",
            f"train.grad_accum={grad_accum_for(micro, nproc)}", "train.lr=3e-3", "train.log_every=1",
            "data.group_by_length=true", "data.unlabeled=keep", "checkpoint.at_end=false",
            f"train.precision={'bf16' if bf16 else 'fp32'}", "output.overwrite=true", *extra]
    if nproc == 1:
        cmd = [sys.executable, "launch.py", *args]
    else:
        cmd = [str(Path(sys.executable).parent / "deepspeed"), f"--num_accelerators={nproc}", "launch.py", *args]
    log = log or out.parent / f"{out.name}.log"
    rc, tail = run_child(cmd, log)
    if rc != 0:
        raise SystemExit(f"launcher failed (exit {rc}, {log}):\n{tail}")
    from ia3_dist.train.plots import read_metrics

    recs = read_metrics(out / "metrics.jsonl")
    steps_logged = [r for r in recs if "loss" in r]
    if len(steps_logged) <= warmup:
        raise SystemExit(f"--steps must be more than the {warmup} warm-up steps")
    timed = steps_logged[warmup:]
    tokens = sum(r["tokens_per_s"] * r["step_time_s"] for r in timed)
    padded = sum(r["padded_tokens_per_s"] * r["step_time_s"] for r in timed)
    # Wall clock from the end of the last warm-up step to the end of the last step, as the reference side is
    # timed: everything between steps (this side's per-step log line, the reference's logging) is included.
    # step_time_s alone would leave out the launcher's logging block.
    secs = timed[-1]["elapsed_s"] - steps_logged[warmup - 1]["elapsed_s"]
    # "tokenized in ..." or, where an earlier row of the same data built the cache, "from cache ...".
    tok_line = next((ln for ln in log.read_text(errors="replace").splitlines()
                     if "tokenized in" in ln or "from cache" in ln), "")
    return {"side": f"ia3-dist x{nproc}", "tokens_per_s": tokens / secs, "padding_efficiency": tokens / padded,
            "step_ms": secs / len(timed) * 1e3,
            "peak_mem_gb": max(r["peak_mem_gb"] for r in timed), "mfu": _time_mean(timed, "mfu"),
            "mfu_executed": _time_mean(timed, "mfu_executed"), "tflops": _time_mean(timed, "tflops"),
            "tflops_executed": _time_mean(timed, "tflops_executed"),
            "startup_s": next((r["startup_s"] for r in recs if "startup_s" in r), None),
            "tokenize_line": tok_line.strip(), "metrics": recs}


def _time_mean(recs: list[dict], key: str) -> float | None:
    """A rate's mean over the timed steps, weighted by step time (None when the launcher did not log it)."""
    if not recs or any(r.get(key) is None for r in recs):
        return None
    return sum(r[key] * r["step_time_s"] for r in recs) / sum(r["step_time_s"] for r in recs)


def bench_records(src: Path | None, n: int, cache: Path, work: Path) -> tuple[Path, str, int]:
    """The first ``n`` records of ``src`` (default: the shared Alpaca sample, else the demo records) written to
    ``work/records.json``; returns that path, the source's name and the count."""
    if src is not None and not src.is_file():
        raise SystemExit(f"--data {src}: no such file (a figure on the demo records would pass for the Alpaca one)")
    src = src or SHARED
    if src.exists():
        records = json.loads(src.read_text(encoding="utf-8"))[:n]
        source = src.name
    else:
        from ia3_dist.train.demo import ensure_data

        records = json.loads(ensure_data(str(cache)).read_text(encoding="utf-8"))[:n]
        source = "demo records"
    data = work / "records.json"
    data.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return data, source, len(records)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=[*SHAPES, *LLAMA_SHAPES], default="100m")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--records", type=int, default=400, help="records used (the shared file has 1000)")
    ap.add_argument("--micro", type=int, default=8, help="launcher micro-batch (global batch stays 8)")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--two-ranks", action="store_true", help="also run the launcher on 2 ranks")
    ap.add_argument("--cache", default=os.environ.get("IA3_DIST_CACHE", str(Path.home() / ".cache" / "ia3-dist")))
    ap.add_argument("--work", default="/tmp/ia3-bench")
    ap.add_argument("--launcher-dir", help="the launcher's output.dir (default: WORK/launcher)")
    ap.add_argument("--json", help="write all results here")
    ap.add_argument("--logs", help="dir for each side's output, written as it runs (default: WORK/logs)")
    ap.add_argument("--data", help="records file (default: the shared Alpaca sample, else the demo records)")
    ap.add_argument("--ds", default="zero0", help="launcher DeepSpeed config")
    ap.add_argument("--reference-json", help="reuse the reference side measured by an earlier run (same model, data "
                    "and steps), written there when absent")
    ap.add_argument("--warmup", type=int, default=WARMUP_STEPS, help="launcher steps left out of the timing "
                    "(more for compiled runs, whose first steps compile)")
    ap.add_argument("--peer", action="store_true", help="also run HF Trainer + PEFT IA3 at the launcher's "
                    "micro-batch and accumulation (the same-shape peer; the reference recipe is micro 1 x 8)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra launcher override, e.g. --set model.last_mlp_at_labels=false (repeatable)")
    a = ap.parse_args()
    grad_accum_for(a.micro, 1)  # refused before anything is built or run
    if a.two_ranks:
        if a.micro % 2:
            raise SystemExit(f"--two-ranks gives each rank half of --micro: {a.micro} is odd; use 2, 4 or 8")
        grad_accum_for(a.micro // 2, 2)

    cache, work = Path(a.cache), Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    logs = Path(a.logs) if a.logs else work / "logs"
    os.environ["IA3_DIST_CACHE"] = str(cache)
    model = build_model(a.model, cache, a.bf16)
    data, source, n_records = bench_records(Path(a.data) if a.data else None, a.records, cache, work)

    import torch

    # The code under test first: a row cut off by its time limit (gpu_check.sh's) has lost an HF side, not the
    # launcher's figures. Each side is a process of its own; the table lists the reference first.
    ds = [f"deepspeed.config={a.ds}", *a.set]
    ours = [run_launcher(model, data, a.steps, Path(a.launcher_dir) if a.launcher_dir else work / "launcher",
                         1, a.bf16, a.micro, ds, a.warmup, logs / "launcher.log")]
    if a.two_ranks:
        ours.append(run_launcher(model, data, a.steps, work / "launcher2", 2, a.bf16, a.micro // 2, ds,
                                 a.warmup, logs / "launcher2.log"))
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    if a.json:
        write_row(a, Path(a.json), dev, stack_versions(), source, n_records, ours, partial=True)
    results = []
    ref_json = Path(a.reference_json) if a.reference_json else work / "reference.json"
    failed_mark = ref_json.with_name(ref_json.name + ".failed")  # rows of the same model do not retry it
    if not (a.reference_json and (ref_json.exists() or failed_mark.exists())):
        cmd = [sys.executable, str(ROOT / "bench" / "reference_recipe.py"), "--model", str(model), "--data",
               str(data), "--steps", str(a.steps), "--warmup", str(WARMUP_STEPS), "--out", str(ref_json)] + (
            ["--bf16"] if a.bf16 else [])
        rc, tail = run_child(cmd, logs / "reference.log")
        if rc != 0:
            # Recorded, and the launcher still measured: the code under test has its figures (and its own
            # failures) whatever happens to HF Trainer on this machine.
            print(f"reference failed (exit {rc}):\n{tail}", file=sys.stderr)
            failed_mark.write_text(tail)
    ref = json.loads(ref_json.read_text()) if ref_json.exists() else {"side": "reference", "failed": True}
    results.append(ref)
    if a.peer and a.micro > 1:
        peer_json = work / f"peer-m{a.micro}.json"  # one per micro-batch and work dir: rows of one shape share it
        cmd = [sys.executable, str(ROOT / "bench" / "reference_recipe.py"), "--model", str(model), "--data",
               str(data), "--steps", str(a.steps), "--warmup", str(WARMUP_STEPS), "--micro", str(a.micro),
               "--out", str(peer_json)] + (["--bf16"] if a.bf16 else [])
        if not peer_json.exists():
            rc, tail = run_child(cmd, logs / f"peer-m{a.micro}.log")
            if rc != 0:
                print(f"same-shape peer failed (exit {rc}):\n{tail}", file=sys.stderr)
        results.append(json.loads(peer_json.read_text()) if peer_json.exists() else
                       {"side": f"HF peer {a.micro}x{8 // a.micro}", "failed": True})
    results += ours

    n = ref.get("n_params")
    ref_tps = ref.get("tokens_per_s")
    print(f"\nmodel {a.model}" + (f" ({n / 1e6:.1f}M params incl. IA3)" if n else "")
          + f", {source}, {n_records} records, global batch 8, {a.steps} steps ({'bf16' if a.bf16 else 'fp32'}), "
          f"device: {dev}")
    print(f"{'side':<16}{'real tok/s':>12}{'ratio':>8}{'pad eff':>9}{'peak GB':>9}{'TFLOP/s*':>10}{'MFU':>7}"
          f"{'exec TFLOP/s':>14}{'exec util':>11}")

    def fmt(v: float | None, spec: str) -> str:
        return format(v, spec) if v else "-"

    for r in results:
        if r.get("failed"):
            print(f"{r['side']:<16}failed: see its log in {logs}")
            continue
        ratio = r["tokens_per_s"] / ref_tps if ref_tps else None
        print(f"{r['side']:<16}{r['tokens_per_s']:>12.1f}{fmt(ratio, '.2f'):>8}{r['padding_efficiency']:>9.1%}"
              f"{r['peak_mem_gb']:>9.2f}{fmt(r.get('tflops'), '.3f'):>10}{fmt(r.get('mfu'), '.1%'):>7}"
              f"{fmt(r.get('tflops_executed'), '.3f'):>14}{fmt(r.get('mfu_executed'), '.1%'):>11}")
    print("* model FLOPs: 6 N per token + attention; exec: what the IA3 step executes (launcher side, see README)")
    launcher = next(r for r in results if r["side"].startswith("ia3-dist"))
    if n and not torch.cuda.is_available():
        ia3_flops = 4 * n * launcher["tokens_per_s"]
        mm = matmul_gflops(os.cpu_count() or 1)
        print(f"IA3 training FLOP/s (4 N per real token, N = all params): {ia3_flops / 1e9:.1f} GFLOP/s = "
              f"{ia3_flops / 1e9 / mm:.0%} of a 2048^3 fp32 matmul ({mm:.1f} GFLOP/s, same box, same run)")
    print(f"tokenization: reference unbatched map {fmt(ref.get('tokenize_s'), '.2f')}s; launcher: "
          f"{launcher['tokenize_line']}")
    env = stack_versions()
    print("stack: " + ", ".join(f"{k} {v}" for k, v in env.items()))
    if a.json:
        write_row(a, Path(a.json), dev, env, source, n_records, results)


def write_row(a: argparse.Namespace, path: Path, dev: str, env: dict, source: str, n_records: int,
              results: list[dict], partial: bool = False) -> None:
    """The row's JSON (gpu_check.sh's table reads it); ``partial``: written once the launcher measured, before the
    HF sides ran, so a row its time limit cuts off still has the launcher's figures."""
    path.write_text(json.dumps({"model": a.model, "device": dev, "env": env, "ds": a.ds, "micro": a.micro,
                                "bf16": a.bf16, "steps": a.steps, "warmup": a.warmup, "set": a.set, "data": source,
                                "records": n_records, "results": results, **({"partial": True} if partial else {})},
                               indent=1))

if __name__ == "__main__":
    main()
