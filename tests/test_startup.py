"""Start-up cost of a rank: DeepSpeed is imported without MLflow (its autotuner would import it, ~1.5 s a rank),
and MLflow stays importable for ``output.report_to: [mlflow]``."""

from __future__ import annotations

import subprocess
import sys

import pytest

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
