#!/usr/bin/env bash
# bash bench/gpu_check.sh            one GPU: the figures issues 15 and 29 ask for, as one table
# bash bench/gpu_check.sh --smoke    the same pipeline on CPU with the tiny shape (checks the script, 2.5 min)
#
# Made for one device call of at most 600 s: rows that would start past DEADLINE (500 s) are skipped and a failed
# row is reported, never the end of the run, so the table of what was measured always prints; ROWS="name ..."
# measures only those rows (a second call for the skipped ones). STEPS (12) and BIG_STEPS (6) set the lengths.
#
# The reference recipe (HF Trainer, micro-batch 1 x 8), HF Trainer at each launcher row's own micro-batch (the
# same-shape peer), and the launcher on the bloom-1b4-zh shape (random weights built locally, no hub), bf16 (rows
# below; global batch 8 throughout), ZeRO-3 at 8
# (the partitioned loader, models/zero3_load.py, on CUDA); then the bloom-7b1 shape (250,880-token vocabulary) on
# ZeRO-3 against its own reference. Data: ../shared/data/alpaca_zh_demo.json where present. Every row's ratio is
# against the reference measured in the same invocation. JSON per run under $OUT.
#
# On a device machine (nothing can be fetched there; its image lacks DeepSpeed and `datasets`): first, here,
# `bash bench/gpu_wheels.sh` (wheels into .whl/) and `mkdir -p .gpu-data && cp ../shared/data/alpaca_zh_demo.json
# .gpu-data/` (both git-ignored); then run `IA3_BENCH_DATA=.gpu-data/alpaca_zh_demo.json bash bench/gpu_check.sh`
# there with `.whl` and `.gpu-data` in the run's carry: the wheels go into /tmp/site before anything imports.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python || command -v python3)}
OUT=${OUT:-/tmp/ia3-gpu-check}
mkdir -p "$OUT"
T0=$SECONDS
# Within one device call (600 s at most): rows that would start past DEADLINE are skipped, not cut off, so the
# table below always prints; each row is bounded by ROW_TIMEOUT.
DEADLINE=${DEADLINE:-500}
ROW_TIMEOUT=${ROW_TIMEOUT:-170}
if [ -d .whl ] && ! "$PY" -c "import deepspeed" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "[gpu_check] installing .whl/ failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# What the benchmark imports (datasets only for Arrow data and hub datasets: optional here).
"$PY" -c "import deepspeed, transformers, peft; print('[gpu_check] deepspeed', deepspeed.__version__, 'transformers',
transformers.__version__, 'peft', peft.__version__)" || { echo "[gpu_check] the stack does not import" >&2; exit 1; }
DATA=()
if [ -n "${IA3_BENCH_DATA:-}" ]; then DATA=(--data "$IA3_BENCH_DATA"); fi
if [ "${1:-}" = "--smoke" ]; then
  SMALL=tiny; BIG=tiny; PREC=(); STEPS=6; BIG_STEPS=4
else
  SMALL=1b4; BIG=7b1; PREC=(--bf16); STEPS=${STEPS:-12}; BIG_STEPS=${BIG_STEPS:-6}
