"""The sbatch templates on a real Slurm (the local cluster from ../shared/slurm, 2 emulated nodes on loopback).

1 node x 2 ranks (deepspeed launcher task, and srun one task per rank) and 2 nodes x 1 rank (deepspeed --no_ssh,
and torchrun c10d) each train configs/tiny-cpu.yaml to the adapter of the same run launched with deepspeed
directly. A preempted job checkpoints, requeues itself, resumes and finishes with the adapter of an uninterrupted
run: a node-range job (1-2 nodes) sent USR1 to its batch shell (what --signal=B:USR1@N delivers) with one node
drained resumes on the other with twice the accumulation (the pip-install test); a sweep's array task cancelled with
a plain scancel (SIGTERM to every process, as a preemption sends it) resumes alone.

.ci/run starts the cluster and stops it by PID. Elsewhere these tests skip when no cluster answers (sinfo).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _util import ROOT, adapter_tensors, alive, check, launch, tagged_ranks

pytestmark = [pytest.mark.slow, pytest.mark.slurm]
TINY = "configs/tiny-cpu.yaml"
SHORT = ["train.max_steps=10"]
# Long enough to freeze a rank mid-run on a loaded box (the test acts at step 7, through Slurm): 60 steps of 4
# micro-steps per rank.
LONG = ["train.micro_batch_size=1", "train.grad_accum=4", "train.log_every=1", "checkpoint.every=5",
        "train.max_steps=60"]
# Preemption (the pip-install test's) acts at step 3 while rank 0 holds at step 4 (HOLD below), so a short run
# leaves it room. (A frozen rank
# needs LONG: on a loaded box the freeze could otherwise land after the last step, where the hang watchdog no longer
# runs; a hold cannot help there, the watchdog would see it.)
MID = [*LONG[:-1], "train.max_steps=20"]
# Rank 0 stalls at the start of step 4 until a preemption signal reaches it or the file IA3_DIST_FAULT_RELEASE names
# exists (ia3_dist/runtime/faults.py).
HOLD = "step:4:0:hold"


def _idle_nodes() -> int:
    if not shutil.which("sinfo"):
        return 0
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return 0
    return len({ln.split()[0] for ln in out.stdout.splitlines() if ln.strip() and ln.split()[1] in ("idle", "mix",
                                                                                                "alloc")})


def _missing(why: str) -> None:
    """Under CI a Slurm test never skips: what it needs is missing, so it fails."""
    if os.environ.get("CI"):
        pytest.fail(f"CI: {why}; .ci/run should have started a 2-node cluster")
    pytest.skip(why)


@pytest.fixture(scope="module")
def cluster() -> int:
    n = _idle_nodes()
    if n == 0:
        _missing("no Slurm cluster answers (start one: NODES=2 ../shared/slurm/start-local-slurm.sh)")
    return n


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    env.update(IA3_DIST_HOME=str(ROOT), LOG_DIR=str(tmp / "logs"), PYTHON=sys.executable)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def sbatch(tmp: Path, template: str, sbatch_args: list[str], run_args: list[str],
           env: dict[str, str] | None = None) -> str:
    tmp.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["sbatch", "--parsable", f"--chdir={tmp}", *sbatch_args, str(ROOT / "slurm" / template),
                           TINY, *run_args], capture_output=True, text=True, env={**_env(tmp), **(env or {})},
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def job_state(job: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    for tok in out.split():
        if tok.startswith("JobState="):
            return tok.split("=", 1)[1]
    return "GONE"


def wait_job(job: str, timeout: float = 600) -> str:
    t0 = time.time()
    while time.time() - t0 < timeout:
        st = job_state(job)
        if st not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED"):
            return st
        time.sleep(1)
    subprocess.run(["scancel", job])
    raise AssertionError(f"job {job} did not finish in {timeout}s")


def wait_restart(job: str, tmp: Path, timeout: float = 300) -> None:
    """Until the requeued job's second instance has started."""
    t0 = time.time()
    released = False
    while "restart 1" not in logs(tmp, None):
        assert time.time() - t0 < timeout, logs(tmp)
        if not released and job_state(job) == "PENDING":
            # A requeued job is held ~120 s before it may start again; the test skips the wait, but only once the
            # old instance is cleaned up (released at once, Slurm kills the restart: "Job credential revoked").
            time.sleep(5)
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True)
            released = True
        time.sleep(0.5)


