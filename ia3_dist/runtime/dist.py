"""Distributed state: the only module that reads RANK / WORLD_SIZE / SLURM_* and talks to the process group.

Launchers set different variables: ``deepspeed`` and ``torchrun`` set RANK, LOCAL_RANK, WORLD_SIZE (and
LOCAL_SIZE / LOCAL_WORLD_SIZE); a plain ``srun`` with one task per rank only sets SLURM_PROCID, SLURM_LOCALID,
SLURM_NTASKS and the step's SLURM_STEP_* (the batch script's shell has SLURM_PROCID and SLURM_NTASKS too, but no
step: a ``python launch.py`` there is one process). A plain ``python launch.py`` sets nothing and is world 1.
"""

from __future__ import annotations

import itertools
import os
import re
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from ..errors import UsageError
from . import console
from .cpus import affinity, mask_is_allocation, node_cpus, rank_share


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int_env(environ: Mapping[str, str], *names: str) -> int | None:
    for n in names:
        v = environ.get(n)
        if v not in (None, ""):
            # Strict: "1e3" or "0x10" read digit by digit would be another rank layout, silently. (Slurm's
            # compressed per-node lists are tasks_per_node's.)
            if not re.fullmatch(r"\s*\d{1,9}\s*", v):
                raise UsageError(f"environment variable {n}={v[:40]!r}: expected a whole number (what the launcher "
                                 f"sets); unset it or fix the job script that sets it")
            return int(v)
    return None


def tasks_per_node(value: str) -> list[int]:
    """Slurm's compressed tasks-per-node list, one entry per node: ``2(x3),1`` -> ``[2, 2, 2, 1]``; ``[]`` when it is
    not one."""
    out: list[int] = []
    for part in value.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:\(x(\d+)\))?\s*", part)
        if m is None:
            return []
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def _slurm_local_world(e: Mapping[str, str]) -> int | None:
    """Tasks of this srun step on this node: the step's own layout first (a job's layout counts tasks the step
    does not have: ``srun -n2`` inside an 8-per-node job), the entry of this node (``SLURM_NODEID``), since the
    nodes of a step may hold different counts (``3,1``)."""
    node, rank = _int_env(e, "SLURM_NODEID"), _int_env(e, "SLURM_PROCID") or 0
    for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        counts = tasks_per_node(e.get(name) or "")
        if not counts:
            continue
        if node is None or not 0 <= node < len(counts):
            # srun sets SLURM_NODEID; without it, the node holding this rank under srun's default block
            # distribution (consecutive ranks fill a node).
            ends = list(itertools.accumulate(counts))
            node = next((i for i, end in enumerate(ends) if rank < end), len(counts) - 1)
        return counts[node]
    return _int_env(e, "SLURM_NTASKS_PER_NODE")


def _srun_step(e: Mapping[str, str]) -> bool:
    """Whether SLURM_* describe this process as one task of an srun step. An sbatch shell carries SLURM_PROCID=0
    and the job's SLURM_NTASKS as well, but only srun sets the step's layout (SLURM_STEP_NUM_TASKS,
    SLURM_STEP_TASKS_PER_NODE: Slurm's env_array_for_step). SLURM_STEP_ID alone is not relied on: slurmstepd
    sets it from the step id, and the batch script runs as a step of its own (a sentinel id). Variables set by
    hand, outside any job (no SLURM_JOB_ID), are taken as given."""
    if e.get("SLURM_PROCID") is None:
        return False
    return not e.get("SLURM_JOB_ID") or e.get("SLURM_STEP_NUM_TASKS") not in (None, "")


_WARNED_BATCH_SHELL = False