fi
FAILED=()
bench() {  # name model steps ds micro [launcher overrides...]
  local name=$1 model=$2 steps=$3 ds=$4 micro=$5; shift 5
  if [ -n "${ROWS:-}" ] && [[ " $ROWS " != *" $name "* ]]; then return 0; fi
  local left=$((DEADLINE - (SECONDS - T0)))
  if [ "$left" -lt 30 ]; then
    echo "[gpu_check] $name skipped: ${DEADLINE}s deadline (run it again with ROWS=\"$name\")" >&2
    FAILED+=("$name (skipped)"); return 0
  fi
  local sets=(); for kv in "$@"; do sets+=(--set "$kv"); done
  if timeout "$(( left < ROW_TIMEOUT ? left : ROW_TIMEOUT ))" "$PY" bench/bench_train.py --model "$model" \
      --steps "$steps" --ds "$ds" --micro "$micro" "${PREC[@]}" --peer ${DATA[@]+"${DATA[@]}"} \
      --warmup "${WARMUP:-2}" --work "$OUT/work-$model" --reference-json "$OUT/reference-$model.json" \
      --json "$OUT/$name.json" "${sets[@]}" > "$OUT/$name.log" 2>&1; then
    echo "[gpu_check $(date +%H:%M:%S), $((SECONDS - T0)) s] $name done"
  else
    echo "[gpu_check] $name failed (exit $?): see $OUT/$name.log" >&2; tail -15 "$OUT/$name.log" >&2
    FAILED+=("$name"); rm -f "$OUT/$name.json"
  fi
}
rm -f "$OUT"/reference-*.json "$OUT"/work-*/peer-*.json
# The seed's shape (1 x 8) on the stage plan picks for IA3 (ZeRO-1: the frozen weights fit), then micro-batches 8
# and 4 on ZeRO-1, 8 on ZeRO-2 and ZeRO-3, the 7b1 shape on ZeRO-3; the compiled rows last (the riskiest, and the
# first steps compile: timed after STEPS/2).
bench "$SMALL-zero1-m1" "$SMALL" "$STEPS" zero1 1
bench "$SMALL-zero1-m8" "$SMALL" "$STEPS" zero1 8
bench "$SMALL-zero2-m8" "$SMALL" "$STEPS" zero2 8
bench "$SMALL-zero1-m4" "$SMALL" "$STEPS" zero1 4
bench "$SMALL-zero3-m8" "$SMALL" "$STEPS" zero3 8
bench "$BIG-zero3-m4" "$BIG" "$BIG_STEPS" zero3 4
# FlexAttention (ALiBi as a score_mod, compiled on the GPU) against the eager row above (zero1-m8); GPU only (torch
# has no FlexAttention backward on CPU: training with it is refused there).
[ "${1:-}" = "--smoke" ] || bench "$SMALL-zero1-m8-flex" "$SMALL" "$STEPS" zero1 8 model.attention=flex
WARMUP=$((STEPS / 2)) bench "$SMALL-zero1-m8-packed-compiled" "$SMALL" "$STEPS" zero1 8 data.packing=true \
  train.compile=true
WARMUP=$((STEPS / 2)) bench "$SMALL-zero1-m8-packed-cudagraphs" "$SMALL" "$STEPS" zero1 8 data.packing=true \
  train.compile=true train.compile_mode=reduce-overhead
# A rotary family: its 4-D masks are built on the device (no host sync; an explicit causal mask where no row is
# padded, so SDPA's memory-efficient kernel instead of flash), against HF Trainer's own masks at the same shape.
[ "${1:-}" = "--smoke" ] || bench "llama-1b-zero1-m8" llama-1b "$STEPS" zero1 8
echo "[gpu_check] $((SECONDS - T0)) s in all${FAILED[0]+; not measured: ${FAILED[*]}}"
"$PY" - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
files = [f for f in sorted(out.glob("*.json"), key=lambda f: f.stat().st_mtime) if not f.name.startswith("reference-")]
runs = [json.loads(f.read_text()) for f in files]
if not runs:
    sys.exit("no row was measured")
print(f"\ndevice: {runs[0]['device']}; global batch 8; ratios: launcher tokens/s over HF Trainer's, same invocation "
      f"(ref: the recipe's 1 x 8; peer: HF Trainer at the launcher's own micro x accum)")
head = (f"{'run':<34}{'ref tok/s':>10}{'peer tok/s':>11}{'tok/s':>9}{'ms/step':>8}{'x ref':>7}{'x peer':>7}"
        f"{'MFU 6N':>8}{'exec util':>10}{'peak GB':>8}{'startup s':>10}")
print(head)
z2 = {}
for f, r in zip(files, runs):
    sides = {x["side"]: x for x in r["results"]}
    ref = sides["reference"]
    peer = next((x for k, x in sides.items() if k.startswith("HF peer")), ref if r["micro"] == 1 else None)
    l = next(x for k, x in sides.items() if k.startswith("ia3-dist"))
    if r["ds"] == "zero2" and r["micro"] == 8:
        z2[r["model"]] = l["tokens_per_s"]
    pct = lambda v: f"{v:.1%}" if v else "-"
    print(f"{f.stem:<34}{ref['tokens_per_s']:>10.1f}{(peer or {}).get('tokens_per_s', 0):>11.1f}"
          f"{l['tokens_per_s']:>9.1f}{l.get('step_ms', 0):>8.1f}{l['tokens_per_s'] / ref['tokens_per_s']:>7.2f}"
          f"{(l['tokens_per_s'] / peer['tokens_per_s']) if peer else 0:>7.2f}{pct(l.get('mfu')):>8}"
          f"{pct(l.get('mfu_executed')):>10}{l['peak_mem_gb']:>8.2f}{(l.get('startup_s') or 0):>10.1f}")
for r in runs:
    if r["ds"] == "zero3" and r["micro"] == 8 and r["model"] in z2:
        l = next(x for x in r["results"] if x["side"].startswith("ia3-dist"))
        print(f"{r['model']} ZeRO-3 / ZeRO-2 at micro 8: {l['tokens_per_s'] / z2[r['model']]:.2f}x")
PYEOF
