#!/usr/bin/env bash
# Create (or reuse) a virtualenv and install ia3-dist with its test tools. torch goes first, pinned: an unpinned
# torch requirement on a machine without it pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
. "$VENV/bin/activate"
stamp="$VENV/.ia3-dist-installed"
want=$(cat requirements.txt requirements-dev.txt setup.cfg | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  python -m pip install -q --upgrade pip
  python -c "import torch" 2>/dev/null || python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
  python -m pip install -q -r requirements-dev.txt
  python -m pip install -q --no-deps -e .
  echo "$want" > "$stamp"
fi