def queued(job: str) -> bool:
    """Whether Slurm still lists any task of ``job``; a failed squeue (a busy slurmctld) is asked again."""
    for _ in range(30):
        proc = subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True)
        if proc.returncode == 0:
            return bool(proc.stdout.strip())
        time.sleep(2)
    raise AssertionError(f"squeue -j {job} kept failing: {proc.stderr}")


def wait_step(job: str, tmp: Path, out: Path, step: int, timeout: float = 300) -> None:
    metrics = out / "metrics.jsonl"
    t0 = time.time()
    while True:
        assert time.time() - t0 < timeout, logs(tmp)
        assert job_state(job) in ("PENDING", "RUNNING", "CONFIGURING"), logs(tmp)
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        if lines and json.loads(lines[-1])["step"] >= step:
            return
        time.sleep(0.2)


def _last_step(out: Path) -> int:
    """The last step metrics.jsonl logged (0 before any; a line still being written is skipped)."""
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue
    return 0


def logs(tmp: Path, tail: int | None = 3000) -> str:
    """Job and per-rank logs (each file's last ``tail`` characters; None for all)."""
    files = sorted(p for p in tmp.rglob("*") if p.is_file() and p.suffix in (".out", ".log", ".err"))
    return "\n".join(f"== {p.relative_to(tmp)}\n{p.read_text(errors='replace')[-(tail or 0):]}" for p in files)


def same_adapter(a: Path, b: Path, tol: float = 1e-6) -> None:
    """``tol``: 1e-6 for the same layout; another cut of the global batch sums in another order (1e-5)."""
    ta, tb = adapter_tensors(a / "adapter"), adapter_tensors(b / "adapter")
    assert set(ta) == set(tb)
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=tol, atol=tol)


def _job_fields(job: str) -> dict[str, str]:
    """``scontrol show job``'s fields (JobState, Reason, Dependency, StartTime, EndTime, ...); kept for an hour after
    the job ended (the local cluster's MinJobAge; it has no accounting for sacct)."""
    show = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, check=True).stdout
    return dict(tok.split("=", 1) for tok in show.split() if "=" in tok)


def _job_nodes(job: str) -> list[str]:
    """The hosts of a running job, batch host first."""
    show = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, check=True).stdout
    fields = dict(tok.split("=", 1) for tok in show.split() if "=" in tok)
    hosts = subprocess.run(["scontrol", "show", "hostnames", fields["NodeList"]], capture_output=True, text=True,
                           check=True).stdout.split()
    batch = fields.get("BatchHost")
    return sorted(hosts, key=lambda h: h != batch)


