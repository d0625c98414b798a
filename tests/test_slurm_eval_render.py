"""``ia3-dist slurm --eval`` as a renderer (unit tier: no Slurm cluster, no training).

Besides the training job file it writes ``<name>.eval.sbatch`` (one node, never more GPUs per node or time than the
training job, ``ia3-dist eval`` on the run's output.dir with the training job's python) and ``<name>.submit.sh``
(``sbatch --parsable`` the training job, then the evaluation with ``--dependency=afterok:<id>
--kill-on-invalid-dep=yes``). Bad ``--eval-*`` values exit 2 naming the option before any file is written. The
real dependency (held through a requeue, a failed training job cancelling the evaluation) is tested on Slurm in
test_slurm.py.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from _util import lm_eval_registry_indexed_once

from ia3_dist.cli import main as cli_main
from ia3_dist.tools.slurm import NAME_MAX, template_dir, time_seconds

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny-cpu.yaml"
TASKS = ROOT / "tests" / "data"
HELDOUT = "data.eval_ratio=0.05"  # tiny-cpu.yaml has no held-out data of its own
BASH = shutil.which("bash")
needs_bash = pytest.mark.skipif(BASH is None, reason="no bash")


@pytest.fixture(scope="module")
def registry_indexed_once() -> Iterator[None]:
    with lm_eval_registry_indexed_once():
        yield


def directives(text: str, opt: str) -> list[str]:
    return [ln.split("=", 1)[1] for ln in text.splitlines() if ln.startswith(f"#SBATCH --{opt}=")]


def slurm(tmp: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``ia3-dist slurm --config tiny-cpu.yaml --out <tmp>/job.sbatch ARGS``."""
    rc = cli_main(["slurm", "--config", str(TINY), "--out", str(tmp / "job.sbatch"), *args])
    out, err = capsys.readouterr()
    return rc, out, err


def files(tmp: Path) -> tuple[str, str, str]:
    return tuple((tmp / n).read_text() for n in ("job.sbatch", "job.eval.sbatch", "job.submit.sh"))


def assert_refused(rc: int, err: str, tmp: Path, *needles: str) -> None:
    """Exit 2, one line naming the option, and no file written."""
    assert rc == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    assert sorted(p.name for p in tmp.iterdir()) == [], err


# --- what is written ----------------------------------------------------------------------------------------------


