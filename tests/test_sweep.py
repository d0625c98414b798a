"""``ia3-dist sweep`` and ``ia3-dist summary`` without a cluster (unit tier: no training).

Bad grids exit 2 through the CLI entry before anything is written or submitted: an ``sbatch`` stand-in first on
PATH records any call, and the sweep dir must not appear. The written array file is run by bash with a stand-in
python to see exactly which arguments a task hands to ia3-dist. The summary reads run dirs made of real files.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ia3_dist.cli import main as cli_main
from ia3_dist.config import load_config
from ia3_dist.tools import summary
from ia3_dist.tools.summary import run_status

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml"
BASH = shutil.which("bash")
SLURM = ["--gpus-per-node", "0", "--cpus-per-node", "1"]


@pytest.fixture
def fake_sbatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An ``sbatch`` first on PATH that records its arguments and answers with a job id."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "sbatch-calls"
    (bindir / "sbatch").write_text(f'#!/bin/sh\necho "$@" >> {calls}\necho 4242\n')
    (bindir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    return calls


def sweep(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = cli_main(["sweep", "--config", str(TINY), *SLURM, *args])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize(("grid", "needles"), [
    (["train.lrr=3e-3,1e-2"], ["train.lrr", "unknown key"]),
    (["nosection.lr=1"], ["nosection", "unknown key"]),
    (["train.lr="], ["train.lr", "empty value"]),
    (["train.lr=3e-3,,1e-2"], ["train.lr", "empty value"]),
    (["train.lr"], ["--grid", "key.sub=value1,value2"]),
    # The grid's own bad value is the grid's, not the config file's (its path was put in front).
    (["train.lr=3e-3,abc"], ["error: --grid train.lr=abc: config key 'train.lr': expected a number"]),
    (["train.lr=3e-3,3e-3"], ["3e-3", "listed twice"]),
    (["train.lr=3e-3,0.003"], ["train.lr=3e-3", "train.lr=0.003", "same config"]),
    (["model.revision=v/1,v-1"], ["model.revision=v/1", "model.revision=v-1", "same output dir"]),
    (["model.revision=Main,main"], ["same output dir"]),
    (["output.dir=a,b"], ["output.dir"]),
    (["train.lr=3e-3,1e-2", "train.lr=3e-2"], ["train.lr", "given twice"]),
    ([f"train.seed={','.join(map(str, range(41)))}", f"train.lr={','.join(f'{i + 1}e-3' for i in range(25))}"],
     ["41 x 25 = 1025 tasks", "--max-tasks 1025"]),
    ([], ["at least one --grid"]),
    # What the job would refuse after its wait in the queue: the global batch over its ranks, a misspelt config.
    (["train.global_batch_size=16,13"], ["task 1", "train.global_batch_size=13 does not divide"]),
    (["deepspeed.config=zero1,zero9"], ["task 1", "deepspeed.config zero9: no such file"]),
    (["hardware.gpus_per_node=1,8"], ["--grid hardware.gpus_per_node", "same job shape"]),
])
def test_bad_grid_exits_2_before_anything_is_written_or_submitted(tmp_path: Path, fake_sbatch: Path,
                                                                  capsys: pytest.CaptureFixture[str],
                                                                  grid: list[str], needles: list[str]) -> None:
    d = tmp_path / "sw"
    rc, _, err = sweep(["--dir", str(d), *[f"--grid={g}" for g in grid]], capsys)
    assert rc == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    assert not d.exists()
    assert not fake_sbatch.exists()


def test_max_tasks_limit_is_the_grid_size(tmp_path: Path, fake_sbatch: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    grid = ["--grid", "train.lr=3e-3,1e-2", "--grid", "data.max_length=128,256"]
    rc, _, err = sweep(["--dir", str(tmp_path / "a"), "--max-tasks", "3", *grid], capsys)
    assert rc == 2 and "2 x 2 = 4 tasks" in err and not (tmp_path / "a").exists()
    rc, out, err = sweep(["--dir", str(tmp_path / "b"), "--max-tasks", "4", *grid], capsys)
    assert rc == 0, err
    assert "submitted job array 4242" in out
    assert fake_sbatch.read_text().split() == ["--parsable", str(tmp_path / "b" / "sweep.sbatch")]
    assert json.loads((tmp_path / "b" / "sweep.json").read_text())["job"] == "4242"


def test_bad_slurm_option_and_existing_sweep_are_refused(tmp_path: Path, fake_sbatch: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "sw"
    rc, _, err = sweep(["--dir", str(d), "--grid", "train.lr=1e-3,1e-2", "--time", "1h"], capsys)
    assert rc == 2 and "--time" in err and not d.exists()
    rc, _, err = sweep(["--dir", str(tmp_path / "a b"), "--grid", "train.lr=1e-3,1e-2"], capsys)
    assert rc == 2 and "--dir" in err and not (tmp_path / "a b").exists()
    assert sweep(["--dir", str(d), "--grid", "train.lr=1e-3,1e-2", "--no-submit"], capsys)[0] == 0
    rc, _, err = sweep(["--dir", str(d), "--grid", "train.lr=1e-3,1e-2"], capsys)
    assert rc == 2 and "--force" in err
    assert not fake_sbatch.exists()


def test_force_over_a_live_array_is_refused(tmp_path: Path, fake_sbatch: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """--force writes a sweep again (its task dirs resume); while the earlier array still has tasks in the queue
    (squeue lists them) that would start a second run in each task dir: refused, naming the job to cancel."""
    squeue = fake_sbatch.parent / "bin" / "squeue"
    queue = tmp_path / "queue"
    squeue.write_text(f'#!/bin/sh\ncat {queue} 2>/dev/null\n')
    squeue.chmod(0o755)
    d = tmp_path / "sw"
    assert sweep(["--dir", str(d), "--grid", "train.lr=1e-3,1e-2"], capsys)[0] == 0
    assert json.loads((d / "sweep.json").read_text())["job"] == "4242"
    queue.write_text("0|RUNNING\n1|PENDING\n")
    rc, _, err = sweep(["--dir", str(d), "--grid", "train.lr=1e-3,1e-2", "--force"], capsys)
    assert rc == 2 and "job array 4242 still has 2 task(s) queued or running" in err and "scancel 4242" in err, err
    # Slurm cannot be asked (its controller down): no sign the array ended, so refused too.
    squeue.write_text('#!/bin/sh\necho "slurm_load_jobs error: Unable to contact slurm controller" >&2\nexit 1\n')
    rc, _, err = sweep(["--dir", str(d), "--grid", "train.lr=1e-3,1e-2", "--force"], capsys)
    assert rc == 2 and "cannot ask Slurm whether its job array 4242 still runs" in err, err
    squeue.write_text(f'#!/bin/sh\ncat {queue} 2>/dev/null\n')
    queue.write_text("")
    assert sweep(["--dir", str(d), "--grid", "train.lr=1e-3,1e-2", "--force"], capsys)[0] == 0
    # An sbatch that does not answer (slurmctld overloaded): exit 2 saying the array may be queued, not a traceback.
    from ia3_dist.tools import sweep as sweep_mod

    (fake_sbatch.parent / "bin" / "sbatch").write_text("#!/bin/sh\nexec sleep 30\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sweep_mod, "SBATCH_TIMEOUT_S", 1)
        rc, _, err = sweep(["--dir", str(tmp_path / "sw2"), "--grid", "train.lr=1e-3,1e-2"], capsys)
    assert rc == 2 and "did not answer within 1 s" in err and "squeue --me" in err, err
    # --local writes no #SBATCH line: a space in its dir is fine there.
    from ia3_dist.tools.sweep import check_sweep_dir

    check_sweep_dir(tmp_path / "a b", False, local=True)


def test_no_sbatch_on_path_is_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing there
    rc, _, err = sweep(["--dir", str(tmp_path / "sw"), "--grid", "train.lr=1e-3,1e-2"], capsys)
    assert rc == 2 and "sbatch not found" in err and "--local" in err
    assert not (tmp_path / "sw").exists()


@pytest.mark.skipif(BASH is None, reason="no bash")
def test_array_file_hands_each_task_its_values_and_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "sw"
    rc, _, err = sweep(["--dir", str(d), "--grid", "train.lr=3e-3,1e-2,3e-2", "--grid",
                        "data.max_length=128,256", "--max-concurrent", "2", "--no-submit", "train.max_steps=3"],
                       capsys)
    assert rc == 0, err
    text = (d / "sweep.sbatch").read_text()
    assert "#SBATCH --array=0-5%2\n" in text and f"#SBATCH --output={d}/logs/%x-%A_%a.out\n" in text
    assert "source slurm/lib.sh" not in text and "ia3_run() {" in text
    assert subprocess.run([BASH, "-n", str(d / "sweep.sbatch")], capture_output=True).returncode == 0
    rec = json.loads((d / "sweep.json").read_text())
    names = [t["name"] for t in rec["tasks"]]
    assert names == ["lr=3e-3,max_length=128", "lr=3e-3,max_length=256", "lr=1e-2,max_length=128",
                     "lr=1e-2,max_length=256", "lr=3e-2,max_length=128", "lr=3e-2,max_length=256"]
    # Task 3 under a stand-in python: the import check passes, the first real call (resolve) is recorded.
    stub = tmp_path / "python"
    stub.write_text('#!/bin/bash\nif [ "$1" = -c ]; then echo /x/ia3_dist/__init__.py; exit 0; fi\n'
                    'printf "%s\\0" "$@" > "$ARGS_OUT"; exit 1\n')
    stub.chmod(0o755)
    env = {"PATH": os.environ["PATH"], "IA3_DIST_PYTHON": str(stub), "ARGS_OUT": str(tmp_path / "args"),
           "SLURM_ARRAY_TASK_ID": "3"}
    proc = subprocess.run([BASH, str(d / "sweep.sbatch"), "train.seed=7"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2, proc.stderr
    got = [a.decode() for a in (tmp_path / "args").read_bytes().split(b"\0")[:-1]]
    assert got == ["-m", "ia3_dist", "resolve", "--config", str(TINY), "train.max_steps=3", "train.lr=1e-2",
                   "data.max_length=256", f"output.dir={d}/lr=1e-2,max_length=256", "train.seed=7", "--key",
                   "output.dir"]
    # Outside an array (no task id) the file refuses to guess.
    env.pop("SLURM_ARRAY_TASK_ID")
    proc = subprocess.run([BASH, str(d / "sweep.sbatch")], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "no task" in proc.stderr


# --- summary --------------------------------------------------------------------------------------------------


def fake_run(d: Path, lr: float, losses: list[float], *, adapter: bool = True, pid: int | None = None,
             host: str | None = None, preempted: bool = False, evals: tuple[float, float] | None = None,
             resolved: tuple[str, ...] = ()) -> Path:
    """A run dir as a run leaves it: run.yaml (with ``resolved``: values its start resolved), metrics.jsonl, and
    the adapter / pid file (``host`` on its second line, as rank 0 writes it; none: as earlier versions wrote it) /
    preemption marker."""
    d.mkdir(parents=True)
    (d / "run.yaml").write_text(load_config(TINY, [f"train.lr={lr}", f"output.dir={d}", *resolved]).to_yaml())
    recs = [{"step": i + 1, "loss": x, "tokens_per_s": 100.0 * (i + 1), "peak_mem_gb": 0.5 + i}
            for i, x in enumerate(losses)]
    if evals:
        recs.append({"step": len(losses), "eval_loss": evals[0], "eval_ppl": evals[1]})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"step": 9, "lo')
    if adapter:
        (d / "adapter").mkdir()
        (d / "adapter" / "adapter_model.safetensors").write_bytes(b"x")
    if pid is not None:
        (d / "rank0.pid").write_text(f"{pid}\n{host}\n" if host else str(pid))
    if preempted:
        (d / "preempted.json").write_text('{"step": 2}')
    return d


def test_summary_table_of_run_dirs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = tmp_path / "runs"
    fake_run(runs / "a", 0.003, [2.0, 1.5, 1.25], evals=(1.5, 4.48))
    fake_run(runs / "b", 0.03, [2.0, 1.0], adapter=False, pid=os.getpid())
    fake_run(runs / "c", 0.01, [2.0], adapter=False, preempted=True)
    fake_run(runs / "d", 0.1, [2.0, 9.0], adapter=False)
    fake_run(runs / "e", 0.2, [2.0, float("nan")], adapter=False)
    assert cli_main(["summary", "--json", "--no-plot", str(runs)]) == 0

    def strict(name: str) -> None:
        raise AssertionError(f"{name} in the JSON: strict readers (jq, JavaScript) refuse it")

    got = json.loads(capsys.readouterr().out, parse_constant=strict)
    assert got["rows"][-1]["train_loss"] is None  # e: its loss went NaN
    got["rows"] = got["rows"][:-1]
    assert got["keys"] == ["train.lr"]  # output.dir differs too, but always does
    rows = {Path(r["dir"]).name: r for r in got["rows"]}
    assert {k: r["status"] for k, r in rows.items()} == {"a": "done", "b": "running", "c": "preempted",
                                                         "d": "failed"}
    a = rows["a"]
    assert (a["train.lr"], a["step"], a["train_loss"], a["eval_loss"], a["eval_ppl"]) == (0.003, 3, 1.25, 1.5, 4.48)
    assert a["tokens_per_s"] == 250.0 and a["peak_mem_gb"] == 2.5  # median after the warm-up window; max
    assert rows["c"]["tokens_per_s"] == 100.0 and rows["c"]["eval_loss"] is None
    assert cli_main(["summary", "--no-plot", str(runs / "a"), str(runs / "d")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["run", "train.lr", "status", "step", "train", "loss", "eval", "loss", "eval", "ppl",
                                "tokens/s", "peak", "mem", "GiB"]
    assert lines[1].split() == [str(runs / "a"), "0.003", "done", "3", "1.25", "1.5", "4.48", "250", "2.5"]
    assert lines[2].split()[1:5] == ["0.1", "failed", "2", "9"]


def test_summary_of_a_written_sweep_shows_pending_tasks_and_plots(tmp_path: Path, fake_sbatch: Path,
                                                                  capsys: pytest.CaptureFixture[str],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "sw"
    assert sweep(["--dir", str(d), "--grid", "train.lr=3e-3,3e-2", "--no-submit", "train.global_batch_size=12"],
                 capsys)[0] == 0
    # The started task's run.yaml holds the accumulation its start derived from the global batch (12 over micro 4 x
    # 1 rank); the pending task is planned with the config's grad_accum (2), and shows the same derivation: not a
    # value that differs.
    fake_run(d / "lr=3e-2", 0.03, [2.0, 1.0], resolved=("train.global_batch_size=12", "train.grad_accum=3"))
    assert cli_main(["summary", str(d)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["run", "train.lr", "status"]
    assert out[1].split()[:4] == ["lr=3e-3", "0.003", "pending", "-"]
    assert out[2].split()[:4] == ["lr=3e-2", "0.03", "done", "2"]
    assert out[3] == f"loss curves: {d / 'summary.png'}"
    assert (d / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Ranked by a metric, the curves are still labelled by the values that differ (not rank=-, ..., metric=-).
    from ia3_dist.tools import summary

    labels = []
    real = summary.overlay_figure
    monkeypatch.setattr(summary, "overlay_figure", lambda runs: labels.extend(lab for lab, _ in runs) or real(runs))
    assert cli_main(["summary", "--metric", "heldout/loss", str(d)]) == 0
    assert labels == ["lr=0.03 (done)"], labels


def test_summary_bad_dir_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["summary", str(tmp_path / "nope")]) == 2
    (tmp_path / "empty").mkdir()
    assert cli_main(["summary", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "no such directory" in err and "not a run dir" in err


def test_stale_pid_file_is_failed_when_old(tmp_path: Path) -> None:
    d = fake_run(tmp_path / "r", 0.1, [1.0], adapter=False, pid=12345, host="other-node")
    assert run_status(d) == "running"  # wrote just now: it runs on another node, whose processes are not seen here
    old = 10_000.0
    for f in (d / "rank0.pid", d / "metrics.jsonl"):
        os.utime(f, (old, old))
    assert run_status(d) == "failed"
    assert run_status(d, job_known=True) == "failed"
    assert run_status(d, slurm_state="RUNNING", job_known=True) == "running"
    (d / "preempted.json").write_text("{}")
    assert run_status(d, slurm_state="PENDING", job_known=True) == "preempted"
    # Slurm lists the task as running while its batch shell requeues it: the attempt ended at its checkpoint (its
    # pid file gone, the marker there); once the next attempt writes its pid file it runs.
    assert run_status(d, slurm_state="RUNNING", job_known=True) == "running"
    (d / "rank0.pid").unlink()
    assert run_status(d, slurm_state="COMPLETING", job_known=True) == "preempted"
    (d / "preempted.json").unlink()
    assert run_status(d, slurm_state="RUNNING", job_known=True) == "running"


def test_a_chunk_of_a_run_is_stopped_not_done(tmp_path: Path) -> None:
    """train.stop_after_steps ends an invocation with its adapter written: the run is stopped (resume continues
    it), not done, and sweep --local runs such a task again; an attempt after it that logged later steps and ended
    without an adapter failed. The adapter of the run's end, or of an earlier version (no step file), is done."""
    from ia3_dist.runtime.adapter import STEP_FILE

    d = fake_run(tmp_path / "r", 0.1, [1.0, 0.9, 0.8])
    assert run_status(d) == "done"  # no step file: an earlier version's adapter
    (d / "adapter" / STEP_FILE).write_text('{"step": 3, "final": false}')
    assert run_status(d) == "stopped"
    with (d / "metrics.jsonl").open("a") as f:
        f.write('\n{"step": 5, "loss": 0.7}\n')
    assert run_status(d) == "failed"
    (d / "adapter" / STEP_FILE).write_text('{"step": 5, "final": true}')
    assert run_status(d) == "done"
    (d / "adapter" / STEP_FILE).write_text('{"step": 3}')
    assert run_status(d) == "done"


