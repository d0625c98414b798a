#!/usr/bin/env bash
# bash bench/gpu_check.sh            one GPU: the figures issues 15 and 29 ask for, as one table
# bash bench/gpu_check.sh --smoke    the same pipeline on CPU with the tiny shape (checks the script, 2.5 min)
#
# Made for one device call of at most 600 s: rows that would start less than MIN_LEFT (75 s; the bloom-7b1 and
# compiled rows their own MIN) before DEADLINE (500 s) are skipped and a failed row is reported, never the end of
# the run, so the table of what was measured
# always prints; the issue's targets run first. ROWS="name ..." measures only those rows (a second call for the
# skipped ones). STEPS (12) and BIG_STEPS (6) set the lengths.
#
# The reference recipe (HF Trainer, micro-batch 1 x 8), HF Trainer at each launcher row's own micro-batch (the
# same-shape peer), and the launcher on the bloom-1b4-zh shape (random weights built locally, no hub), bf16 (rows
# below; global batch 8 throughout), ZeRO-3 at 8
# (the partitioned loader, models/zero3_load.py, on CUDA); then the bloom-7b1 shape (250,880-token vocabulary) on
# ZeRO-3 against its own reference. Data: ../shared/data/alpaca_zh_demo.json where present. Every row's ratio is
# against the reference measured in the same invocation. Into $OUT (a device call brings back 8 files at most):
# table.txt, results.json (every row's JSON) and logs.tar.gz (every row's log); the rest stays in WORK.
#
# On a device machine (nothing can be fetched there; its image lacks DeepSpeed and `datasets`): first, here,
# `bash bench/gpu_wheels.sh` (wheels into .whl/) and `mkdir -p .gpu-data && cp ../shared/data/alpaca_zh_demo.json
# .gpu-data/` (both git-ignored); then run `IA3_BENCH_DATA=.gpu-data/alpaca_zh_demo.json bash bench/gpu_check.sh`
# there with `.whl` and `.gpu-data` in the run's carry: the wheels go into /tmp/site before anything imports.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3 || command -v python)}
# What comes back from a device call is at most 8 files under $OUT: the rows' JSON, logs and models live in WORK,
# and $OUT gets table.txt, results.json (every row) and logs.tar.gz (every row's log) at the end.
OUT=${OUT:-/tmp/ia3-gpu-check}
WORK=${WORK:-/tmp/ia3-gpu-work}
mkdir -p "$OUT" "$WORK"
# USE_HUB_KERNELS=0: no hub kernels in any model of the run (the loaders pass use_kernels=False too; offline
# they fail to fetch).
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 USE_HUB_KERNELS=0
T0=$SECONDS
# Within one device call (600 s at most): rows that would start with less than MIN_LEFT before DEADLINE are
# skipped, not cut off, so the table below always prints; each row is bounded by ROW_TIMEOUT.
DEADLINE=${DEADLINE:-500}
ROW_TIMEOUT=${ROW_TIMEOUT:-170}
MIN_LEFT=${MIN_LEFT:-75}
# A failure before any row still leaves its reason in $OUT (what comes back is $OUT and the output's tail).
setup_failed() {
  echo "[gpu_check] $1" >&2
  { echo "{\"setup_failed\": \"$1\"}"; } > "$OUT/results.json"
  { echo "setup failed: $1"; "$PY" -m pip list 2>&1; nvidia-smi 2>&1; } > "$OUT/table.txt"
  exit 1
}
if [ -d .whl ] && ! "$PY" -c "import deepspeed" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || setup_failed "installing .whl/ failed"
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# What the benchmark imports. `datasets` is optional (Arrow data, hub datasets), but transformers' Trainer imports
# it whenever it is installed: one that does not import (a pyarrow older than it needs) would fail every row.
if ! "$PY" -c "import datasets; from transformers import Trainer" 2>/dev/null; then
  echo "[gpu_check] datasets does not import here: set aside (the benchmark needs none)" >&2
  rm -rf /tmp/site/datasets /tmp/site/datasets-*.dist-info
fi
"$PY" -c "import deepspeed, torch, transformers, peft; from transformers import Trainer; print('[gpu_check] torch',
torch.__version__, 'cuda', torch.version.cuda, 'deepspeed', deepspeed.__version__, 'transformers',
transformers.__version__, 'peft', peft.__version__)" || setup_failed "the stack does not import"
DATA=()
if [ -n "${IA3_BENCH_DATA:-}" ]; then
  [ -f "$IA3_BENCH_DATA" ] || setup_failed "IA3_BENCH_DATA=$IA3_BENCH_DATA: no such file"
  DATA=(--data "$IA3_BENCH_DATA")
fi
if [ "${1:-}" = "--smoke" ]; then
  SMALL=tiny; BIG=tiny; PREC=(); STEPS=6; BIG_STEPS=4
