"""Security round 2, part C: run dirs and sweep dirs from elsewhere, the files the tools write, and cost bounds.

``ia3-dist summary`` and ``ia3-dist plot`` read run dirs and sweep dirs that may come from another machine or
person: every file is read as hostile (regular files only, never through a symlink, size-bounded, damaged lines
skipped and counted). ``plot``, ``summary``, ``sweep`` and ``slurm`` never write through a symlink, and ``slurm
--out`` never replaces an existing file without ``--force``. Numbers that reach ``#SBATCH`` lines are bounded, and
an error quotes at most ~200 characters of any value. Every refusal here is exit 2 with one line and no traceback,
and the symlink targets outside keep their bytes and their mode.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import yaml
from _util import measured_cli

from ia3_dist.cli import main as cli_main
from ia3_dist.config import load_config
from ia3_dist.errors import UsageError
from ia3_dist.tools.slurm import render
from ia3_dist.tools.summary import run_status
from ia3_dist.train import plots

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny-cpu.yaml"
SLURM = ["--gpus-per-node", "0", "--cpus-per-node", "1"]
LONG = "x" * 10_000
PNG = b"\x89PNG\r\n\x1a\n"
RSS_LIMIT = 1 << 30
"""Peak RSS a hostile input may cost a subprocess (a summary needs about 100 MiB)."""


def cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = cli_main(args)
    out, err = capsys.readouterr()
    return rc, out, err


def assert_refused(rc: int, err: str, *needles: str) -> None:
    assert rc == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "x" * 250 not in err and len(err) < 1500, err[:2000]  # quotes shortened
    for n in needles:
        assert n in err, err


def one_note(err: str, *needles: str) -> None:
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for n in needles:
        assert n in err, err


def make_run(d: Path, lines: list[bytes] | None = None, run_yaml: bytes | None = None, lr: float = 0.003) -> Path:
    """A finished run dir: run.yaml, metrics.jsonl (two good records unless ``lines``) and an adapter."""
    d.mkdir(parents=True)
    if run_yaml is None:
        run_yaml = load_config(TINY, [f"train.lr={lr}", f"output.dir={d}"]).to_yaml().encode()
    (d / "run.yaml").write_bytes(run_yaml)
    if lines is None:
        lines = [json.dumps({"step": 1, "loss": 2.0}).encode(), json.dumps({"step": 2, "loss": 1.5}).encode()]
    (d / "metrics.jsonl").write_bytes(b"".join(ln + b"\n" for ln in lines))
    (d / "adapter").mkdir()
    (d / "adapter" / "adapter_model.safetensors").write_bytes(b"x")
    return d


def outside(tmp_path: Path, name: str = "precious") -> Path:
    """A file outside every run dir that a write through a link would change: bytes and mode are checked."""
    f = tmp_path / "elsewhere" / name
    f.parent.mkdir(exist_ok=True)
    f.write_bytes(b"precious\n")
    f.chmod(0o600)
    return f


def unchanged(f: Path) -> bool:
    return f.read_bytes() == b"precious\n" and (f.stat().st_mode & 0o777) == 0o600


def summary_row(out: str, label: str) -> list[str]:
    return next(ln.split() for ln in out.splitlines() if ln.split()[:1] == [label])


# --- reading run dirs ------------------------------------------------------------------------------------------------

SECRET = yaml.safe_dump({"model": {"revision": "SECRET-TOKEN"}}).encode()
BAD_RUN_YAML = {
    "anchor": (b"train: &t {lr: 0.1}\nmodel: *t\n", "anchor"),
    "duplicate-key": (b"train:\n  lr: 0.1\n  lr: 0.2\n", "duplicate key"),
    "not-utf8": (b"train:\n  lr: \xff\xfe\n", "UTF-8"),
    "deep": (b"[" * 5000, "nested"),
    "huge-int": (b"train:\n  seed: " + b"9" * 100_000 + b"\n", "integer of"),
    "2-MiB": (b"# padding\n" * 210_000, "larger than"),
    "not-a-mapping": (b"- 1\n- 2\n", None),
}


@pytest.mark.parametrize("case", sorted(BAD_RUN_YAML))
def test_hostile_run_yaml_is_one_note_and_the_run_still_shows(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                               case: str) -> None:
    text, needle = BAD_RUN_YAML[case]
    d = make_run(tmp_path / "r", run_yaml=text)
    rc, out, err = cli(["summary", str(d), "--no-plot"], capsys)
    assert rc == 0, err
    assert summary_row(out, str(d))[1:4] == ["done", "2", "1.5"], out
    if needle is None:  # valid YAML, just not a config: no keys of a run config, nothing to say
        assert err == ""
    else:
        one_note(err, "run.yaml", needle, "not shown")


def test_config_mappings_with_keys_yaml_does_not_make_strings_compare(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A mapping value (data.columns) whose YAML keys are a number and a string, or a date: compared between runs
    as JSON with sorted keys, they failed with a TypeError traceback; now they are compared by their text."""
    cfg = load_config(TINY, ["train.lr=0.01"]).to_yaml()
    a = make_run(tmp_path / "a", run_yaml=cfg.encode())
    b = make_run(tmp_path / "b", run_yaml=cfg.replace("  columns: null", "  columns: {1: a, b: c}").encode())
    c = make_run(tmp_path / "c", run_yaml=cfg.replace("  columns: null", "  columns: {2024-01-01: text}").encode())
    assert b.joinpath("run.yaml").read_text() != cfg
    rc, out, err = cli(["summary", str(a), str(b), str(c), "--no-plot"], capsys)
    assert rc == 0 and "Traceback" not in err, err
    assert "data.columns" in out.splitlines()[0], out


