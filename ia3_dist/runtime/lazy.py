"""Importing DeepSpeed without what a run never uses.

``import deepspeed`` imports its autotuner, and the autotuner imports MLflow whenever it is installed (the
``track`` extra installs it): about 1.5 s of every rank's start-up on a CPU box, for a feature ia3-dist never
runs. :func:`import_deepspeed` hides MLflow from that first import only; the autotuner then records "no MLflow",
and a run with ``output.report_to: [mlflow]`` still imports the real package later (``train/trackers.py``).

DeepSpeed's ZeRO and bf16 optimizers import its Muon optimizer (when built, and ZeRO-1/2 at every step's
gradient copy) only to ask whether the optimizer they wrap is one, or to have its update function at hand for
Muon parameters: those modules apply ``torch.compile`` at import, which imports TorchInductor (about 1 s of a
core per rank, measured on this box's CPUs). ia3-dist's optimizer is always AdamW (``optimizer.type`` other than
AdamW is refused, ds_config.py), so :func:`import_deepspeed` puts stand-ins in their place: a
``MuonWithAuxAdam`` nothing is an instance of and a ``muon_update`` nothing calls, so every check answers as it
would with the real modules.
"""

from __future__ import annotations

import sys
from types import ModuleType

_HIDDEN = ("mlflow",)


def import_deepspeed() -> ModuleType:
    """``import deepspeed`` (once per process) with :data:`_HIDDEN` kept out of it. Call it before anything else
    imports DeepSpeed; a later call returns the module already imported."""
    if "deepspeed" in sys.modules:
        _stand_in_for_muon()
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
    _stand_in_for_muon()
    return deepspeed


MUON_MODULES = ("deepspeed.runtime.zero.muon.muon_optimizer", "deepspeed.runtime.zero.muon.original_muon")


def _stand_in_for_muon() -> None:
    """Put the stand-ins (see the module docstring) where DeepSpeed imports its Muon modules from, unless the real
    ones are imported already. Any other name from them fails to import."""
    optimizer, functions = MUON_MODULES
    if optimizer not in sys.modules:
        mod = ModuleType(optimizer, "ia3-dist's stand-in: its optimizer is AdamW, never DeepSpeed's Muon")

        class MuonWithAuxAdam:  # never built: DeepSpeed only asks isinstance(optimizer, MuonWithAuxAdam)
            def __init__(self, *_a: object, **_k: object) -> None:
                raise RuntimeError("ia3-dist trains with AdamW; DeepSpeed's Muon optimizer is not available here")

        MuonWithAuxAdam.__module__ = optimizer
        mod.MuonWithAuxAdam = MuonWithAuxAdam  # type: ignore[attr-defined]
        sys.modules[optimizer] = mod
    if functions not in sys.modules:
        mod = ModuleType(functions, "ia3-dist's stand-in: no parameter of its runs is a Muon parameter")

        def muon_update(*_a: object, **_k: object) -> None:  # DeepSpeed calls it for Muon parameters only
            raise RuntimeError("ia3-dist trains with AdamW; DeepSpeed's Muon update is not available here")

        mod.muon_update = muon_update  # type: ignore[attr-defined]
        sys.modules[functions] = mod
