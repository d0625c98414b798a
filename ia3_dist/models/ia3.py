"""The IA3 adapter (PEFT) on a base model, and its trainable-parameter line."""

from __future__ import annotations

import contextlib
import io
from typing import Any

from torch import nn

from ..config import IA3Section
from ..errors import UsageError
from .load import base_on_meta


def ia3_config(section: IA3Section) -> Any:
    from peft import IA3Config, TaskType

    kw: dict[str, Any] = {"task_type": TaskType.CAUSAL_LM}
    if section.target_modules is not None:
        kw["target_modules"] = list(section.target_modules)
        kw["feedforward_modules"] = list(section.feedforward_modules or [])
    return IA3Config(**kw)


def apply_ia3(model: nn.Module, section: IA3Section) -> Any:
    from peft import get_peft_model

    try:
        return get_peft_model(model, ia3_config(section))
    except ValueError as e:  # e.g. target modules not found in the model
        raise UsageError(f"ia3: {e}") from None


def trainable_line(peft_model: Any) -> str:
    """PEFT's own ``print_trainable_parameters`` line, captured (it also counts ZeRO-3 partitioned params)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        peft_model.print_trainable_parameters()
    return buf.getvalue().strip()


def build_on_meta(config: Any, section: IA3Section | None = None) -> Any:
    """The IA3 model of an architecture from its config alone (meta device)."""
    return apply_ia3(base_on_meta(config), section or IA3Section())
