"""Packed training runs (``data.packing``) on the real engine: multi-turn data packed (stopped and resumed) and
unpacked train the same (1 process ZeRO-0, 2 gloo ranks ZeRO-3), and a compiled packed run stops compiling after
its warm-up. (Single-turn packed runs against the HF Trainer reference are in test_parity.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _util import adapter_tensors, check, launch, metrics

from ia3_dist.train.demo import make_records

pytestmark = pytest.mark.slow
TINY = "configs/tiny-cpu.yaml"


@pytest.fixture(scope="module")
def multiturn(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """80 records, most with one or two earlier exchanges as history (every assistant turn labelled)."""
    recs = make_records(80, 13, None)
    for i, r in enumerate(recs):
        r["history"] = [[recs[(i + k) % 80]["instruction"], recs[(i + k) % 80]["output"]] for k in range(1, i % 3 + 1)]
    f = tmp_path_factory.mktemp("mt") / "multiturn.json"
    f.write_text(json.dumps(recs, ensure_ascii=False), encoding="utf-8")
    return f


def _same_training(a: Path, b: Path, tol: float) -> None:
    la = {r["step"]: r["loss"] for r in metrics(a) if "loss" in r}
    lb = {r["step"]: r["loss"] for r in metrics(b) if "loss" in r}
    assert sorted(la) == sorted(lb) and len(la) >= 5
    for s in la:
        assert la[s] == pytest.approx(lb[s], rel=tol), (s, la[s], lb[s])
    ta, tb = adapter_tensors(a / "adapter"), adapter_tensors(b / "adapter")
    assert set(ta) == set(tb)
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=tol, atol=tol)


def _run(out: Path, data: Path, world: int, ds: str, *extra: str):
    return launch(["--config", TINY, f"data.path={data}", f"deepspeed.config={ds}", f"output.dir={out}",
                   "train.epochs=1", "train.lr=3e-3", "train.log_every=1", "train.micro_batch_size=4",
                   "train.grad_accum=2",
                   "data.max_length=192", *extra], nproc=world)


@pytest.mark.parametrize("world, ds", [(1, "zero0"), (2, "zero3")])
def test_multi_turn_packed_trains_like_unpacked_and_resumes_exactly(multiturn: Path, tmp_path: Path, world: int,
                                                                    ds: str) -> None:
    """The packed run is stopped after step 2 and resumed: per-step losses and the final adapter still equal the
    uninterrupted unpacked run's."""
    plain, packed = tmp_path / "plain", tmp_path / "packed"
    check(_run(plain, multiturn, world, ds))
    proc = check(_run(packed, multiturn, world, ds, "data.packing=true", "train.stop_after_steps=2"))
    assert "packed in rows of" in proc.stdout and "packing efficiency" in proc.stdout
    proc = check(_run(packed, multiturn, world, ds, "data.packing=true", "train.resume=auto"))
    assert "resuming from" in proc.stdout
    _same_training(packed, plain, tol=1e-6)
    m = [r for r in metrics(packed) if "loss" in r]
    # Fewer rows than examples, and the efficiency logged is the packed rows' (real tokens / row slots).
    assert all(r["rows_per_step"] < 8 * world for r in m)
    assert all(0.5 < r["padding_efficiency"] <= 1.0 for r in m)


def test_compiled_packed_run_stops_compiling_after_warm_up(tmp_path: Path) -> None:
    """train.compile on packed rows: the width is fixed and the row count changes; the blocks are compiled
    shape-generic at the first step, once more for a one-row micro-step (dynamo specializes size 1), and nothing
    recompiles after that (graph count logged every step)."""
    out = tmp_path / "compiled"
    check(launch(["--config", TINY, "deepspeed.config=zero2", f"output.dir={out}", "train.max_steps=10",
                  "train.log_every=1", "data.packing=true", "train.compile=true", "checkpoint.at_end=false"]))
    m = [r for r in metrics(out) if "loss" in r]
    graphs = [r["compiled_graphs"] for r in m]
    rows = {r["rows_per_step"] for r in m}
    assert len(rows) > 1, rows  # the row count did change
    assert graphs[0] > 0 and graphs[-1] == graphs[4], graphs
