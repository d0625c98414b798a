"""Helpers for tests that run the launcher as real processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bin_path(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def launch(args: list[str], nproc: int = 1, timeout: int = 600, env: dict | None = None,
           script: str = "launch.py", launcher: str = "direct", port: int | None = None
           ) -> subprocess.CompletedProcess:
    """Run the launcher for real: ``python launch.py`` for one process; for more, ``deepspeed`` or ``torchrun``
    when a test is about that launcher, else ``direct``: the ranks started here with the variables torchrun
    sets. The ranks are the same real processes (DeepSpeed engine, gloo); ``direct`` only skips the launcher's
    own two interpreter start-ups (torch and deepspeed imported twice, about 10 s per run on 2 cores). ``port``:
    the rendezvous port (a free one by default), for tests that find a run's resources by it."""
    e = {**os.environ, **(env or {})}
    e.pop("RANK", None)
    e.pop("WORLD_SIZE", None)
    if nproc == 1 and launcher in ("deepspeed", "direct"):
        cmd = [sys.executable, script, *args]
    elif launcher == "direct":
        return _direct([sys.executable, script, *args], nproc, e, timeout, port or free_port())
    elif launcher == "torchrun":
        cmd = [bin_path("torchrun"), f"--nproc_per_node={nproc}", f"--master_port={port or free_port()}", script,
               *args]
    else:
        cmd = [bin_path("deepspeed"), f"--num_accelerators={nproc}", f"--master_port={port or free_port()}", script,
               *args]
    return subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)


# What deepspeed's launcher gives the other ranks after one fails: SIGTERM, then SIGKILL this much later.
_GRACE_S = 30.0


def _direct(cmd: list[str], nproc: int, env: dict, timeout: float, port: int) -> subprocess.CompletedProcess:
    """``nproc`` ranks of ``cmd`` on this host, their output interleaved into one stdout and one stderr as under
    a launcher. As deepspeed's launcher does, the first rank to fail ends the others and its exit code is the
    result; past ``timeout`` every rank is killed and TimeoutExpired raised, as by ``subprocess.run``."""
    import signal
    import tempfile
    import time

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        procs = []
        for r in range(nproc):
            e = {**env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(nproc),
                 "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=out, stderr=err, stdin=subprocess.DEVNULL))
        deadline = time.monotonic() + timeout
        failed, kill_at = 0, None
        try:
            while any(p.poll() is None for p in procs):
                now = time.monotonic()
                if now > deadline:
                    raise subprocess.TimeoutExpired(cmd, timeout)
                bad = next((p.returncode for p in procs if p.returncode not in (None, 0)), 0)
                if bad and not failed:
                    failed, kill_at = bad, now + _GRACE_S
                    for p in procs:
                        if p.poll() is None:
                            p.send_signal(signal.SIGTERM)
                if kill_at is not None and now > kill_at:
                    break
                time.sleep(0.05)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait()
        failed = failed or next((p.returncode for p in procs if p.returncode), 0)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(cmd, failed, out.read().decode(errors="replace"),
                                           err.read().decode(errors="replace"))


def spawn_slurm_style(args: list[str], world: int = 2) -> list[subprocess.Popen]:
    """Start ``world`` ranks the way a plain ``srun`` task-per-rank does: only SLURM_* variables, no launcher."""
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update(SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NTASKS=str(world),
                   SLURM_NTASKS_PER_NODE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, "launch.py", *args], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    if proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def adapter_tensors(adapter_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(adapter_dir / "adapter_model.safetensors"))


def write_records(path: Path, records: list[dict]) -> Path:
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


def tagged_ranks(tag: str) -> dict[int, int]:
    """``{rank: pid}`` of the rank processes started with ``IA3_TEST_TAG=tag`` in their environment, whatever
    launched them (deepspeed, torchrun, srun): python processes running launch.py or ``-m ia3_dist``, not the
    launchers."""
    import psutil

    found: dict[int, int] = {}
    for p in psutil.process_iter():
        try:
            env = p.environ()
            cmd = p.cmdline()
        except psutil.Error:
            continue
        # launch.py, or `python -m ia3_dist` (what the sbatch templates run)
        runs_us = any(a.endswith("launch.py") for a in cmd) or any(a == "-m" and b == "ia3_dist"
                                                                   for a, b in zip(cmd, cmd[1:]))
        if env.get("IA3_TEST_TAG") != tag or not runs_us:
            continue
        if any("deepspeed.launcher" in a or "torch.distributed.run" in a or a.endswith("torchrun")
               or a.endswith("deepspeed") for a in cmd):
            continue
        rank = env.get("RANK") or env.get("SLURM_PROCID")
        if rank is not None and cmd[0].split("/")[-1].startswith("python"):
            found[int(rank)] = p.pid
    return found


def alive(pids: list[int]) -> list[int]:
    """The pids still running (zombies count as gone)."""
    import psutil

    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def job_segments(port: int) -> list[str]:
    """DeepSpeed shared-memory segments of the job on ``port`` still in /dev/shm."""
    return sorted(str(p) for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