def test_a_pid_file_of_this_host_is_read_at_once(tmp_path: Path) -> None:
    """Rank 0's pid file names its host: where that is this host, whether the run lives is known at once (its
    process is an ia3-dist one, or it ended), not guessed from how recently the run wrote. A live process of
    another program that took the pid is no run; the same pid named by another host says nothing here, and a
    file of an earlier version (the pid alone) is a run only where its pid is one here."""
    import signal
    import socket
    import subprocess

    from ia3_dist.runtime import manifest

    here = socket.gethostname()
    run = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "ia3_dist"])
    other = subprocess.Popen(["sleep", "120"])
    try:
        d = fake_run(tmp_path / "live", 0.1, [1.0], adapter=False, pid=run.pid, host=here)
        assert run_status(d) == "running" and manifest.live_run_pid(d) == run.pid
        e = fake_run(tmp_path / "reused", 0.1, [1.0], adapter=False, pid=other.pid, host=here)
        assert run_status(e) == "failed" and manifest.live_run_pid(e) is None  # wrote just now, yet no run
        f = fake_run(tmp_path / "elsewhere", 0.1, [1.0], adapter=False, pid=run.pid, host=here + "-other")
        assert run_status(f) == "running" and manifest.live_run_pid(f) is None  # recent: it may run there
        g = fake_run(tmp_path / "old-format", 0.1, [1.0], adapter=False, pid=run.pid)
        assert manifest.live_run_pid(g) == run.pid and manifest.pid_file_alive(g) is True
        run.send_signal(signal.SIGKILL)
        run.wait()
        assert run_status(d) == "failed" and manifest.pid_file_alive(d) is False
        assert manifest.pid_file_alive(g) is None and run_status(g) == "running"  # may be another host's
    finally:
        for p in (run, other):
            p.kill()
            p.wait()


