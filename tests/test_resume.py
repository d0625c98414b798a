"""Checkpoints: small (trainable state only), atomic, exactly resumable on 2 gloo ranks (ZeRO-2 and ZeRO-3, across
an epoch boundary), resumable on another allocation with the same global batch (1 <-> 2 ranks, another ZeRO stage,
into another output dir), keep-K pruning, refused changes of the global batch and the run, and the output-dir
guard."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from _util import adapter_tensors, check, launch, metrics

from ia3_dist.runtime.checkpoint import complete_checkpoints, dir_size, latest, read_meta

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
    the probe leaves no trace in the training. (Also the exact ZeRO-2 resume on the same allocation: stopped
    mid-epoch 0, the resumed run crosses the epoch boundary; test_resume_is_exact has ZeRO-3's, stopped on it.)"""
    out = tmp_path / "auto"
    auto = ("train.micro_batch_size=auto", "train.grad_accum=8")
    proc = check(run2(out, *auto, "train.stop_after_steps=3", env={"IA3_DIST_FAULT": "probe:8:1:oom"}))
    assert "stopped after step 3 of 10" in proc.stdout, proc.stdout[-3000:]
    assert latest(out / "checkpoints").name == "step3"
    meta = json.loads((out / "checkpoints" / "step3" / "meta.json").read_text())
    assert meta["step"] == 3 and meta["world_size"] == 2
    assert "train.micro_batch_size=auto: 4 x 2 accumulation = 8 examples per rank per step (plan picked 8" \
        in proc.stdout, proc.stdout[-3000:]
    ds = json.loads((out / "ds_config.json").read_text())
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) \
        == (4, 2, 16)
    run = (out / "run.yaml").read_text()
    assert "micro_batch_size: 4\n" in run and "grad_accum: 2\n" in run
    proc = check(run2(out, *auto, "train.resume=auto"))
    assert "4 x 2 accumulation = 8 examples per rank per step (from the checkpoint it resumes)" in proc.stdout
    assert f"resuming from {out / 'checkpoints' / 'step3'}" in proc.stdout
    assert_same_training(out, straight["zero2"])


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(out) if "loss" in r}


def assert_continues(straight: Path, resumed: Path, first: int, tol: float = 1e-5) -> None:
    """``resumed`` logged steps ``first``..10 and ended on ``straight``'s adapter, both within ``tol`` (relative:
    another cut of the global batch sums in another order)."""
    a, b = losses(straight), losses(resumed)
    assert sorted(b) == list(range(first, 11)), sorted(b)
    for s in b:
        assert b[s] == pytest.approx(a[s], rel=tol), (s, a[s], b[s])
    ta, tb = adapter_tensors(straight / "adapter"), adapter_tensors(resumed / "adapter")
    assert set(ta) == set(tb)
    for k in ta:
        torch.testing.assert_close(tb[k], ta[k], rtol=tol, atol=tol * float(ta[k].abs().max()))


def examples_by_step(*outs: Path) -> dict[int, list[int]]:
    """examples.jsonl of one or more output dirs (an interrupted run's pieces), by step; a step twice is an error."""
    got: dict[int, list[int]] = {}
    for out in outs:
        for line in (out / "examples.jsonl").read_text().splitlines():
            r = json.loads(line)
            assert r["step"] not in got, f"step {r['step']} logged twice"
            got[r["step"]] = r["examples"]
    return got


def assert_each_example_once_per_epoch(got: dict[int, list[int]], n: int = 80, per_epoch: int = 5) -> None:
    assert sorted(got) == list(range(1, 11))
    for epoch in range(2):
        used = [i for s in range(epoch * per_epoch + 1, (epoch + 1) * per_epoch + 1) for i in got[s]]
        assert sorted(used) == list(range(n)), (epoch, sorted(used))


# global batch 16 on either allocation: 2 ranks x 4 x 2, or 1 rank x 4 x 4.
G16 = ("train.global_batch_size=16", "output.log_examples=true")