def test_eval_writes_the_job_file_the_eval_file_and_the_submit_script(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = slurm(tmp_path, capsys, "--nodes", "2", "--gpus-per-node", "4", "--time", "12:00:00",
                         "--partition", "gpu", "--account", "proj", "--eval", HELDOUT, "output.dir=runs/a b")
    assert rc == 0, err
    train, ev, submit = files(tmp_path)
    assert directives(train, "nodes") == ["2"]  # the training job is what `ia3-dist slurm` writes without --eval
    for opt, want in [("nodes", "1"), ("ntasks-per-node", "1"), ("gpus-per-node", "4"), ("time", "12:00:00"),
                      ("partition", "gpu"), ("account", "proj"), ("job-name", "a-b-eval"),
                      ("kill-on-invalid-dep", "yes"), ("output", "%x-%j.out")]:
        assert directives(ev, opt) == [want], opt
    assert "#SBATCH --requeue\n" in ev and "--signal" not in ev and directives(ev, "cpus-per-task") == []
    # The training job's config (absolute) and overrides, then `ia3-dist eval`'s options after `--`.
    assert f"\n[ $# -gt 0 ] || set -- {TINY} {HELDOUT} 'output.dir=runs/a b' -- --checkpoints all\n" in ev
    assert ev.rstrip().endswith('ia3_eval "$@"')
    # Self-contained like the training file: the recorded python and lib.sh inlined, no checkout.
    assert "IA3_DIST_HOME" not in ev and "source " not in ev and "\nia3_eval() {" in ev
    assert train.split("\nPYTHON=")[1].split("\n")[0] == ev.split("\nPYTHON=")[1].split("\n")[0]
    assert 'train=$(sbatch --parsable "$DIR"/job.sbatch)' in submit
    assert ('evaljob=$(sbatch --parsable --dependency="afterok:$train" --kill-on-invalid-dep=yes '
            '"$DIR"/job.eval.sbatch)') in submit
    for f in ("job.sbatch", "job.eval.sbatch", "job.submit.sh"):
        assert os.access(tmp_path / f, os.X_OK), f
        if BASH:
            assert subprocess.run([BASH, "-n", str(tmp_path / f)], capture_output=True).returncode == 0, f
    assert f"bash {tmp_path / 'job.submit.sh'}" in out
    assert f"--dependency=afterok:${{train%%;*}} --kill-on-invalid-dep=yes {tmp_path / 'job.eval.sbatch'}" in out


def test_eval_options_reach_ia3_dist_eval(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(ROOT)  # tiny_mc.yaml names its data file relative to the working dir
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    spec = (TASKS / "tiny_mc.yaml").read_text()
    (tasks / "tiny_mc.yaml").write_text(spec)
    (tasks / "tiny_mc2.yaml").write_text(spec.replace("task: tiny_mc", "task: tiny_mc2"))
    rc, _, err = slurm(tmp_path, capsys, "--gpus-per-node", "8", "--time", "2-0", "--eval", "--eval-tasks",
                       "tiny_mc,tiny_mc2", "--eval-include", str(tasks), "--eval-checkpoints",
                       "step500,final", "--eval-gpus", "2", "--eval-time", "1-12:30")
    assert rc == 0, err
    ev = files(tmp_path)[1]
    assert directives(ev, "gpus-per-node") == ["2"] and directives(ev, "time") == ["1-12:30"]
    assert (f"-- --checkpoints step500,final --tasks tiny_mc,tiny_mc2 --include {tasks}\n"
            in ev)  # the include dir made absolute, as the config is


@pytest.mark.parametrize(("args", "gpus", "cpus"), [
    (["--gpus-per-node", "4", "--eval-gpus", "0"], [], []),  # a GPU job's evaluation on no GPU: Slurm's CPUs
    (["--gpus-per-node", "0", "--cpus-per-node", "3"], [], ["3"]),  # CPU nodes: the training job's CPUs
    (["--gpus-per-node", "0", "--cpus-per-node", "3", "--eval-gpus", "0"], [], ["3"]),
    (["--gpus-per-node", "4", "--cpus-per-node", "32", "--eval-gpus", "0"], [], []),
    # With GPUs, the training job's CPUs per GPU for each: not one core for the launcher and all its ranks.
    (["--gpus-per-node", "4", "--cpus-per-node", "32"], ["4"], ["32"]),
    (["--gpus-per-node", "4", "--cpus-per-node", "32", "--eval-gpus", "2"], ["2"], ["16"]),
])
def test_eval_cpus(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], gpus: list[str],
                           cpus: list[str]) -> None:
    rc, _, err = slurm(tmp_path, capsys, *args, "--eval", HELDOUT)
    assert rc == 0, err
    ev = files(tmp_path)[1]
    assert directives(ev, "gpus-per-node") == gpus and directives(ev, "cpus-per-task") == cpus


@pytest.mark.parametrize("args", [["--nodes", "1-2", "train.global_batch_size=64"], ["--nodes", "3"],
                                  ["--nodes", "2", "--launcher", "srun"], ["--nodes", "2", "--launcher", "torchrun"]])
def test_eval_is_one_node_one_task_whatever_the_training_layout(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                args: list[str]) -> None:
    rc, _, err = slurm(tmp_path, capsys, "--gpus-per-node", "8", *args, "--eval", HELDOUT)
    assert rc == 0, err
    ev = files(tmp_path)[1]
    assert directives(ev, "nodes") == ["1"] and directives(ev, "ntasks-per-node") == ["1"]
    assert directives(ev, "ntasks") == [] and "--spread-job" not in ev and "LAUNCHER=" not in ev


def test_eval_job_name_stays_a_valid_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = slurm(tmp_path, capsys, "--job-name", "j" * NAME_MAX, "--eval", HELDOUT)
    assert rc == 0, err
    (name,) = directives(files(tmp_path)[1], "job-name")
    assert name == "j" * (NAME_MAX - 5) + "-eval"


def test_default_names_follow_the_training_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli_main(["slurm", "--config", str(TINY), "--eval", HELDOUT, "output.dir=runs/exp1"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp1.eval.sbatch", "exp1.sbatch", "exp1.submit.sh"]
    assert cli_main(["slurm", "--config", str(TINY), "--out", "job", "--eval", HELDOUT]) == 0
    assert {"job", "job.eval.sbatch", "job.submit.sh"} <= {p.name for p in tmp_path.iterdir()}


# --- the scripts, run with stand-ins for sbatch and python ---------------------------------------------------------


def _stub(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)
    return path


@needs_bash
def test_submit_script_chains_the_jobs_by_id(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The evaluation is submitted with afterok on the id sbatch --parsable printed (its ;cluster suffix cut); no
    evaluation is submitted when the training submission fails, and a failed evaluation submission says how to
    submit it by hand."""
    rc, _, err = slurm(tmp_path, capsys, "--eval", HELDOUT)
    assert rc == 0, err
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls"
    _stub(bin_dir / "sbatch", f'echo "$*" >> {log}\nn=$(wc -l < {log})\n'
                              '[ "$n" != "${FAIL_AT:-0}" ] || { echo "sbatch: error: refused" >&2; exit 1; }\n'
                              'echo "$((4000 + n));cluster1"\n')
    env = {"PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    work = tmp_path / "work"  # the jobs start where the script is run; the files are found beside it
    work.mkdir()
    proc = subprocess.run([BASH, str(tmp_path / "job.submit.sh")], cwd=work, env=env, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert log.read_text().splitlines() == [
        f"--parsable {tmp_path}/job.sbatch",
        f"--parsable --dependency=afterok:4001 --kill-on-invalid-dep=yes {tmp_path}/job.eval.sbatch"]
    assert proc.stdout.splitlines() == ["training job 4001",
                                        "evaluation job 4002 (starts after job 4001 completes with exit 0)"]
    for fail_at, calls in ((1, 1), (2, 2)):
        log.unlink()
        proc = subprocess.run([BASH, str(tmp_path / "job.submit.sh")], cwd=work, env={**env, "FAIL_AT": str(fail_at)},
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode != 0 and len(log.read_text().splitlines()) == calls, proc.stderr
    assert "training job 4001 submitted, but not its evaluation" in proc.stderr
    assert f"sbatch --dependency=afterok:4001 --kill-on-invalid-dep=yes {tmp_path}/job.eval.sbatch" in proc.stderr
    proc = subprocess.run([BASH, str(tmp_path / "job.submit.sh"), "--qos=x"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "no arguments" in proc.stderr
    # A file name with shell syntax in it is printed, never run (it once stood inside a double-quoted echo).
    odd = tmp_path / "odd"
    odd.mkdir()
    name = "j`touch PWNED`$(touch PWNED2)$UNSET_VAR"
    assert cli_main(["slurm", "--config", str(TINY), "--out", str(odd / f"{name}.sbatch"), "--eval", HELDOUT]) == 0
    capsys.readouterr()
    log.unlink()
    proc = subprocess.run([BASH, str(odd / f"{name}.submit.sh")], cwd=work, env={**env, "FAIL_AT": "2"},
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and not list(work.glob("PWNED*")) and not list(odd.glob("PWNED*")), proc.stderr
    assert f"--kill-on-invalid-dep=yes {odd}/j\\`touch\\ PWNED\\`\\$\\(touch\\ PWNED2\\)\\$UNSET_VAR.eval.sbatch" \
        in proc.stderr, proc.stderr


@needs_bash
@pytest.mark.parametrize(("gpus", "launch"), [
    (["--gpus-per-node", "1"], []),
    (["--gpus-per-node", "4", "--eval-gpus", "0"], []),
    (["--gpus-per-node", "4"], ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4"]),
    (["--gpus-per-node", "4", "--eval-gpus", "2"], ["-m", "torch.distributed.run", "--standalone",
                                                    "--nproc_per_node", "2"]),
    (["--gpus-per-node", "0", "--cpus-per-node", "2"], ["-m", "torch.distributed.run", "--standalone",
                                                        "--nproc_per_node", "2"]),
])
def test_eval_file_runs_ia3_dist_eval_on_the_resolved_output_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str], gpus: list[str],
                                                                 launch: list[str]) -> None:
    """The eval job resolves output.dir from the training job's config and overrides (hostile ones stay data) and
    runs `$PYTHON -m ia3_dist eval <dir> <options>` with the recorded python, one rank per GPU of the job (or per
    CPU rank on CPU nodes) through torch.distributed.run when there is more than one; its exit code is the
    job's."""
    monkeypatch.chdir(ROOT)
    hostile = "output.dir=runs/x$(touch MARKER)"
    rc, _, err = slurm(tmp_path, capsys, *gpus, "--eval", "--eval-tasks", "tiny_mc", "--eval-include", "tests/data",
                       HELDOUT, hostile)
    assert rc == 0, err
    calls = tmp_path / "calls"
    stub = _stub(tmp_path / "python", 'if [ "$1" = -c ]; then echo /x/ia3_dist/__init__.py; exit 0; fi\n'
                                      f'printf "%s\\0" "$@" >> {calls}; printf "\\n" >> {calls}\n'
                                      '[ "$3" = resolve ] && { echo "runs/resolved dir"; exit 0; }\nexit 7\n')
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "IA3_DIST_PYTHON": str(stub), "SLURM_JOB_ID": "9",
           "SLURM_JOB_NODELIST": "n1"}
    proc = subprocess.run([BASH, str(tmp_path / "job.eval.sbatch")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 7, proc.stdout + proc.stderr
    resolve, ev = ([a.decode() for a in line.split(b"\0")[:-1]]
                   for line in calls.read_bytes().split(b"\n") if line)
    assert resolve == ["-m", "ia3_dist", "resolve", "--config", str(TINY), HELDOUT, hostile, "--key", "output.dir"]
    assert ev == [*launch, "-m", "ia3_dist", "eval", "runs/resolved dir", "--checkpoints", "all", "--tasks",
                  "tiny_mc", "--include", str(TASKS)]
    assert "eval finished with exit 7" in proc.stdout
    assert list(tmp_path.rglob("MARKER*")) == [] and list(ROOT.glob("MARKER*")) == []


def test_checkout_template_matches_the_generator() -> None:
    """slurm/eval.sbatch is both the checkout's template and what the generator fills: its directives are the
    eval job's."""
    text = (template_dir() / "eval.sbatch").read_text()
    assert directives(text, "kill-on-invalid-dep") == ["yes"] and directives(text, "nodes") == ["1"]
    assert 'source slurm/lib.sh\nia3_eval "$@"\n' in text


# --- refusals: exit 2 naming the option, nothing written --------------------------------------------------------


@pytest.mark.parametrize(("args", "needles"), [
    (["--gpus-per-node", "4", "--eval-gpus", "5"], ["--eval-gpus", "0 to 4", "never asks for more"]),
    (["--gpus-per-node", "0", "--cpus-per-node", "2", "--eval-gpus", "1"], ["--eval-gpus", "0 to 0"]),
    (["--eval-gpus", "-1"], ["--eval-gpus"]),
    (["--eval-gpus", "1\n2"], ["--eval-gpus"]),
    (["--time", "01:00:00", "--eval-time", "01:00:01"], ["--eval-time", "longer than the training job's", "01:00:00"]),
    (["--time", "90", "--eval-time", "1-0"], ["--eval-time", "longer"]),
    (["--time", "2-0", "--eval-time", "0"], ["--eval-time", "longer"]),  # 0: no limit, more than any
    (["--eval-time", "1h"], ["--eval-time", "expected a Slurm time limit"]),
    (["--eval-time", "1:00\n#SBATCH --x=1"], ["--eval-time"]),
    (["--eval-tasks", "tiny mc"], ["--eval-tasks", "comma-separated list of lm-eval task names"]),
    (["--eval-tasks", ""], ["--eval-tasks"]),
    (["--eval-tasks", "a,,b"], ["--eval-tasks"]),
    (["--eval-tasks", "a,"], ["--eval-tasks"]),
    (["--eval-tasks", "$(touch X)"], ["--eval-tasks"]),
    (["--eval-tasks", "a\x1b[2Kb"], ["--eval-tasks", "control character"]),
    (["--eval-checkpoints", "step"], ["--eval-checkpoints", "all, latest, best"]),
    (["--eval-checkpoints", "step5,"], ["--eval-checkpoints"]),
    (["--eval-checkpoints", "latest,best"], ["--eval-checkpoints"]),
    (["--eval-checkpoints", "all\n"], ["--eval-checkpoints", "control character"]),
    (["--eval-include", "tests/data"], ["--eval-include", "needs --eval-tasks"]),
    (["--eval-tasks", "tiny_mc", "--eval-include", "no/such/dir"], ["--eval-include", "not a directory"]),
    (["--eval-tasks", "tiny_mc", "--eval-include", "tests/data\r"], ["--eval-include", "control character"]),
    (["--eval-tasks", "tiny_mc", "--eval-include", "d" * 10_000], ["--eval-include", "not a directory"]),
    (["--eval-tasks", "t" * 10_000], ["--eval-tasks", "..."]),  # one line, the value shortened
], ids=lambda v: repr(v)[:40] if isinstance(v, list) else None)
def test_bad_eval_values_exit_2_naming_the_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str], args: list[str],
                                                  needles: list[str]) -> None:
    monkeypatch.chdir(ROOT)
    out = tmp_path / "out"
    out.mkdir()
    rc, _, err = slurm(out, capsys, "--eval", HELDOUT, *args)
    assert_refused(rc, err, out, *needles)


def test_nothing_to_evaluate_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Without lm-eval tasks the job computes the held-out loss: a run without held-out data (or a preference run,
    whose held-out data are pairs) would evaluate nothing; best needs the held-out loss too."""
    rc, _, err = slurm(tmp_path, capsys, "--eval")
    assert_refused(rc, err, tmp_path, "--eval-tasks", "no held-out loss to evaluate (it sets no data.eval_ratio",
                   "give the run held-out data")
    rc, _, err = slurm(tmp_path, capsys, "--eval", HELDOUT, "train.objective=dpo")
    # Its held-out pairs exist: the message says why they are not what the job evaluates, and not to add them.
    assert_refused(rc, err, tmp_path, "--eval-tasks", "for train.objective sft only; this run's is dpo", "name tasks")
    assert "give the run held-out data" not in err
    rc, _, err = slurm(tmp_path, capsys, "--eval", "--eval-tasks", "tiny_mc", "--eval-checkpoints", "best")
    assert_refused(rc, err, tmp_path, "--eval-checkpoints best", "data.eval_ratio")
    # Tasks alone: fine (tiny_mc is a local task: its dir is named).
    assert slurm(tmp_path, capsys, "--eval", "--eval-tasks", "tiny_mc", "--eval-include", str(TASKS))[0] == 0


@pytest.mark.usefixtures("registry_indexed_once")
@pytest.mark.slow
def test_a_task_eval_would_not_run_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A name that is neither a local task nor in lm-eval's registry: `ia3-dist eval` refuses it, so the job would
    fail once the training is done; refused here, with the same message (slow: indexing the registry)."""
    monkeypatch.chdir(ROOT)
    rc, _, err = slurm(tmp_path, capsys, "--eval", "--eval-tasks", "tiny_mcq", "--eval-include", "tests/data")
    assert_refused(rc, err, tmp_path, "--eval-tasks: unknown task(s) ['tiny_mcq']")
    rc, _, err = slurm(tmp_path, capsys, "--eval", "--eval-tasks", "tiny_mc")  # local, but its dir is not named
    assert_refused(rc, err, tmp_path, "--eval-tasks: unknown task(s) ['tiny_mc']")


def test_a_task_file_whose_data_is_missing_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "t.yaml").write_text("task: t\ndataset_path: json\ndataset_kwargs: {data_files: {test: nowhere.jsonl}}\n")
    out = tmp_path / "out"
    out.mkdir()
    rc, _, err = slurm(out, capsys, "--eval", "--eval-tasks", "t", "--eval-include", str(tasks), HELDOUT)
    assert_refused(rc, err, out, "--eval-include", "nowhere.jsonl", "not on this machine")


@pytest.mark.parametrize("opt", [["--eval-tasks", "tiny_mc"], ["--eval-gpus", "0"], ["--eval-time", "10"],
                                 ["--eval-checkpoints", "latest"], ["--eval-include", "tests/data"]])
def test_eval_options_need_eval(tmp_path: Path, capsys: pytest.CaptureFixture[str], opt: list[str]) -> None:
    rc, _, err = slurm(tmp_path, capsys, *opt, HELDOUT)
    assert_refused(rc, err, tmp_path, opt[0], "add --eval")


@pytest.mark.parametrize("existing", ["job.sbatch", "job.eval.sbatch", "job.submit.sh"])
def test_no_file_of_the_set_is_written_over_without_force(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          existing: str) -> None:
    (tmp_path / existing).write_text("keep me\n")
    rc, _, err = slurm(tmp_path, capsys, "--eval", HELDOUT)
    assert rc == 2 and existing in err and "--force" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == [existing]  # the others not written either
    assert (tmp_path / existing).read_text() == "keep me\n"
    assert slurm(tmp_path, capsys, "--eval", HELDOUT, "--force")[0] == 0
    assert all(t.startswith("#!/bin/bash\n") for t in files(tmp_path))


def test_a_name_only_the_eval_files_make_too_long_is_refused_before_any_write(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli_main(["slurm", "--config", str(TINY), "--out", str(tmp_path / ("n" * 245 + ".sbatch")), "--eval",
                   HELDOUT])
    err = capsys.readouterr().err
    assert rc == 2 and "--eval" in err and ".eval.sbatch: file name longer than" in err, err
    assert list(tmp_path.iterdir()) == []


def test_a_symlink_or_dir_in_place_of_the_eval_file_is_refused(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("keep me\n")
    (tmp_path / "job.eval.sbatch").symlink_to(target)
    rc, _, err = slurm(tmp_path, capsys, "--eval", HELDOUT, "--force")
    assert rc == 2 and "symlink" in err and "--eval" in err, err
    assert target.read_text() == "keep me\n" and not (tmp_path / "job.sbatch").exists()
    (tmp_path / "job.eval.sbatch").unlink()
    (tmp_path / "job.submit.sh").mkdir()
    rc, _, err = slurm(tmp_path, capsys, "--eval", HELDOUT, "--force")
    assert rc == 2 and "directory" in err and not (tmp_path / "job.sbatch").exists(), err


# --- Slurm time limits ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "seconds"), [("90", 5400), ("90:30", 5430), ("12:00:00", 43200), ("2-0", 172800),
                                                ("2-12:30", 217800), ("1-0:0:5", 86405), ("0", math.inf),
                                                ("00:00:00", math.inf)])
def test_time_seconds(value: str, seconds: float) -> None:
    assert time_seconds(value) == seconds
