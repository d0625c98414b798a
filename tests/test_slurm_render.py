"""``ia3-dist slurm`` as a renderer (unit tier: no Slurm cluster, no training).

Every value that reaches the generated script is checked against Slurm's grammar or written inert: the inputs of
the security review (a newline in --account, a backslash escape in --job-name, a group reference in --time) are
refused with exit 2, overrides stay shell-quoted data, and --out never overwrites a file without --force.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ia3_dist.cli import main as cli_main
from ia3_dist.errors import UsageError
from ia3_dist.tools.slurm import NAME_MAX, _set_directive, render, safe_name, template_dir
from ia3_dist.tools.slurm import main as slurm_main

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml"
BASH = shutil.which("bash")
needs_bash = pytest.mark.skipif(BASH is None, reason="no bash")
# No example database: it would write .hypothesis/ into the shared working tree.
PROPERTY = settings(max_examples=60, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
VALID_NAME = st.from_regex(r"\A[A-Za-z0-9_][A-Za-z0-9._+-]{0,63}\Z")


def _render(**kw) -> str:
    args = dict(config=str(TINY), overrides=[], nodes=1, gpus_per_node=1, time="01:00:00")
    args.update(kw)
    return render(**args)


def directives(text: str, opt: str) -> list[str]:
    return [ln.split("=", 1)[1] for ln in text.splitlines() if ln.startswith(f"#SBATCH --{opt}=")]


def bash_syntax_ok(text: str) -> bool:
    return subprocess.run([BASH, "-n"], input=text, text=True, capture_output=True).returncode == 0


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = cli_main(["slurm", "--config", str(TINY), *args])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_usage_exit(rc: int, err: str, *needles: str) -> None:
    assert rc == 2, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err  # one line, no traceback
    for n in needles:
        assert n in err, err


# --- the review's inputs ------------------------------------------------------------------------------------------


def test_account_with_a_newline_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(UsageError, match="--account"):
        _render(account="proj\ntouch X")
    out = tmp_path / "job.sbatch"
    rc, _, err = run_cli(["--account", "proj\ntouch X", "--out", str(out)], capsys)
    assert_usage_exit(rc, err, "--account")
    assert not out.exists()


def test_job_name_with_backslash_n_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(UsageError, match="--job-name"):
        _render(job_name=r"x\ntouch X")
    out = tmp_path / "job.sbatch"
    rc, _, err = run_cli(["--job-name", r"x\ntouch X", "--out", str(out)], capsys)
    assert_usage_exit(rc, err, "--job-name")
    assert not out.exists()


def test_time_with_a_group_reference_exits_2_not_re_error(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "job.sbatch"
    with pytest.raises(UsageError, match="--time"):
        slurm_main(["--config", str(TINY), "--time", "1:00\\1", "--out", str(out)], "ia3-dist slurm")
    rc, _, err = run_cli(["--time", "1:00\\1", "--out", str(out)], capsys)
    assert_usage_exit(rc, err, "--time")
    assert not out.exists()


@pytest.mark.parametrize("value", [r"x\ntouch X", r"1:00\1", r"\g<0>", "a\\", r"\\n"])
def test_directive_values_are_written_literally(value: str) -> None:
    # The backstop below the validators: whatever reaches _set_directive is copied, never read as a template.
    text = (template_dir() / "single_node.sbatch").read_text()
    for opt in ("job-name", "account"):  # replaced in place / appended
        got = _set_directive(text, opt, value)
        assert directives(got, opt) == [value]
        assert len(got.splitlines()) == len(text.splitlines()) + (opt == "account")


def test_directive_refuses_a_multi_line_value() -> None:
    text = (template_dir() / "single_node.sbatch").read_text()
    with pytest.raises(ValueError):
        _set_directive(text, "account", "proj\ntouch X")


# --- grammar of each value ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["90", "90:00", "12:00:00", "04:00:00", "2-0", "2-12:00", "2-12:00:00", "0"])
def test_slurm_time_formats_are_accepted(value: str) -> None:
    assert directives(_render(time=value), "time") == [value]


@pytest.mark.parametrize("value", ["", " 1:00", "1:00 ", "1:00:00:00", "1-", "-1", "1-2-3", "1h", "1:", ":1",
                                   "1-2:3:4:5", "1.5", "\u0663", "1:00\n#SBATCH --x=1", "1:00\\1", "UNLIMITED"])
def test_bad_time_is_refused(value: str) -> None:
    with pytest.raises(UsageError, match="--time"):
        _render(time=value)


BAD_NAMES = ["", " ", "a b", "a;b", "$(touch X)", "`x`", "a/b", "..", ".hidden", "-x", "+x", "a'b", 'a"b', "a\tb",
             "a\rb", "a\x1bb", "caf\u00e9", "x" * (NAME_MAX + 1), "a=b"]


@pytest.mark.parametrize("opt", ["account", "job_name", "partition"])
@pytest.mark.parametrize("value", BAD_NAMES)
def test_bad_names_are_refused(opt: str, value: str) -> None:
    with pytest.raises(UsageError, match="--" + opt.replace("_", "-")):
        _render(**{opt: value})


@pytest.mark.parametrize("value", ["gpu,", ",gpu", "gpu,,cpu", "gpu, cpu", ","])
def test_bad_partition_lists_are_refused(value: str) -> None:
    with pytest.raises(UsageError, match="--partition"):
        _render(partition=value)


@pytest.mark.parametrize("opt", ["account", "job_name"])
def test_only_partition_takes_a_list(opt: str) -> None:
    with pytest.raises(UsageError, match="--" + opt.replace("_", "-")):
        _render(**{opt: "a,b"})


def test_partition_list_and_plain_names_are_accepted() -> None:
    text = _render(partition="gpu,gpu-long", account="proj_01.x+y", job_name="run-1.b")
    assert directives(text, "partition") == ["gpu,gpu-long"]
    assert directives(text, "account") == ["proj_01.x+y"]
    assert directives(text, "job-name") == ["run-1.b"]
    assert directives(_render(account="a" * NAME_MAX), "account") == ["a" * NAME_MAX]


@pytest.mark.parametrize(("kw", "opt"), [({"nodes": 0}, "--nodes"), ({"nodes": -3}, "--nodes"),
                                         ({"nodes": True}, "--nodes"), ({"gpus_per_node": -1}, "--gpus-per-node"),
                                         ({"gpus_per_node": 0, "cpus_per_node": -1}, "--cpus-per-node"),
                                         ({"gpus_per_node": 0, "cpus_per_node": 0}, "--cpus-per-node"),
                                         ({"launcher": "mpirun"}, "--launcher")])
def test_numbers_and_launcher_are_checked(kw: dict, opt: str) -> None:
    with pytest.raises(UsageError, match=opt):
        _render(**kw)


@pytest.mark.parametrize(("value", "written"), [("64G", "64G"), ("500000", "500000"), ("64g", "64G"), ("0", "0"),
                                               ("2048K", "2048K"), ("1T", "1T"), ("0G", "0")])
@pytest.mark.parametrize("launcher", ["deepspeed", "srun"])
def test_mem_is_one_directive_per_node(value: str, written: str, launcher: str) -> None:
    """--mem: GPU jobs asked for no host memory, so the cluster's default (often a few GB per CPU) applied to ranks
    loading a 7B base model. One --mem directive per job, per node whatever the launcher, none when not given."""
    text = _render(mem=value, launcher=launcher, nodes=2, gpus_per_node=4)
    assert directives(text, "mem") == [written] and bash_syntax_ok(text)
    assert directives(_render(launcher=launcher), "mem") == []
    desc = "all of each node's memory" if written == "0" else f"{written} memory per node"
    assert desc in text.splitlines()[1], text.splitlines()[1]


@pytest.mark.parametrize("value", ["", "64GB", "1.5G", "-1", "G", "64 G", "00", "0G1", "1K", "12345678901G", "64G\n",
                                   "64G\n#SBATCH --exclusive"])
def test_bad_mem_is_refused(value: str) -> None:
    with pytest.raises(UsageError, match="--mem"):
        _render(mem=value)


def test_mem_reaches_the_eval_job_and_the_sweep_array(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The evaluation job loads the same base model on one node: it asks for the training job's memory; a sweep's
    array tasks take --mem as `ia3-dist slurm` does; a bad value exits 2 naming --mem, writing nothing."""
    out = tmp_path / "job.sbatch"
    rc, _, err = run_cli(["--gpus-per-node", "2", "--mem", "96G", "--eval", "data.eval_ratio=0.05", "--out", str(out),
                          f"output.dir={tmp_path / 'run'}"], capsys)
    assert rc == 0, err
    assert directives(out.read_text(), "mem") == ["96G"]
    assert directives((tmp_path / "job.eval.sbatch").read_text(), "mem") == ["96G"]
    rc = cli_main(["sweep", "--config", str(TINY), "--grid", "train.lr=1e-3,2e-3", "--gpus-per-node", "1",
                   "--mem", "32G", "--dir", str(tmp_path / "sw"), "--no-submit"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert directives((tmp_path / "sw" / "sweep.sbatch").read_text(), "mem") == ["32G"]
    rc, _, err = run_cli(["--mem", "lots", "--out", str(tmp_path / "bad.sbatch")], capsys)
    assert rc == 2 and "--mem 'lots'" in err and "64G" in err, err
    assert not (tmp_path / "bad.sbatch").exists()


def test_control_characters_in_the_config_path_are_refused() -> None:
    with pytest.raises(UsageError, match="--config"):
        _render(config=str(TINY) + "\n")


# --- property: hostile strings cannot add a line or break the script ----------------------------------------------


@needs_bash
@PROPERTY
@given(opt=st.sampled_from(["account", "job_name", "partition"]),
       value=st.one_of(st.text(max_size=80), VALID_NAME, st.lists(VALID_NAME, min_size=1, max_size=3).map(",".join),
                       st.text(alphabet="ab\\\n\r$();'\"`,.-_ 1{}&|<>#=", max_size=20)))
def test_any_name_is_refused_or_stays_one_directive(opt: str, value: str) -> None:
    benign = _render(**{opt: "benign"})
    try:
        text = _render(**{opt: value})
    except UsageError as e:
        assert ("--" + opt.replace("_", "-")) in str(e) and "\n" not in str(e)
        return
    assert len(text.splitlines()) == len(benign.splitlines())
    assert directives(text, opt.replace("_", "-")) == [value]
    assert bash_syntax_ok(text)


@PROPERTY
@given(value=VALID_NAME)
def test_valid_names_are_accepted_verbatim(value: str) -> None:
    assert directives(_render(account=value, job_name=value), "account") == [value]


@PROPERTY
@given(raw=st.text(max_size=120))
def test_safe_name_is_a_plain_file_name(raw: str) -> None:
    name = safe_name(raw)
    assert re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._+-]*", name) and len(name) <= NAME_MAX
    assert Path(f"{name}.sbatch").parent == Path(".")


# --- overrides and the config path stay data ----------------------------------------------------------------------

HOSTILE = ["output.dir=x$(touch MARKER)", "data.prompt_template=Q: {instruction}\n$(touch MARKER2)\n`touch MARKER3`"
           "\n{input}", "model.revision=main;touch MARKER4", "data.cache_dir=x' ; touch MARKER5 ; '\\'"]


@needs_bash
def test_hostile_overrides_stay_inert(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = tmp_path / "job.sbatch"
    assert slurm_main(["--config", str(TINY), "--out", str(job), *HOSTILE], "ia3-dist slurm") == 0
    text = job.read_text()
    assert os.access(job, os.X_OK)
    assert subprocess.run([BASH, "-n", str(job)], cwd=tmp_path, capture_output=True).returncode == 0
    # The default job name comes from output.dir, made safe.
    assert directives(text, "job-name") == ["x-touch-MARKER"]
    # Run the generated script with a stand-in python (IA3_DIST_PYTHON) that passes the import check and records
    # the arguments of the first real call (resolve): the baked-in `set --` line must hand over the overrides byte
    # for byte and run none of them.
    stub = _stand_in_python(tmp_path, '#!/bin/bash\nif [ "$1" = -c ]; then echo /x/ia3_dist/__init__.py; exit 0; fi\n'
                            'printf "%s\\0" "$@" > "$ARGS_OUT"; exit 1\n')
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "IA3_DIST_PYTHON": str(stub),
           "ARGS_OUT": str(tmp_path / "args")}
    proc = subprocess.run([BASH, str(job)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2, proc.stderr
    got = [a.decode() for a in (tmp_path / "args").read_bytes().split(b"\0")[:-1]]
    assert got == ["-m", "ia3_dist", "resolve", "--config", str(TINY), *HOSTILE, "--key", "output.dir"]
    made = [p for p in tmp_path.rglob("MARKER*")] + list(Path.cwd().glob("MARKER*"))
    assert made == []


def test_control_characters_other_than_newline_and_tab_in_overrides_are_refused() -> None:
    with pytest.raises(UsageError, match="override"):
        _render(overrides=["output.dir=a\x1b[2Kb"])
    assert "'output.dir=a\tb'" in _render(overrides=["output.dir=a\tb"])


# --- --out ---------------------------------------------------------------------------------------------------------


def test_out_onto_an_existing_file_needs_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "job.sbatch"
    f.write_text("keep me\n")
    rc, _, err = run_cli(["--out", str(f)], capsys)
    assert_usage_exit(rc, err, "--out", str(f), "--force")
    assert f.read_text() == "keep me\n"
    rc, out, err = run_cli(["--out", str(f), "--force"], capsys)
    assert rc == 0, err
    assert f.read_text().startswith("#!/bin/bash\n") and f"sbatch {f}" in out


def test_out_onto_an_empty_file_or_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "empty.sbatch"
    f.touch()
    # An empty file is an existing file too (someone's placeholder): --force, as for any other.
    rc, _, err = run_cli(["--out", str(f)], capsys)
    assert_usage_exit(rc, err, "--out", "--force")
    assert f.read_bytes() == b""
    assert run_cli(["--out", str(f), "--force"], capsys)[0] == 0
    assert f.read_text().startswith("#!/bin/bash\n")
    rc, _, err = run_cli(["--out", str(tmp_path), "--force"], capsys)
    assert_usage_exit(rc, err, "--out", "directory")
    rc, _, err = run_cli(["--out", str(tmp_path / "no" / "such" / "dir" / "x.sbatch")], capsys)
    assert_usage_exit(rc, err, "--out")


@pytest.mark.parametrize(("out_dir", "expect"), [("runs/demo", "demo.sbatch"), ("..", "ia3-dist.sbatch"),
                                                  ("../../..", "ia3-dist.sbatch"), ("/", "ia3-dist.sbatch"),
                                                  ("runs/.hidden", "hidden.sbatch"),
                                                  ("runs/my run$(touch X)", "my-run-touch-X.sbatch"),
                                                  ("runs/-rf", "rf.sbatch"), ("runs/a\nb", "a-b.sbatch")])
def test_default_out_name_is_a_plain_file_in_the_current_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str], out_dir: str,
                                                            expect: str) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert slurm_main(["--config", str(TINY), f"output.dir={out_dir}"], "ia3-dist slurm") == 0
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(["work", expect])
    # The same name again is an existing file: refused without --force.
    with pytest.raises(UsageError, match="--force"):
        slurm_main(["--config", str(TINY), f"output.dir={out_dir}"], "ia3-dist slurm")


# --- plain rendering ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("nodes", [1, 3])
def test_directives_appear_once_with_the_given_values(nodes: int) -> None:
    text = render(str(TINY), [], nodes, 4, "2-12:00:00", partition="gpu", account="proj", job_name="myjob")
    for opt, want in [("nodes", str(nodes)), ("time", "2-12:00:00"), ("gpus-per-node", "4"), ("partition", "gpu"),
                      ("account", "proj"), ("job-name", "myjob"), ("ntasks-per-node", "1")]:
        assert directives(text, opt) == [want], opt
    assert directives(text, "cpus-per-task") == []
    tmpl = "multi_node.sbatch" if nodes > 1 else "single_node.sbatch"
    assert text.splitlines()[-1] == (template_dir() / tmpl).read_text().splitlines()[-1]
    assert "export NPROC_PER_NODE=4\n" in text
    # The launcher the header names, whatever LAUNCHER the submitting shell exports (sbatch passes it on).
    assert ("export LAUNCHER=deepspeed\n" in text) is (nodes > 1) and "deepspeed launcher" in text.splitlines()[1]


def test_absent_partition_and_account_give_no_directive() -> None:
    text = _render()
    assert directives(text, "partition") == [] and directives(text, "account") == []
    assert directives(text, "job-name") == ["demo"]  # output.dir runs/demo


def test_srun_launcher_sets_ntasks_per_node() -> None:
    text = render(str(TINY), [], 2, 8, "01:00:00", launcher="srun")
    assert directives(text, "ntasks-per-node") == ["8"]
    assert '"$PYTHON" -m ia3_dist --config' in text and "deepspeed.launcher" not in text  # srun_per_rank


@pytest.mark.parametrize("nodes", [1, 2])
def test_torchrun_launcher_runs_torchrun(nodes: int) -> None:
    """On one node too: single_node.sbatch would start the deepspeed launcher under a torchrun label."""
    text = render(str(TINY), [], nodes, 2, "01:00:00", launcher="torchrun")
    assert "export LAUNCHER=torchrun\n" in text and directives(text, "nodes") == [str(nodes)]
    assert "-m torch.distributed.run --nnodes" in text and "deepspeed.launcher.runner --num_accelerators" not in text


@pytest.mark.parametrize("launcher, want", [("deepspeed", ["32"]), ("srun", ["4"])])
def test_gpu_nodes_get_the_cpus_asked_for(launcher: str, want: list[str]) -> None:
    """--gpus-per-node 8 --cpus-per-node 32 rendered no --cpus-per-task: Slurm's default of one CPU per task ran
    the launcher and its 8 ranks on one core. One launcher task gets all 32; one task per rank (srun) 32 / 8."""
    text = render(str(TINY), [], 1, 8, "01:00:00", launcher=launcher, cpus_per_node=32)
    assert directives(text, "cpus-per-task") == want
    assert directives(text, "gpus-per-node") == ["8"] and "export NPROC_PER_NODE=8\n" in text


@pytest.mark.parametrize("cmd", ["slurm", "sweep"])
def test_a_gpu_job_without_cpus_is_told_it_gets_the_clusters_default(tmp_path: Path, cmd: str,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """No --cpus-per-node on GPU nodes: the job runs on the cluster's default CPUs (one per task unless it sets
    DefCpuPerGPU), the launcher and all 8 ranks on one core: said on stderr, with what to give. CPU jobs and GPU
    jobs with their CPUs are not told."""
    common = {"slurm": ["slurm", "--config", str(TINY), "--out", str(tmp_path / "j.sbatch"), "--force"],
              "sweep": ["sweep", "--config", str(TINY), "--grid", "train.lr=1e-3,2e-3", "--no-submit", "--dir",
                        str(tmp_path / "sw"), "--force"]}[cmd]
    for extra, told in ((["--gpus-per-node", "8"], True), (["--gpus-per-node", "8", "--cpus-per-node", "64"], False),
                        (["--gpus-per-node", "0", "--cpus-per-node", "2"], False)):
        assert cli_main([*common, *extra]) == 0
        err = capsys.readouterr().err
        assert ("note: no --cpus-per-node: the job gets the cluster's default CPUs" in err) is told, err
        if told:
            assert "the node's 8 GPU rank(s) would share; give --cpus-per-node (a few per GPU, e.g. 32)" in err


def _slurm_env(**kv: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}, **kv}


@pytest.mark.parametrize("visible, nproc, gpus, want", [
    ("", 2, "", "--num_accelerators 2"),  # CPU ranks
    ("4,5,6,7", 4, "4", "--include localhost:4,5,6,7"),  # a node that does not renumber: the job's GPUs, not 0-3
    ("0,1,2,3,4,5,6,7", 2, "8", "--include localhost:0,1"),
    # UUIDs or MIG instances: --include takes indices only, and --num_accelerators ran on devices 0..N-1
    ("GPU-3f2a,GPU-9c1b", 2, "2", "exit 2"),
    ("MIG-1,MIG-2", 2, "2", "exit 2"),
    ("0,1,2,3", 4, "", "--num_accelerators 4"),  # a CPU job that inherited the variable from its submit shell
])
def test_one_node_deepspeed_jobs_run_on_the_gpus_slurm_gave(visible: str, nproc: int, gpus: str, want: str) -> None:
    """--num_accelerators N made DeepSpeed's launcher drop CUDA_VISIBLE_DEVICES and run on devices 0..N-1: on a
    node that does not constrain devices, another job's GPUs."""
    env = _slurm_env(NPROC_PER_NODE=str(nproc), CUDA_VISIBLE_DEVICES=visible, SLURM_GPUS_ON_NODE=gpus)
    proc = subprocess.run([BASH, "-c", 'source slurm/lib.sh; ia3_ds_devices; echo "${DS_DEVICES[*]}"'],
                          cwd=TINY.parents[1], env=env, capture_output=True, text=True)
    if want == "exit 2":
        assert proc.returncode == 2 and "which the deepspeed launcher cannot keep; render the job with ia3-dist " \
            "slurm --launcher torchrun" in proc.stderr, proc.stderr
    else:
        assert proc.returncode == 0 and proc.stdout.strip() == want, proc.stderr
    assert '"${DS_DEVICES[@]}"' in (TINY.parents[1] / "slurm" / "single_node.sbatch").read_text()
    fewer = subprocess.run([BASH, "-c", "source slurm/lib.sh; ia3_ds_devices"], cwd=TINY.parents[1],
                           env={**env, "CUDA_VISIBLE_DEVICES": "3", "SLURM_GPUS_ON_NODE": "1"},
                           capture_output=True, text=True)
    assert fewer.returncode == 2
    assert f"NPROC_PER_NODE={nproc} ranks, but the job sees 1 GPU(s) (CUDA_VISIBLE_DEVICES=3)" in fewer.stderr


@pytest.mark.parametrize("visible, ok", [("", True), ("0,1", True), ("0,1,2,3", True), ("2,3", False),
                                         ("0,12", False), ("0", False), ("MIG-1,MIG-2", False),
                                         ("cpu-job:2,3", True), ("cpu-job:GPU-aa", True)])
def test_multi_node_deepspeed_jobs_refuse_a_node_whose_gpus_are_not_0_to_n(visible: str, ok: bool) -> None:
    """From a hostfile the launcher runs each node's ranks on devices 0..N-1: a node whose job GPUs are others
    stops the job (exit 2, saying to use torchrun) instead of running on another job's GPUs."""
    template = (TINY.parents[1] / "slurm" / "multi_node.sbatch").read_text()
    block = template[template.index("LAUNCHER=${LAUNCHER:-deepspeed}"):template.index("RANK_LOGS=")]
    block = block[block.index("if [ \"$LAUNCHER\" = torchrun ]"):]
    cpu_job = visible.startswith("cpu-job:")  # no GPUs from Slurm, the variable inherited from the submit shell
    env = _slurm_env(NPROC_PER_NODE="2", CUDA_VISIBLE_DEVICES=visible.removeprefix("cpu-job:"), PYTHON="true",
                     LAUNCHER="deepspeed", **({} if cpu_job else {"SLURM_JOB_GPUS": "0,1,2,3"}))
    proc = subprocess.run([BASH, "-c", block + 'bash -c "$NODE_CMD" node'], env=env, capture_output=True, text=True)
    assert (proc.returncode == 0) is ok, proc.stderr
    assert ok or "use LAUNCHER=torchrun" in proc.stderr


def test_the_layout_defaults_to_the_configs_hardware(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A config written for 8 nodes x 8 GPUs (its hardware section, what plan reads) rendered a 1 x 1 job."""
    cfg = str(TINY.parent / "bloom-176b.yaml")
    out = tmp_path / "b.sbatch"
    assert cli_main(["slurm", "--config", cfg, "--out", str(out)]) == 0
    text, said = out.read_text(), capsys.readouterr().out
    assert directives(text, "nodes") == ["8"] and directives(text, "gpus-per-node") == ["8"], text[:800]
    assert "from the config's hardware section: --nodes 8, --gpus-per-node 8" in said
    assert cli_main(["slurm", "--config", cfg, "--out", str(out), "--force", "--nodes", "2"]) == 0
    assert directives(out.read_text(), "nodes") == ["2"] and directives(out.read_text(), "gpus-per-node") == ["8"]
    assert "--gpus-per-node 8" in capsys.readouterr().out
    # A config without a hardware section (1 x 1 by default) is not said to have chosen anything.
    assert cli_main(["slurm", "--config", str(TINY), "--out", str(out), "--force", "--gpus-per-node", "0",
                     "--cpus-per-node", "2"]) == 0
    said = capsys.readouterr().out
    assert "hardware section" not in said
    # The hint names the batch log where the job writes it (%x-%j.out in the submit folder), not only logs/.
    assert "tail -f demo-<jobid>.out (in that folder" in said, said


@pytest.mark.parametrize("time, lead", [("04:00:00", 300), ("20", 300), ("8", 120), ("2", 30), ("0", 300)])
def test_the_warning_before_the_limit_fits_in_the_limit(time: str, lead: int) -> None:
    """A fixed USR1@300 on a limit of 5 minutes or less came as the job started: it requeued for ever without
    training. Limits under 20 minutes get a quarter of theirs (at least 30 s); no limit (0) keeps 300 s."""
    text = render(str(TINY), [], 1, 1, time)
    assert directives(text, "signal") == [f"B:USR1@{lead}"], text
    assert f"# Preemption-safe: USR1 {lead} s before the time limit" in text  # the header says the same


def test_a_limit_too_short_to_train_is_refused() -> None:
    with pytest.raises(UsageError, match=r"--time '1': shorter than 2 minutes"):
        render(str(TINY), [], 1, 1, "1")


def test_cpu_nodes() -> None:
    text = render(str(TINY), [], 1, 0, "00:20:00", cpus_per_node=2)
    assert directives(text, "gpus-per-node") == []
    assert directives(text, "cpus-per-task") == ["2"]
    assert directives(text, "ntasks-per-node") == ["1"]
    assert "export NPROC_PER_NODE=2\n" in text


def test_baked_in_set_line() -> None:
    text = render(str(TINY), ["train.max_steps=10", "output.dir=runs/a b"], 1, 1, "01:00:00")
    lines = text.splitlines()
    want = f"[ $# -gt 0 ] || set -- {TINY} train.max_steps=10 'output.dir=runs/a b'"
    assert lines.count(want) == 1
    i = lines.index(want)
    assert lines.index("set -uo pipefail") < i < lines.index('ia3_setup "$@"')


# --- self-contained: what a pip install needs -------------------------------------------------------------------


@pytest.mark.parametrize(("nodes", "launcher"), [(1, "deepspeed"), (3, "deepspeed"), (2, "torchrun"), (2, "srun")])
def test_written_file_needs_no_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nodes: int,
                                        launcher: str) -> None:
    monkeypatch.chdir(TINY.parent)
    text = render(TINY.name, [], nodes, 4, "01:00:00", launcher=launcher, python="/opt/env/bin/python")
    assert "IA3_DIST_HOME" not in text and "source " not in text and "launch.py" not in text
    assert not any(ln.startswith("cd ") for ln in text.splitlines())
    lib = (template_dir() / "lib.sh").read_text()
    for fn in re.findall(r"^(ia3_\w+)\(\) \{", lib, re.M):
        assert f"\n{fn}() {{" in text, fn
    assert "\nPYTHON=/opt/env/bin/python\n" in text and '"$PYTHON" -m ' in text
    assert f"\n[ $# -gt 0 ] || set -- {TINY}\n" in text  # the relative config path made absolute
    # The header describes this file, not the template it came from.
    head = [ln for ln in text.splitlines() if ln.startswith("#") and not ln.startswith("#SBATCH")][:8]
    assert f"{nodes} node(s) x 4 GPU(s), {launcher} launcher" in head[1]
    assert not any("sbatch --nodes=4" in ln or "slurm/" in ln for ln in head), head
    if BASH:
        assert bash_syntax_ok(text)


def test_default_python_is_this_one() -> None:
    import sys

    assert f"\nPYTHON={sys.executable}\n" in _render()
    with pytest.raises(UsageError, match="--python"):
        _render(python="/x/python\n")


@needs_bash
def test_a_python_without_ia3_dist_stops_the_job_with_exit_2(tmp_path: Path) -> None:
    job = tmp_path / "job.sbatch"
    job.write_text(_render())
    stub = _stand_in_python(tmp_path, '#!/bin/bash\necho "Traceback (most recent call last):" >&2\n'
                            'echo "ModuleNotFoundError: No module named \'ia3_dist\'" >&2\nexit 1\n')
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "IA3_DIST_PYTHON": str(stub)}
    proc = subprocess.run([BASH, str(job)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert f"{stub} cannot import ia3_dist (ModuleNotFoundError: No module named 'ia3_dist')" in proc.stderr
    assert "IA3_DIST_PYTHON" in proc.stderr


# --- node ranges (resume on whatever nodes a requeued job gets) --------------------------------------------------


def test_node_range_renders_a_range_that_takes_every_free_node() -> None:
    text = _render(nodes=(2, 4), gpus_per_node=8, overrides=["train.global_batch_size=384"])
    assert directives(text, "nodes") == ["2-4"] and directives(text, "ntasks") == ["4"]
    assert "#SBATCH --spread-job\n" in text and not directives(text, "ntasks-per-node")
    assert "2-4 node(s) x 8 GPU(s)" in text.splitlines()[1]
    # A range of one count is a plain count.
    fixed = _render(nodes=(2, 2), gpus_per_node=8)
    assert directives(fixed, "nodes") == ["2"] and "--spread-job" not in fixed


def test_node_range_with_cpus_per_node_notes_the_cpus_a_node_must_hold(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """On 2 of --nodes 2-4 a node holds 2 of the 4 launcher tasks, each asking --cpus-per-node CPUs: said."""
    args = ["slurm", "--config", str(TINY), "--nodes", "2-4", "--gpus-per-node", "8", "--time", "01:00:00",
            "train.global_batch_size=384"]
    assert cli_main([*args, "--cpus-per-node", "32", "--out", str(tmp_path / "a.sbatch")]) == 0
    err = capsys.readouterr().err
    assert "on 2 node(s) one node holds up to 2 of the 4 tasks (64 CPUs)" in err and "a node's CPUs / 2" in err, err
    assert cli_main([*args, "--out", str(tmp_path / "b.sbatch")]) == 0
    err = capsys.readouterr().err
    assert "node(s) one node holds" not in err and "note: no --cpus-per-node" in err, err  # GPUs without CPUs


@pytest.mark.parametrize("args, needles", [
    (["--nodes", "1-2", "--gpus-per-node", "0", "--cpus-per-node", "1"],
     ["--nodes 1-2", "set train.global_batch_size", "train.global_batch_size=16"]),
    (["--nodes", "1-3", "--gpus-per-node", "0", "--cpus-per-node", "1", "train.global_batch_size=16"],
     ["train.global_batch_size=16 does not divide over 3 node(s) x 1 rank(s)"]),
    (["--nodes", "1-2", "--launcher", "srun", "train.global_batch_size=16"],
     ["needs --launcher deepspeed or torchrun"]),
    # A fixed count too: the job would exit 2 after its wait in the queue.
    (["--nodes", "2", "--gpus-per-node", "0", "--cpus-per-node", "3", "train.global_batch_size=16"],
     ["--nodes 2: train.global_batch_size=16 does not divide over 2 node(s) x 3 rank(s)", "a multiple of 24"]),
    (["deepspeed.config=zero9"], ["deepspeed.config zero9: no such file", "zero0, zero1", "or auto (the lowest"]),
    (["--nodes", "3-2"], ["--nodes '3-2'", "the first at most the second"]),
    (["--nodes", "0-2"], ["expected counts from 1"]),
    (["--nodes", "1-2-3"], ["a node count N or a range MIN-MAX"]),
])
def test_bad_node_ranges_exit_2_naming_the_fix(capsys: pytest.CaptureFixture[str], args: list[str],
                                               needles: list[str]) -> None:
    rc, _, err = run_cli(args, capsys)
    assert_usage_exit(rc, err, *needles)


def test_a_sweep_keeps_a_fixed_node_count(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli_main(["sweep", "--config", str(TINY), "--grid", "train.lr=0.1,0.2", "--nodes", "1-2",
                   "--dir", str(tmp_path / "s")])
    _, err = capsys.readouterr()
    assert_usage_exit(rc, err, "a sweep's tasks run on a fixed number of nodes")


FAKE_RUN = """sleep 1.1  # a run's imports take seconds: its run.yaml is newer than the batch shell's start stamp
echo "output: {}" > "$OUTPUT_DIR/run.yaml"
printf '%s\n%s\n' $$ "${FAKE_HOST:-}" > "$OUTPUT_DIR/rank0.pid"   # FAKE_HOST: rank 0 on another node
trap 'touch "$OUTPUT_DIR/stop-asked"' USR1
until [ -e "$OUTPUT_DIR/trained" ]; do sleep 0.05; done
rm -f "$OUTPUT_DIR/rank0.pid"   # as run.py does when training is over, before the process exits
touch "$OUTPUT_DIR/ended"
until [ -e "$OUTPUT_DIR/go" ]; do sleep 0.05; done
"""


def _stand_in_python(tmp_path: Path, script: str) -> Path:
    """``tmp_path/python``: an executable ``script`` the job runs in place of the real interpreter."""
    stub = tmp_path / "python"
    stub.write_text(script)
    stub.chmod(0o755)
    return stub


def _lib_shell(tmp_path: Path, python: Path, nodelist: str, nnodes: int) -> str:
    """The start of a batch shell as the templates begin one: strict bash, lib.sh, a job on ``nodelist`` running
    ``python``; the caller adds its scontrol stand-in and commands."""
    return (f'set -uo pipefail; source "{template_dir() / "lib.sh"}"; LOG_DIR="{tmp_path}"; SLURM_JOB_ID=7; '
            f'SLURM_JOB_NODELIST={nodelist}; SLURM_NNODES={nnodes}; PYTHON="{python}"; ')


def _batch_shell(tmp_path: Path, before: str = "", scontrol_rc: int = 0) -> tuple[subprocess.Popen, Path]:
    """lib.sh's trap and ia3_run around a stand-in for the run (scontrol recorded, not called). The stand-in's name
    holds "ia3_dist", as a real rank 0's command line does: lib.sh signals only such a process. ``before``: shell
    run before ia3_run."""
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "fake-ia3_dist-run.sh").write_text(FAKE_RUN)
    script = (f'source "{template_dir() / "lib.sh"}"; OUTPUT_DIR="{out}"; LOG_DIR="{tmp_path}"; SLURM_JOB_ID=7; '
              f'scontrol() {{ echo "$*" >> "{tmp_path}/scontrol"; return {scontrol_rc}; }}; '
              "trap 'ia3_forward USR1' USR1; export OUTPUT_DIR; "
              f'{before}ia3_run bash "{tmp_path}/fake-ia3_dist-run.sh"')
    proc = subprocess.Popen([BASH, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, out


def _wait_for(path: Path, proc: subprocess.Popen) -> None:
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None and time.time() - t0 < 30, proc.communicate()[0] if proc.poll() is not None else ""
        time.sleep(0.05)


@pytest.mark.slow  # a bash batch shell around a stand-in resolve that sleeps
@needs_bash
def test_a_signal_while_the_config_is_read_requeues(tmp_path: Path) -> None:
    """The traps were set after ia3_setup read the config (resolve loads Python, seconds on a busy node): a
    warning then killed the batch shell (USR1's default action), with no requeue and the evaluation job
    cancelled. Now it counts as before training started: nothing starts and the job requeues."""
    out = tmp_path / "out"
    stub = _stand_in_python(tmp_path, f'#!/bin/bash\ntouch "{tmp_path}/resolving"; sleep 2; echo "{out}"\n')
    script = (_lib_shell(tmp_path, stub, "n1", 1) +
              f'scontrol() {{ [ "$1" != requeue ] || echo "$*" >> "{tmp_path}/scontrol"; }}; '
              f'ia3_setup cfg.yaml; ia3_run touch "{tmp_path}/started"')
    proc = subprocess.Popen([BASH, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for(tmp_path / "resolving", proc)
    proc.send_signal(signal.SIGUSR1)
    text = proc.communicate(timeout=30)[0]
    assert "caught SIGUSR1 before training started: requeueing" in text, text
    assert not (tmp_path / "started").exists() and (tmp_path / "scontrol").read_text() == "requeue 7\n", text
    assert proc.returncode == 0, text


@pytest.mark.slow  # a bash batch shell around a stand-in run that sleeps
@needs_bash
def test_a_signal_after_training_ended_does_not_requeue_a_finished_run(tmp_path: Path) -> None:
    """The scheduler's warning can land after rank 0 removed its pid file at the end of training: the batch shell
    lets the run finish (exit 0) instead of taking it for a run that never started and requeueing it."""
    proc, out = _batch_shell(tmp_path)
    _wait_for(out / "rank0.pid", proc)
    (out / "trained").touch()
    _wait_for(out / "ended", proc)
    proc.send_signal(signal.SIGUSR1)
    time.sleep(0.5)
    (out / "go").touch()
    text = proc.communicate(timeout=30)[0]
    assert "caught SIGUSR1 after training ended: letting the run finish" in text, text
    assert "run finished with exit 0" in text and proc.returncode == 0, text
    assert not (tmp_path / "scontrol").exists(), text


def _signal_during_training(proc: subprocess.Popen, out: Path) -> None:
    """USR1 to the batch shell once the stand-in run wrote its pid file; the run checkpoints (preempted.json) when
    asked, and ends."""
    _wait_for(out / "rank0.pid", proc)
    proc.send_signal(signal.SIGUSR1)
    _wait_for(out / "stop-asked", proc)
    (out / "preempted.json").write_text("{}")
    (out / "trained").touch()
    (out / "go").touch()


@pytest.mark.slow  # a bash batch shell around a stand-in run that sleeps
@needs_bash
@pytest.mark.parametrize("when", ["before", "during"])
def test_a_signal_before_or_during_training_requeues(tmp_path: Path, when: str) -> None:
    """Before rank 0 wrote its pid file the batch shell stops the start and requeues; during training it forwards
    the signal to rank 0 (which checkpoints and writes preempted.json) and requeues."""
    proc, out = _batch_shell(tmp_path)
    if when == "during":
        _signal_during_training(proc, out)
    else:
        time.sleep(0.3)  # the batch shell is inside ia3_run, the run has not written run.yaml
        proc.send_signal(signal.SIGUSR1)
    text = proc.communicate(timeout=30)[0]
    said = "asking the run (rank 0" if when == "during" else "before training started: requeueing"
    assert said in text and "requeueing job 7" in text and proc.returncode == 0, text
    assert (tmp_path / "scontrol").read_text() == "requeue 7\n", text


@pytest.mark.slow  # a bash batch shell around a stand-in run that sleeps
@needs_bash
def test_a_signal_reaches_rank_0_on_another_node_through_srun(tmp_path: Path) -> None:
    """Rank 0's pid file names another host (task 0 placed on another node than the batch shell's): the warning
    goes through srun, one task per node, and the node whose host and process match signals rank 0, which
    checkpoints; the job requeues. Here srun is a stand-in on PATH running its command as on a node named n2
    (a `hostname` saying so), the real process check included."""
    fakebin = tmp_path / "bin"
    node = tmp_path / "n2bin"
    fakebin.mkdir()
    node.mkdir()
    (node / "hostname").write_text("#!/bin/sh\necho n2\n")
    (fakebin / "srun").write_text(f'#!/bin/bash\necho "$@" >> "{tmp_path}/srun"\n'
                                  f'while [ "$1" != bash ]; do shift; done\nPATH="{node}:$PATH" exec "$@"\n')
    for f in (node / "hostname", fakebin / "srun"):
        f.chmod(0o755)
    proc, out = _batch_shell(tmp_path, before=f'export FAKE_HOST=n2 SLURM_NNODES=2 PATH="{fakebin}:$PATH"; ')
    _signal_during_training(proc, out)
    text = proc.communicate(timeout=30)[0]
    assert "rank 0 runs on n2; asking it through srun" in text and "requeueing job 7" in text, text
    assert "--overlap --jobid=7 --nodes=2 --ntasks=2 --ntasks-per-node=1" in (tmp_path / "srun").read_text()
    assert (tmp_path / "scontrol").read_text() == "requeue 7\n", text


@needs_bash
def test_an_array_task_is_told_to_resubmit_itself_alone(tmp_path: Path) -> None:
    """A sweep task that cannot requeue: `sbatch` of the sweep file again would queue every task, so the job log
    names the task's own --array index (or sweep --force, which leaves finished tasks out)."""
    text, _ = _ia3_run(tmp_path, 'bash -c \'echo "{}" > "$OUTPUT_DIR/preempted.json"; exit 75\'',
                       before='SIGNALLED=1; SLURM_ARRAY_JOB_ID=7 SLURM_ARRAY_TASK_ID=3; scontrol() { return 1; }; ')
    assert "sbatch --array=3" in text and "ia3-dist sweep --force" in text and text.endswith("[exit 75]"), text


def _ia3_run(tmp_path: Path, command: str, before: str = "") -> tuple[str, Path]:
    """lib.sh's ia3_run of ``command`` (shell text) in the foreground, no trap (scontrol recorded, not called):
    its output, ending in ``[exit N]`` (the job's code), and the output dir."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    script = (f'source "{template_dir() / "lib.sh"}"; OUTPUT_DIR="{out}"; LOG_DIR="{tmp_path}"; SLURM_JOB_ID=7; '
              f'scontrol() {{ echo "$*" >> "{tmp_path}/scontrol"; }}; export OUTPUT_DIR; {before}'
              f'ia3_run {command}')
    proc = subprocess.run([BASH, "-c", script], capture_output=True, text=True, timeout=30)
    return f"{proc.stdout}[exit {proc.returncode}]", out


@needs_bash
def test_a_preempted_json_the_shell_did_not_ask_for_does_not_requeue(tmp_path: Path) -> None:
    """A run that wrote preempted.json on a signal of its own launcher (ending the ranks because one failed at its
    start) and exited 1 (torchrun's code): requeued, it would fail the same way for ever. Without a signal
    forwarded by this shell, only exit 75 requeues."""
    text, _ = _ia3_run(tmp_path, 'bash -c \'echo "{}" > "$OUTPUT_DIR/preempted.json"; exit 1\'')
    assert not (tmp_path / "scontrol").exists() and "requeueing" not in text, text


@needs_bash
def test_exit_75_without_a_signal_to_the_job_does_not_requeue(tmp_path: Path) -> None:
    """srun --kill-on-bad-exit TERMs the ranks still meeting when one fails its checks (exit 2); they exit 75, and
    srun reports the highest task code. The job had no signal: requeued, it failed the same way up to 3 times, then
    said to give it more time. It ends, naming where the first error is."""
    text, _ = _ia3_run(tmp_path, "bash -c 'exit 75'")
    assert not (tmp_path / "scontrol").exists() and "requeueing job" not in text, text
    assert "without a signal to this job: not requeueing" in text and text.endswith("[exit 75]"), text
    # A signal that reached only the job's steps (scancel --signal=USR1 without --batch): the run checkpointed
    # (preempted.json) and exits 75; the shell saw no signal, and the job requeues as before.
    text, _ = _ia3_run(tmp_path, 'bash -c \'echo "{\\"step\\": 4}" > "$OUTPUT_DIR/preempted.json"; exit 75\'')
    assert (tmp_path / "scontrol").read_text() == "requeue 7\n" and "requeueing job 7" in text, text


@needs_bash
def test_requeues_that_stop_at_the_same_step_end_after_three(tmp_path: Path) -> None:
    """A start that cannot reach a checkpoint before the scheduler's warning (a load longer than the lead) stopped
    at the same step every time and was requeued for ever: after 3 requeues at one step the job ends (exit 75,
    saying why); a stop at a later step counts as progress and requeues again; a stop on TERM (a preemption, not
    the time limit's warning) is never counted."""
    def stopped_at(step: int) -> tuple[str, int]:
        text, _ = _ia3_run(tmp_path, f'bash -c \'echo "{{\\"step\\": {step}}}" > "$OUTPUT_DIR/preempted.json"; '
                                     f'exit 75\'', before="SIGNALLED=1; LAST_SIGNAL=USR1; ")
        return text, (tmp_path / "scontrol").read_text().count("requeue") if (tmp_path / "scontrol").exists() else 0

    for k in range(1, 4):
        text, requeues = stopped_at(0)
        assert requeues == k and "requeueing job 7" in text, text
    text, requeues = stopped_at(0)
    assert requeues == 3 and "not requeueing job 7" in text and text.endswith("[exit 75]"), text
    assert "then submit the job again" in text, text
    text, requeues = stopped_at(20)  # progress: counted afresh
    assert requeues == 4 and "requeueing job 7" in text, text
    # Stops on TERM (the scheduler preempting the job, however early) are no stall: never counted.
    for k in range(5, 10):
        text, _ = _ia3_run(tmp_path, 'bash -c \'echo "{\\"step\\": 0}" > "$OUTPUT_DIR/preempted.json"; exit 75\'',
                           before="SIGNALLED=1; LAST_SIGNAL=TERM; ")
        assert (tmp_path / "scontrol").read_text().count("requeue") == k and "requeueing job 7" in text, text


@needs_bash
def test_an_array_task_requeues_itself_alone(tmp_path: Path) -> None:
    """The array task that starts last may run under the array's own job id, which scontrol requeue reads as the
    whole array: every task requeued, the finished ones run again. An array task names itself as <array>_<index>."""
    text, _ = _ia3_run(tmp_path, 'bash -c \'echo "{\\"step\\": 5}" > "$OUTPUT_DIR/preempted.json"; exit 75\'',
                       before="SIGNALLED=1; SLURM_ARRAY_JOB_ID=7; SLURM_ARRAY_TASK_ID=3; ")
    assert (tmp_path / "scontrol").read_text() == "requeue 7_3\n", text


@needs_bash
def test_a_signal_before_the_launch_requeues_without_starting(tmp_path: Path) -> None:
    """The warning landed after the traps were set and before ia3_run started the run (no run to stop yet): the
    run trained to its end and the finished run was then requeued. Now nothing starts and the job requeues."""
    text, out = _ia3_run(tmp_path, 'touch "$OUTPUT_DIR/started"', before="PREEMPT_EARLY=1; ")
    assert not (out / "started").exists() and (tmp_path / "scontrol").read_text() == "requeue 7\n", text
    assert "caught a signal before the launch: requeueing job 7" in text, text


@pytest.mark.slow  # a bash batch shell around a stand-in run that sleeps
@needs_bash
def test_a_refused_requeue_ends_the_job_unfinished(tmp_path: Path) -> None:
    """scontrol requeue failing (slurmctld busy, requeue not allowed): the job ended with exit 0, as COMPLETED, so an
    afterok evaluation job started on an unfinished run. It now ends with 75, saying how to go on."""
    proc, out = _batch_shell(tmp_path, scontrol_rc=1)
    time.sleep(0.3)
    proc.send_signal(signal.SIGUSR1)
    text = proc.communicate(timeout=30)[0]
    assert "scontrol requeue 7 failed: ending with exit 75" in text and proc.returncode == 75, text
    assert (tmp_path / "scontrol").read_text() == "requeue 7\n", text


@pytest.mark.slow  # a bash batch shell around a stand-in run that sleeps
@needs_bash
def test_a_stale_pid_file_is_never_signalled(tmp_path: Path) -> None:
    """rank0.pid left by a run that was killed (SIGKILL, out of memory, the hang watchdog) names a pid some other
    process may have now: the next start removes it, and a signal before the new rank 0 writes its own takes the
    not-started path (requeue) instead of killing that process."""
    other = subprocess.Popen(["sleep", "60"])
    try:
        proc, out = _batch_shell(tmp_path, before=f'echo {other.pid} > "$OUTPUT_DIR/rank0.pid"; ')
        time.sleep(0.3)  # inside ia3_run; the stand-in has not written its pid file yet
        proc.send_signal(signal.SIGUSR1)
        text = proc.communicate(timeout=30)[0]
        assert "before training started: requeueing" in text and "requeueing job 7" in text, text
        assert other.poll() is None, "the stale pid's process was signalled"
    finally:
        other.kill()



@needs_bash
@pytest.mark.parametrize("cpus, srun", [("3", "3"), ("", "")])
def test_the_job_steps_get_the_tasks_cpus(tmp_path: Path, cpus: str, srun: str) -> None:
    """Slurm 22.05-23.02's srun reads SRUN_CPUS_PER_TASK, not sbatch's SLURM_CPUS_PER_TASK: without it a CPU job's
    launcher and all its ranks ran on one core where cores are enforced. ia3_setup passes the job's on."""
    stub = _stand_in_python(tmp_path, f"#!/bin/sh\necho {tmp_path / 'out'}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SRUN_"))}
    env.update(PYTHON=str(stub), SLURM_JOB_ID="7", SLURM_JOB_NODELIST="n1", SLURM_NNODES="1", LOG_DIR=str(tmp_path),
               **({"SLURM_CPUS_PER_TASK": cpus} if cpus else {}))
    script = (f'source "{template_dir() / "lib.sh"}"; scontrol() {{ echo n1; }}; ia3_setup c.yaml; '
              'echo "srun=${SRUN_CPUS_PER_TASK:-}"')
    proc = subprocess.run([BASH, "-c", script], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == f"srun={srun}", proc.stdout + proc.stderr


@needs_bash
@pytest.mark.parametrize("node_info, want", [
    ('echo "NodeName=n1 Arch=x86_64 CoresPerSocket=16"; echo "   NodeAddr=10.0.0.7 NodeHostName=h1 Version=23.02"',
     "10.0.0.7"),
    ("return 1", "n1"),  # slurmctld busy: the node's name, as before
])
def test_master_addr_is_the_first_nodes_address(tmp_path: Path, node_info: str, want: str) -> None:
    """MASTER_ADDR was the first node's Slurm name, which need not resolve to the node (NodeName=n1 with its own
    NodeAddr): the rendezvous of every rank failed. Now its NodeAddr, what slurmd reaches it at."""
    stub = _stand_in_python(tmp_path, f'#!/bin/bash\necho "{tmp_path / "out"}"\n')
    script = (_lib_shell(tmp_path, stub, '"n[1-2]"', 2) +
              f'scontrol() {{ case "$1 $2" in "show hostnames") echo n1; echo n2 ;; '
              f'"show node") [ "$3" = n1 ] || return 1; {node_info} ;; esac; }}; '
              'ia3_setup cfg.yaml; echo "MASTER=$MASTER_ADDR"')
    proc = subprocess.run([BASH, "-c", script], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert f"MASTER={want}\n" in proc.stdout and f"master {want}:" in proc.stdout, proc.stdout
