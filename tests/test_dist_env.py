"""Rank layout and rendezvous address from each launcher's environment variables alone."""

from __future__ import annotations

import pytest

from ia3_dist.errors import UsageError
from ia3_dist.runtime.dist import DistEnv, detect, first_host, slurm_master

# What srun sets in a step of a job (besides the task's own SLURM_PROCID, SLURM_NODEID, ...).
STEP = {"SLURM_JOB_ID": "123", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4",
        "SLURM_LOCALID": "0"}


@pytest.mark.parametrize("env, want", [
    ({}, DistEnv(0, 0, 1, 1)),
    # deepspeed / torchrun
    ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}, DistEnv(3, 1, 8, 2)),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_SIZE": "2"}, DistEnv(0, 0, 2, 2)),
    ({"RANK": "1", "WORLD_SIZE": "2"}, DistEnv(1, 0, 2, 2)),
    # the launcher's variables win over an enclosing srun step's
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"},
     DistEnv(1, 1, 2, 2)),
    # plain srun, one task per rank
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "4"},
     DistEnv(5, 1, 8, 4)),
    ({"SLURM_PROCID": "2", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0", "SLURM_TASKS_PER_NODE": "2(x2)"},
     DistEnv(2, 0, 4, 2)),
    # one srun task that runs a launcher itself: not a rank layout
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0"}, DistEnv(0, 0, 1, 1)),
    # a job's srun step: the step's task count and this node's entry of the step's layout (3 tasks on the first
    # node, 1 on the second; 2 on each of 3 nodes and 1 on the fourth; 2 tasks of a job that has 8 per node)
    ({**STEP, "SLURM_PROCID": "3", "SLURM_NODEID": "1", "SLURM_STEP_TASKS_PER_NODE": "3,1"}, DistEnv(3, 0, 4, 1)),
    ({**STEP, "SLURM_NTASKS": "7", "SLURM_STEP_NUM_TASKS": "7", "SLURM_PROCID": "6", "SLURM_NODEID": "3",
      "SLURM_STEP_TASKS_PER_NODE": "2(x3),1", "SLURM_TASKS_PER_NODE": "2(x3),1"}, DistEnv(6, 0, 7, 1)),
    ({**STEP, "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "1",
      "SLURM_NTASKS_PER_NODE": "8", "SLURM_TASKS_PER_NODE": "8(x2)", "SLURM_STEP_TASKS_PER_NODE": "2"},
     DistEnv(1, 1, 2, 2)),
    # without SLURM_NODEID: the node holding the rank under srun's default block distribution
    ({"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0", "SLURM_TASKS_PER_NODE": "3,1"},
     DistEnv(3, 0, 4, 1)),
    # the batch script's shell of `sbatch --ntasks=4` (no srun): the job's tasks are not this process's ranks
    ({"SLURM_JOB_ID": "123", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "4",
      "SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_NODEID": "0"}, DistEnv(0, 0, 1, 1)),
    ({"SLURM_JOB_ID": "123", "SLURM_STEP_ID": "4294967291", "SLURM_PROCID": "0", "SLURM_NTASKS": "4"},
     DistEnv(0, 0, 1, 1)),
])
def test_detect(env: dict[str, str], want: DistEnv) -> None:
    assert detect(env) == want


@pytest.mark.parametrize("name, value", [("RANK", "1e3"), ("WORLD_SIZE", "0x10"), ("LOCAL_RANK", "-1"),
                                         ("SLURM_STEP_NUM_TASKS", "4 tasks")])
def test_a_launcher_variable_that_is_not_a_whole_number_is_refused(name: str, value: str) -> None:
    """Read digit by digit ("1e3" as 13, "0x10" as 10) it was another rank layout, silently."""
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"} if name in ("RANK", "WORLD_SIZE", "LOCAL_RANK") else \
        {"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "4"}
    with pytest.raises(UsageError, match=f"environment variable {name}="):
        detect({**env, name: value})