def detect(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Rank layout from the launcher's environment (torch/deepspeed variables first, then an srun step's)."""
    global _WARNED_BATCH_SHELL
    e = os.environ if environ is None else environ
    if e.get("RANK") is not None and e.get("WORLD_SIZE") is not None:
        rank = _int_env(e, "RANK") or 0
        world = _int_env(e, "WORLD_SIZE") or 1
        local = _int_env(e, "LOCAL_RANK") or 0
        local_world = _int_env(e, "LOCAL_WORLD_SIZE", "LOCAL_SIZE") or world
    elif _srun_step(e) and (_int_env(e, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS") or 1) > 1:
        rank = _int_env(e, "SLURM_PROCID") or 0
        world = _int_env(e, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS") or 1
        local = _int_env(e, "SLURM_LOCALID") or 0
        local_world = _slurm_local_world(e) or world
    else:
        rank, local, world, local_world = 0, 0, 1, 1
        tasks = _int_env(e, "SLURM_NTASKS") or 1
        if e.get("SLURM_PROCID") is not None and tasks > 1 and environ is None and not _WARNED_BATCH_SHELL:
            # Taken for rank 0 of the job's tasks, this process would wait for ranks nobody starts (30 minutes).
            _WARNED_BATCH_SHELL = True
            print(f"warning: Slurm job {e.get('SLURM_JOB_ID', '?')} has {tasks} tasks, but this process is not an "
                  f"srun step (the batch script's shell): running as 1 process. Start one rank per task with "
                  f"`srun python launch.py ...`, or a launcher (deepspeed, torchrun)", file=sys.stderr, flush=True)
    return DistEnv(rank=rank, local_rank=local, world_size=world, local_world_size=max(1, local_world))


def setup_threads(env: DistEnv, threads: int = 0, bind: bool = False) -> int:
    """Give this rank its share of the cores so ranks on one box do not oversubscribe them (2 threads per rank
    on 2 cores halve throughput); with ``bind``, pin the rank to its own slice of them."""
    cores = affinity()
    share = rank_share(env.local_world_size, cores)
    node = node_cpus(env.local_world_size, cores)
    if node < env.local_world_size:
        print0(env, f"note: {node} CPU(s) on this node for its {env.local_world_size} ranks: they share cores, and "
                    f"every step's host side waits on them (a GPU rank's too); give the job a CPU per rank at least "
                    f"(sbatch --cpus-per-task, ia3-dist slurm --cpus-per-node)")
    if bind and not mask_is_allocation(cores):
        print0(env, f"train.bind_cores: not pinning ranks: Slurm allocated fewer CPUs on this node than the "
                    f"{len(cores)} this job may run on (the cluster does not confine jobs), so which are this "
                    f"job's is unknown; {share} thread(s) per rank")
    elif bind and hasattr(os, "sched_setaffinity"):
        start = (env.local_rank * share) % len(cores)
        os.sched_setaffinity(0, cores[start:start + share] or cores)
    if threads <= 0:
        threads = share
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    return threads


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list without ``scontrol``: ``gpu[007-010,12],cpu1`` -> ``gpu007``,
    ``rack[1-2]-node[01-04]`` -> ``rack1-node01`` (each bracket group at its first value)."""
    # The first entry: up to the first comma outside brackets.
    first = re.match(r"(?:[^,\[]|\[[^\]]*\])*", nodelist.strip()).group(0)
    return re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(",")[0].split("-")[0], first)


def slurm_master(environ: Mapping[str, str], use_scontrol: bool = True) -> tuple[str, str] | None:
    """MASTER_ADDR and MASTER_PORT of a plain ``srun`` job: the first host of the step's nodes (as ``scontrol show
    hostnames`` orders them; a step on part of the allocation has no rank on the job's first node) and a port
    derived from the job and step ids (two steps at once in one allocation meet apart), below Linux's ephemeral
    range as ``slurm/lib.sh``'s, or ``IA3_DIST_MASTER_PORT``: every task computes the same pair alone."""
    nodes = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if not nodes:
        return None
    out: list[str] = []
    if use_scontrol:
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True,
                                 timeout=30, check=True).stdout.split()
        except (OSError, subprocess.SubprocessError):
            out = []
    host = out[0] if out else first_host(nodes)
    job = _int_env(environ, "SLURM_JOB_ID") or 0
    step = _int_env(environ, "SLURM_STEP_ID") or 0
    # 4001 and 12000 are coprime: the step moves the port without dividing the job id's 12,000 ports.
    port = environ.get("IA3_DIST_MASTER_PORT") or str(20000 + (job + step * 4001) % 12000)
    return host, port