def test_rank0_writes_its_pid_and_host(tmp_path: Path) -> None:
    import socket

    from ia3_dist.runtime import manifest

    manifest.write_pid_file(tmp_path)
    stamp = manifest.start_stamp()
    assert stamp is not None and len(stamp.split()) == 2
    assert (tmp_path / "rank0.pid").read_text() == f"{os.getpid()}\n{socket.gethostname()}\n{stamp}\n"
    assert manifest.live_run_pid(tmp_path) is None  # this process itself
    # While the run lives, rank 0 touches rank0.alive (a login node's summary tells a live run on another host by
    # it); the pid file's own time stays when the attempt started. Stopped, it is removed.
    started = os.stat(tmp_path / "rank0.pid").st_mtime
    beat = manifest.PidHeartbeat(tmp_path, every_s=0.05).start()
    alive = tmp_path / manifest.ALIVE_FILE
    os.utime(alive, (started - 3600, started - 3600))
    time.sleep(0.3)
    assert alive.stat().st_mtime > started - 60 and os.stat(tmp_path / "rank0.pid").st_mtime == started
    beat.stop()
    assert not alive.exists()


def _summary_rows(d: Path, capsys: pytest.CaptureFixture[str]) -> tuple[list[str], dict[str, dict]]:
    assert cli_main(["summary", "--json", "--no-plot", str(d)]) == 0
    got = json.loads(capsys.readouterr().out)
    return got["keys"], {r["run"]: r for r in got["rows"]}


