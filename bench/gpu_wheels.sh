#!/usr/bin/env bash
# bash bench/gpu_wheels.sh     here, where the package registry is reachable: the wheels a device machine lacks
#
# The device machines' image (Python 3.12, torch, transformers, peft, accelerate, ...) has no DeepSpeed, no
# `datasets` and an older transformers, and nothing can be fetched there. This puts, into .whl/ (git-ignored), the
# launcher's own versions of what it lacks: pure-Python wheels, binary ones for CPython 3.12 on x86-64 Linux, and a
# wheel built here from DeepSpeed's source release (PyPI has no DeepSpeed wheel; its ops are JIT-compiled where they
# are used, so the wheel holds none). Then, on the device: run bench/gpu_check.sh with `.whl` in the run's carry;
# it installs them into /tmp/site first.
set -euo pipefail
cd "$(dirname "$0")/.."
# The checkout's venv (scripts/setup.sh): the tested versions, which the pins below read.
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
W=.whl
rm -rf "$W" && mkdir -p "$W"
ver() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
# The launcher's stack and everything it needs, each at the version this checkout runs with (scripts/setup.sh's
# venv: the tested combination; one version of each, two stop the install), less what the image has in a version
# the stack accepts and that is large (torch and its CUDA libraries, numpy, pyarrow, pandas).
pins=$("$PY" - <<'PYEOF'
import importlib.metadata as m, re
from packaging.markers import default_environment
from packaging.requirements import Requirement

env = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3", "extra": ""}
skip = {"torch", "numpy", "pyarrow", "pandas", "triton", "sympy", "networkx", "jinja2", "markupsafe", "mpmath",
        "setuptools"}
seen, todo = {}, ["deepspeed", "transformers", "peft", "datasets", "accelerate", "pyyaml"]
while todo:
    n = re.sub(r"[-_.]+", "-", todo.pop()).lower()
    if n in seen or n in skip or n.startswith("nvidia-"):
        continue
    d = m.distribution(n)
    seen[n] = d.version
    todo += [r.name for r in map(Requirement, d.requires or []) if not r.marker or r.marker.evaluate(env)]
print(" ".join(f"{k}=={v}" for k, v in sorted(seen.items()) if k != "deepspeed"))
PYEOF
)
plat=()
for n in 17 24 27 28 31 34; do plat+=(--platform "manylinux_2_${n}_x86_64"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 "${plat[@]}" -d "$W" $pins
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation "deepspeed==$(ver deepspeed)" -w "$W"
du -sh "$W"
ls "$W"
# A device call carries at most 64 MiB of working tree, .whl and .gpu-data included.
size=$(du -sm "$W" | cut -f1)
[ "$size" -lt 56 ] || { echo "gpu_wheels: $W is $size MiB; a device call carries 64 MiB in all" >&2; exit 1; }