def test_a_chunks_metrics_that_cannot_be_read_leave_the_other_runs_shown(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """A chunk's adapter (its step record says the run has not ended) beside a metrics.jsonl that is a link: the
    status reads the last logged step, which raised the link's refusal and ended the summary of every run (exit 2)."""
    a = make_run(tmp_path / "a")
    b = make_run(tmp_path / "b")
    (b / "adapter" / "ia3_dist_step.json").write_text('{"step": 2, "final": false}')
    (b / "metrics.jsonl").rename(b / "m.jsonl")
    (b / "metrics.jsonl").symlink_to("m.jsonl")
    rc, out, err = cli(["summary", str(a), str(b), "--no-plot"], capsys)
    assert rc == 0, err
    assert summary_row(out, str(a))[1] == "done" and summary_row(out, str(b))[1] == "stopped", out


@pytest.mark.parametrize("kind", ["symlink", "dir"])
def test_run_yaml_that_is_not_a_regular_file_is_not_read(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         kind: str) -> None:
    a = make_run(tmp_path / "runs" / "a", lr=0.01)
    b = make_run(tmp_path / "runs" / "b")
    (b / "run.yaml").unlink()
    if kind == "symlink":  # a run dir from elsewhere pointing at a file of the reader's: never shown in the table
        secret = outside(tmp_path, "secret.yaml")
        secret.write_bytes(SECRET)
        (b / "run.yaml").symlink_to(secret)
    else:
        (b / "run.yaml").mkdir()
    rc, out, err = cli(["summary", str(tmp_path / "runs"), "--no-plot"], capsys)
    assert rc == 0, err
    assert "SECRET-TOKEN" not in out and summary_row(out, str(a))[-7:-5] == ["done", "2"]  # status, step
    one_note(err, f"{b}/run.yaml", "a symlink" if kind == "symlink" else "a directory")


BAD_LINES = {
    "not-utf8": b"\xff\xfe{\"step\": 5}",
    "not-json": b"garbage",
    "nul-bytes": b"\0\0\0",
    "deep-nesting": b"[" * 60_000,
    "int-of-5000-digits": b'{"step": ' + b"9" * 5000 + b"}",
    "int-of-100k-digits": b'{"step": 1, "loss": ' + b"9" * 100_000 + b"}",
    "2-MiB-line": b'{"step": 1, "pad": "' + b"a" * (2 << 20) + b'"}',
    "array": b"[1, 2]",
    "no-step": b'{"loss": 1.0}',
    "string-step": b'{"step": "3", "loss": 1.0}',
    "bool-step": b'{"step": true, "loss": 1.0}',
    "negative-step": b'{"step": -1, "loss": 1.0}',
    "float-step": b'{"step": 1.5, "loss": 1.0}',
}


def _with_bad(*bad: bytes) -> list[bytes]:
    return [b'{"step": 1, "loss": 2.0, "tokens_per_s": 10.0}', *bad, b'{"step": 2, "loss": 1.5, "tokens_per_s": 30.0}']


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_metric_lines_are_skipped_and_counted(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  case: str) -> None:
    d = make_run(tmp_path / "r", lines=_with_bad(BAD_LINES[case]))
    t0 = time.monotonic()
    rc, out, err = cli(["summary", str(d), "--no-plot"], capsys)
    assert rc == 0, err
    assert time.monotonic() - t0 < 10
    assert summary_row(out, str(d))[1:4] == ["done", "2", "1.5"], out
    one_note(err, f"skipped 1 bad line in {d}/metrics.jsonl")


def test_all_bad_lines_are_one_note_and_a_torn_last_line_is_not_one(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    d = make_run(tmp_path / "r", lines=_with_bad(*BAD_LINES.values()))
    with (d / "metrics.jsonl").open("ab") as fh:
        fh.write(b'{"step": 3, "lo')  # a live run's line half written: normal, not damage
    rc, out, err = cli(["summary", str(d), "--no-plot", "--json"], capsys)
    assert rc == 0, err
    row = json.loads(out)["rows"][0]
    assert (row["step"], row["train_loss"], row["tokens_per_s"]) == (2, 1.5, 30.0)
    one_note(err, f"skipped {len(BAD_LINES)} bad lines in {d}/metrics.jsonl")


def test_metrics_reads_are_bounded_in_bytes_and_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the file's tail is read, only the last records are kept, and only number values of the keys asked for:
    a huge or hostile metrics.jsonl costs bounded memory (the real bounds are 64 MiB and 400k records)."""
    f = tmp_path / "metrics.jsonl"
    f.write_bytes(b"".join(json.dumps({"step": i, "loss": float(i), "junk": [i] * 3, "lr": "fast"}).encode() + b"\n"
                           for i in range(1, 2001)))
    monkeypatch.setattr(plots, "MAX_METRICS_BYTES", 4096)
    got = plots.scan_metrics(f, ("step", "loss", "lr"), keep=10)
    assert got is not None and got.skipped_bytes == f.stat().st_size - 4096
    assert [r["step"] for r in got.records] == list(range(1991, 2001))
    assert got.records[-1] == {"step": 2000, "loss": 2000.0}  # no junk, no string
    assert got.dropped > 0 and got.bad == 0
    msg = got.describe(f)
    assert msg is not None and "last 4096 bytes" in msg and "kept only the last 10 records" in msg


def test_records_are_budgeted_over_all_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from ia3_dist.tools import summary

    monkeypatch.setattr(summary, "MAX_RECORDS", 30)
    lines = [json.dumps({"step": i, "loss": 1.0 / i}).encode() for i in range(1, 101)]
    for name in "abc":
        make_run(tmp_path / "runs" / name, lines=lines)
    runs, _ = summary.collect([str(tmp_path / "runs")])
    assert [len(r.records) for r in runs] == [10, 10, 10] and runs[0].records[-1]["step"] == 100
    err = capsys.readouterr().err
    assert err.count("kept only the last 10 records") == 3 and len(err.splitlines()) == 3


@pytest.mark.parametrize("content", ["0", "-1", "99999999999999999999999999", "1" * 40, "dir"])
def test_hostile_pid_file_is_no_live_process(tmp_path: Path, content: str) -> None:
    # "0" and "-1" would make kill(pid, 0) ask about a whole process group; a huge number overflows kill().
    d = tmp_path / "r"
    d.mkdir()
    pid = d / "rank0.pid"
    if content == "dir":
        pid.mkdir()
    else:
        pid.write_text(content)
    os.utime(pid, (10_000.0, 10_000.0))
    assert run_status(d) == "failed"


def test_eval_result_past_floats_range_is_a_note(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An integer score too large for a float in eval/results.json (an OverflowError, a traceback) is a malformed
    file: a note, and the run shows no value."""
    from ia3_dist.tools import summary

    d = tmp_path / "r"
    (d / "eval").mkdir(parents=True)
    row = {"task": "heldout", "metric": "loss", "step": 4, "checkpoint": "final", "value": 10 ** 400}
    (d / "eval" / "results.json").write_text(json.dumps({"rows": [row]}))
    assert summary.eval_value(d, "heldout/loss") is None
    assert "not readable as eval results" in capsys.readouterr().err
    row["value"] = 3
    (d / "eval" / "results.json").write_text(json.dumps({"rows": [row]}))
    assert summary.eval_value(d, "heldout/loss") == 3.0


def test_table_cells_from_files_are_escaped_short_and_config_keys_only(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Escape sequences in a value would drive the reader's terminal; 10,000 characters would fill it; 3,000 keys no
    run config has would be 3,000 columns (and a table quadratic in the runs)."""
    raw = load_config(TINY).to_dict()
    raw["model"]["revision"] = "\x1b]0;pwned\x07\x1b[2J" + "y" * 10_000
    raw.update({f"zzz{i}": {"k": i} for i in range(3000)})
    make_run(tmp_path / "runs" / "a", run_yaml=yaml.safe_dump(raw).encode())
    make_run(tmp_path / "runs" / "b")
    rc, out, err = cli(["summary", str(tmp_path / "runs"), "--no-plot"], capsys)
    assert rc == 0 and err == "", err
    assert "\x1b" not in out and "\x07" not in out and "y" * 250 not in out and "zzz" not in out
    assert "model.revision" in out.splitlines()[0]
    assert max(len(ln) for ln in out.splitlines()) < 600
    rc, out, _ = cli(["summary", str(tmp_path / "runs"), "--no-plot", "--json"], capsys)
    assert rc == 0 and "\x1b" not in out and "zzz" not in out


def _sweep_record(tasks: list[dict] | None = None, **kw: object) -> dict:
    rec: dict = {"format": 1, "config": str(TINY), "overrides": [], "job": None, "grid": {"train.lr": ["1e-3"]},
                 "tasks": tasks if tasks is not None else [
                     {"index": 0, "name": "lr=1e-3", "values": {"train.lr": "1e-3"}, "overrides": ["train.lr=1e-3"],
                      "dir": "/nonexistent"}]}
    rec.update(kw)
    return rec


def _task(**kw: object) -> dict:
    t: dict = {"index": 0, "name": "lr=1e-3", "values": {"train.lr": "1e-3"}, "overrides": ["train.lr=1e-3"]}
    t.update(kw)
    return t


BAD_SWEEP = {
    "not-utf8": b"\xff\xfe{}",
    "not-json": b"{format: 1",
    "deep-nesting": b"[" * 100_000,
    "int-of-100k-digits": b'{"format": ' + b"1" * 100_000 + b"}",
    "17-MiB": b'{"format": 1, "pad": "' + b"a" * (17 << 20) + b'"}',
    "a-list": b"[]",
    "format-true": json.dumps(_sweep_record(format=True)).encode(),
    "no-tasks": json.dumps(_sweep_record(tasks=None) | {"tasks": None}).encode(),
    "no-config": json.dumps(_sweep_record(config=None)).encode(),
    "task-not-object": json.dumps(_sweep_record(tasks=[1])).encode(),
    "task-without-name": json.dumps(_sweep_record(tasks=[_task(name=None)])).encode(),
    "task-name-dotdot": json.dumps(_sweep_record(tasks=[_task(name="..")])).encode(),
    "task-name-a-path": json.dumps(_sweep_record(tasks=[_task(name="../../etc")])).encode(),
    "task-name-10k": json.dumps(_sweep_record(tasks=[_task(name=LONG)])).encode(),
    "index-a-string": json.dumps(_sweep_record(tasks=[_task(index="0")])).encode(),
    "index-out-of-range": json.dumps(_sweep_record(tasks=[_task(index=10**30)])).encode(),
    "overrides-not-strings": json.dumps(_sweep_record(tasks=[_task(overrides=[1, 2])])).encode(),
    "values-not-strings": json.dumps(_sweep_record(tasks=[_task(values={"train.lr": [1]})])).encode(),
    "job-an-option": json.dumps(_sweep_record(job="--help")).encode(),
    "job-10k": json.dumps(_sweep_record(job=LONG)).encode(),
}


@pytest.mark.parametrize("case", sorted(BAD_SWEEP))
def test_bad_sweep_json_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str) -> None:
    d = tmp_path / "sw"
    d.mkdir()
    (d / "sweep.json").write_bytes(BAD_SWEEP[case])
    t0 = time.monotonic()
    rc, out, err = cli(["summary", str(d), "--no-plot"], capsys)
    assert time.monotonic() - t0 < 10
    assert_refused(rc, err, f"{d}/sweep.json")
    assert out == ""


@pytest.mark.parametrize("kind", ["symlink", "dir"])
def test_sweep_json_that_is_not_a_regular_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          kind: str) -> None:
    d = tmp_path / "sw"
    d.mkdir()
    if kind == "symlink":
        real = tmp_path / "elsewhere.json"
        real.write_text(json.dumps(_sweep_record()))
        (d / "sweep.json").symlink_to(real)
    else:
        (d / "sweep.json").mkdir()
    rc, _, err = cli(["summary", str(d), "--no-plot"], capsys)
    assert_refused(rc, err, "sweep.json", "a symlink" if kind == "symlink" else "a directory")


def test_sweep_task_dirs_are_under_the_sweep_dir_not_the_recorded_paths(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """A record from elsewhere names paths of that machine, or any dir: the task dir is <sweep dir>/<name>."""
    other = make_run(tmp_path / "someone-else")
    d = tmp_path / "sw"
    d.mkdir()
    (d / "sweep.json").write_text(json.dumps(_sweep_record(tasks=[_task(dir=str(other))])))
    rc, out, err = cli(["summary", str(d), "--no-plot", "--json"], capsys)
    assert rc == 0, err
    row = json.loads(out)["rows"][0]
    assert (row["dir"], row["status"], row["step"]) == (str(d / "lr=1e-3"), "pending", None)


# --- drawing hostile values --------------------------------------------------------------------------------------


def test_plot_and_summary_draw_hostile_values_and_labels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Values matplotlib cannot draw (1e308, inf, NaN, strings, objects) are left out, and '$...$' in a run dir's
    name is text, not math (a bad math expression raises only when the figure is drawn)."""
    recs = [{"step": 1, "loss": 2.0, "eval_loss": 2.5, "lr": 1e-3, "tokens_per_s": 10.0, "grad_norm": 1.0},
            {"step": 2, "loss": 1e308, "lr": -1e308, "tokens_per_s": float("inf"), "grad_norm": float("nan")},
            {"step": 2**62, "loss": "1.0", "eval_loss": {"x": 1}, "lr": [1], "tokens_per_s": None, "grad_norm": True},
            {"step": 3, "loss": 1.5, "eval_loss": 2.0, "lr": 1e-3, "tokens_per_s": 30.0, "grad_norm": 0.5}]
    lines = [json.dumps(r).encode() for r in recs] + [b"garbage"]
    a = make_run(tmp_path / "runs" / r"a$\frac{1}{\undefined}$", lines=lines)
    b = make_run(tmp_path / "runs" / "b", lines=lines, lr=0.01)
    rc, out, err = cli(["plot", str(a)], capsys)
    assert rc == 0 and out == f"wrote {a}/metrics.png\n", err
    one_note(err, f"skipped 1 bad line in {a}/metrics.jsonl")
    assert (a / "metrics.png").read_bytes()[:8] == PNG
    rc, out, err = cli(["plot", str(a), str(b), "--out", str(tmp_path / "cmp.png")], capsys)
    assert rc == 0 and (tmp_path / "cmp.png").read_bytes()[:8] == PNG, err
    assert len(err.splitlines()) == 2 and "Traceback" not in err
    rc, out, err = cli(["summary", str(tmp_path / "runs"), "--plot", str(tmp_path / "s.png")], capsys)
    assert rc == 0 and (tmp_path / "s.png").read_bytes()[:8] == PNG, err
    assert str(2**62) in out and "Traceback" not in err


def test_plot_out_without_an_extension_writes_and_reports_that_path(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    d = make_run(tmp_path / "r")
    rc, out, err = cli(["plot", str(d), "--out", str(tmp_path / "X")], capsys)
    assert rc == 0, err
    assert out == f"wrote {tmp_path / 'X'}\n" and (tmp_path / "X").read_bytes()[:8] == PNG
    assert not (tmp_path / "X.png").exists()


# --- writing: never through a symlink ------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["default-png", "out", "dangling", "compare"])
def test_plot_never_writes_through_a_symlink(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str) -> None:
    d = make_run(tmp_path / "r")
    target = outside(tmp_path)
    link = tmp_path / "link.png"
    args = ["plot", str(d), "--out", str(link)]
    if case == "default-png":
        link = d / "metrics.png"
        args = ["plot", str(d)]
    elif case == "dangling":
        target = tmp_path / "elsewhere" / "new-file"
    elif case == "compare":
        args = ["plot", str(d), str(make_run(tmp_path / "r2")), "--out", str(link)]
    link.symlink_to(target)
    rc, _, err = cli(args, capsys)
    assert_refused(rc, err, str(link), "symlink")
    assert unchanged(target) if case != "dangling" else not target.exists()
    assert link.is_symlink() and not list(link.parent.glob(".*.tmp"))


@pytest.mark.parametrize("where", ["sweep-default", "plot-option"])
def test_summary_never_writes_through_a_symlink(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                where: str) -> None:
    d = tmp_path / "sw"
    make_run(d / "lr=1e-3")
    (d / "sweep.json").write_text(json.dumps(_sweep_record()))
    target = outside(tmp_path)
    link = d / "summary.png" if where == "sweep-default" else tmp_path / "s.png"
    link.symlink_to(target)
    rc, out, err = cli(["summary", str(d), *([] if where == "sweep-default" else ["--plot", str(link)])], capsys)
    assert "lr=1e-3" in out  # the table first, then the refusal
    assert_refused(rc, err, str(link), "symlink")
    assert unchanged(target) and link.is_symlink()


def slurm_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    return cli(["slurm", "--config", str(TINY), *args], capsys)


@pytest.mark.parametrize(("case", "force", "needle"), [
    ("empty-file", False, "--force"), ("dangling-symlink", False, "symlink"), ("symlink", False, "symlink"),
    ("symlink", True, "symlink"), ("dangling-symlink", True, "symlink")])
def test_slurm_out_never_replaces_without_force_nor_writes_through_a_symlink(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, force: bool, needle: str) -> None:
    out = tmp_path / "job.sbatch"
    target = outside(tmp_path) if case == "symlink" else tmp_path / "elsewhere" / "new-file"
    if case == "empty-file":
        out.touch()
    else:
        out.symlink_to(target)
    rc, _, err = slurm_cli(["--out", str(out), *(["--force"] if force else [])], capsys)
    assert_refused(rc, err, "--out", needle)
    if case == "empty-file":
        assert out.read_bytes() == b""
    elif case == "symlink":
        assert unchanged(target)
    else:
        assert not target.exists()


def test_slurm_out_force_replaces_the_file_not_what_it_is_linked_to(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    target = outside(tmp_path)
    out = tmp_path / "job.sbatch"
    os.link(target, out)  # a hard link: writing in place would change the file outside too
    rc, _, err = slurm_cli(["--out", str(out), "--force"], capsys)
    assert rc == 0, err
    assert unchanged(target) and out.read_text().startswith("#!/bin/bash\n") and os.access(out, os.X_OK)


def sweep_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    return cli(["sweep", "--config", str(TINY), *SLURM, "--grid", "train.lr=1e-3,1e-2", "--no-submit", *args], capsys)


@pytest.mark.parametrize("entry", ["sweep.sbatch", "sweep.json", "logs"])
def test_sweep_force_never_writes_through_a_symlink(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    entry: str) -> None:
    d = tmp_path / "sw"
    assert sweep_cli(["--dir", str(d)], capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}
    if entry == "logs":
        target = tmp_path / "elsewhere"
        target.mkdir()
        (d / "logs").rmdir()
        (d / "logs").symlink_to(target, target_is_directory=True)
    else:
        target = outside(tmp_path)
        (d / entry).unlink()
        (d / entry).symlink_to(target)
    rc, _, err = sweep_cli(["--dir", str(d), "--force"], capsys)
    assert_refused(rc, err, "--dir", entry, "symlink")
    assert list(target.iterdir()) == [] if entry == "logs" else unchanged(target)
    # Refused before anything was written: the other files are as they were.
    assert {p.name: p.read_bytes() for p in d.iterdir() if p.is_file() and not p.is_symlink()} == \
        {k: v for k, v in before.items() if k != entry}


def test_sweep_force_replaces_a_stale_temp_link_without_following_it(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """sweep.json used to be written via a fixed ``sweep.json.tmp``: a link left under that name is ignored."""
    d = tmp_path / "sw"
    assert sweep_cli(["--dir", str(d)], capsys)[0] == 0
    target = outside(tmp_path)
    (d / "sweep.json.tmp").symlink_to(target)
    rc, _, err = sweep_cli(["--dir", str(d), "--force"], capsys)
    assert rc == 0, err
    assert unchanged(target) and json.loads((d / "sweep.json").read_text())["format"] == 1


@pytest.mark.parametrize("kind", ["symlink", "dangling-symlink", "fifo"])
def test_local_sweep_never_logs_through_a_symlink_or_into_a_fifo(tmp_path: Path, kind: str) -> None:
    from ia3_dist.tools.sweep import Task, run_local

    d = tmp_path / "sw"
    (d / "logs").mkdir(parents=True)
    log = d / "logs" / "lr=1.log"
    target = outside(tmp_path) if kind == "symlink" else tmp_path / "elsewhere" / "new-file"
    if kind == "fifo":
        os.mkfifo(log)  # opened for writing without O_NONBLOCK, this would wait for a reader for ever
    else:
        log.symlink_to(target)
    task = Task(0, "lr=1", {"train.lr": "1"}, ["train.lr=1"], str(d / "lr=1"))
    assert run_local(str(TINY), [], [task], d, 1) == [0]  # failed without starting, the next task would go on
    assert unchanged(target) if kind == "symlink" else not target.exists()


# --- cost bounds and quoting -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("cmd", "opt", "value"), [
    ("slurm", "--nodes", "1000000000000"), ("slurm", "--nodes", "100001"), ("slurm", "--nodes", "1e12"),
    ("slurm", "--nodes", "0"), ("slurm", "--nodes", "9" * 10_000), ("slurm", "--gpus-per-node", "100000"),
    ("slurm", "--cpus-per-node", "1000000000"), ("sweep", "--max-concurrent", "100000000000000000000"),
    ("sweep", "--max-concurrent", "1e20"), ("sweep", "--max-concurrent", "0"), ("sweep", "--max-tasks", "10" * 8),
    ("sweep", "--nproc", "1000000000"), ("sweep", "--nodes", "1000000000000")])
def test_costly_numbers_never_reach_a_job_file(tmp_path: Path, capsys: pytest.CaptureFixture[str], cmd: str,
                                               opt: str, value: str) -> None:
    out = tmp_path / "job.sbatch"
    d = tmp_path / "sw"
    if cmd == "slurm":
        rc, _, err = slurm_cli([opt, value, "--out", str(out)], capsys)
    else:
        rc, _, err = sweep_cli([opt, value, "--dir", str(d)], capsys)
    assert_refused(rc, err, opt)
    assert not out.exists() and not d.exists()


def test_the_render_api_bounds_nodes_too() -> None:
    with pytest.raises(UsageError, match="--nodes"):
        render(str(TINY), [], 10**12, 1, "01:00:00")


def test_max_concurrent_above_the_task_count_is_the_task_count(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "sw"
    assert sweep_cli(["--dir", str(d), "--max-concurrent", "5000"], capsys)[0] == 0
    assert "#SBATCH --array=0-1%2\n" in (d / "sweep.sbatch").read_text()


@pytest.mark.parametrize(("args", "needle"), [
    (["slurm", "--job-name", LONG], "--job-name"), (["slurm", "--account", LONG], "--account"),
    (["slurm", "--partition", LONG], "--partition"), (["slurm", "--time", LONG], "--time"),
    (["slurm", "--launcher", LONG], "--launcher"), (["slurm", "--python", "\x01" + LONG], "--python"),
    (["slurm", "--out", "\x01" + LONG], "--out"), (["slurm", "--out", "/" + LONG + "/job.sbatch"], "--out"),
    (["sweep", "--grid", LONG], "--grid"), (["sweep", "--grid", f"train.{LONG}=1,2"], "--grid"),
    (["sweep", "--grid", f"train.lr=1e-3,{LONG}"], "--grid"), (["sweep", "--grid", f"train.lr=1,1,{LONG}"], "--grid"),
    (["sweep", "--grid", "train.lr=1", "--dir", "/tmp/" + LONG], "--dir"),
    (["sweep", "--grid", "train.lr=1", "--dir", "/tmp/a b" + LONG], "--dir"),
    (["summary", LONG], "cannot read it"), (["summary", "x" * 254], "no such directory")])
def test_errors_quote_long_values_shortened(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str], args: list[str], needle: str) -> None:
    monkeypatch.chdir(tmp_path)
    cmd, *rest = args
    if cmd == "slurm":
        args = ["slurm", "--config", str(TINY), *rest]
    elif cmd == "sweep":
        args = ["sweep", "--config", str(TINY), *SLURM, "--no-submit", *rest]
    rc, _, err = cli(args, capsys)
    assert_refused(rc, err, needle)
    assert list(tmp_path.iterdir()) == []


# --- in a real process: what would hang or exhaust memory ------------------------------------------------------------

BOMB = ("a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
        + "".join(f"{n}: &{n} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
                  for p, n in zip("abcdefgh", "bcdefghi", strict=True))
        + "train: {lr: *i}\n")
"""Nine levels of nine aliases: 387 million strings (gigabytes, minutes) under yaml.safe_load."""


def run_limited(args: list[str], timeout: float = 60) -> tuple[int, str, str, int, float]:
    """``python -m ia3_dist ARGS`` in a real process: (exit code, stdout, stderr, peak RSS in bytes, seconds). The
    peak RSS is this child's own; an address-space limit of 4 GiB keeps a regression from swapping the box."""
    m = measured_cli(args, timeout)
    return m.rc, m.out, m.err, int(m.peak_rss_mib * (1 << 20)), m.seconds


@pytest.mark.slow
def test_alias_bomb_run_yaml_costs_bounded_time_and_memory(tmp_path: Path) -> None:
    d = make_run(tmp_path / "r", run_yaml=BOMB.encode())
    assert len(BOMB) < 1000
    rc, out, err, rss, secs = run_limited(["summary", str(d), "--no-plot"])
    assert rc == 0, err
    assert summary_row(out, str(d))[1:3] == ["done", "2"]
    one_note(err, "run.yaml", "anchor")
    assert rss < RSS_LIMIT and secs < 30, (rss, secs)


@pytest.mark.slow
def test_fifos_in_run_and_sweep_dirs_never_hang(tmp_path: Path) -> None:
    """A FIFO with no writer blocks a plain open() for ever: as run.yaml, metrics.jsonl, rank0.pid, sweep.json,
    a plot's PNG or slurm --out."""
    r = tmp_path / "r"
    r.mkdir()
    for name in ("run.yaml", "metrics.jsonl", "rank0.pid", "metrics.png"):
        os.mkfifo(r / name)
    rc, out, err, rss, _ = run_limited(["summary", str(r), "--no-plot"])
    assert rc == 0 and str(r) in out, err
    assert len(err.splitlines()) == 2 and "named pipe" in err and "Traceback" not in err, err
    assert rss < RSS_LIMIT
    rc, _, err, rss, _ = run_limited(["plot", str(r)])
    assert_refused(rc, err, f"{r}/metrics.jsonl", "named pipe")
    sw = tmp_path / "sw"
    sw.mkdir()
    os.mkfifo(sw / "sweep.json")
    rc, _, err, _, _ = run_limited(["summary", str(sw)])
    assert_refused(rc, err, f"{sw}/sweep.json", "named pipe")
    (r / "metrics.jsonl").unlink()
    make_run(tmp_path / "ok")
    rc, _, err, _, _ = run_limited(["plot", str(tmp_path / "ok"), "--out", str(r / "metrics.png")])
    assert_refused(rc, err, "--out", "not a regular file")
    rc, _, err, _, _ = run_limited(["slurm", "--config", str(TINY), "--out", str(r / "metrics.png"), "--force"])
    assert_refused(rc, err, "--out", "not a regular file")


@pytest.mark.slow  # a CLI process, and 1.5 GB touched here
def test_the_measured_peak_rss_is_the_cli_process_own() -> None:
    """The bound above is the CLI's own memory, whatever this test process holds: a child forked from a big test
    worker used to report the worker's resident pages as its peak (Linux keeps the high-water mark across exec)."""
    from _util import measured_cli

    big = bytearray(1500 << 20)
    for i in range(0, len(big), 4096):
        big[i] = 1
    m = measured_cli(["summary", "/nonexistent", "--no-plot"], 60)
    del big
    assert m.rc == 2 and 0 < m.peak_rss_mib < 400, m