class _Direct(dict):
    """The same runs launched with deepspeed directly, each run the first time a test asks for it."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        super().__init__()
        self.tmp = tmp_path_factory

    def __missing__(self, name: str) -> Path:
        out = self.tmp.mktemp(f"direct-{name}")
        runs = {"short": SHORT, "mid": MID, "long": LONG}
        check(launch(["--config", TINY, f"output.dir={out}", *runs[name]], nproc=2))
        self[name] = out
        return out


@pytest.fixture(scope="module")
def direct(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> dict[str, Path]:
    return _Direct(tmp_path_factory)


def layout_checks(tmp: Path, nodes: int) -> None:
    """The job said its layout (nodes x ranks per node), finished, and each rank wrote its own log."""
    text = logs(tmp)
    assert f"{nodes} node(s) x {2 // nodes} rank(s)" in text and "run finished with exit 0" in text, text
    rank_logs = [p for p in (tmp / "logs").rglob("*") if p.is_file() and p.stat().st_size > 0
                 and ("rank" in p.name or p.parent.name.isdigit())]
    assert len(rank_logs) >= 2, sorted(str(p) for p in (tmp / "logs").rglob("*"))  # one log per rank


# Each template and launcher trains the direct run's adapter: srun_per_rank.sbatch in the frozen-rank test,
# multi_node.sbatch with deepspeed as `ia3-dist slurm` renders it (test_generator_..., and the pip-install test's
# node-range job), and multi_node.sbatch with torchrun here; single_node.sbatch (deepspeed), as `ia3-dist sweep`
# renders it, runs the sweep's array tasks, a cancelled task ending on the adapter of one never interrupted. One
# job each carries all of its checks.
def test_two_node_torchrun_template_trains_like_direct_deepspeed(cluster: int, direct: dict[str, Path],
                                                                 tmp_path: Path) -> None:
    if cluster < 2:
        _missing(f"needs 2 Slurm nodes, the cluster has {cluster}")
    out = tmp_path / "out"
    job = sbatch(tmp_path, "multi_node.sbatch", ["--nodes=2", "--cpus-per-task=1",
                                                 "--export=ALL,NPROC_PER_NODE=1,LAUNCHER=torchrun"],
                 [f"output.dir={out}", *SHORT])
    assert wait_job(job) == "COMPLETED", logs(tmp_path)
    layout_checks(tmp_path, 2)
    same_adapter(out, direct["short"])


def test_frozen_rank_requeues_and_resumes(cluster: int, direct: dict[str, Path], tmp_path: Path) -> None:
    """Plain srun, one task per rank: SIGSTOP rank 1 mid-run. Rank 0's hang watchdog exits 76 with its stacks in its
    log, srun --kill-on-bad-exit ends the frozen rank, the job requeues itself, resumes and finishes with the
    uninterrupted run's adapter."""
    out, tag, hang_s = tmp_path / "out", f"slurm-hang-{os.getpid()}", 5
    # RANK/WORLD_SIZE left exported in the submitting shell (sbatch passes them on): the template ignores them.
    job = sbatch(tmp_path, "srun_per_rank.sbatch", ["--nodes=1", "--ntasks-per-node=2"],
                 [f"output.dir={out}", *LONG, f"train.hang_timeout_s={hang_s}"],
                 env={"IA3_TEST_TAG": tag, "RANK": "1", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    wait_step(job, tmp_path, out, 7)
    pids = tagged_ranks(tag)
    assert sorted(pids) == [0, 1], pids
    # Frozen right after a step one past a checkpoint (saved every 5th step), rank 0 waits in a training step's
    # all-reduce, steps before the next save. Frozen at any moment, rank 1 could stop inside a save, whose
    # allowance (at least 30 min) holds the watchdog off: on an idle box (steps of ~0.1 s) the polling above lags
    # a few steps, and the freeze landed in step 10's save.
    step, t0 = 0, time.time()
    while step < 7 or step % 5 != 1:
        assert time.time() - t0 < 120, logs(tmp_path)
        time.sleep(0.01)
        step = _last_step(out)
    os.kill(pids[1], signal.SIGSTOP)
    t0 = time.time()
    while alive(list(pids.values())):
        assert time.time() - t0 < hang_s + 60, logs(tmp_path)
        time.sleep(0.5)
    print(f"srun per rank: frozen rank -> both ranks gone in {time.time() - t0:.1f} s (hang_timeout_s={hang_s})")
    wait_restart(job, tmp_path)
    assert wait_job(job) == "COMPLETED", logs(tmp_path)
    text = logs(tmp_path, None)
    assert "hang watchdog on rank 0: no progress" in text and "(most recent call first)" in text, text[-5000:]
    assert "hang watchdog ended the run" in text and "resuming from" in text, text[-5000:]
    layout_checks(tmp_path, 1)
    same_adapter(out, direct["long"])


def test_generator_writes_a_submittable_file(cluster: int, direct: dict[str, Path], tmp_path: Path) -> None:
    """`launch.py slurm` from the checkout renders multi_node.sbatch for 2 nodes x 1 CPU rank (the deepspeed
    launcher, --no_ssh), which Slurm accepts as written."""
    if cluster < 2:
        _missing(f"needs 2 Slurm nodes, the cluster has {cluster}")
    out = tmp_path / "gen-out"
    f = tmp_path / "job.sbatch"
    proc = subprocess.run([sys.executable, "launch.py", "slurm", "--config", TINY, "--nodes", "2",
                           "--gpus-per-node", "0", "--cpus-per-node", "1", "--time", "00:20:00", "--mem", "512M",
                           "--out", str(f), f"output.dir={out}", *SHORT], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert f"sbatch {f}" in proc.stdout
    text = f.read_text()
    assert "#SBATCH --time=00:20:00" in text and "#SBATCH --nodes=2" in text and "NPROC_PER_NODE=1" in text
    assert "#SBATCH --mem=512M" in text
    # Submitted as written it trained the direct run's adapter; the suite submits the installed package's 2-node
    # deepspeed-launcher file instead (test_pip_install_renders_self_contained_jobs), for suite time. Here: Slurm
    # accepts this one (--test-only checks it against the cluster without queueing it).
    sub = subprocess.run(["sbatch", "--test-only", f"--chdir={tmp_path}", str(f)], capture_output=True, text=True,
                         env=_env(tmp_path))
    assert sub.returncode == 0 and "to start at" in sub.stderr, sub.stderr


def test_eval_job_never_runs_after_a_failed_training_job(cluster: int, tmp_path: Path) -> None:
    """The submit script of `ia3-dist slurm --eval` with its training file replaced by one that fails at once:
    Slurm marks the afterok dependency failed and cancels the evaluation job without ever starting it
    (--kill-on-invalid-dep=yes), instead of leaving it pending for ever. (The job that succeeds after a requeue:
    test_pip_install_renders_self_contained_jobs.)"""
    proc = subprocess.run([sys.executable, "-m", "ia3_dist", "slurm", "--config", TINY, "--gpus-per-node", "0",
                           "--cpus-per-node", "1", "--time", "00:05:00", "--out", str(tmp_path / "job.sbatch"),
                           "--eval", "data.eval_ratio=0.05", f"output.dir={tmp_path / 'out'}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    (tmp_path / "job.sbatch").write_text("#!/bin/bash\n#SBATCH --time=1\nexit 1\n")
    sub = subprocess.run(["bash", str(tmp_path / "job.submit.sh")], cwd=tmp_path, env=_env(tmp_path),
                         capture_output=True, text=True, timeout=60)
    assert sub.returncode == 0, sub.stderr
    import re

    train, ev = re.match(r"training job (\d+)\nevaluation job (\d+) ", sub.stdout).groups()
    try:
        assert wait_job(train, timeout=120) == "FAILED"
        t0 = time.time()
        while (st := _job_fields(ev))["JobState"] == "PENDING":
            assert time.time() - t0 < 60, st  # pending with DependencyNeverSatisfied: the flag did not reach Slurm
            time.sleep(0.5)
    finally:
        subprocess.run(["scancel", train, ev], capture_output=True)
    assert (st["JobState"], st["Reason"], st["Dependency"]) == ("CANCELLED", "DependencyNeverSatisfied",
                                                                f"afterok:{train}(failed)"), st
    # Never started: no node, no batch host, no log (RunTime and StartTime of a job cancelled while pending are
    # not reliable: "Unknown", or the cancel time).
    assert st["NodeList"] in ("", "(null)") and "BatchHost" not in st, st
    assert not list(tmp_path.glob("*-eval-*.out"))


def test_plain_srun_without_master_variables(cluster: int, direct: dict[str, Path], tmp_path: Path) -> None:
    """`srun` one task per rank on 2 nodes with no MASTER_ADDR/MASTER_PORT anywhere (no template, no lib.sh): the
    ranks meet at the first host of the step's nodes on the port derived from the job and step ids, and train the
    same adapter as deepspeed directly. With the templates' --wait (here 2 s) and rank 0's work after training
    held past it (a tracker's upload, 6 s): the ranks leave together, and srun kills no task of the finished run
    (it did, exit 137, while rank 1 left at once)."""
    if cluster < 2:
        _missing(f"needs 2 Slurm nodes, the cluster has {cluster}")
    out = tmp_path / "out"
    env = _env(tmp_path)
    assert not {"MASTER_ADDR", "MASTER_PORT"} & set(env)
    env.update(IA3_DIST_FAULT="trained:10:0:hold", IA3_DIST_FAULT_HOLD_S="6")
    proc = subprocess.run(["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--cpus-per-task=1",
                           "--kill-on-bad-exit=1", "--wait=2", f"--chdir={ROOT}", sys.executable, "launch.py",
                           "--config", TINY, f"output.dir={out}", *SHORT], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "hold on rank 0 at point 'trained', step 10" in proc.stdout
    assert not (out / "rank0.pid").exists()
    import re

    m = re.search(r"rendezvous at (\S+):(\d+) \(first host of Slurm job (\d+) step (\d+);", proc.stdout)
    assert m, proc.stdout[-3000:]
    host, port, job, step = m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4))
    first = subprocess.run(["scontrol", "show", "hostnames", _nodelist()], capture_output=True, text=True,
                           check=True).stdout.split()[0]
    assert host == first and port == 20000 + (job + step * 4001) % 12000, m.group(0)
    assert "rank 1/2 on" in proc.stdout and "rank 0/2 on" in proc.stdout
    same_adapter(out, direct["short"])


def _nodelist() -> str:
    out = subprocess.run(["sinfo", "-h", "-o", "%N"], capture_output=True, text=True, check=True).stdout
    return out.split()[0]


# --- from a pip install: a wheel in a fresh venv, rendered and submitted from a folder outside the checkout -------


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with this project's wheel and nothing else of the checkout.

    The heavy dependencies (torch, deepspeed, transformers: GBs) come from the project's venv through a .pth line
    in the fresh venv's site-packages, not from a download. Not --system-site-packages: the project venv is itself
    a venv, and that flag would reach the base interpreter's packages, not its. A .pth line only appends the
    directory to sys.path (its own .pth files, among them the editable install pointing at a checkout, are not
    run), so ia3_dist is imported from the wheel's copy, which comes first.
    """
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"  # pip wheel writes build/ and *.egg-info into the source tree: a copy, not the checkout
    for name in ("ia3_dist", "slurm", "ds_configs"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    check(subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                          str(base / "dist"), str(src)], capture_output=True, text=True, timeout=300))
    (wheel,) = (base / "dist").glob("ia3_dist-*.whl")
    venv = base / "venv"
    check(subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], capture_output=True,
                         text=True, timeout=120))
    py = venv / "bin" / "python"
    check(subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index",
                          "-q", str(wheel)], capture_output=True, text=True, timeout=300))
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    import torch as _torch

    (Path(purelib) / "ia3_dist_test_deps.pth").write_text(str(Path(_torch.__file__).parents[1]) + "\n")
    # DeepSpeed's ninja (a dependency: a user's venv has it in bin/). Without it the venv's runs build DeepSpeed's
    # CPU ops with the system's older ninja, which hashes commands differently: each switch between the two
    # rebuilt the shared op cache (~40-90 s of a core, three times per suite).
    ninja = Path(sys.executable).parent / "ninja"
    if ninja.exists():
        (venv / "bin" / "ninja").symlink_to(ninja)
    shutil.rmtree(src)
    return venv


def _installed_env(venv: Path, tmp: Path) -> dict[str, str]:
    """The environment of a user of the installed package: its venv first on PATH, nothing of the checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "IA3_DIST_HOME", "PYTHON",
                                                            "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    dirs = [d for d in env.get("PATH", "/usr/bin:/bin").split(":") if d and Path(d) != Path(sys.executable).parent]
    env.update(PATH=":".join([str(venv / "bin"), *dirs]), VIRTUAL_ENV=str(venv), LOG_DIR=str(tmp / "logs"))
    return env


def test_pip_install_renders_self_contained_jobs(cluster: int, direct: dict[str, Path], installed: Path,
                                                 demo_model: Path, tmp_path: Path) -> None:
    """`ia3-dist slurm --eval` of the installed package, run in an empty folder: the 2-node job, preempted mid-run,
    requeues, resumes from the same install on the one node left and ends on the direct run's adapter. Its
    evaluation job, submitted by the written submit script with afterok on the training job, stays pending through
    the requeue and starts only after the training job ended: the held-out loss of each checkpoint in
    <output.dir>/eval/results.json, the final one equal to what training logged. Neither file nor job touches the
    checkout."""
    proj, cfgdir = tmp_path / "proj", tmp_path / "cfg"
    proj.mkdir()
    cfgdir.mkdir()
    cfg = cfgdir / "tiny.yaml"
    shutil.copy2(ROOT / TINY, cfg)
    env = _installed_env(installed, tmp_path)
    site = subprocess.run([str(installed / "bin" / "python"), "-c", "import ia3_dist; print(ia3_dist.__file__)"],
                          capture_output=True, text=True, env=env, cwd=proj, check=True).stdout.strip()
    assert site.startswith(str(installed)), site  # the wheel's copy, not the checkout's

    # Held-out data for the evaluation job's loss: a separate file (data.eval_path), so that the training data, and
    # with them the adapter compared with the direct run below, stay those of the run without it.
    from ia3_dist.train.demo import make_records

    heldout = cfgdir / "heldout.jsonl"
    heldout.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in make_records(16, 7, 0)),
                       encoding="utf-8")

    def render(name: str, *args: str) -> Path:
        proc = subprocess.run([str(installed / "bin" / "ia3-dist"), "slurm", "--config", str(cfg), "--gpus-per-node",
                               "0", "--time", "00:20:00", "--out", f"{name}.sbatch", *args], cwd=proj, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        text = (proj / f"{name}.sbatch").read_text()
        assert str(ROOT) not in text and "slurm/lib.sh\n" not in text and "launch.py" not in text
        assert f"PYTHON={installed}/bin/python\n" in text
        return proj / f"{name}.sbatch"

    model = f"model.path={demo_model}"  # the direct run's model
    one = render("one", "--cpus-per-node", "2", "output.dir=runs/one", model, *MID)
    # A node range: the job starts on 2 nodes and, requeued when only one is left, resumes on it with twice the
    # accumulation (train.global_batch_size keeps the direct run's 2 x 1 x 4 = 8 examples per step).
    # train.threads=1: on the one node left the rank would take both tasks' CPUs, and another thread count sums
    # the matmuls in another order (measured: 6.6e-5 on the adapter after 60 steps instead of < 1e-5).
    # checkpoint.keep=2: more than one checkpoint for the evaluation job (rotation does not change the run).
    two = render("two", "--nodes", "1-2", "--cpus-per-node", "1", "--eval", "--eval-time", "00:10:00",
                 "output.dir=runs/two", model, *MID, "train.global_batch_size=8", "train.threads=1",
                 f"data.eval_path={heldout}", "checkpoint.keep=2")
    assert "1-2 node(s) x 1 CPU rank(s)" in two.read_text().splitlines()[1]
    assert "#SBATCH --nodes=1-2\n" in two.read_text()
    two_eval, two_submit = proj / "two.eval.sbatch", proj / "two.submit.sh"
    assert "#SBATCH --nodes=1\n" in two_eval.read_text() and "#SBATCH --time=00:10:00\n" in two_eval.read_text()
    assert f"PYTHON={installed}/bin/python\n" in two_eval.read_text() and str(ROOT) not in two_eval.read_text()

    # The 1-node file renders alike (the 1 node x 2 ranks job from the install was run and matched the direct run;
    # the 2-node job below carries the checks, for suite time).
    assert "1 node(s) x 2 CPU rank(s)" in one.read_text().splitlines()[1], one.read_text()[:500]

    # The node-range file starts on both nodes; one node is drained (a failing node taken out of service) and the
    # job preempted mid-run: checkpoint, requeue, resume on the one node left from the same install, same adapter.
    if cluster < 2:
        _missing(f"needs 2 Slurm nodes, the cluster has {cluster}")
    release = tmp_path / "release"
    sub = subprocess.run(["bash", two_submit.name], cwd=proj, capture_output=True, text=True, timeout=60,
                         env={**env, "IA3_DIST_FAULT": HOLD, "IA3_DIST_FAULT_RELEASE": str(release),
                              "IA3_DIST_FAULT_HOLD_S": "600"})
    assert sub.returncode == 0, sub.stderr
    import re

    j2, je = re.fullmatch(r"training job (\d+)\nevaluation job (\d+) \(starts after job \1 completes with exit "
                          r"0\)\n", sub.stdout).groups()
    drained = None
    try:
        assert _job_fields(je)["Dependency"] == f"afterok:{j2}(unfulfilled)", _job_fields(je)
        wait_step(j2, tmp_path, proj / "runs" / "two", 3)
        nodes = _job_nodes(j2)
        assert len(nodes) == 2, nodes
        drained = nodes[1]
        subprocess.run(["scontrol", "update", f"NodeName={drained}", "State=DRAIN", "Reason=ia3-dist-test"],
                       check=True)
        subprocess.run(["scancel", "--signal=USR1", "--batch", j2], check=True)
        t0 = time.time()
        while "caught SIGUSR1" not in logs(tmp_path, None):
            assert time.time() - t0 < 120, logs(tmp_path)
            time.sleep(0.5)
        release.touch()  # the resumed run goes past step 4
        wait_restart(j2, tmp_path)
        # Requeued and restarted under the same id: the evaluation still waits on it.
        ev = _job_fields(je)
        assert (ev["JobState"], ev["Reason"], ev["Dependency"]) == ("PENDING", "Dependency",
                                                                    f"afterok:{j2}(unfulfilled)"), ev
        assert wait_job(j2) == "COMPLETED", logs(tmp_path)
        assert wait_job(je, timeout=300) == "COMPLETED", logs(tmp_path)
    finally:
        subprocess.run(["scancel", j2, je], capture_output=True)  # a failed wait must not leave them holding nodes
        if drained is not None:
            subprocess.run(["scontrol", "update", f"NodeName={drained}", "State=RESUME"], capture_output=True)
    # The evaluation started after the training job's last start had ended (Slurm's times, 1 s resolution).
    tr, ev = _job_fields(j2), _job_fields(je)
    assert ev["StartTime"] >= tr["EndTime"] and ev["Restarts"] == "0", (tr, ev)
    run_two = proj / "runs" / "two"
    rows = json.loads((run_two / "eval" / "results.json").read_text())["rows"]
    assert all((r["task"], r["metric"]) == ("heldout", "loss") and r["value"] > 0 for r in rows), rows
    kept = sorted(int(d.name[4:]) for d in (run_two / "checkpoints").glob("step*") if (d / "ia3_state.safetensors")
                  .is_file())
    assert [(r["checkpoint"], r["step"]) for r in rows] == [*[(f"step{s}", s) for s in kept if s < 20],
                                                            ("final", 20)], (kept, rows)
    assert len(rows) >= 2, rows
    logged = [json.loads(ln) for ln in (run_two / "metrics.jsonl").read_text().splitlines()]
    final_eval = [r["eval_loss"] for r in logged if r.get("step") == 20 and "eval_loss" in r]
    assert rows[-1]["value"] == pytest.approx(final_eval[-1], rel=1e-5), (rows, final_eval)
    text = logs(tmp_path, None)
    assert f"ia3_dist from {Path(site).parent}" in text, text[-3000:]
    assert text.count("caught SIGUSR1") == 1 and "2 node(s) x 1 rank(s)" in text and "1 node(s) x 1 rank(s)" in text
    assert "resuming step " in text and " saved on 2 ranks, now on 1 ranks (saved as 2 ranks x micro-batch 1 x 4 " \
        "accumulation, ZeRO-2, now 1 rank x micro-batch 1 x 8 accumulation" in text, text[-5000:]
    # 1 thread per rank on both starts, as in the direct run (train.threads=1 above).
    ranks = re.findall(r"rank (\d)/(\d) on \S+: local rank 0/1, (\d+) thread\(s\)",
                       "".join(f.read_text() for f in (tmp_path / "logs").glob(f"two-{j2}/*") if f.is_file()))
    assert sorted(ranks) == [("0", "1", "1"), ("0", "2", "1"), ("1", "2", "1")], ranks
    same_adapter(proj / "runs" / "two", direct["mid"], tol=1e-5)


# --- a sweep as one job array ---------------------------------------------------------------------------------


def _summary(sweep_dir: Path, env: dict[str, str], *extra: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "ia3_dist", "summary", "--json", *extra, str(sweep_dir)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


STEPS = 12  # the tasks hold at step 4 (HOLD) until the test has signalled task 0 and created the release file: it
# acts at a known step instead of racing fast tasks (90 steps were not always enough on an idle box).


def test_sweep_runs_as_a_job_array_and_a_preempted_task_resumes_alone(cluster: int, demo_model: Path,
                                                                      tmp_path: Path) -> None:
    """One 2-task array (train.log_every=1,2), one task at a time, carries the sweep's checks: each task trains into
    its own dir; the summary follows them from running / pending to done with the values that differ. A plain
    scancel of task 0 while it runs (SIGTERM to all its processes): task 0 checkpoints, the summary shows it
    preempted while Slurm holds the requeued task, and it resumes under its own job id to task 1's adapter (the same
    run but for log_every, never interrupted); task 1 is not signalled or resumed. A --force over the live array is
    refused. Two tasks, not a
    2 x 2 grid at 2 at a time: half the task starts on the suite's 2 cores, the same checks (the grid's expansion
    into tasks and their values is the unit tier's, test_sweep.py)."""
    proj = tmp_path / "proj"
    proj.mkdir()
    env = _env(tmp_path)
    env.pop("LOG_DIR")
    release = tmp_path / "release"
    env.update(IA3_DIST_FAULT=HOLD, IA3_DIST_FAULT_RELEASE=str(release), IA3_DIST_FAULT_HOLD_S="600")
    run = [f"model.path={demo_model}", f"train.max_steps={STEPS}", "train.micro_batch_size=1", "train.grad_accum=4",
           "checkpoint.every=5", "train.eval_every=0", "train.lr=3e-2"]
    sweep = [sys.executable, "-m", "ia3_dist", "sweep", "--config", str(ROOT / TINY), "--grid", "train.log_every=1,2",
             "--gpus-per-node", "0", "--cpus-per-node", "1", "--max-concurrent", "1", "--time", "00:20:00", "--dir",
             "sw", *run]
    proc = subprocess.run(sweep, cwd=proj, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    sw = proj / "sw"
    rec = json.loads((sw / "sweep.json").read_text())
    job, tasks = rec["job"], rec["tasks"]
    assert [t["name"] for t in tasks] == ["log_every=1", "log_every=2"]
    first = f"{job}_0"
    try:
        wait_step(first, sw, Path(tasks[0]["dir"]), 3, timeout=600)
        states = [r["status"] for r in _summary(sw, env, "--no-plot")["rows"]]
        assert states == ["running", "pending"], states
        again = subprocess.run([*sweep, "--force"], cwd=proj, env=env, capture_output=True, text=True, timeout=300)
        assert again.returncode == 2 and f"job array {job} still has 2 task(s) queued or running" in again.stderr, \
            again.stderr
        # A plain scancel: SIGTERM to every process of the task, as a preemption sends it. DeepSpeed's runner, which
        # single_node.sbatch starts, ignores it (it died of it at once, and Slurm killed the ranks before they
        # reached a step boundary: no checkpoint, exit 143); the ranks stop at the next step and checkpoint, the
        # batch shell requeues the task. Sent again only when slurmctld was too busy to take it ("Job can not be
        # altered now, try again later" on a loaded box): a second TERM is not what is tested. (Its exit code
        # decides nothing else: the batch shell's log says whether the signal came.)
        log0 = next(sw.rglob(f"*-{job}_0.out"))
        t0 = time.time()
        while "try again" in subprocess.run(["scancel", first], capture_output=True, text=True).stderr:
            assert time.time() - t0 < 120, logs(sw)
            time.sleep(2)
        while "caught SIGTERM" not in log0.read_text(errors="replace"):
            assert time.time() - t0 < 120, logs(sw)
            time.sleep(0.5)
        release.touch()  # task 1 (and task 0 once resumed) go on past step 4
        # Requeued: Slurm holds the task before it may start again; the summary says preempted from the moment the
        # task's checkpoint is written.
        t0 = time.time()
        while "requeueing job" not in log0.read_text(errors="replace"):
            assert time.time() - t0 < 300 and job_state(first) in ("RUNNING", "COMPLETING", "REQUEUED",
                                                                   "CONFIGURING", "PENDING", "CANCELLED"), logs(sw)
            time.sleep(0.5)
        assert _summary(sw, env, "--no-plot")["rows"][0]["status"] == "preempted", logs(sw)
        time.sleep(5)  # see wait_restart: release the hold once the old instance is cleaned up
        subprocess.run(["scontrol", "update", f"JobId={first}", "StartTime=now"], capture_output=True)
        t0 = time.time()
        while queued(job):
            assert time.time() - t0 < 900, logs(sw)
            time.sleep(1)
    finally:
        # A task cancelled while it starts counts as preempted early and requeues itself (lib.sh): cancel twice.
        for _ in range(2):
            subprocess.run(["scancel", job], capture_output=True)
            time.sleep(1)
    text = logs(sw, None)
    assert all(job_state(f"{job}_{t['index']}") == "COMPLETED" for t in tasks), text[-5000:]
    assert "could not all be removed" not in text, text[-5000:]  # the tasks start over in new dirs: nothing aside
    got = _summary(sw, env)
    assert sorted(got["keys"]) == ["train.log_every"], got
    rows = got["rows"]
    assert [r["status"] for r in rows] == ["done"] * 2, rows
    assert [r["train.log_every"] for r in rows] == [1, 2]
    assert all(r["step"] == STEPS and r["train_loss"] > 0 and r["tokens_per_s"] > 0 for r in rows), rows
    assert (sw / "summary.png").stat().st_size > 0
    # The batch shell's log per array task (%A_%a); the ranks' logs go under the task's own job id (%j).
    batch = [next(sw.rglob(f"*-{job}_{i}.out")).read_text(errors="replace") for i in range(2)]
    assert "caught SIGTERM" in batch[0] and "requeueing job" in batch[0] and "(restart 1)" in batch[0], batch[0][-5000:]
    assert "caught SIG" not in batch[1] and "(restart 1)" not in batch[1], batch[1][-5000:]
    import re

    def rank_logs(batch_log: str) -> str:
        task_job = re.search(r"job (\d+) \(restart 0\)", batch_log).group(1)
        return "".join(f.read_text(errors="replace") for f in (sw / "logs").glob(f"*-{task_job}/*"))

    assert "resuming from" in rank_logs(batch[0]) and "resuming from" not in rank_logs(batch[1])
    for t, every in zip(tasks, (1, 2), strict=True):
        m = [json.loads(ln) for ln in (Path(t["dir"]) / "metrics.jsonl").read_text().splitlines()]
        steps = [r["step"] for r in m if "loss" in r]
        assert steps == sorted(set(steps)) and steps[-1] == STEPS, (t["name"], steps)  # none lost or twice
        if every == 1:
            assert steps == list(range(1, STEPS + 1)), t["name"]
    same_adapter(Path(tasks[0]["dir"]), Path(tasks[1]["dir"]))