else
  SMALL=1b4; BIG=7b1; PREC=(--bf16); STEPS=${STEPS:-12}; BIG_STEPS=${BIG_STEPS:-6}
fi
FAILED=()
bench() {  # name model steps ds micro [launcher overrides...]; MIN=seconds the row needs (default MIN_LEFT)
  local name=$1 model=$2 steps=$3 ds=$4 micro=$5; shift 5
  if [ -n "${ROWS:-}" ] && [[ " $ROWS " != *" $name "* ]]; then return 0; fi
  local left=$((DEADLINE - (SECONDS - T0)))
  if [ "$left" -lt "${MIN:-$MIN_LEFT}" ]; then
    echo "[gpu_check] $name skipped: ${DEADLINE}s deadline (run it again with ROWS=\"$name\")" >&2
    FAILED+=("$name (skipped)"); return 0
  fi
  local sets=(); for kv in "$@"; do sets+=(--set "$kv"); done
  rm -f "$WORK/rows/$name.json"  # an earlier call's row (ROWS= reruns keep rows/) is never taken for this one's
  # SIGKILL, to the row's whole process group: the launcher it started takes SIGTERM as a preemption (it would
  # finish its step and save, holding the GPU while the next row runs).
  if timeout -s KILL "$(( left < ROW_TIMEOUT ? left : ROW_TIMEOUT ))" "$PY" bench/bench_train.py --model "$model" \
      --steps "$steps" --ds "$ds" --micro "$micro" "${PREC[@]}" --peer ${DATA[@]+"${DATA[@]}"} \
      --warmup "${WARMUP:-2}" --work "$WORK/work-$model" --launcher-dir "$WORK/launcher-$name" \
      --reference-json "$WORK/reference-$model.json" --json "$WORK/rows/$name.json" --logs "$WORK/logs/$name" \
      "${sets[@]}" > "$WORK/logs/$name.log" 2>&1; then
    echo "[gpu_check $(date +%H:%M:%S), $((SECONDS - T0)) s] $name done"
    # The row's own summary now, should the table below not print.
    sed -n '/^model /,$p' "$WORK/logs/$name.log" | head -8
    if grep -q "cudagraph_skips" "$WORK/launcher-$name/metrics.jsonl" 2>/dev/null; then
      echo "[gpu_check] $name: inductor skipped CUDA graphs (cudagraph_skips in its metrics): the row measures a" \
        "plain compile" >&2
    fi
  else
    echo "[gpu_check] $name failed (exit $?): see logs.tar.gz, $name.log" >&2; tail -15 "$WORK/logs/$name.log" >&2
    FAILED+=("$name")
    # A row cut off after the launcher measured keeps its figures (marked partial: its HF sides are missing).
    grep -q '"partial": true' "$WORK/rows/$name.json" 2>/dev/null || rm -f "$WORK/rows/$name.json"
  fi
}
rm -rf "$WORK"/reference-*.json "$WORK"/reference-*.json.failed "$WORK"/work-*/peer-*.json
# A ROWS= call on the same machine adds to the earlier call's rows (their own references, measured then).
[ -n "${ROWS:-}" ] || rm -rf "$WORK/rows" "$WORK/logs"
mkdir -p "$WORK/rows" "$WORK/logs"
# The issue's targets first (the seed's 1 x 8, micro-batch 8 on the stage plan picks, the best configuration:
# packed and compiled, CUDA graphs; the bloom-7b1 shape), then what no GPU has measured yet (FlexAttention, the
# rotary family's device masks), then the other stages. Compiled rows are timed after STEPS/2 (their first steps
# compile).
bench "$SMALL-zero1-m1" "$SMALL" "$STEPS" zero1 1
bench "$SMALL-zero1-m8" "$SMALL" "$STEPS" zero1 8
# Builds and saves a 14 GB model, then loads it three times (reference, peer, launcher): started only with the
# time for all of it, so a row it could not finish is skipped, not killed with the rows after it.
MIN=${BIG_MIN:-160} bench "$BIG-zero3-m4" "$BIG" "$BIG_STEPS" zero3 4
MIN=120 WARMUP=$((STEPS / 2)) bench "$SMALL-zero1-m8-packed-cudagraphs" "$SMALL" "$STEPS" zero1 8 \
  data.packing=true train.compile=true train.compile_mode=reduce-overhead
MIN=110 WARMUP=$((STEPS / 2)) bench "$SMALL-zero1-m8-packed-compiled" "$SMALL" "$STEPS" zero1 8 data.packing=true \
  train.compile=true
