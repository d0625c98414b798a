#!/usr/bin/env bash
# ./dev.sh demo   set up .venv if needed, then run the embedded CPU demo on 2 ranks (python launch.py for 1)
# ./dev.sh test   set up .venv if needed, then run the whole test suite (what CI runs)
# ./dev.sh lint   ruff
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
. .venv/bin/activate
case "${1:-}" in
  demo) shift; exec deepspeed --quiet --num_accelerators 2 launch.py --config configs/tiny-cpu.yaml "$@" ;;
  # Three workers on 2 cores, a test file each at a time (module fixtures share their runs): the Slurm and fault
  # tests spend much of their time waiting (on the cluster, on a hang timeout), which a third worker fills.
  # IA3_TEST_WORKERS=0 for one process.
  test) shift; exec python -m pytest -n "${IA3_TEST_WORKERS:-3}" --dist loadfile --no-loadscope-reorder "$@" ;;
  lint) exec ruff check . ;;
  *) echo "usage: ./dev.sh demo|test|lint [args]" >&2; exit 2 ;;
esac