def test_python_in_a_batch_shell_is_one_process_and_says_srun(monkeypatch, capsys) -> None:
    from ia3_dist.runtime import dist

    for k in ("RANK", "WORLD_SIZE", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE",
              "SLURM_NTASKS_PER_NODE", "SLURM_NODEID"):
        monkeypatch.delenv(k, raising=False)
    for k, v in {"SLURM_JOB_ID": "77", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "4"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(dist, "_WARNED_BATCH_SHELL", False)
    assert detect() == DistEnv(0, 0, 1, 1)
    err = capsys.readouterr().err
    assert "Slurm job 77 has 4 tasks, but this process is not an srun step" in err and "srun python" in err, err
    assert detect() == DistEnv(0, 0, 1, 1) and capsys.readouterr().err == ""  # said once
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")  # the same variables in an srun step: rank 0 of 4
    assert detect() == DistEnv(0, 0, 4, 4)


@pytest.mark.parametrize("nodelist, host", [
    ("n1", "n1"), ("n[1-2]", "n1"), ("gpu[007-010,12],cpu1", "gpu007"), ("a,b", "a"), ("x[3]-ib", "x3-ib"),
    ("node-[5-7]", "node-5"), ("c[12,3-4]", "c12"),
    # two bracket groups in one name, each at its first value
    ("rack[1-2]-node[01-04]", "rack1-node01"), ("n[1-2]x[3-4]", "n1x3"), ("a[2,5]b[7-8],c1", "a2b7"),
])
def test_first_host_without_scontrol(nodelist: str, host: str) -> None:
    assert first_host(nodelist) == host


def test_slurm_master_port_from_job_id() -> None:
    env = {"SLURM_JOB_NODELIST": "gpu[003-004]", "SLURM_JOB_ID": "123456"}
    assert slurm_master(env, use_scontrol=False) == ("gpu003", str(20000 + 123456 % 12000))
    assert slurm_master({"SLURM_NODELIST": "n2", "SLURM_JOB_ID": "7"}, use_scontrol=False) == ("n2", "20007")
    assert slurm_master({}, use_scontrol=False) is None
    # A step on part of the allocation meets on its own first node; two steps at once on other ports; below the
    # ephemeral range (32768+) whatever the job id; IA3_DIST_MASTER_PORT by hand.
    step = {**env, "SLURM_STEP_NODELIST": "gpu004", "SLURM_STEP_ID": "1"}
    assert slurm_master(step, use_scontrol=False) == ("gpu004", str(20000 + (123456 + 4001) % 12000))
    assert all(int(slurm_master({**env, "SLURM_JOB_ID": str(j)}, use_scontrol=False)[1]) < 32000
               for j in (0, 11999, 19999, 12345678))
    assert slurm_master({**env, "IA3_DIST_MASTER_PORT": "23456"}, use_scontrol=False)[1] == "23456"


@pytest.mark.parametrize("files,want", [
    ({}, None), ({"cpu.max": "max 100000\n"}, None), ({"cpu.max": "150000 100000\n"}, 2),
    ({"cpu.max": "50000 100000\n"}, 1), ({"cpu/cpu.cfs_quota_us": "200000", "cpu/cpu.cfs_period_us": "100000"}, 2),
    ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None)])
def test_usable_cpus_follow_a_cgroup_quota(tmp_path, files, want) -> None:
    """A container capped at 2 CPUs by quota shows every host core in the affinity mask: ranks' threads and the
    tokenizer's workers are sized from the quota instead."""
    import os

    from ia3_dist.runtime.cpus import usable_cpus

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    mask = len(os.sched_getaffinity(0))
    assert usable_cpus(tmp_path, {}) == (mask if want is None else min(mask, want))


@pytest.mark.parametrize("value,want", [("1", 1), ("", None), ("0", None), ("two", None), ("4096", None)])
def test_usable_cpus_follow_slurms_allocation(tmp_path, value: str, want: int | None) -> None:
    """A Slurm cluster without CPU confinement shows a job every core of a shared node: its ranks size their
    threads from SLURM_CPUS_ON_NODE instead (unset or unreadable: the mask)."""
    import os

    from ia3_dist.runtime.cpus import usable_cpus

    mask = len(os.sched_getaffinity(0))
    assert usable_cpus(tmp_path, {"SLURM_CPUS_ON_NODE": value}) == (mask if want is None else min(mask, want))


