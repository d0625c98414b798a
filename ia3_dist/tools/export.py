"""``ia3-dist export``: merge the IA3 vectors into the base weights and save a plain HF model."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..data.template import TEMPLATE_FILE
from ..errors import UsageError
from .inference import load_for_inference


def export_merged(adapter: str, out: str, base: str | None = None, dtype: str = "fp32") -> Path:
    """Merge IA3 into the base weights (PEFT ``merge_and_unload``) and save a plain HF model + tokenizer."""
    model, tok, _, is_adapter = load_for_inference(adapter, base, dtype)
    if not is_adapter:
        raise UsageError(f"{adapter}: not an adapter dir (no adapter_config.json)")
    merged = model.merge_and_unload()
    o = Path(out)
    o.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(o), safe_serialization=True)
    tok.save_pretrained(str(o))
    src = Path(adapter) / TEMPLATE_FILE
    if src.is_file():
        shutil.copy(src, o / TEMPLATE_FILE)
    return o
