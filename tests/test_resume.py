"""Checkpoints: small (trainable state only), atomic, exactly resumable on 2 gloo ranks (ZeRO-2 and ZeRO-3, across
an epoch boundary), keep-K pruning, a refused world-size change, and the output-dir guard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _util import adapter_tensors, check, launch, metrics

from ia3_dist.runtime.checkpoint import complete_checkpoints, dir_size, latest

pytestmark = pytest.mark.slow
TINY = "configs/tiny-cpu.yaml"
# 80 examples / global batch 16 = 5 steps per epoch, 2 epochs = 10 steps.
RUN = ["data.limit=80", "train.epochs=2", "train.log_every=1"]


def run2(out: Path, *extra: str, ds: str = "zero2", env: dict | None = None):
    return launch(["--config", TINY, f"deepspeed.config={ds}", f"output.dir={out}", *RUN, *extra], nproc=2,
                  env=env)


def assert_same_training(a: Path, b: Path, tol: float = 1e-6) -> None:
    la = {r["step"]: r["loss"] for r in metrics(a)}
    lb = {r["step"]: r["loss"] for r in metrics(b)}
    assert sorted(la) == sorted(lb) == list(range(1, 11))
    for s in la:
        assert la[s] == pytest.approx(lb[s], rel=tol, abs=1e-6), (s, la[s], lb[s])
    ta, tb = adapter_tensors(a / "adapter"), adapter_tensors(b / "adapter")
    assert set(ta) == set(tb)
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=tol, atol=tol)


class _Straight(dict):
    """Uninterrupted reference runs, each run the first time a test asks for its ZeRO stage."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        super().__init__()
        self.tmp = tmp_path_factory

    def __missing__(self, ds: str) -> Path:
        out = self.tmp.mktemp(f"straight-{ds}")
        check(run2(out, ds=ds))
        self[ds] = out
        return out


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> dict[str, Path]:
    return _Straight(tmp_path_factory)


def test_auto_micro_batch_steps_down_on_every_rank_and_resumes_exactly(straight: dict[str, Path],
                                                                       tmp_path: Path) -> None:
    """train.micro_batch_size=auto with 8 examples per rank per step: the plan picks 8; rank 1's probe runs out of
    memory there (injected), so both ranks agree on 4 x 2 accumulation, the straight zero2 run's layout. Stopped
    at step 3 and resumed with auto (the checkpoint's micro-batch, no probe), it must reproduce that run exactly:
    the probe leaves no trace in the training."""
    out = tmp_path / "auto"
    auto = ("train.micro_batch_size=auto", "train.grad_accum=8")
    proc = check(run2(out, *auto, "train.stop_after_steps=3", env={"IA3_DIST_FAULT": "probe:8:1:oom"}))
    assert "train.micro_batch_size=auto: 4 x 2 accumulation = 8 examples per rank per step (plan picked 8" \
        in proc.stdout, proc.stdout[-3000:]
    ds = json.loads((out / "ds_config.json").read_text())
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) \
        == (4, 2, 16)
    run = (out / "run.yaml").read_text()
    assert "micro_batch_size: 4\n" in run and "grad_accum: 2\n" in run
    proc = check(run2(out, *auto, "train.resume=auto"))
    assert "4 x 2 accumulation = 8 examples per rank per step (from the checkpoint it resumes)" in proc.stdout
    assert_same_training(out, straight["zero2"])


@pytest.mark.parametrize("ds, first_chunk", [("zero2", 3), ("zero3", 5)])
def test_resume_is_exact(straight: dict[str, Path], tmp_path: Path, ds: str, first_chunk: int) -> None:
    """zero2 stops mid-epoch 0 and the resumed run crosses the epoch boundary; zero3 stops exactly on it."""
    out = tmp_path / "chunked"
    proc = check(run2(out, f"train.stop_after_steps={first_chunk}", ds=ds))
    assert f"stopped after step {first_chunk} of 10" in proc.stdout
    assert latest(out / "checkpoints").name == f"step{first_chunk}"
    meta = json.loads((out / "checkpoints" / f"step{first_chunk}" / "meta.json").read_text())
    assert meta["step"] == first_chunk and meta["world_size"] == 2
    proc = check(run2(out, "train.resume=auto", ds=ds))
    assert f"resuming from {out / 'checkpoints' / f'step{first_chunk}'}" in proc.stdout
    assert_same_training(out, straight[ds])


@pytest.mark.parametrize("ds", ["zero2", "zero3"])
def test_checkpoint_size_follows_trainable_params(tmp_path: Path, demo_model: Path, ds: str) -> None:
    """Two bases with the same IA3 parameters, one 3x larger (a wider vocabulary): same checkpoint size."""
    from transformers import AutoModelForCausalLM

    big = tmp_path / "big"
    m = AutoModelForCausalLM.from_pretrained(str(demo_model))
    m.resize_token_embeddings(16000, mean_resizing=False)
    m.save_pretrained(str(big))
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(demo_model)).save_pretrained(str(big))
    sizes = {}
    for name, path in (("small", str(demo_model)), ("big", str(big))):
        out = tmp_path / name
        check(run2(out, f"model.path={path}", "train.max_steps=2", ds=ds))
        (ck,) = complete_checkpoints(out / "checkpoints")
        sizes[name] = dir_size(ck)
    base_small = sum(f.stat().st_size for f in demo_model.glob("*.safetensors"))
    base_big = sum(f.stat().st_size for f in big.glob("*.safetensors"))
    assert base_big > 2.5 * base_small
    assert abs(sizes["big"] - sizes["small"]) < 0.02 * sizes["small"], sizes
    # 3,584 trainable fp32 params + Adam moments + master copy: tens of KB, never the base's megabytes.
    assert sizes["small"] < base_small / 4, (sizes, base_small)


