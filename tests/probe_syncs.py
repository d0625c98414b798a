"""Count the host syncs of real optimizer steps: the launcher's training path under torch.profiler (with Python
frames) over steps ``IA3_TEST_SYNC_FROM`` .. ``IA3_TEST_SYNC_TO`` (between them too: the loop's own bookkeeping
runs there), no log step in that window. A sync is an ``aten::_local_scalar_dense`` (a value read back:
``.item()``, ``bool()``, ``float()`` of a tensor) or an ``aten::nonzero`` (a data-dependent shape), counted by
``bench/profile_step.sync_sites`` (reads inside the fused AdamW kernel left out: its CPU form reads the step count
from host memory, the CUDA form on the device). So does each of DeepSpeed's device-wide waits
(``get_accelerator().synchronize()``): DeepSpeed skips them where the accelerator resolves data dependencies
itself, as the CPU one does, so here the accelerator answers as a GPU's does. Each is written with its innermost
frames outside torch to ``IA3_TEST_PROBE`` as JSON. ``IA3_TEST_DS_ORIGINALS=1``: DeepSpeed's own functions, not
``runtime/ds_syncs``'s.

Run as ``python tests/probe_syncs.py --config X [overrides]`` (one process).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from profile_step import sync_sites  # noqa: E402

from ia3_dist.cli import _train_parser  # noqa: E402
from ia3_dist.config import load_config  # noqa: E402
from ia3_dist.train import loop  # noqa: E402
from ia3_dist.train.run import run  # noqa: E402


def main() -> None:
    if os.environ.get("IA3_TEST_DS_ORIGINALS") == "1":  # DeepSpeed's own steps, to compare the results with
        from ia3_dist.runtime import ds_syncs

        ds_syncs.install = lambda: False
    first, last = int(os.environ.get("IA3_TEST_SYNC_FROM", 0)), int(os.environ.get("IA3_TEST_SYNC_TO", 0))
    where: dict[str, int] = {}
    state: dict = {}
    orig = loop.Trainer.step

    def step(self, step_no, step_mbs):  # noqa: ANN001, ANN202
        if step_no + 1 == first:
            state["prof"] = profile(activities=[ProfilerActivity.CPU], with_stack=True)
            state["prof"].__enter__()
        res = orig(self, step_no, step_mbs)
        if step_no + 1 == last:
            state["prof"].__exit__(None, None, None)
            where.update(sync_sites(state["prof"].events()))
            state["done"] = True
        return res

    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    device_wide = acc.synchronize

    def synchronize(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if "prof" in state and "done" not in state:
            frames = [f"{_short(f.filename)}({f.lineno}): {f.name}" for f in reversed(traceback.extract_stack()[:-1])]
            key = "synchronize  " + " <- ".join(frames[:3])
            where[key] = where.get(key, 0) + 1
        return device_wide(*args, **kwargs)

    acc.resolves_data_dependency = lambda: False
    acc.synchronize = synchronize
    loop.Trainer.step = step
    args = _train_parser("probe_syncs.py").parse_args()
    run(load_config(args.config, args.overrides))
    if first:
        assert state.get("done"), "the window's last step never ran"
        Path(os.environ["IA3_TEST_PROBE"]).write_text(json.dumps({"steps": last - first + 1, "sites": where}))


def _short(path: str) -> str:
    """A frame's file as the profiler names it: from the package folder on (``deepspeed/runtime/...``)."""
    for root in sys.path:
        if root and path.startswith(root.rstrip("/") + "/"):
            return path[len(root.rstrip("/")) + 1:]
    return path


if __name__ == "__main__":
    main()
