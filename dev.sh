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
  # Two workers, a test file each at a time (module fixtures share their runs); IA3_TEST_WORKERS=0 for one process.
  # (Three were measured slower on 2 cores: 21 min 10 s against 19 min 50 s, 17 min 22 s against 14 min 57 s.)
  # Bytecode written (an environment may turn it off): the unit tier's collection rewrites ~180 test modules'
  # asserts, 4-5 s of each worker's start when nothing is cached; every fresh interpreter compiles ia3_dist.
  test) shift; unset PYTHONDONTWRITEBYTECODE; exec python -m pytest -n "${IA3_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "$@" ;;
  lint) exec ruff check . ;;
  *) echo "usage: ./dev.sh demo|test|lint [args]" >&2; exit 2 ;;
esac
