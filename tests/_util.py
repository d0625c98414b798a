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
           script: str = "launch.py", launcher: str = "deepspeed") -> subprocess.CompletedProcess:
    """Run the launcher for real: ``python launch.py`` for one process, ``deepspeed`` (or torchrun) for more."""
    e = {**os.environ, **(env or {})}
    e.pop("RANK", None)
    e.pop("WORLD_SIZE", None)
    if nproc == 1 and launcher == "deepspeed":
        cmd = [sys.executable, script, *args]
    elif launcher == "torchrun":
        cmd = [bin_path("torchrun"), f"--nproc_per_node={nproc}", f"--master_port={free_port()}", script, *args]
    else:
        cmd = [bin_path("deepspeed"), f"--num_accelerators={nproc}", f"--master_port={free_port()}", script, *args]
    return subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)


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
