"""Faults on 2 gloo ranks: a signal on one rank stops all at a step boundary with a checkpoint and exit 75, and the
resumed run ends with the uninterrupted adapter; a rank killed with -9 takes the others down within 60 s (with and
without a launcher watching); a non-finite loss stops the run naming the step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from _util import ROOT, adapter_tensors, bin_path, check, free_port, launch, spawn_slurm_style

from ia3_dist.errors import EXIT_NONFINITE, EXIT_PREEMPTED
from ia3_dist.runtime.checkpoint import latest

pytestmark = pytest.mark.slow
TINY = "configs/tiny-cpu.yaml"
# Long enough (75 steps of 4 micro-steps per rank) to signal or kill a rank mid-run.
RUN = ["train.micro_batch_size=1", "train.grad_accum=4", "train.log_every=1", "checkpoint.every=5"]


def _args(out: Path, *extra: str) -> list[str]:
    return ["--config", TINY, f"output.dir={out}", *RUN, *extra]


def _rank_pids(launcher: subprocess.Popen) -> list[int]:
    """Rank processes under the deepspeed launcher, by their --local_rank argument."""
    import psutil

    found: dict[int, int] = {}
    for p in psutil.Process(launcher.pid).children(recursive=True):
        try:
            cmd = p.cmdline()
        except psutil.Error:
            continue
        for a in cmd:
            if a.startswith("--local_rank="):
                found[int(a.split("=")[1])] = p.pid
    return [found[r] for r in sorted(found)]


def _start(out: Path, *extra: str) -> subprocess.Popen:
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    return subprocess.Popen([bin_path("deepspeed"), "--num_accelerators=2", f"--master_port={free_port()}",
                             "launch.py", *_args(out, *extra)], cwd=ROOT, env=e, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait_for_step(out: Path, proc: subprocess.Popen, step: int, timeout: float = 300) -> None:
    t0 = time.time()
    m = out / "metrics.jsonl"
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.communicate()[0][-3000:]}")
        if m.exists():
            lines = [ln for ln in m.read_text().splitlines() if ln.strip()]
            if lines and json.loads(lines[-1])["step"] >= step:
                return
        time.sleep(0.05)
    raise AssertionError("run did not reach the step in time")


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Path:
    out = tmp_path_factory.mktemp("straight")
    check(launch(_args(out), nproc=2))
    return out


@pytest.mark.parametrize("sig, rank", [(signal.SIGUSR1, 1), (signal.SIGTERM, 0)])
def test_signal_on_one_rank_checkpoints_all_and_resumes(straight: Path, tmp_path: Path, sig: int,
                                                        rank: int) -> None:
    out = tmp_path / "sig"
    proc = _start(out)
    _wait_for_step(out, proc, 3)
    os.kill(_rank_pids(proc)[rank], sig)
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == EXIT_PREEMPTED, log[-3000:]
    assert "train.resume=auto" in log
    ck = latest(out / "checkpoints")
    assert ck is not None
    stopped = int(ck.name[4:])
    assert 3 <= stopped < 75
    check(launch(_args(out, "train.resume=auto"), nproc=2))
    ta, tb = adapter_tensors(out / "adapter"), adapter_tensors(straight / "adapter")
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=1e-6, atol=1e-6)


def test_dead_rank_under_deepspeed_launcher(tmp_path: Path) -> None:
    out = tmp_path / "dead"
    proc = _start(out)
    _wait_for_step(out, proc, 7)
    pids = _rank_pids(proc)
    t0 = time.time()
    os.kill(pids[1], signal.SIGKILL)
    proc.communicate(timeout=120)
    took = time.time() - t0
    assert proc.returncode != 0 and took < 60, took
    import psutil

    assert not psutil.pid_exists(pids[0]) or psutil.Process(pids[0]).status() == psutil.STATUS_ZOMBIE
    ck = latest(out / "checkpoints")
    assert ck is not None and int(ck.name[4:]) >= 5
    check(launch(_args(out, "train.resume=auto"), nproc=2))


def test_dead_rank_without_a_launcher(tmp_path: Path) -> None:
    """Ranks started like `srun` does (one process each, SLURM_* only): the survivor must exit by itself."""
    out = tmp_path / "dead-srun"
    procs = spawn_slurm_style(_args(out))
    _wait_for_step(out, procs[0], 7)
    t0 = time.time()
    procs[1].kill()
    procs[0].communicate(timeout=120)
    took = time.time() - t0
    procs[1].wait()
    assert procs[0].returncode != 0 and took < 60, took


def test_non_finite_loss_stops_naming_the_step(tmp_path: Path) -> None:
    out = tmp_path / "nan"
    proc = launch(_args(out, "train.lr=1e30", "checkpoint.every=1", "train.grad_clip=0"), nproc=2)
    assert proc.returncode == EXIT_NONFINITE, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "at optimizer step" in proc.stderr and "Last good checkpoint" in proc.stderr
    ck = latest(out / "checkpoints")
    assert ck is not None
