#!/usr/bin/env python
"""Seeded mutations must fail the suite: a guard that the tests still assert what they claim after they were
merged into shared runs and sped up.

    python scripts/check_mutants.py                 # every mutant against the unit tier (-m "not slow")
    python scripts/check_mutants.py --tier all      # against the whole suite (slow)
    python scripts/check_mutants.py --only warmup

Each mutant is one small edit of the package (a flipped sign, a dropped branch) applied to a copy of this
checkout; the copy's tests run with that copy first on PYTHONPATH. A mutant that no test catches is a hole in the
suite, reported with exit 1. The edit must apply exactly once, so a refactor that moves the code makes this script
fail loudly instead of testing nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name: (file, original text, mutated text, tests to run: the files that should catch it, for speed)
MUTANTS = {
    # The ZeRO-3 loader reads each rank's slice at the wrong place in the safetensors file.
    "zero3-offset-sign": ("ia3_dist/models/zero3_load.py",
                          'begin = self.base + info["data_offsets"][0] + start * item',
                          'begin = self.base + info["data_offsets"][0] - start * item',
                          ["tests/test_zero_load.py", "tests/test_model.py"]),
    # The learning rate skips its warmup ramp.
    "warmup-dropped": ("ia3_dist/train/schedule.py",
                       "        if step < warmup:\n            return step / max(1, warmup)\n",
                       "",
                       ["tests/test_schedule.py"]),
    # Every epoch sees the examples in the first epoch's order.
    "epoch-reshuffle-skipped": ("ia3_dist/data/sampler.py",
                                "return np.random.default_rng([seed, epoch]).permutation(n)",
                                "return np.random.default_rng([seed, 0]).permutation(n)",
                                ["tests/test_data.py"]),
}


def _copy(dst: Path) -> None:
    ignore = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.pyc", "*.egg-info", "runs", "build")
    shutil.copytree(ROOT, dst, ignore=ignore, symlinks=True)


def run(name: str, tier: str) -> bool:
    """Whether the tests fail on mutant ``name``; ``name=None``: the unmutated copy (the control, which must pass, so
    that a catch is the mutant's and not the copy's)."""
    path, old, new, tests = MUTANTS[name] if name else ("", "", "", sorted({t for m in MUTANTS.values() for t in m[3]}))
    with tempfile.TemporaryDirectory(prefix=f"mutant-{name or 'control'}-") as tmp:
        work = Path(tmp) / "ia3-dist"
        _copy(work)
        if name:
            f = work / path
            text = f.read_text()
            if text.count(old) != 1:
                raise SystemExit(f"{name}: the code to mutate is not in {path} exactly once; update MUTANTS")
            f.write_text(text.replace(old, new))
        control = not name
        name = name or "control (no mutant)"
        targets = ["-m", "not slow", *tests] if tier == "unit" else []
        env = {**os.environ, "PYTHONPATH": str(work)}
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *targets],
                              cwd=work, env=env, capture_output=True, text=True)
        tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-300:]
        caught = proc.returncode == 1  # test failures; 2-5 are usage/collection errors, not a catch
        verdict = ("fails" if caught else "passes") if control else ("caught" if caught else "NOT CAUGHT")
        print(f"{name}: {verdict} in {time.monotonic() - t0:.0f} s ({tail})", flush=True)
        if proc.returncode not in (0, 1):
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
        return caught


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tier", choices=["unit", "all"], default="unit")
    ap.add_argument("--only", choices=list(MUTANTS), action="append")
    a = ap.parse_args()
    if run(None, a.tier):
        raise SystemExit("the unmutated copy fails its tests: fix that first")
    missed = [n for n in (a.only or MUTANTS) if not run(n, a.tier)]
    if missed:
        raise SystemExit(f"mutants no test caught: {', '.join(missed)}")
    print("every mutant was caught")


if __name__ == "__main__":
    main()
