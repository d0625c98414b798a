"""Packed training runs (``data.packing``) on the real engine: for every tested family, packed and unpacked runs
train the same on 1 process ZeRO-0 and 2 gloo ranks ZeRO-2 and ZeRO-3, on mixed single- and multi-turn records; a
packed run
resumes exactly; a compiled packed run stops compiling after its warm-up.
(Packed runs against the HF Trainer reference are in test_parity.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _util import adapter_tensors, check, launch, metrics

from ia3_dist.train.demo import make_records

pytestmark = pytest.mark.slow
TINY = "configs/tiny-cpu.yaml"


N = 32  # records: 4 steps of global batch 8


@pytest.fixture(scope="module")
def multiturn(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Records with zero (every third one: single-turn) to two earlier exchanges as history (every assistant turn
    labelled)."""
    recs = make_records(N, 17, None)
    for i, r in enumerate(recs):
        r["history"] = [[recs[(i + k) % N]["instruction"], recs[(i + k) % N]["output"]] for k in range(1, i % 3 + 1)]
    f = tmp_path_factory.mktemp("mt") / "multiturn.json"
    f.write_text(json.dumps(recs, ensure_ascii=False), encoding="utf-8")
    return f


def _same_training(a: Path, b: Path, tol: float) -> None:
    la = {r["step"]: r["loss"] for r in metrics(a) if "loss" in r}
    lb = {r["step"]: r["loss"] for r in metrics(b) if "loss" in r}
    assert sorted(la) == sorted(lb) and len(la) >= 4
    for s in la:
        assert la[s] == pytest.approx(lb[s], rel=tol), (s, la[s], lb[s])
    ta, tb = adapter_tensors(a / "adapter"), adapter_tensors(b / "adapter")
    assert set(ta) == set(tb)
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=tol, atol=tol)


def _run(out: Path, data: Path, world: int, ds: str, *extra: str):
    return launch(["--config", TINY, f"data.path={data}", f"deepspeed.config={ds}", f"output.dir={out}",
                   "train.epochs=1", "train.lr=3e-3", "train.log_every=1", "train.micro_batch_size=2",
                   "train.grad_accum=2", "train.precision=fp32",
                   "data.max_length=192", *extra], nproc=world)


CONFIGS = [(1, "zero0", 4), (2, "zero2", 2), (2, "zero3", 2)]
"""(ranks, ZeRO config, accumulation): global batch 8 (micro-batch 2) everywhere, so every run trains the same
examples in each step and one unpacked run is the baseline of all three packed ones."""


@pytest.mark.parametrize("model_type", ["bloom", "llama", "qwen2", "mistral", "gpt_neox"])
def test_packed_and_unpacked_runs_train_alike(model_type: str, family_models: dict, tiny_model: Path,
                                              multiturn: Path, tmp_path: Path) -> None:
    """The exactness matrix, per family: packed runs on 1 process ZeRO-0 and 2 ranks ZeRO-2 and ZeRO-3, on records
    of which a third are single-turn and the rest multi-turn (the batches mix both), each against the unpacked
    run over the same examples: per-step losses within 1e-6, final vectors within 1e-5. Packed rows are fewer
    than the examples, and the efficiency logged is theirs."""
    model = f"model.path={tiny_model if model_type == 'bloom' else family_models[model_type]}"
    plain = tmp_path / "plain"
    check(_run(plain, multiturn, 1, "zero0", model, "train.grad_accum=4"))
    # Bloom on all three; the other families on ZeRO-0 and ZeRO-3 (ZeRO-2 packs the same rows as ZeRO-0 and was
    # matched too; left out for suite time).
    for world, ds, accum in CONFIGS if model_type == "bloom" else [c for c in CONFIGS if c[1] != "zero2"]:
        packed = tmp_path / f"{world}-{ds}-packed"
        proc = check(_run(packed, multiturn, world, ds, model, f"train.grad_accum={accum}", "data.packing=true"))
        assert "packed in rows of" in proc.stdout and "packing efficiency" in proc.stdout
        _same_training(packed, plain, tol=1e-6)
        m = [r for r in metrics(packed) if "loss" in r]
        assert all(r["rows_per_step"] < 8 for r in m)
        assert all(0.5 < r["padding_efficiency"] <= 1.0 for r in m)


def test_packed_run_resumes_exactly(multiturn: Path, tiny_model: Path, tmp_path: Path) -> None:
    """Stopped after step 2 on 2 ranks (ZeRO-2) and resumed: the uninterrupted packed run, step for step."""
    straight, chunked = tmp_path / "straight", tmp_path / "chunked"
    packed = (f"model.path={tiny_model}", "data.packing=true")
    check(_run(straight, multiturn, 2, "zero2", *packed))
    check(_run(chunked, multiturn, 2, "zero2", *packed, "train.stop_after_steps=2"))
    proc = check(_run(chunked, multiturn, 2, "zero2", *packed, "train.resume=auto"))
    assert "resuming from" in proc.stdout
    _same_training(chunked, straight, tol=1e-6)


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "length-grouped"])
def test_compiled_run_stops_compiling_after_warm_up(tmp_path: Path, packing: bool) -> None:
    """train.compile on packed rows: the width is fixed and the row count changes; the blocks are compiled
    shape-generic at the first step, once more for a one-row micro-step (dynamo specializes size 1), and nothing
    recompiles after that (graph count logged every step). Length-grouped padded batches: the padded length
    changes every step; dynamo recompiles once, shape-generic, when it first changes, and never after."""
    out = tmp_path / "compiled"
    # Inductor for the packed rows (the compiled setup the README recommends), aot_eager for the padded batches:
    # the same graph capture and recompiles, without a minute of C++ code generation.
    check(launch(["--config", TINY, "deepspeed.config=zero2", f"output.dir={out}", "train.max_steps=10",
                  "train.log_every=1", f"data.packing={str(packing).lower()}", "train.compile=true",
                  f"train.compile_backend={'inductor' if packing else 'aot_eager'}", "checkpoint.at_end=false"]))
    m = [r for r in metrics(out) if "loss" in r]
    graphs = [r["compiled_graphs"] for r in m]
    if packing:
        shapes = {r["rows_per_step"] for r in m}
    else:
        shapes = {round(r["padded_tokens_per_s"] * r["step_time_s"] / r["rows_per_step"]) for r in m}
    assert len(shapes) > 1, shapes  # the row count (packed) or the padded length did change
    assert graphs[0] > 0 and graphs[-1] == graphs[4], graphs