# FlexAttention (ALiBi as a score_mod, compiled on the GPU) against the eager zero1-m8 row; GPU only (torch has no
# FlexAttention backward on CPU: training with it is refused there).
[ "${1:-}" = "--smoke" ] || MIN=110 WARMUP=$((STEPS / 2)) bench "$SMALL-zero1-m8-flex" "$SMALL" "$STEPS" zero1 8 \
  model.attention=flex
# A rotary family: its 4-D masks are built on the device (no host sync; an explicit causal mask where no row is
# padded, so SDPA's memory-efficient kernel instead of flash), against HF Trainer's own masks at the same shape.
[ "${1:-}" = "--smoke" ] || bench "llama-1b-zero1-m8" llama-1b "$STEPS" zero1 8
bench "$SMALL-zero2-m8" "$SMALL" "$STEPS" zero2 8
bench "$SMALL-zero3-m8" "$SMALL" "$STEPS" zero3 8
bench "$SMALL-zero1-m4" "$SMALL" "$STEPS" zero1 4
echo "[gpu_check] $((SECONDS - T0)) s in all${FAILED[0]+; not measured: ${FAILED[*]}}" | tee "$WORK/summary.txt"
# Every side's output, the launcher's metrics and the HF sides' JSON: a killed row still shows how far it got.
tar -czf "$OUT/logs.tar.gz" -C "$WORK" logs rows summary.txt $(cd "$WORK" && ls -d launcher-*/metrics.jsonl \
  reference-*.json* work-*/peer-*.json 2>/dev/null) 2>/dev/null
"$PY" - "$WORK/rows" "$OUT" <<'PYEOF' | tee "$OUT/table.txt"
import json, sys
from pathlib import Path

rows, out = Path(sys.argv[1]), Path(sys.argv[2])
files = sorted(rows.glob("*.json"), key=lambda f: f.stat().st_mtime)
runs = []
for f in files:
    try:
        runs.append((f, json.loads(f.read_text())))
    except ValueError as e:
        print(f"{f.name}: unreadable ({e})")
(out / "results.json").write_text(json.dumps({f.stem: r for f, r in runs}, indent=1))
if not runs:
    sys.exit("no row was measured")
print(f"\ndevice: {runs[0][1]['device']}; stack: {runs[0][1].get('env')}")
print(f"global batch 8; data: {runs[0][1].get('data')}; ratios: launcher "
      f"tokens/s over HF Trainer's, same invocation (ref: the recipe's 1 x 8; peer: HF Trainer at the launcher's own "
      f"micro x accum)")
head = (f"{'run':<34}{'ref tok/s':>10}{'peer tok/s':>11}{'tok/s':>9}{'ms/step':>8}{'x ref':>7}{'x peer':>7}"
        f"{'MFU 6N':>8}{'exec util':>10}{'peak GB':>8}{'startup s':>10}")
print(head)
z2 = {}
for f, r in runs:
    try:
        sides = {x["side"]: x for x in r["results"] if not x.get("failed")}  # a failed HF side: "-" in its columns
        ref = sides.get("reference")
        peer = next((x for k, x in sides.items() if k.startswith("HF peer")), ref if r["micro"] == 1 else None)
        l = next(x for k, x in sides.items() if k.startswith("ia3-dist"))
        if r["ds"] == "zero2" and r["micro"] == 8:
            z2[r["model"]] = l["tokens_per_s"]
        pct = lambda v: f"{v:.1%}" if v else "-"
        num = lambda v, spec: format(v, spec) if v else "-"
        x = lambda side: l["tokens_per_s"] / side["tokens_per_s"] if side else None
        print(f"{f.stem:<34}{num((ref or {}).get('tokens_per_s'), '.1f'):>10}"
              f"{num((peer or {}).get('tokens_per_s'), '.1f'):>11}"
              f"{l['tokens_per_s']:>9.1f}{l.get('step_ms', 0):>8.1f}{num(x(ref), '.2f'):>7}{num(x(peer), '.2f'):>7}"
              f"{pct(l.get('mfu')):>8}{pct(l.get('mfu_executed')):>10}{l['peak_mem_gb']:>8.2f}"
              f"{(l.get('startup_s') or 0):>10.1f}"
              + ("  CUDA graphs skipped" if any(m.get("cudagraph_skips") for m in l.get("metrics", [])) else "")
              + ("  (cut off: HF sides missing)" if r.get("partial") else ""))
    except (KeyError, StopIteration, TypeError, ZeroDivisionError) as e:
        print(f"{f.stem:<34}unreadable row ({type(e).__name__}: {e})")
for f, r in runs:
    if r.get("ds") == "zero3" and r.get("micro") == 8 and r.get("model") in z2:
        l = next(x for x in r["results"] if x["side"].startswith("ia3-dist"))
        print(f"{r['model']} ZeRO-3 / ZeRO-2 at micro 8: {l['tokens_per_s'] / z2[r['model']]:.2f}x")
PYEOF
