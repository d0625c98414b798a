"""Bad input exits 2 with a message naming the problem, before any process group, leaving the output dir alone;
and the command line a new user meets (``--help``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.distributed
from _util import launch

from ia3_dist.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("args, needle", [
    (["--config", "configs/tiny-cpu.yaml", "train.lr_rate=1"], "train.lr_rate"),
    (["--config", "configs/tiny-cpu.yaml", "train.precision=fp8"], "train.precision"),
    (["--config", "nope.yaml"], "nope.yaml: not found"),
    (["--config", "configs/tiny-cpu.yaml", "deepspeed.config=zero7"], "zero7"),
    (["--config", "configs/tiny-cpu.yaml", "data.path=/no/such.json"], "/no/such.json"),
    (["--config", "configs/tiny-cpu.yaml", "model.path=/no/model"], "/no/model"),
])
def test_bad_input_exits_2_and_keeps_output(tmp_path: Path, args: list[str], needle: str, tiny_model: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    out.mkdir()
    keep = out / "precious.txt"
    keep.write_text("keep me")
    model = [] if any(a.startswith("model.path=") for a in args) else [f"model.path={tiny_model}"]
    assert main([*args, *model, f"output.dir={out}"]) == 2
    err = capsys.readouterr().err
    assert needle in err and "error:" in err
    assert not torch.distributed.is_initialized()
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"] and keep.read_text() == "keep me"


@pytest.mark.slow
def test_bad_data_file_names_line_in_a_real_process(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": 3}\n')
    proc = launch(["--config", "configs/tiny-cpu.yaml", f"data.path={bad}", f"output.dir={tmp_path / 'o'}"])
    assert proc.returncode == 2
    assert f"{bad}:2: field 'output' must be a string" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


def test_help_lists_every_subcommand(capsys: pytest.CaptureFixture) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert any(line.split()[:1] == [name] and len(line.split()) > 2 for line in out.splitlines()), name
    for name in COMMANDS:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: ia3-dist {name}")


@pytest.mark.parametrize("word, near", [("summry", "summary"), ("generte", "generate"), ("benchmark", None)])
def test_a_mistyped_command_is_named_with_the_commands(word: str, near: str | None,
                                                       capsys: pytest.CaptureFixture) -> None:
    """It was taken for train's override without '=' (or train's unknown argument), naming neither the word as a
    command nor the commands."""
    assert main([word, "run1", "--adapter", "x"]) == 2
    err = capsys.readouterr().err
    assert f"unknown command '{word}'" in err and ", ".join(COMMANDS) in err, err
    assert (f"did you mean '{near}'?" in err) == (near is not None), err


LIGHT_HELP = ["train", "check", "prepare", "plan", "slurm", "sweep", "summary", "plot", "resolve"]


def test_help_imports_no_torch() -> None:
    """The module docstring's promise: these commands answer --help without loading torch (seconds of a login
    node's CPU)."""
    import subprocess
    import sys

    code = ("import contextlib, io, sys\nfrom ia3_dist.cli import main\nheavy = []\n"
            "for name in sys.argv[1:]:\n"
            "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
            "        main([name, '--help'])\n"
            "    if 'torch' in sys.modules:\n"
            "        heavy.append(name)\n"
            "        break\n"
            "print(heavy)\n")
    proc = subprocess.run([sys.executable, "-c", code, *LIGHT_HELP], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]", proc.stdout


@pytest.mark.parametrize("how", ["launch.py", "-m"])
def test_help_into_a_closed_pipe_ends_quietly(how: str) -> None:
    """`ia3-dist --help | head -3`: the reader gone before the help is written ended in a BrokenPipeError traceback
    (exit 1) in 2 of 3 tries. Now the process ends without one. The pipe's read end is closed before the process
    starts, so the write always meets it closed."""
    import os
    import subprocess
    import sys

    r, w = os.pipe()
    os.close(r)
    cmd = [sys.executable, "launch.py"] if how == "launch.py" else [sys.executable, "-m", "ia3_dist"]
    try:
        proc = subprocess.run([*cmd, "--help"], stdout=w, stderr=subprocess.PIPE, text=True, timeout=120, cwd=ROOT)
    finally:
        os.close(w)
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr, proc.stderr
    assert proc.returncode == 1
    # A broken pipe that is not stdout's (a tracker's socket) is an error to show, not a quiet exit.
    code = ("from ia3_dist import cli\ndef boom(prog):\n    raise BrokenPipeError('a tracker socket')\n"
            "cli.main = boom\ncli.entry()\n")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert other.returncode == 1 and "BrokenPipeError: a tracker socket" in other.stderr, other.stderr


def test_resolve_prints_what_a_job_script_compares(capsys: pytest.CaptureFixture) -> None:
    """Scalars as YAML writes them (null, false, a number), strings bare, sections and lists as one JSON line:
    a script's [ "$(ia3-dist resolve ... --key data.packing)" = false ] matches."""
    from ia3_dist.cli import main

    tiny = str(Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml")
    got = {}
    for key in ("model.arch", "data.packing", "train.lr", "train.betas", "output.dir", "train.early_stopping"):
        assert main(["resolve", "--config", tiny, "--key", key, "train.lr=0.003", "output.dir=runs/x"]) == 0
        got[key] = capsys.readouterr().out.strip()
    assert got["model.arch"] == "null" and got["data.packing"] == "false" and got["train.lr"] == "0.003"
    assert got["train.betas"] == "[0.9, 0.999]" and got["output.dir"] == "runs/x"
    assert json.loads(got["train.early_stopping"])["patience"] == 3
