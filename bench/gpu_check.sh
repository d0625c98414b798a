#!/usr/bin/env bash
# bash bench/gpu_check.sh            one GPU, about 8 minutes: the figures issue 15 asks for, as one table
# bash bench/gpu_check.sh --smoke    the same pipeline on CPU with the tiny shape (checks the script, 2.5 min)
#
# The reference recipe (HF Trainer, micro-batch 1 x 8) and the launcher on the bloom-1b4-zh shape (random weights
# built locally, no hub), bf16: ZeRO-2 at micro-batches 1, 4 and 8 (global batch 8 throughout) and ZeRO-3 at 8
# (the partitioned loader, models/zero3_load.py, on CUDA); then the bloom-7b1 shape (250,880-token vocabulary) on
# ZeRO-3 against its own reference. Data: ../shared/data/alpaca_zh_demo.json where present. Every row's ratio is
# against the reference measured in the same invocation. JSON per run under $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-/tmp/ia3-gpu-check}
mkdir -p "$OUT"
if [ "${1:-}" = "--smoke" ]; then
  SMALL=tiny; BIG=tiny; PREC=(); STEPS=6; BIG_STEPS=4
else
  SMALL=1b4; BIG=7b1; PREC=(--bf16); STEPS=20; BIG_STEPS=8
fi
bench() {  # name model steps ds micro
  "$PY" bench/bench_train.py --model "$2" --steps "$3" --ds "$4" --micro "$5" "${PREC[@]}" --work "$OUT/work-$2" \
    --reference-json "$OUT/reference-$2.json" --json "$OUT/$1.json" > "$OUT/$1.log" 2>&1 \
    || { echo "$1 failed: see $OUT/$1.log" >&2; tail -20 "$OUT/$1.log" >&2; exit 1; }
  echo "[gpu_check $(date +%H:%M:%S)] $1 done"
}
rm -f "$OUT"/reference-*.json
for m in 1 4 8; do bench "$SMALL-zero2-m$m" "$SMALL" "$STEPS" zero2 "$m"; done
bench "$SMALL-zero3-m8" "$SMALL" "$STEPS" zero3 8
bench "$BIG-zero3-m4" "$BIG" "$BIG_STEPS" zero3 4
"$PY" - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
runs = [json.loads(f.read_text()) for f in sorted(out.glob("*.json")) if not f.name.startswith("reference-")]
print(f"\ndevice: {runs[0]['device']}; global batch 8; ratio = launcher tokens/s over the reference's, same invocation")
head = (f"{'shape':<6}{'zero':>6}{'micro':>6}{'ref tok/s':>11}{'tok/s':>10}{'ratio':>7}{'MFU 6N':>8}{'exec util':>10}"
        f"{'peak GB':>9}{'startup s':>10}")
print(head)
z2 = {}
for r in runs:
    ref, l = r["results"][0], r["results"][1]
    if r["ds"] == "zero2" and r["micro"] == 8:
        z2[r["model"]] = l["tokens_per_s"]
    pct = lambda v: f"{v:.1%}" if v else "-"
    print(f"{r['model']:<6}{r['ds']:>6}{r['micro']:>6}{ref['tokens_per_s']:>11.1f}{l['tokens_per_s']:>10.1f}"
          f"{l['tokens_per_s'] / ref['tokens_per_s']:>7.2f}{pct(l.get('mfu')):>8}{pct(l.get('mfu_executed')):>10}"
          f"{l['peak_mem_gb']:>9.2f}{(l.get('startup_s') or 0):>10.1f}")
for r in runs:
    if r["ds"] == "zero3" and r["micro"] == 8 and r["model"] in z2:
        print(f"{r['model']} ZeRO-3 / ZeRO-2 at micro 8: {r['results'][1]['tokens_per_s'] / z2[r['model']]:.2f}x")
PYEOF
