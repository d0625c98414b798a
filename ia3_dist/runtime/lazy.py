"""Importing DeepSpeed without what a run never uses.

``import deepspeed`` imports its autotuner, and the autotuner imports MLflow whenever it is installed (the
``track`` extra installs it): about 1.5 s of every rank's start-up on a CPU box, for a feature ia3-dist never
runs. :func:`import_deepspeed` hides MLflow from that first import only; the autotuner then records "no MLflow",
and a run with ``output.report_to: [mlflow]`` still imports the real package later (``train/trackers.py``).
"""

from __future__ import annotations

import sys
from types import ModuleType

_HIDDEN = ("mlflow",)


def import_deepspeed() -> ModuleType:
    """``import deepspeed`` (once per process) with :data:`_HIDDEN` kept out of it. Call it before anything else
    imports DeepSpeed; a later call returns the module already imported."""
    if "deepspeed" in sys.modules:
        return sys.modules["deepspeed"]
    # None in sys.modules makes `import mlflow` raise ImportError, which the autotuner catches.
    hidden = [name for name in _HIDDEN if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        import deepspeed
    finally:
        for name in hidden:
            if sys.modules.get(name, False) is None:
                del sys.modules[name]
    return deepspeed
