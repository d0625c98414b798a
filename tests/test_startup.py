"""Start-up cost of a rank: DeepSpeed is imported without MLflow (its autotuner would import it, ~1.5 s a rank),
and MLflow stays importable for ``output.report_to: [mlflow]``; a run never imports DeepSpeed's Muon modules."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from _util import check, launch

pytestmark = pytest.mark.slow

PROBE = """
import sys
from ia3_dist.runtime.lazy import import_deepspeed
ds = import_deepspeed()
assert "mlflow" not in sys.modules, "DeepSpeed's import pulled MLflow in"
assert import_deepspeed() is ds
import mlflow  # a run that reports to MLflow still gets the real package
from deepspeed.autotuning import autotuner
print("has_mlflow", autotuner.has_mlflow, "mlflow", mlflow.__name__)
"""


def test_deepspeed_is_imported_without_mlflow() -> None:
    pytest.importorskip("mlflow")
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "has_mlflow False mlflow mlflow" in proc.stdout


def test_a_run_never_imports_deepspeeds_muon(tmp_path: Path) -> None:
    """A ZeRO-2 run (whose engine asks at every step's gradient copy whether its optimizer is Muon) trains without
    importing DeepSpeed's Muon modules, which import TorchInductor (about 1 s of a core per rank). Run from the
    tests' warm interpreter, which has imported DeepSpeed as a rank does (ia3_dist.runtime.lazy) and little else:
    whatever the run imports shows in its sys.modules, and an import the warm-up made would show too (a failure,
    never a pass)."""
    out = tmp_path / "run"
    proc = check(launch(["--config", "configs/tiny-cpu.yaml", "train.max_steps=2", "deepspeed.config=zero2",
                         f"output.dir={out}"], script="tests/probe_run_imports.py"))
    assert "inductor False" in proc.stdout, proc.stdout[-2000:]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_demo_data_is_written_once_and_never_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two nodes (or workers) writing the demo data at once: the first link wins and the file is never renamed
    over afterwards. A rename over it changed the file another node was hashing: its rank exited 2 with "changed
    while it was tokenized" (seen on the 2-node Slurm test)."""
    import os

    from ia3_dist.train import demo

    made = []

    def make() -> list[dict[str, str]]:
        made.append(1)
        if len(made) == 2:  # the first writer links its file in while this one writes
            first = demo.asset_root(str(tmp_path)).with_name(f"x-v{demo.ASSET_VERSION}.json")
            first.write_text('[{"first": "1"}]', encoding="utf-8")
        return [{"n": str(len(made))}]

    f = demo._ensure_json(str(tmp_path), "x", make)
    f.unlink()
    assert demo._ensure_json(str(tmp_path), "x", make) == f
    assert f.read_text(encoding="utf-8") == '[{"first": "1"}]'  # the winner's, not replaced by the loser's
    ino = os.stat(f).st_ino
    assert demo._ensure_json(str(tmp_path), "x", make) == f and os.stat(f).st_ino == ino and len(made) == 2
    assert [p.name for p in f.parent.iterdir() if ".tmp" in p.name] == []