@pytest.mark.parametrize("cores,slurm,local,want", [
    (64, None, 2, 32),  # outside Slurm: the mask split between the local ranks
    (2, None, 2, 1),
    (64, "8", 2, 4),    # a cluster that confines nothing: the node's allocation, not the node, is split
    (4, "32", 8, 4),    # srun one task per rank, each confined to its own 4 CPUs: the mask is already the share
    (8, "8", 8, 1),     # a launcher's 8 ranks in one task confined to the job's 8 CPUs
    (8, "1", 2, 1),
])
def test_rank_share_under_and_outside_slurm(tmp_path, cores: int, slurm: str | None, local: int, want: int) -> None:
    from ia3_dist.runtime.cpus import mask_is_allocation, rank_share

    env = {} if slurm is None else {"SLURM_CPUS_ON_NODE": slurm}
    assert rank_share(local, list(range(cores)), tmp_path, env) == want
    # Pinning to slices of the mask stays inside the job only where the mask is the job's own CPUs.
    assert mask_is_allocation(list(range(cores)), env) == (slurm is None or int(slurm) >= cores)
    # A container's quota of 4 CPUs is shared by every local rank in it, under Slurm too.
    (tmp_path / "cpu.max").write_text("400000 100000\n")
    assert rank_share(local, list(range(cores)), tmp_path, env) == max(1, min(want, 4 // local))


def test_a_launchers_ranks_split_their_shared_mask_under_slurm_too(tmp_path) -> None:
    """`numactl --cpunodebind=0 torchrun --nproc 4` in a job of 64 CPUs: the 4 ranks share one mask of 32; each got
    16 threads (the allocation's share), twice the cores, and bind_cores pinned two ranks on each slice."""
    from ia3_dist.runtime.cpus import rank_share

    env = {"SLURM_CPUS_ON_NODE": "64", "LOCAL_RANK": "1"}
    assert rank_share(4, list(range(32)), tmp_path, env, host=128) == 8
    assert rank_share(4, list(range(64)), tmp_path, env, host=128) == 16  # the whole allocation: as before
    # srun one task per rank (no launcher: no LOCAL_RANK): the rank's own mask is its share.
    assert rank_share(4, list(range(16)), tmp_path, {"SLURM_CPUS_ON_NODE": "64"}, host=128) == 16
    # deepspeed --bind_cores_to_rank inside the job: already bound per rank.
    assert rank_share(4, list(range(16)), tmp_path, {**env, "OMP_NUM_THREADS": "16"}, host=128) == 16


@pytest.mark.parametrize("mask, local, omp, host, want", [
    (4, 4, "4", 16, 4),    # deepspeed --bind_cores_to_rank: numactl gave each rank its 4 cores, OMP_NUM_THREADS=4
    (4, 4, None, 16, 1),   # the same mask without the launcher's OMP_NUM_THREADS: a shared mask, split
    (8, 2, "8", 16, 8),
    (2, 2, "2", 2, 1),     # 2 ranks on a 2-core box: the mask is the host's, split whatever OMP_NUM_THREADS says
    (32, 2, "32", 64, 32),
    (32, 4, "32", 64, 8),  # numactl --cpunodebind=0 around 4 ranks: more than the host has if per rank, split
    (16, 2, "8", 64, 8),
])
def test_rank_share_keeps_a_launchers_per_rank_binding(tmp_path, mask: int, local: int, omp: str | None, host: int,
                                                      want: int) -> None:
    from ia3_dist.runtime.cpus import rank_share

    env = {} if omp is None else {"OMP_NUM_THREADS": omp}
    assert rank_share(local, list(range(mask)), tmp_path, env, host=host) == want
    # A container's quota is shared by every rank in it, bound or not.
    (tmp_path / "cpu.max").write_text("800000 100000\n")
    assert rank_share(local, list(range(mask)), tmp_path, env, host=host) == min(want, max(1, 8 // local))


@pytest.mark.parametrize("files, want", [
    ({"cpuset.cpus.effective": "0-3,8,10-11\n"}, 7), ({"cpuset/cpuset.effective_cpus": "0-15\n"}, 16),
    ({"cpuset.cpus.effective": "\n"}, None), ({}, None)])
def test_host_cpus_is_the_cgroups_cpuset(tmp_path, files: dict[str, str], want: int | None) -> None:
    import os

    from ia3_dist.runtime.cpus import host_cpus

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert host_cpus(tmp_path) == (os.cpu_count() if want is None else want)


def test_rank_share_follows_a_cgroup_quota(tmp_path) -> None:
    from ia3_dist.runtime.cpus import rank_share

    (tmp_path / "cpu.max").write_text("400000 100000\n")
    assert rank_share(2, list(range(64)), tmp_path, {}) == 2


@pytest.mark.parametrize("slurm", [None, "1"])
def test_bind_cores_pins_only_inside_the_jobs_cpus(monkeypatch: pytest.MonkeyPatch, capsys, slurm: str | None) -> None:
    """train.bind_cores pins local rank 1 of 2 to the second half of the mask; where Slurm allocated fewer CPUs than
    the mask shows (nothing confines the job), it pins nothing and says why."""
    import os

    import torch

    from ia3_dist.runtime.dist import setup_threads

    mask = sorted(os.sched_getaffinity(0))
    if len(mask) < 2:
        pytest.skip("needs 2 CPUs")
    if slurm is None:
        monkeypatch.delenv("SLURM_CPUS_ON_NODE", raising=False)
    else:
        monkeypatch.setenv("SLURM_CPUS_ON_NODE", slurm)
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))  # restored afterwards
    threads = torch.get_num_threads()
    try:
        got = setup_threads(DistEnv(0, 1, 2, 2), bind=True)
        pinned = sorted(os.sched_getaffinity(0))
    finally:
        os.sched_setaffinity(0, mask)
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    # One CPU for the node's 2 ranks: said, with what to ask Slurm for.
    crowded = "note: 1 CPU(s) on this node for its 2 ranks: they share cores" in out
    if slurm is None:
        share = len(mask) // 2
        assert got == share and pinned == mask[share:2 * share] and "not pinning" not in out and not crowded
    else:
        assert got == 1 and pinned == mask and "train.bind_cores: not pinning ranks" in out and crowded, out


def test_device_index_is_among_the_devices_the_rank_sees(monkeypatch) -> None:
    """srun --gpus-per-task=1: local rank 3 sees one GPU, device 0 (DeepSpeed takes LOCAL_RANK as the index)."""
    import torch

    from ia3_dist.runtime.dist import device_index

    env = DistEnv(rank=3, local_rank=3, world_size=4, local_world_size=4)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device_index(env) == 3  # off the GPU nothing changes
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for seen, want in ((4, 3), (1, 0), (2, 1)):
        monkeypatch.setattr(torch.cuda, "device_count", lambda seen=seen: seen)
        assert device_index(env) == want


def test_set_device_is_the_ranks_gpu_and_nothing_off_the_gpu(monkeypatch) -> None:
    """ia3-dist eval on several GPUs: each rank's current device before the process group starts (NCCL binds to
    it); on CPU nothing is touched."""
    import torch

    from ia3_dist.runtime.dist import set_device

    calls: list[int] = []
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    set_device(DistEnv(rank=3, local_rank=3, world_size=4, local_world_size=4))
    assert calls == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    set_device(DistEnv(rank=3, local_rank=3, world_size=4, local_world_size=4))
    assert calls == [1]


@pytest.mark.parametrize("mask, local, env, quota, want", [
    (8, 8, {"SLURM_CPUS_ON_NODE": "32"}, None, 32),  # srun, one task per rank: each mask is 4 of the node's 32
    (32, 8, {"SLURM_CPUS_ON_NODE": "1"}, None, 1),   # a launcher task on the cluster's default CPU
    (4, 4, {"OMP_NUM_THREADS": "4"}, None, 16),      # deepspeed --bind_cores_to_rank: 4 ranks x their 4 cores
    (2, 4, {}, None, 2),                             # 4 ranks sharing 2 cores
    (64, 8, {}, 4, 4),                               # a container's quota of 4 CPUs
])
def test_node_cpus_counts_the_nodes_cpus_not_a_ranks_slice(tmp_path, mask: int, local: int, env: dict,
                                                           quota: int | None, want: int) -> None:
    from ia3_dist.runtime.cpus import node_cpus

    if quota:
        (tmp_path / "cpu.max").write_text(f"{quota * 100000} 100000\n")
    assert node_cpus(local, list(range(mask)), tmp_path, env, host=64) == want