def test_kill_during_save_keeps_previous_checkpoint(straight: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "killed"
    proc = run2(out, "checkpoint.every=2", env={"IA3_DIST_FAULT": "save:4:1"})
    assert proc.returncode != 0
    root = out / "checkpoints"
    assert latest(root).name == "step2"
    assert [c.name for c in complete_checkpoints(root)] == ["step2"]  # step4 never completed
    check(run2(out, "checkpoint.every=2", "train.resume=auto"))
    assert_same_training(out, straight["zero2"])


def test_keep_last_k(tmp_path: Path) -> None:
    out = tmp_path / "keep"
    check(run2(out, "checkpoint.every=1", "checkpoint.keep=2", "train.max_steps=5"))
    assert [c.name for c in complete_checkpoints(out / "checkpoints")] == ["step4", "step5"]
    assert latest(out / "checkpoints").name == "step5"


def test_changed_world_size_is_refused(straight: dict[str, Path], tmp_path: Path) -> None:
    src = straight["zero2"]
    proc = launch(["--config", TINY, "deepspeed.config=zero2", f"output.dir={src}", *RUN, "train.resume=auto"])
    assert proc.returncode == 2
    assert "world_size=2" in proc.stderr and "this run has 1" in proc.stderr
    # And the other way: a 1-rank checkpoint is not resumed on 2 ranks, and stays as it was.
    one = tmp_path / "one"
    check(launch(["--config", TINY, "deepspeed.config=zero2", f"output.dir={one}", *RUN,
                  "train.stop_after_steps=2"]))
    before = sorted(p.name for p in (one / "checkpoints").iterdir())
    proc = run2(one, "train.resume=auto")
    assert proc.returncode == 2
    assert "world_size=1" in proc.stderr and "this run has 2" in proc.stderr
    assert sorted(p.name for p in (one / "checkpoints").iterdir()) == before


@pytest.mark.parametrize("change, key, saved, now", [
    (["train.seed=7"], "seed", 42, 7),
    # Another batch layout with the same global batch (2 ranks x 2 x 4 instead of 2 ranks x 4 x 2).
    (["train.micro_batch_size=2", "train.grad_accum=4"], "micro_batch_size", 4, 2),
    (["data.shuffle=false"], "shuffle", True, False),
    # Another dataset of the same size: one answer edited.
    (["data.path=EDITED"], "data_key", None, None),
])
def test_changed_layout_seed_or_data_is_refused(straight: dict[str, Path], tmp_path: Path, change: list[str],
                                                key: str, saved: object, now: object) -> None:
    """The real checkpoint of a 2-rank run, resumed by the real preflight of a 2-rank run with one thing changed:
    refused before any process group starts, naming what differs."""
    from ia3_dist.config import load_config
    from ia3_dist.errors import UsageError
    from ia3_dist.runtime.dist import DistEnv
    from ia3_dist.train.demo import ensure_data
    from ia3_dist.train.prepare import prepare

    if change == ["data.path=EDITED"]:
        records = json.loads(ensure_data(None).read_text(encoding="utf-8"))
        records[0]["output"] += "。"
        edited = tmp_path / "edited.json"
        edited.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
        change = [f"data.path={edited}"]
    src = straight["zero2"]
    cfg = load_config(TINY, ["deepspeed.config=zero2", f"output.dir={src}", *RUN, "train.resume=auto", *change])
    before = sorted(p.name for p in (src / "checkpoints").iterdir())
    with pytest.raises(UsageError) as e:
        prepare(cfg, DistEnv(rank=0, local_rank=0, world_size=2, local_world_size=2))
    msg = str(e.value)
    assert f"saved with {key}=" in msg and "this run has" in msg, msg
    if saved is not None:
        assert f"saved with {key}={saved}" in msg and f"this run has {now}" in msg, msg
    assert sorted(p.name for p in (src / "checkpoints").iterdir()) == before
    # The unchanged run is accepted by the same preflight (so each refusal above is the change's).
    ok = load_config(TINY, ["deepspeed.config=zero2", f"output.dir={src}", *RUN, "train.resume=auto"])
    assert prepare(ok, DistEnv(rank=0, local_rank=0, world_size=2, local_world_size=2)).resume_from is not None


def test_output_dir_guard(straight: dict[str, Path], tmp_path: Path) -> None:
    src = straight["zero2"]
    before = sorted(p.name for p in (src / "checkpoints").iterdir())
    proc = run2(src, "output.overwrite=false")  # the demo config starts over by default
    assert proc.returncode == 2 and "holds another run's checkpoints" in proc.stderr
    assert sorted(p.name for p in (src / "checkpoints").iterdir()) == before
    # Resuming a finished run does no more steps and rewrites the same adapter.
    ad = adapter_tensors(src / "adapter")
    check(run2(src, "train.resume=auto"))
    for k, v in adapter_tensors(src / "adapter").items():
        assert torch.equal(v, ad[k])