def test_pending_tasks_show_the_accumulation_their_start_derives(tmp_path: Path, fake_sbatch: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A grid over the micro-batch at a fixed global batch: each task's start derives grad_accum = global batch /
    (micro x ranks). Pending rows showed the config's grad_accum (no task started) or the started task's (one
    started), not their own."""
    d = tmp_path / "sw"
    rc, _, err = sweep(["--dir", str(d), "--nodes", "2", "--grid", "train.micro_batch_size=1,2", "--no-submit",
                        "train.global_batch_size=8"], capsys)
    assert rc == 0, err
    assert json.loads((d / "sweep.json").read_text())["world_size"] == 2  # 2 nodes x 1 CPU rank
    keys, rows = _summary_rows(d, capsys)
    assert keys == ["train.micro_batch_size", "train.grad_accum"], keys
    assert [(r["train.micro_batch_size"], r["train.grad_accum"], r["status"]) for r in rows.values()] == \
        [(1, 4, "pending"), (2, 2, "pending")]
    # Task 0 started: its run.yaml holds its own derivation (4); task 1 still shows its own (2), not task 0's.
    started = d / "micro_batch_size=1"
    started.mkdir()
    (started / "run.yaml").write_text(load_config(TINY, [f"output.dir={started}", "train.micro_batch_size=1",
                                                         "train.global_batch_size=8", "train.grad_accum=4"]).to_yaml())
    keys, rows = _summary_rows(d, capsys)
    assert rows["micro_batch_size=2"]["train.grad_accum"] == 2 and rows["micro_batch_size=1"]["train.grad_accum"] == 4
    # A record from before world_size was recorded: the ranks follow from the started task's settled batch.
    rec = json.loads((d / "sweep.json").read_text())
    del rec["world_size"]
    (d / "sweep.json").write_text(json.dumps(rec))
    _, rows = _summary_rows(d, capsys)
    assert rows["micro_batch_size=2"]["train.grad_accum"] == 2


def test_every_config_key_either_may_settle_a_start_or_cannot() -> None:
    """The summary's two lists of config keys (what a start's auto choices may depend on, and what cannot change
    them) cover every key of the schema once: a key added to the config without a decision fails here (left out
    of both, a pending task differing only in it would take a started task's choices)."""
    import dataclasses
    import typing

    from ia3_dist.config import schema

    def keys(cls: type, prefix: str = "") -> list[str]:
        hints = typing.get_type_hints(cls, vars(schema))
        out = []
        for f in dataclasses.fields(cls):
            t = hints[f.name]
            out += keys(t, f"{prefix}{f.name}.") if dataclasses.is_dataclass(t) else [prefix + f.name]
        return out

    every = keys(schema.RunConfig)
    assert len(every) > 90 and "train.lr" in every and "data.packing" in every
    both = [k for k in every if k.startswith(summary._SETTLES_NOTHING) and k.startswith(summary._MAY_SETTLE)]
    neither = [k for k in every if not k.startswith(summary._SETTLES_NOTHING + summary._MAY_SETTLE)]
    assert (both, neither) == ([], [])
    # Every entry of the lists names some key (no entry left behind by a renamed key).
    for entry in summary._SETTLES_NOTHING + summary._MAY_SETTLE:
        assert any(k.startswith(entry) for k in every), entry


@pytest.mark.parametrize(("grid", "settled"), [
    ("train.lr=3e-3,3e-2", {"deepspeed.config": "zero2", "train.micro_batch_size": 2, "train.grad_accum": 3}),
    ("data.max_length=128,256", {"deepspeed.config": "auto", "train.micro_batch_size": "auto",
                                 "train.grad_accum": None}),
])
def test_pending_tasks_take_a_started_tasks_auto_choices_only_where_nothing_settling_them_differs(
        tmp_path: Path, fake_sbatch: Path, capsys: pytest.CaptureFixture[str], grid: str, settled: dict) -> None:
    """deepspeed.config and micro_batch_size auto are settled at a task's start from the model, the data and the
    batch: a task that differs from the started one in the learning rate alone settles alike; one with another
    data.max_length may choose otherwise, so its row shows auto, and no grad_accum (the one the chosen micro-batch
    gives, not the config's 2)."""
    d = tmp_path / "sw"
    auto = ["deepspeed.config=auto", "train.micro_batch_size=auto", "train.global_batch_size=6"]
    assert sweep(["--dir", str(d), "--grid", grid, "--no-submit", *auto], capsys)[0] == 0
    rec = json.loads((d / "sweep.json").read_text())
    first, second = (t["name"] for t in rec["tasks"])
    # What prepare writes for the started task: the stage and micro-batch it chose, the accumulation that keeps 6.
    (d / first).mkdir()
    (d / first / "run.yaml").write_text(load_config(TINY, [
        *auto, rec["tasks"][0]["overrides"][0], f"output.dir={d / first}", "deepspeed.config=zero2",
        "train.micro_batch_size=2", "train.grad_accum=3"]).to_yaml())
    runs, _ = summary.collect([str(d)])
    assert [r.status for r in runs] == ["failed", "pending"]  # the first: a run.yaml alone, no process
    assert {k: runs[1].config[k] for k in settled} == settled, runs[1].config
    keys = summary.differing(runs)
    if grid.startswith("train.lr"):
        assert keys == ["train.lr"], keys  # settled alike: no column of values that differ
    else:
        assert set(settled) < set(keys), keys


def test_pending_task_keeps_its_own_config_beside_a_task_dir_of_an_earlier_sweep(
        tmp_path: Path, fake_sbatch: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """sweep --force keeps task dirs: a started task's run.yaml may hold the earlier sweep's config
    (train.max_steps=5); a pending task runs with this sweep's (9), which its row shows."""
    d = tmp_path / "sw"
    assert sweep(["--dir", str(d), "--grid", "train.lr=3e-3,3e-2", "--no-submit", "train.max_steps=9"],
                 capsys)[0] == 0
    fake_run(d / "lr=3e-2", 0.03, [2.0], resolved=("train.max_steps=5",))
    keys, rows = _summary_rows(d, capsys)
    assert rows["lr=3e-3"]["train.max_steps"] == 9 and rows["lr=3e-2"]["train.max_steps"] == 5
    assert "train.max_steps" in keys


@pytest.mark.parametrize("damage", ["not-json", "not-utf8", "format-2", "job-an-option", "not-an-object"])
def test_damaged_sweep_record_is_refused_without_force_and_replaced_with_it(
        tmp_path: Path, fake_sbatch: Path, capsys: pytest.CaptureFixture[str], damage: str) -> None:
    """One reader of sweep.json (summary.read_sweep): without --force a damaged record is exit 2 naming the file
    (not "summary shows it": summary refuses it); --force writes the new sweep over it, with a note saying what was
    there."""
    d = tmp_path / "sw"
    assert sweep(["--dir", str(d), "--grid", "train.lr=1e-3,1e-2", "--no-submit"], capsys)[0] == 0
    rec = json.loads((d / "sweep.json").read_text())
    bad = {"not-json": b'{"format": 1, "tasks": [', "not-utf8": b"\xff\xfe{}", "not-an-object": b"[]",
           "format-2": json.dumps(rec | {"format": 2}).encode(),
           "job-an-option": json.dumps(rec | {"job": "--help"}).encode()}[damage]
    (d / "sweep.json").write_bytes(bad)
    script = (d / "sweep.sbatch").read_bytes()
    rc, _, err = sweep(["--dir", str(d), "--grid", "train.lr=1e-3,1e-2"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert f"{d}/sweep.json" in err and "--force" in err and "summary" not in err, err
    assert (d / "sweep.json").read_bytes() == bad and (d / "sweep.sbatch").read_bytes() == script
    assert not fake_sbatch.exists()
    # The same record, summarised: exit 2 naming it, as the reader's own message.
    assert cli_main(["summary", str(d)]) == 2
    assert f"{d}/sweep.json" in capsys.readouterr().err
    rc, out, err = sweep(["--dir", str(d), "--grid", "train.lr=1e-3,1e-2", "--force"], capsys)
    assert rc == 0, err
    assert f"note: {d}/sweep.json" in err and "--force writes this sweep over it" in err, err
    assert json.loads((d / "sweep.json").read_text())["job"] == "4242" and "submitted job array 4242" in out


def test_force_leaves_done_tasks_out_of_the_array(tmp_path: Path, fake_sbatch: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A sweep written again with --force queues only the tasks whose runs have not finished: a done task would
    take an allocation to say so, and with output.overwrite: true train again from scratch. All done: no array."""
    _squeue(fake_sbatch, tmp_path)
    d = tmp_path / "sw"
    grid = ["--grid", "train.lr=1e-3,1e-2,3e-2,1e-1"]
    assert sweep(["--dir", str(d), *grid], capsys)[0] == 0
    assert "#SBATCH --array=0-3" in (d / "sweep.sbatch").read_text()
    tasks = json.loads((d / "sweep.json").read_text())["tasks"]
    for i in (0, 1, 3):
        fake_run(Path(tasks[i]["dir"]), float(tasks[i]["values"]["train.lr"]), [2.0, 1.0])
    fake_run(Path(tasks[2]["dir"]), 0.03, [2.0], adapter=False)  # started, not finished: queued again
    # Written again with other settings, a finished task is not what this sweep asks for: refused, naming it (the
    # dirs are named by the grid values alone; counted as done, train.epochs=5 would never have been trained).
    before = (d / "sweep.sbatch").read_text()
    rc, out, err = sweep(["--dir", str(d), *grid, "--force", "train.epochs=5"], capsys)
    assert rc == 2 and "task lr=1e-3: its run in" in err and "finished with other settings than this sweep " \
        "gives it (train.epochs); remove its dir to train it with these, or give another --dir" in err, err
    assert (d / "sweep.sbatch").read_text() == before
    rc, out, err = sweep(["--dir", str(d), *grid, "--max-concurrent", "8", "--force"], capsys)
    assert rc == 0, err
    assert "3 of 4 task(s) done already, left out of the job array" in out, out
    text = (d / "sweep.sbatch").read_text()
    assert "#SBATCH --array=2%1" in text and "a job array of 1 task(s)" in text, text
    # The cases stay: an explicit sbatch --array=0 of a done task still knows its values.
    assert "  0) TASK=" in text
    assert fake_sbatch.read_text().count("--parsable") == 2
    fake_run_done = Path(tasks[2]["dir"])
    shutil.rmtree(fake_run_done)
    fake_run(fake_run_done, 0.03, [2.0, 1.0])
    rc, out, err = sweep(["--dir", str(d), *grid, "--force"], capsys)
    assert rc == 0 and "every task is done: nothing to submit" in out, (out, err)
    assert not (d / "sweep.sbatch").exists()
    assert fake_sbatch.read_text().count("--parsable") == 2
    assert json.loads((d / "sweep.json").read_text())["job"] is None
    rc, out, err = sweep(["--dir", str(d), *grid, "--force", "--no-submit"], capsys)
    assert rc == 0 and "nothing to submit" in out and not (d / "sweep.sbatch").exists(), (out, err)


def test_array_spec_compresses_runs() -> None:
    from ia3_dist.tools.sweep import array_spec

    assert array_spec([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert array_spec([3]) == "3" and array_spec([0, 1]) == "0-1"


def _squeue(fake_sbatch: Path, tmp_path: Path) -> Path:
    """An ``squeue`` beside the fake sbatch: prints the file ``queue`` (lines ``index|STATE``), or, without it,
    answers as Slurm does for a job it has forgotten."""
    queue = tmp_path / "queue"
    squeue = fake_sbatch.parent / "bin" / "squeue"
    squeue.write_text(f'#!/bin/sh\nif [ -e {queue} ]; then cat {queue}; exit 0; fi\n'
                      'echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1\n')
    squeue.chmod(0o755)
    return queue


def _at(t: float, *paths: Path) -> None:
    for p in paths:
        os.utime(p, (t, t))


def test_task_status_is_its_latest_attempts(tmp_path: Path, fake_sbatch: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """A sweep's array (job 4242) has run task 0, which failed, leaving its pid file; the task is then run again by
    hand. The array's batch log of the task (logs/<name>-4242_0.out) is its last sign of the task: a pid file newer
    than it belongs to the attempt by hand, which runs (on another node: its pid is no process here) while it writes,
    and is done once its adapter is written, even while the array's task waits in the queue."""
    d = tmp_path / "sw"
    assert sweep(["--dir", str(d), "--grid", "train.lr=3e-3,3e-2"], capsys)[0] == 0
    queue = _squeue(fake_sbatch, tmp_path)
    now = time.time()
    run = fake_run(d / "lr=3e-3", 0.003, [2.0], adapter=False, pid=12345, host="other-node")
    log = d / "logs" / "sw-4242_0.out"
    log.write_text("[ia3-dist 10:00:00] run finished with exit 137\n")
    other = d / "logs" / "sw-5151_0.out"  # another job's log of the same index: not this array's sign
    other.write_text("")
    _at(now - 100, d / "sweep.json")
    _at(now - 60, run / "rank0.pid", run / "metrics.jsonl")
    _at(now - 50, log)
    _at(now, other)

    def status(queued: str | None = None) -> str:
        if queued is None:
            queue.unlink(missing_ok=True)
        else:
            queue.write_text(queued)
        _, rows = _summary_rows(d, capsys)
        assert rows["lr=3e-2"]["status"] == "pending"
        return rows["lr=3e-3"]["status"]

    assert status() == "failed"  # the array's attempt: the array has ended the task; no need to wait 15 minutes
    # Run again by hand: its rank 0 writes the pid file (and metrics) after the array's last word on the task.
    _at(now - 10, run / "rank0.pid", run / "metrics.jsonl")
    assert status() == "running"
    assert status("0|FAILED\n") == "running"  # squeue listing ended tasks (SQUEUE_STATES=all): not queued
    _at(now - summary.RECENT_S - 60, run / "rank0.pid", run / "metrics.jsonl")
    _at(now - summary.RECENT_S - 120, log, d / "sweep.json")
    assert status() == "failed"  # the attempt by hand stopped writing long ago
    # It ended with its adapter (and removed its pid file): done, also while the array's task is queued again.
    (run / "rank0.pid").unlink()
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"x")
    assert status() == "done"
    assert status("0|PENDING\n1|PENDING\n") == "done"
    # The array's task starts again (it resumes the finished run): Slurm's word is the latest.
    assert status("0|RUNNING\n") == "running"
    # An adapter older than the array's last sign: the queued task is what comes next.
    _at(now + 5, log)
    assert status("0|PENDING\n") == "pending"


def test_queued_task_run_by_hand_here_is_running(tmp_path: Path, fake_sbatch: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "sw"
    assert sweep(["--dir", str(d), "--grid", "train.lr=3e-3,3e-2"], capsys)[0] == 0
    queue = _squeue(fake_sbatch, tmp_path)
    queue.write_text("0|PENDING\n1|PENDING\n")
    import socket
    import subprocess

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "ia3_dist"])  # a run's rank 0
    try:
        run = fake_run(d / "lr=3e-3", 0.003, [2.0], adapter=False, pid=live.pid, host=socket.gethostname())
        _at(time.time() - 100, d / "sweep.json")
        _, rows = _summary_rows(d, capsys)
        assert rows["lr=3e-3"]["status"] == "running" and rows["lr=3e-2"]["status"] == "pending"
        # The same pid file older than the sweep record: no attempt of its own, the queue's word stands.
        _at(time.time() - 200, run / "rank0.pid")
        _, rows = _summary_rows(d, capsys)
        assert rows["lr=3e-3"]["status"] == "pending"
    finally:
        live.kill()
        live.wait()


def test_slurm_states_leave_out_ended_tasks(fake_sbatch: Path, tmp_path: Path) -> None:
    queue = _squeue(fake_sbatch, tmp_path)
    queue.write_text("0|COMPLETED\n1|FAILED\n2|PENDING\n3|RUNNING\n4|TIMEOUT\n5|REQUEUE_HOLD\n")
    assert summary.slurm_states("4242") == {2: "PENDING", 3: "RUNNING", 5: "REQUEUE_HOLD"}
    queue.unlink()
    assert summary.slurm_states("4242") == {}


@pytest.mark.slow
def test_local_sweep_runs_the_grid_in_turn(tmp_path: Path, tiny_model: Path) -> None:
    """--local: both tasks train here, one after the other, each into its own dir; the summary closes the output;
    run again, the finished tasks are skipped."""
    d = tmp_path / "sw"
    cmd = [sys.executable, "-m", "ia3_dist", "sweep", "--local", "--config", str(TINY), "--grid", "train.lr=3e-3,3e-2",
           "--dir", str(d), f"model.path={tiny_model}", "train.max_steps=2", "train.log_every=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert out.index("[1/2] lr=3e-3: done in") < out.index("[2/2] lr=3e-2: training") < out.index("[2/2] lr=3e-2: done")
    rows = [ln.split() for ln in out.splitlines() if ln.startswith("lr=")]
    assert [r[:4] for r in rows] == [["lr=3e-3", "0.003", "done", "2"], ["lr=3e-2", "0.03", "done", "2"]], out
    for name in ("lr=3e-3", "lr=3e-2"):
        assert (d / name / "adapter" / "adapter_model.safetensors").is_file()
        assert (d / "logs" / f"{name}.log").stat().st_size > 0
    assert (d / "summary.png").is_file()
    again = subprocess.run([*cmd, "--force"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("done already, skipped") == 2


@pytest.mark.slow
def test_task_run_again_by_hand_after_the_array_failed_it(tmp_path: Path, tiny_model: Path, fake_sbatch: Path,
                                                          capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Real runs in a sweep task's dir. The array's attempt is killed at step 2 (SIGKILL: its pid file stays) and its
    batch shell logs the exit: failed. The task's command is run again by hand, held at step 2: running, also as
    seen from another node (its pid no process here). Released, it writes its adapter: done, whether the array's
    job is gone or its task waits in the queue again."""
    d = tmp_path / "sw"
    rc, _, err = sweep(["--dir", str(d), "--grid", "train.lr=3e-3,3e-2", f"model.path={tiny_model}",
                        "train.max_steps=3", "train.log_every=1"], capsys)
    assert rc == 0, err
    rec = json.loads((d / "sweep.json").read_text())
    task = rec["tasks"][0]
    run = d / task["name"]
    # The task's command as the array file runs it (with one rank: python -m ia3_dist).
    cmd = [sys.executable, "-m", "ia3_dist", "--config", rec["config"], *rec["overrides"], *task["overrides"],
           "train.resume=auto"]
    env = {**os.environ, "IA3_DIST_FAULT": "step:2:0:kill"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9 and (run / "rank0.pid").is_file(), proc.stderr[-3000:]
    (d / "logs" / f"{d.name}-4242_0.out").write_text("[ia3-dist 10:00:00] run finished with exit 137\n")
    queue = _squeue(fake_sbatch, tmp_path)  # the array is gone: Slurm has forgotten job 4242

    def statuses() -> list[str]:
        runs, _ = summary.collect([str(d)])
        return [r.status for r in runs]

    assert statuses() == ["failed", "pending"]
    release = tmp_path / "release"
    env = {**os.environ, "IA3_DIST_FAULT": "step:2:0:hold", "IA3_DIST_FAULT_RELEASE": str(release),
           "IA3_DIST_FAULT_HOLD_S": "600"}
    again = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        t0 = time.time()
        while not ((run / "rank0.pid").is_file()
                   and (run / "rank0.pid").read_text().split("\n")[0] == str(again.pid)):
            assert again.poll() is None and time.time() - t0 < 600, again.stdout.read() if again.stdout else ""
            time.sleep(0.2)
        assert statuses() == ["running", "pending"]
        with monkeypatch.context() as m:
            m.setattr(summary, "pid_file_alive", lambda _: None)  # as summary sees it on another node
            assert statuses() == ["running", "pending"]
            queue.write_text("0|PENDING\n")
            assert statuses()[0] == "pending"  # elsewhere and queued: the queue's word (a pid alive here is not)
            queue.unlink()
    finally:
        release.touch()
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out[-3000:]
    assert not (run / "rank0.pid").exists() and (run / "adapter" / "adapter_model.safetensors").is_file()
    assert statuses() == ["done", "pending"]
    queue.write_text("0|PENDING\n1|PENDING\n")  # requeued by hand, or held back by --max-concurrent
    assert statuses() == ["done", "pending"]
    assert cli_main(["summary", "--no-plot", str(d)]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[:3] == [task["name"], "0.003", "done"]


def test_a_sweep_dir_yaml_would_cut_gives_each_task_its_own_dir(tmp_path: Path) -> None:
    """A local sweep dir named "exp #2": the tasks' output.dir overrides are read as YAML, where " #" starts a
    comment, so every task trained in ".../exp" (the second resumed the first). Each task now gets its own dir."""
    from ia3_dist.config import load_config
    from ia3_dist.tools.sweep import plan_tasks

    tasks = plan_tasks(TINY, [], {"train.lr": ["3e-3", "1e-2"]}, tmp_path / "exp #2", 10)
    dirs = [load_config(TINY, t.overrides).output.dir for t in tasks]
    assert dirs == [str(tmp_path / "exp #2" / "lr=3e-3"), str(tmp_path / "exp #2" / "lr=1e-2")], dirs


def test_a_run_whose_final_adapter_diverged_ranks_last(tmp_path: Path) -> None:
    """results.json of `ia3-dist eval` writes a diverged point's value as NaN: that final row was read as no value,
    and the run was ranked by an earlier checkpoint's, first here."""
    from ia3_dist.tools.summary import eval_value, rank_by

    def run(name: str, step500: float, final: str) -> dict:
        d = tmp_path / name
        (d / "eval").mkdir(parents=True)
        rows = [{"checkpoint": "step500", "step": 500, "task": "heldout", "metric": "loss", "value": step500}]
        text = json.dumps({"rows": rows})[:-2] + (', {"checkpoint": "final", "step": 1000, "task": "heldout", '
                                                  f'"metric": "loss", "value": {final}}}]}}')
        (d / "eval" / "results.json").write_text(text)
        return {"dir": str(d), "heldout/loss": eval_value(d, "heldout/loss")}

    a, b = run("a", 1.1, "NaN"), run("b", 1.5, "1.3")
    assert math.isnan(a["heldout/loss"]) and b["heldout/loss"] == 1.3
    assert [r["dir"] for r in rank_by([a, b], "heldout/loss")] == [b["dir"], a["dir"]]


def test_a_local_sweep_keeps_the_visible_gpus() -> None:
    """Given --num_accelerators the deepspeed launcher drops CUDA_VISIBLE_DEVICES and runs on devices 0..N-1
    (another user's on a shared box): a local sweep's ranks take the GPUs the variable names, as lib.sh's jobs do."""
    from ia3_dist.errors import UsageError
    from ia3_dist.tools.sweep import local_devices

    assert local_devices(2, {"CUDA_VISIBLE_DEVICES": "2,3,5"}) == ["--include", "localhost:2,3"]
    assert local_devices(2, {}) == ["--num_accelerators", "2"]  # CPU ranks
    with pytest.raises(UsageError, match="names 1 GPU"):
        local_devices(2, {"CUDA_VISIBLE_DEVICES": "4"})
    with pytest.raises(UsageError, match="UUID or MIG"):
        local_devices(2, {"CUDA_VISIBLE_DEVICES": "GPU-8a1b,GPU-9c2d"})


def test_a_preempted_task_the_queue_no_longer_holds_is_stopped(tmp_path: Path) -> None:
    """preempted.json says a task checkpointed for its requeue; once Slurm (asked) no longer lists it (cancelled
    after its requeue, a refused requeue, the stall guard's end) nothing will requeue it: stopped (resume=auto
    continues it), not 'preempted' for ever. Without a record of the job it waits for its requeue, as before."""
    d = fake_run(tmp_path / "t", 0.003, [2.0], adapter=False, preempted=True)
    assert run_status(d) == "preempted"
    assert run_status(d, "REQUEUED", True) == "preempted"
    assert run_status(d, None, True) == "stopped"


def test_a_run_on_another_host_is_running_while_its_pid_file_beats(tmp_path: Path) -> None:
    """Seen from a login node, a run on another host counts as running while it wrote within RECENT_S: a load or a
    log window longer than that (a big model, slow steps x log_every) showed it failed. Rank 0 touches rank0.alive
    every minute."""
    d = fake_run(tmp_path / "r", 0.003, [2.0], adapter=False, pid=12345, host="gpu-node-017")
    old = time.time() - summary.RECENT_S - 300
    _at(old, d / "rank0.pid", d / "metrics.jsonl")
    assert run_status(d) == "failed"
    (d / "rank0.alive").write_text("")  # rank 0's heartbeat, touched a moment ago
    assert run_status(d) == "running"


def test_a_finished_run_is_compared_only_on_what_it_trained(tmp_path: Path) -> None:
    """What `sweep --force` calls another training: a value of a key both configs hold that changes what is
    trained. Keys an earlier ia3-dist did not write, the start's own choices and the keys that change only how a
    run goes (logging, caches, threads, benchmarks) are not."""
    from ia3_dist.tools.summary import config_view, trained_otherwise

    planned = config_view(load_config(TINY, ["train.lr=0.01", "train.epochs=2"]).to_dict())
    d = fake_run(tmp_path / "r", 0.01, [2.0, 1.0], resolved=("train.epochs=2",))
    assert trained_otherwise(d, planned) == []
    old = "".join(ln for ln in (d / "run.yaml").read_text().splitlines(keepends=True)
                  if "compile_backend" not in ln and "label_smoothing" not in ln)
    (d / "run.yaml").write_text(old)
    assert trained_otherwise(d, planned) == []
    for key, value in (("train.log_every", 7), ("data.cache_dir", "/elsewhere"), ("train.peak_tflops", 5.0),
                       ("eval.batch_size", 3), ("train.threads", 2)):
        assert trained_otherwise(d, {**planned, key: value}) == [], key
    assert trained_otherwise(d, {**planned, "train.epochs": 5, "train.lr": 0.02}) == ["train.epochs", "train.lr"]
    # A key the old run.yaml lacks counts as its default: set otherwise now, it is another training.
    assert trained_otherwise(d, {**planned, "train.label_smoothing": 0.1}) == ["train.label_smoothing"]
    # eval.* changes what is trained where early stopping follows a benchmark score.
    bench = {**planned, "train.early_stopping.metric": "tiny_mc/acc,none"}
    assert trained_otherwise(d, {**bench, "eval.limit": 3}) == ["eval.limit", "train.early_stopping.metric"]
    # A held-out metric with a slash in its name (a preference run's) is not a benchmark score.
    pair = {**planned, "train.objective": "dpo", "train.early_stopping.metric": "eval_rewards/margins"}
    assert "eval.limit" not in trained_otherwise(d, {**pair, "eval.limit": 3})