@pytest.mark.parametrize("ds, k", [("zero2", 3), ("zero3", 5)])
def test_resume_on_another_allocation(straight: dict[str, Path], tmp_path: Path, ds: str, k: int) -> None:
    """B: 2 ranks stopped by SIGTERM at step k, resumed on 1 rank (twice the accumulation). C: 1 rank stopped at step
    k, continued on 2 ranks in a new output dir from C's checkpoint. Both end on the uninterrupted 2-rank run A's
    adapter, with A's losses after the resume, and every example of each epoch is used exactly once across the
    pieces (examples.jsonl). Under zero2, B's checkpoint also continues on 1 rank under ZeRO-3 (a stage change)."""
    import shutil

    a = straight[ds]
    b = tmp_path / "b"
    proc = run2(b, *G16, ds=ds, env={"IA3_DIST_FAULT": f"step:{k + 1}:1:term"})
    assert proc.returncode == 75, proc.stderr[-3000:]
    assert latest(b / "checkpoints").name == f"step{k}"
    saved = shutil.copytree(b / "checkpoints" / f"step{k}", tmp_path / "saved" / f"step{k}")
    proc = check(launch(["--config", TINY, f"deepspeed.config={ds}", f"output.dir={b}", *RUN, *G16,
                         "train.resume=auto"]))
    assert f"resuming step {k} saved on 2 ranks, now on 1 ranks (saved as 2 ranks x micro-batch 4 x 2 " \
           f"accumulation, ZeRO-{ds[-1]}, now 1 rank x micro-batch 4 x 4 accumulation" in proc.stdout, proc.stdout
    assert json.loads((b / "ds_config.json").read_text())["gradient_accumulation_steps"] == 4
    assert_continues(a, b, 1)
    assert_each_example_once_per_epoch(examples_by_step(b))

    c, c2 = tmp_path / "c", tmp_path / "c2"
    proc = launch(["--config", TINY, f"deepspeed.config={ds}", f"output.dir={c}", *RUN, *G16],
                  env={"IA3_DIST_FAULT": f"step:{k + 1}:0:term"})
    assert proc.returncode == 75, proc.stderr[-3000:]
    proc = check(run2(c2, *G16, f"train.resume={c / 'checkpoints' / f'step{k}'}", ds=ds))
    assert f"resuming step {k} saved on 1 ranks, now on 2 ranks" in proc.stdout, proc.stdout
    assert_continues(a, c2, k + 1)
    assert_each_example_once_per_epoch(examples_by_step(c, c2))
    # The new dir holds its own checkpoints; the one it started from is untouched.
    assert latest(c2 / "checkpoints").name == "step10" and latest(c / "checkpoints").name == f"step{k}"

    if ds == "zero2":
        # Continued in a new dir and stopped before its first step: the step is saved there (it is not that dir's
        # own checkpoint), and resume=auto in it goes on from it.
        d = tmp_path / "d"
        dargs = ["--config", TINY, "deepspeed.config=zero3", f"output.dir={d}", *RUN, *G16]
        proc = launch([*dargs, f"train.resume={saved}"], env={"IA3_DIST_FAULT": f"step:{k + 1}:0:term"})
        assert proc.returncode == 75, proc.stderr[-3000:]
        assert "now 1 rank x micro-batch 4 x 4 accumulation, ZeRO-3" in proc.stdout, proc.stdout
        assert latest(d / "checkpoints").name == f"step{k}", (proc.stdout + proc.stderr)[-3000:]
        proc = check(launch([*dargs, "train.resume=auto"]))
        assert f"resuming step {k} saved on 1 ranks, now on 1 ranks" in proc.stdout, proc.stdout
        assert_continues(a, d, k + 1)


def test_checkpoint_of_an_earlier_version_resumes_on_its_layout(straight: dict[str, Path], tmp_path: Path) -> None:
    """A checkpoint as earlier versions wrote it (no layout-independent files, no meta keys added since) still
    resumes on its own layout, exactly; on another layout it is refused, naming the layout it needs."""
    from ia3_dist.config import load_config
    from ia3_dist.errors import UsageError
    from ia3_dist.runtime.checkpoint import RECORDED_SINCE_2
    from ia3_dist.runtime.dist import DistEnv
    from ia3_dist.train.prepare import prepare

    out = tmp_path / "old"
    check(run2(out, "train.stop_after_steps=3"))
    # A chunk's adapter says the run has not ended: summary calls it stopped, and sweep --local runs it again.
    from ia3_dist.runtime.adapter import STEP_FILE
    from ia3_dist.tools.summary import run_status

    rec = json.loads((out / "adapter" / STEP_FILE).read_text())
    # The base weights' fingerprint, as the checkpoints record it: generate/export/eval check the base dir by it.
    assert rec == {"step": 3, "final": False, "base_weights": read_meta(out / "checkpoints" / "step3")["base_weights"]}
    assert re.fullmatch("v1-[0-9a-f]{16}", rec["base_weights"])
    assert run_status(out) == "stopped"
    ck = out / "checkpoints" / "step3"
    for f in ("ia3_state.safetensors", "ia3_state.json"):
        (ck / f).unlink()
    meta = json.loads((ck / "meta.json").read_text())
    for key in (*RECORDED_SINCE_2, "global_batch", "examples_consumed"):
        meta.pop(key)
    (ck / "meta.json").write_text(json.dumps(meta))
    cfg = load_config(TINY, ["deepspeed.config=zero2", f"output.dir={out}", *RUN, "train.resume=auto",
                             "train.global_batch_size=16"])
    with pytest.raises(UsageError, match="no layout-independent state .* resumes only on its own layout: 2 ranks x "
                                         "micro-batch 4 x 2 accumulation"):
        prepare(cfg, DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1))
    check(run2(out, "train.resume=auto"))
    assert_same_training(out, straight["zero2"])