def launch_key(env: DistEnv) -> str | None:
    """A name the ranks of one launch on this host share and no other launch has: their parent process (the
    launcher, torchrun, or Slurm's step daemon under srun) by host, pid and start time. None for a lone process,
    whose parent (a shell) outlives many launches."""
    if env.local_world_size <= 1:
        return None
    ppid = os.getppid()
    try:
        with open(f"/proc/{ppid}/stat", "rb") as fh:
            started = fh.read(4096).rsplit(b")", 1)[1].split()[19].decode()  # field 22: start time in ticks
    except (OSError, IndexError):
        return None
    return f"{socket.gethostname()}-{ppid}-{started}"


def under_slurm(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process runs in a Slurm job (compute nodes there often have no internet)."""
    return bool((os.environ if environ is None else environ).get("SLURM_JOB_ID"))


def device_index(env: DistEnv) -> int:
    """This rank's CUDA device among those it sees (its local rank where it sees them all); its local rank off the
    GPU."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return env.local_rank % n if n else env.local_rank


def set_device(env: DistEnv) -> None:
    """Make this rank's GPU (:func:`device_index`) the current CUDA device; nothing off the GPU. NCCL binds a
    rank's communicator to the current device at its first collective: unset, every rank of a node would use
    device 0 (DeepSpeed's engine sets it for training; ``ia3-dist eval`` has no engine)."""
    if torch.cuda.is_available():
        torch.cuda.set_device(device_index(env))


def init(env: DistEnv, timeout_minutes: int = 30) -> None:
    """Start the process group through DeepSpeed (gloo on CPU, nccl on GPU: DeepSpeed's accelerator picks)."""
    import deepspeed

    set_device(env)
    os.environ["RANK"] = str(env.rank)
    # DeepSpeed takes LOCAL_RANK for the CUDA device index: a task that sees fewer GPUs than the node has ranks
    # (srun --gpus-per-task=1, cgroup-constrained devices) uses the one it sees.
    os.environ["LOCAL_RANK"] = str(device_index(env))
    os.environ["WORLD_SIZE"] = str(env.world_size)
    os.environ["LOCAL_WORLD_SIZE"] = str(env.local_world_size)
    if "MASTER_ADDR" not in os.environ:
        slurm = slurm_master(os.environ) if env.world_size > 1 else None
        if slurm is not None:
            os.environ["MASTER_ADDR"] = slurm[0]
            # Not an inherited MASTER_PORT: sbatch exports the submitting shell's, and every job from it would
            # share that one port (as slurm/lib.sh decides).
            os.environ["MASTER_PORT"] = slurm[1]
            if env.is_main:
                # Said once, so a job's log shows where a plain srun's ranks met (and a test can check it).
                print(f"rendezvous at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} (first host of Slurm "
                      f"job {os.environ.get('SLURM_JOB_ID', '?')} step {os.environ.get('SLURM_STEP_ID', '?')}; no "
                      f"MASTER_ADDR set)", flush=True)
        elif env.world_size == 1:
            os.environ["MASTER_ADDR"] = "127.0.0.1"
        else:
            raise RuntimeError("MASTER_ADDR is not set for a multi-rank run; launch with deepspeed, torchrun or srun")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port()) if env.world_size == 1 else "29500"
    with console.filtered_prints():
        deepspeed.init_distributed(dist_backend=None, auto_mpi_discovery=False,
                                   timeout=timedelta(minutes=timeout_minutes))
    global _HOST_GROUP, _LEAVE_GROUP
    d = torch.distributed
    if d.get_world_size() > 1 and d.get_backend() != "gloo":
        # Every rank creates it at the same point, right after the default group (new_group is collective).
        _HOST_GROUP = d.new_group(backend="gloo", timeout=timedelta(minutes=timeout_minutes))
    if d.get_world_size() > 1:
        _LEAVE_GROUP = d.new_group(backend="gloo", timeout=timedelta(minutes=max(timeout_minutes, LEAVE_MINUTES)))


_HOST_GROUP: object = None
"""A gloo group over every rank when the default group is not gloo (NCCL on GPUs): host tensors reduce there."""
_LEAVE_GROUP: object = None
"""A gloo group for :func:`leave_together` alone, with a timeout of its own (:data:`LEAVE_MINUTES`)."""
LEAVE_MINUTES = 6 * 60
"""How long the other ranks of a finished run wait for rank 0's work after training (the plot, a tracker's upload
of the adapter and its close: minutes at most): past deepspeed.timeout_minutes (30 by default, as little as 1),
which would end a finished run with a timeout on every other rank."""


