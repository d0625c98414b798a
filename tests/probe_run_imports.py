"""Run the launcher in this process, then say whether the run imported TorchInductor (test_startup).

Run as ``python tests/probe_run_imports.py --config X [overrides]``; prints ``inductor True|False`` last.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ia3_dist.cli import main  # noqa: E402

if __name__ == "__main__":
    rc = main(sys.argv[1:])
    assert rc == 0, rc
    print("inductor", "torch._inductor.compile_fx" in sys.modules)