@pytest.mark.parametrize("ds, first_chunk", [("zero3", 5)])
def test_resume_is_exact(straight: dict[str, Path], tmp_path: Path, ds: str, first_chunk: int) -> None:
    """zero3 stops exactly on the epoch boundary (ZeRO-2's resume, stopped mid-epoch 0 and crossing the boundary,
    is test_auto_micro_batch_steps_down_on_every_rank_and_resumes_exactly's)."""
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


def test_roll_back_past_the_runs_own_checkpoints(tmp_path: Path) -> None:
    """train.resume=<an earlier stepN> in a run dir that holds later checkpoints: exit 2 before anything starts,
    naming them, nothing touched; with them moved away as the message says, the run goes on from there with the
    uninterrupted run's losses and its own checkpoints (the rotation would have deleted those first)."""
    out = tmp_path / "run"
    run = ["--config", TINY, "deepspeed.config=zero2", f"output.dir={out}", *RUN, "train.max_steps=6",
           "checkpoint.every=2", "checkpoint.keep=2"]
    check(launch(run))
    first = {r["step"]: r["loss"] for r in metrics(out) if "loss" in r}
    root = out / "checkpoints"
    # keep=2 keeps the last two (a checkpoint every 2 steps): step2 rotated out.
    assert [c.name for c in complete_checkpoints(root)] == ["step4", "step6"]
    assert latest(root).name == "step6"
    before = sorted(str(p) for p in out.rglob("*"))
    proc = launch([*run, f"train.resume={root / 'step4'}"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"resumes at step 4, but {root} holds checkpoints past it (step6)" in proc.stderr, proc.stderr[-2000:]
    assert sorted(str(p) for p in out.rglob("*")) == before
    # The advice in full: move them out, and point latest back (a requeue before the first save reads it).
    assert f"echo step4 > {root}/latest" in proc.stderr, proc.stderr[-2000:]
    (root / "step6").rename(tmp_path / "step6")
    (root / "latest").write_text("step4\n")
    assert latest(root).name == "step4"
    check(launch([*run, f"train.resume={root / 'step4'}"]))
    again = {r["step"]: r["loss"] for r in metrics(out) if "loss" in r}
    assert sorted(again) == list(range(1, 7))
    for s in (5, 6):
        assert again[s] == pytest.approx(first[s], rel=1e-6)
    assert [c.name for c in complete_checkpoints(root)] == ["step4", "step6"] and latest(root).name == "step6"


def test_changed_global_batch_is_refused(straight: dict[str, Path], tmp_path: Path) -> None:
    """Another number of ranks with the same micro-batch and accumulation changes the global batch: refused with exit
    2 before any process group, naming both layouts and the key that keeps the batch."""
    src = straight["zero2"]
    proc = launch(["--config", TINY, "deepspeed.config=zero2", f"output.dir={src}", *RUN, "train.resume=auto"])
    assert proc.returncode == 2
    assert "saved with a global batch of 16 examples per step (2 ranks x micro-batch 4 x 2 accumulation, ZeRO-2)" \
        in proc.stderr and "this run has 8 (1 rank x micro-batch 4 x 2 accumulation" in proc.stderr, proc.stderr
    assert "train.global_batch_size=16" in proc.stderr
    # And the other way: a 1-rank checkpoint is not resumed on 2 ranks at a doubled batch, and stays as it was.
    one = tmp_path / "one"
    check(launch(["--config", TINY, "deepspeed.config=zero2", f"output.dir={one}", *RUN,
                  "train.stop_after_steps=2"]))
    before = sorted(p.name for p in (one / "checkpoints").iterdir())
    proc = run2(one, "train.resume=auto")
    assert proc.returncode == 2
    assert "global batch of 8 examples per step" in proc.stderr and "this run has 16" in proc.stderr
    assert sorted(p.name for p in (one / "checkpoints").iterdir()) == before


@pytest.mark.parametrize("change, key, saved, now", [
    (["train.seed=7"], "seed", 42, 7),
    (["train.lr=0.1"], "schedule", None, None),
    (["train.precision=bf16"], "precision", "'fp32'", "'bf16'"),
    (["ia3.variant=paper"], "ia3", None, None),
    (["data.shuffle=false"], "shuffle", True, False),
    # Another dataset of the same size: one answer edited.
    (["data.path=EDITED"], "data_key", None, None),
    # The base model's dir with other weights of the same architecture (one tensor's first value changed).
    (["model.path=RETRAINED"], "base_weights", None, None),
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
    if change == ["model.path=RETRAINED"]:
        from safetensors.torch import load_file, save_file

        from ia3_dist.train.demo import ensure_assets

        other = tmp_path / "retrained"
        shutil.copytree(ensure_assets(None) / "model", other)
        tensors = load_file(other / "model.safetensors")
        name = sorted(tensors)[-1]
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[0] += 0.5
        save_file(tensors, other / "model.safetensors", metadata={"format": "pt"})
        change = [f"model.path={other}"]
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
    if key == "base_weights":
        assert "checkpoint.check_base_weights=false resumes" in msg, msg
        told = load_config(TINY, ["deepspeed.config=zero2", f"output.dir={src}", *RUN, "train.resume=auto", *change,
                                  "checkpoint.check_base_weights=false"])
        p = prepare(told, DistEnv(rank=0, local_rank=0, world_size=2, local_world_size=2))
        saved_fp = read_meta(p.resume_from)["base_weights"]
        assert p.meta["base_weights"] != saved_fp
        assert (f"on other base weights than the checkpoint's (fingerprint {saved_fp}, now {p.meta['base_weights']}), "
                f"as checkpoint.check_base_weights=false allows") in p.resume_line, p.resume_line
    # The unchanged run is accepted by the same preflight (so each refusal above is the change's), on its own
    # layout with DeepSpeed's files, and cut otherwise (2 x 4 instead of 4 x 2, ZeRO-3) with the portable state.
    ok = load_config(TINY, ["deepspeed.config=zero2", f"output.dir={src}", *RUN, "train.resume=auto"])
    p = prepare(ok, DistEnv(rank=0, local_rank=0, world_size=2, local_world_size=2))
    assert p.resume_from is not None and not p.resume_portable
    cut = load_config(TINY, ["deepspeed.config=zero3", f"output.dir={src}", *RUN, "train.resume=auto",
                             "train.micro_batch_size=2", "train.grad_accum=4"])
    p = prepare(cut, DistEnv(rank=0, local_rank=0, world_size=2, local_world_size=2))
    assert p.resume_portable and "now 2 ranks x micro-batch 2 x 4 accumulation, ZeRO-3" in p.resume_line


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


def test_mixed_precision_zero0_checkpoint_moves_to_another_layout(tmp_path: Path) -> None:
    """bf16 under ZeRO-0 keeps its fp32 masters in DeepSpeed's FP16 optimizer (one copy per parameter), not in ZeRO's
    partitions: its checkpoint continues on 2 ranks under ZeRO-2 with the 1-rank run's losses, within what bf16
    itself moves between layouts (two uninterrupted bf16 runs, 1 and 2 ranks, differ by up to 2e-3 here)."""
    bf16 = ("train.precision=bf16", "train.global_batch_size=16", "checkpoint.every=3", "checkpoint.keep=2")
    one = tmp_path / "one"
    check(launch(["--config", TINY, "deepspeed.config=zero0", f"output.dir={one}", *RUN, *bf16,
                  "train.stop_after_steps=5"]))
    two = tmp_path / "two"
    proc = check(run2(two, *bf16, f"train.resume={one / 'checkpoints' / 'step3'}", "train.stop_after_steps=2"))
    assert "resuming step 3 saved on 1 ranks, now on 2 ranks" in proc.stdout and "ZeRO-0, now 2 ranks" in proc.stdout
    a, b = losses(one), losses(two)
    assert sorted(b) == [4, 5]
    for s in b:
        assert b[s] == pytest.approx(a[s], rel=1e-2), (s, a[s], b[s])


def _events(log: Path) -> list[list[str]]:
    return [json.loads(ln) for ln in log.read_text().splitlines()]


def _flushed_before(events: list[list[str]], path: Path, publish: list[str], directory: bool = False) -> None:
    """``path`` was flushed (every file under it, with ``directory``: and it) before the rename ``publish``."""
    at = events.index(publish)
    flushed = {e[1] for e in events[:at] if e[0] == "fsync"}
    assert str(path) in flushed, f"{path} not flushed before {publish}"


def test_saves_are_flushed_before_they_are_published(tmp_path: Path) -> None:
    """A node that crashes after a save was reported must not come back with a checkpoint or an adapter whose
    files are empty: every file of a checkpoint (both ranks', flushed by local rank 0), meta.json and the dir's
    names are on stable storage before ``stepN.new`` is renamed to ``stepN``; the pointer's file before it moves;
    the checkpoints dir after both renames. The adapter likewise through ``adapter.new`` (with its tokenizer and
    template), and on a second run the one it replaces goes to ``adapter.old`` and is gone after."""
    out, log = tmp_path / "run", tmp_path / "events"
    run = ["--config", TINY, "deepspeed.config=zero2", f"output.dir={out}", *RUN, "checkpoint.every=1",
           "checkpoint.keep=1", "train.stop_after_steps=2"]
    check(launch(run, nproc=2, script="tests/probe_durable.py", env={"IA3_TEST_EVENTS": str(log)}))
    events = _events(Path(f"{log}.0"))
    root = out / "checkpoints"
    for step in (1, 2):
        new, d = root / f"step{step}.new", root / f"step{step}"
        publish = ["rename", str(new), str(d)]
        files = [f.name for f in (d.iterdir() if d.is_dir() else [])] or ["meta.json"]
        if step == 2:  # the one kept: its files, both ranks' optimizer states among them
            assert len([f for f in files if "optim_states" in f]) == 2, files
        for f in files:
            _flushed_before(events, new / (f + ".tmp" if f == "meta.json" else f), publish)
        at = events.index(publish)
        meta = events.index(["rename", str(new / "meta.json.tmp"), str(new / "meta.json")])
        assert ["fsync", str(new)] in events[meta:at], "meta.json's name flushed before the dir moves"
        pointer = ["rename", str(root / "latest.tmp"), str(root / "latest")]
        moved = next(i for i, e in enumerate(events) if i > at and e == pointer)
        _flushed_before(events, root / "latest.tmp", pointer)
        assert ["fsync", str(root)] in events[moved:], f"step{step}: the renames flushed"
    other = Path(f"{log}.1")  # local rank 1 flushes nothing: local rank 0 did its files
    assert not other.exists() or not any(e[0] == "fsync" for e in _events(other))

    adapter, staged = out / "adapter", out / "adapter.new"
    publish = ["rename", str(staged), str(adapter)]
    for f in adapter.iterdir():
        _flushed_before(events, staged / f.name, publish)
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= {f.name for f in
                                                                                       adapter.iterdir()}
    assert ["fsync", str(out)] in events[events.index(publish):]

    # Continued: the new adapter replaces the first one, which is gone after.
    first = (adapter / "adapter_model.safetensors").read_bytes()
    log.with_name("events.0").unlink()
    check(launch([*run, "train.resume=auto"], nproc=2, script="tests/probe_durable.py",
                 env={"IA3_TEST_EVENTS": str(log)}))
    events = _events(Path(f"{log}.0"))
    aside = next(i for i, e in enumerate(events) if e[:2] == ["rename", str(adapter)])
    assert re.fullmatch(r"adapter\.old\.[0-9a-f]{12}", Path(events[aside][2]).name), events[aside]
    assert aside < events.index(publish)
    assert (adapter / "adapter_model.safetensors").read_bytes() != first
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("adapter")) == ["adapter"]


def test_zero3_resume_on_a_world_that_does_not_divide_the_vectors(tmp_path: Path) -> None:
    """Saved on 1 rank (ZeRO-2), resumed on 3 under ZeRO-3: the 512-wide dense_4h_to_h vectors split into shares of
    171 padded to 513, which DeepSpeed's set-full API cut past the end on the last rank (a crash there, the other
    ranks left in the gather). It continues the uninterrupted run (same global batch of 12)."""
    run = ["--config", TINY, *RUN, "train.global_batch_size=12", "train.max_steps=6"]
    a, b = tmp_path / "a", tmp_path / "b"
    check(launch([*run, "deepspeed.config=zero2", f"output.dir={a}"]))
    check(launch([*run, "deepspeed.config=zero2", f"output.dir={b}", "train.stop_after_steps=3"]))
    proc = check(launch([*run, "deepspeed.config=zero3", f"output.dir={b}", "train.resume=auto"], nproc=3))
    assert "resuming step 3 saved on 1 ranks, now on 3 ranks" in proc.stdout, proc.stdout[-3000:]
    la, lb = losses(a), losses(b)
    assert sorted(lb) == list(range(1, 7)), sorted(lb)
    for s in range(4, 7):
        assert lb[s] == pytest.approx(la[s], rel=1e-5), (s, la[s], lb[s])
    ta, tb = adapter_tensors(a / "adapter"), adapter_tensors(b / "adapter")
    for k in ta:
        torch.testing.assert_close(tb[k], ta[k], rtol=1e-5, atol=1e-5 * float(ta[k].abs().max()))


def test_examples_log_survives_a_kill_after_a_checkpoint(tmp_path: Path) -> None:
    """output.log_examples is buffered; a kill with no cleanup (SIGKILL, the hang watchdog's exit) after a
    checkpoint lost the lines of the steps it covers, which the resume, starting after it, never writes again.
    They are on disk before the checkpoint is: killed at step 6 after the step-4 save, the log holds steps 1-4,
    and with the resume every example of each epoch exactly once."""
    out = tmp_path / "k"
    args = ["--config", TINY, "deepspeed.config=zero2", f"output.dir={out}", *RUN, *G16, "checkpoint.every=2",
            "train.log_every=3", "data.eval_ratio=0.1", "train.eval_every=4"]
    proc = launch(args, env={"IA3_DIST_FAULT": "step:6:0:kill"})
    assert proc.returncode == -9, (proc.returncode, proc.stderr[-2000:])
    assert latest(out / "checkpoints").name == "step4"
    assert set(range(1, 5)) <= set(examples_by_step(out))
    assert [r["step"] for r in metrics(out) if "loss" in r] == [1, 3]  # step 4's line was still to come
    check(launch([*args, "train.resume=auto"]))
    assert_each_example_once_per_epoch(examples_by_step(out), n=72)
    # Step 4 trained before the checkpoint and was in no training line (its evaluation's line is there): the
    # checkpoint carried its open window, and the resume wrote its line (every step's loss is in some line); a
    # second resume from it would not write it again.
    steps = [r["step"] for r in metrics(out) if "loss" in r]
    assert steps == [1, 3, 4, 5, 6, 9, 10], steps


def test_a_preference_run_killed_after_a_checkpoint_resumes_with_its_window_line(tmp_path: Path) -> None:
    """DPO on 2 ranks, killed after a checkpoint whose step had no training line yet: the resume writes that line
    from the checkpoint, reward metrics included (every rank recorded them at the save; reducing them on rank 0
    alone at the resume waited for ever on the others), and trains on."""
    out = tmp_path / "dpo"
    args = ["--config", "configs/tiny-dpo-cpu.yaml", f"output.dir={out}", "train.max_steps=6", "checkpoint.every=2",
            "train.log_every=3", "data.limit=64"]
    proc = launch(args, nproc=2, env={"IA3_DIST_FAULT": "step:4:0:kill"})
    assert proc.returncode != 0 and latest(out / "checkpoints").name == "step2", proc.stderr[-2000:]
    check(launch([*args, "train.resume=auto"], nproc=2, timeout=300))
    lines = {r["step"]: r for r in metrics(out) if "loss" in r}
    assert sorted(lines) == [1, 2, 3, 6], sorted(lines)
    assert lines[2]["rewards/margins"] == lines[2]["rewards/margins"] and "rewards/accuracies" in lines[2], lines[2]


def test_resume_is_exact_with_dropout_on_every_rank(tmp_path: Path, demo_model: Path) -> None:
    """With dropout, each rank draws from its own RNG stream, and the streams part (a micro-batch's dropout draws
    as many numbers as it has elements, and the ranks' batches differ in length). A resume restores every rank's
    own states, not rank 0's on all of them: the per-step losses equal the uninterrupted run's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    drop = tmp_path / "dropout-model"
    m = AutoModelForCausalLM.from_pretrained(str(demo_model))
    m.config.hidden_dropout = m.config.attention_dropout = 0.1
    m.save_pretrained(str(drop))
    AutoTokenizer.from_pretrained(str(demo_model)).save_pretrained(str(drop))
    args = (f"model.path={drop}", "train.max_steps=6", "train.micro_batch_size=2")
    straight, chunked = tmp_path / "straight", tmp_path / "chunked"
    check(run2(straight, *args))
    check(run2(chunked, *args, "train.stop_after_steps=3"))
    check(run2(chunked, *args, "train.resume=auto"))
    # The same world on another ZeRO stage: the layout-independent state loads, and it carries every rank's
    # generators too (rank 0's on both ranks before).
    staged = tmp_path / "staged"
    check(run2(staged, *args, "train.stop_after_steps=3"))
    proc = check(run2(staged, *args, "train.resume=auto", ds="zero1"))
    assert "layout-independent state from" in proc.stdout, proc.stdout[-2000:]
    a = {r["step"]: r["loss"] for r in metrics(straight)}
    for out in (chunked, staged):
        b = {r["step"]: r["loss"] for r in metrics(out)}
        assert sorted(a) == sorted(b) == list(range(1, 7))
        for s in a:
            assert b[s] == pytest.approx(a[s], rel=1e-6), (out.name, s, a[s], b[s])


def test_auto_micro_batch_chosen_afresh_on_less_memory_keeps_the_checkpoints_order(tmp_path: Path) -> None:
    """A run with micro_batch_size=auto (4 x 2 here, so its examples are grouped by length: group_by_length
    follows the micro-batch unless set) stopped at step 3, resumed where its memory budget fits only micro-batch 1:
    the preflight chooses afresh (the checkpoint recorded the budget it sized against) and resumes from the
    layout-independent state, in the checkpoint's order (grouped), which micro-batch 1 alone would have left."""
    from ia3_dist.config import load_config
    from ia3_dist.models import memory
    from ia3_dist.runtime.dist import DistEnv
    from ia3_dist.train import autobatch
    from ia3_dist.train.prepare import prepare

    out = tmp_path / "auto"
    # group_by_length unset (tiny-cpu.yaml turns it off): it follows the micro-batch.
    auto = ("train.micro_batch_size=auto", "train.grad_accum=8", "data.group_by_length=null")
    proc = check(run2(out, *auto, "train.stop_after_steps=3", env={"IA3_DIST_FAULT": "probe:8:1:oom"}))
    assert "4 x 2 accumulation" in proc.stdout, proc.stdout[-3000:]
    meta = json.loads((out / "checkpoints" / "step3" / "meta.json").read_text())
    assert meta["group_by_length"] is True and meta["micro_batch_size"] == 4 and meta["auto_budget_mib"] > 0
    cfg = load_config(TINY, ["deepspeed.config=zero2", f"output.dir={out}", *RUN, *auto, "train.resume=auto"])
    env = DistEnv(rank=0, local_rank=0, world_size=2, local_world_size=2)
    # The same budget as the checkpoint's run: its micro-batch stays (an exact continuation).
    same = prepare(cfg, env)
    assert (same.auto.micro, same.auto.source) == (4, "checkpoint") and not same.resume_portable
    # A budget between what plan counts for micro-batch 1 and 2 at the data's longest example.
    s = memory.shape_of(same.model_config, cfg.ia3, cfg.train.loss_chunk_mib)
    longest = int(same.data.lengths.max())
    need = [memory.rank_memory(s, "", 2, False, 2, longest, m, 4, False, memory.framework_rss()).gpu_total
            for m in (1, 2)]
    budget = (need[0] + need[1]) / 2
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(autobatch, "memory_budget", lambda *_: budget)
        p = prepare(cfg, env)
    assert (p.auto.micro, p.auto.source) == (1, "plan") and "the checkpoint's micro-batch 4 does not fit" in \
        p.auto.line(), p.auto.line()
    assert p.resume_portable and p.layout.group_by_length and p.cfg.data.group_by_length is True
    assert (p.layout.micro, p.layout.accum) == (1, 8)