def _dist():
    return torch.distributed if torch.distributed.is_available() and torch.distributed.is_initialized() else None


def barrier() -> None:
    d = _dist()
    if d is not None:
        d.barrier()


def leave_together() -> None:
    """Every rank waits here for the others, through a gloo group of its own (no device queue; its own timeout,
    :data:`LEAVE_MINUTES`): the last thing a finished or preempted run does before the group goes. Rank 0's work
    after training (the metrics plot, a tracker's upload of the adapter and its close) may take a minute; ranks
    that left at once would end their srun tasks, and ``srun --wait=60`` SIGKILLs the tasks still running 60 s
    after the first one exited, a finished run then failing."""
    d = _dist()
    if d is not None and d.get_world_size() > 1:
        d.barrier(group=_LEAVE_GROUP)


def all_reduce_sum(t: torch.Tensor, group: object = None) -> torch.Tensor:
    """Sum over ranks (of ``group``, default all), in place (a no-op without a process group)."""
    d = _dist()
    if d is not None and d.get_world_size() > 1:
        d.all_reduce(t, op=d.ReduceOp.SUM, group=group)
    return t


def host_all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a host (CPU) tensor over ranks without touching the device's queue: on NCCL jobs through a gloo group,
    so a step's bookkeeping (token counts, the stop flag) never waits for the GPU to drain."""
    return all_reduce_sum(t, _HOST_GROUP)


def host_max(value: int) -> int:
    """The largest ``value`` over ranks, through the host group (no device sync); ``value`` without a group."""
    d = _dist()
    if d is None or d.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    d.all_reduce(t, op=d.ReduceOp.MAX, group=_HOST_GROUP)
    return int(t.item())


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (small and picklable), in rank order, through the host group; ``[obj]`` without a
    process group. A collective: every rank calls it."""
    d = _dist()
    if d is None or d.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * d.get_world_size()
    d.all_gather_object(out, obj, group=_HOST_GROUP)
    return out


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size of the live process group; (0, 1) without one."""
    d = _dist()
    return (d.get_rank(), d.get_world_size()) if d is not None else (0, 1)


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    d = _dist()
    if d is not None and d.get_world_size() > 1:
        d.all_reduce(t, op=d.ReduceOp.MAX)
    return t


SHM_PREFIX = "/dev/shm/deepspeed_allreduce_buffer_"


def remove_shm_segments(every_rank: bool = False) -> None:
    """DeepSpeed's CPU shared-memory allreduce maps a 69 MB /dev/shm segment per rank and never unlinks it: every
    run would leak RAM until reboot. Peers that still run have it mapped already, so unlinking is safe. A rank
    that leaves normally removes its own; the hang watchdog removes those of every rank of this job on this host
    (a frozen or killed peer never will)."""
    job = f"{SHM_PREFIX}{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_{os.environ.get('MASTER_PORT', '')}_"
    d = _dist()
    if every_rank:
        stem = Path(job).name
        names = [str(p) for p in Path("/dev/shm").glob(stem + "*") if p.name[len(stem):].isdigit()]
    elif d is not None:
        names = [f"{job}{d.get_rank()}"]
    else:
        names = []
    for name in names:
        try:
            os.unlink(name)
        except FileNotFoundError:
            pass


def destroy() -> None:
    """Tear the group down; ranks that exit with it alive die with rc -6 (gloo aborts)."""
    global _HOST_GROUP, _LEAVE_GROUP
    d = _dist()
    if d is not None:
        remove_shm_segments()
        d.destroy_process_group()
    _HOST_GROUP = _LEAVE_GROUP = None  # destroyed with it: a later run in this process makes its own


def announce(env: DistEnv, threads: int) -> None:
    """One line from every rank (the only one the others print): in per-rank logs of a multi-node job it says
    which rank wrote the log, where it ran and with how many threads."""
    print(f"rank {env.rank}/{env.world_size} on {socket.gethostname()}: local rank {env.local_rank}/"
          f"{env.local_world_size}, {threads} thread(s)", flush=True)


def print0(env: DistEnv, *args: object) -> None:
    if env.is_main:
        print(*args, flush=True)

