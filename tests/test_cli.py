"""Bad input exits 2 with a message naming the problem, before any process group, leaving the output dir alone."""

from __future__ import annotations

from pathlib import Path

import pytest
from _util import launch


@pytest.mark.parametrize("args, needle", [
    (["--config", "configs/tiny-cpu.yaml", "train.lr_rate=1"], "train.lr_rate"),
    (["--config", "configs/tiny-cpu.yaml", "train.precision=fp8"], "train.precision"),
    (["--config", "nope.yaml"], "nope.yaml: not found"),
    (["--config", "configs/tiny-cpu.yaml", "deepspeed.config=zero7"], "zero7"),
    (["--config", "configs/tiny-cpu.yaml", "data.path=/no/such.json"], "/no/such.json"),
    (["--config", "configs/tiny-cpu.yaml", "model.path=/no/model"], "/no/model"),
])
def test_bad_input_exits_2_and_keeps_output(tmp_path: Path, args: list[str], needle: str) -> None:
    out = tmp_path / "out"
    out.mkdir()
    keep = out / "precious.txt"
    keep.write_text("keep me")
    proc = launch([*args, f"output.dir={out}"], timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert needle in proc.stderr and "error:" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "init_distributed" not in proc.stderr + proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"] and keep.read_text() == "keep me"


def test_bad_data_file_names_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": 3}\n')
    proc = launch(["--config", "configs/tiny-cpu.yaml", f"data.path={bad}", f"output.dir={tmp_path / 'o'}"])
    assert proc.returncode == 2
    assert f"{bad}:2: field 'output' must be a string" in proc.stderr
    assert not (tmp_path / "o").exists()
