"""Start-up cost of a rank: DeepSpeed is imported without MLflow (its autotuner would import it, ~1.5 s a rank),
and MLflow stays importable for ``output.report_to: [mlflow]``; a run never imports DeepSpeed's Muon modules."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from _util import ROOT

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


RUN = """
import sys
from ia3_dist.cli import main
rc = main(sys.argv[1:])
assert rc == 0, rc
print("inductor", "torch._inductor.compile_fx" in sys.modules)
"""


def test_a_run_never_imports_deepspeeds_muon(tmp_path: Path) -> None:
    """A ZeRO-2 run (whose engine asks at every step's gradient copy whether its optimizer is Muon) trains without
    importing DeepSpeed's Muon modules, which import TorchInductor (about 1 s of a core per rank)."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", RUN, "--config", "configs/tiny-cpu.yaml", "train.max_steps=2",
                           "deepspeed.config=zero2", f"output.dir={out}"], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "inductor False" in proc.stdout, proc.stdout[-2000:]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
