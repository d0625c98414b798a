"""``ia3-dist export``: merge the IA3 vectors into the base weights and save a plain HF model.

The target dir is never shared with files export did not write: it must be new or empty, or (with ``force``) hold
an earlier export of ours, recorded in :data:`MARKER`. The model is saved into a staging dir inside it first
(``save_pretrained`` deletes weight shards it does not recognise in its target), then moved in; only files the
earlier export listed are replaced or removed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .. import __version__
from ..data.template import TEMPLATE_FILE
from ..errors import UsageError
from ..models.load import save_tokenizer
from ..runtime.manifest import check_writable_dir, few
from .inference import load_for_inference

MARKER = ".ia3-dist-export.json"
STAGING_PREFIX = ".ia3-dist-export-staging-"


def _previous_export(o: Path) -> list[str] | None:
    """The plain file names an earlier export recorded in ``o``, or None if ``o`` holds no readable marker."""
    try:
        m = json.loads((o / MARKER).read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return None
    files = m.get("files") if isinstance(m, dict) and m.get("tool") == "ia3-dist export" else None
    if not isinstance(files, list):
        return None
    # A marker is a file anyone can edit: only plain names directly in o are ever acted on.
    return [f for f in files if isinstance(f, str) and f and "/" not in f and "\\" not in f and f not in (".", "..")]


def check_target(out: str, force: bool) -> list[str]:
    """Preflight for ``--out``; returns the files of the earlier export that this one replaces (empty if none).
    Raises UsageError, having touched nothing, unless the dir is new, empty, or an earlier export with ``force``."""
    o = Path(out).expanduser()
    check_writable_dir(o, "--out")
    if not o.is_dir():
        return []
    try:
        entries = sorted(p.name for p in o.iterdir() if not p.name.startswith(STAGING_PREFIX))
    except OSError as e:
        raise UsageError(f"--out {out}: cannot read it ({e.strerror or e}); pick another dir") from None
    if not entries:
        return []
    previous = _previous_export(o)
    if not force:
        what = "an earlier export" if previous is not None else "files export did not write"
        raise UsageError(f"--out {out} is not empty ({what}: {few(entries)}); pick a new or empty dir, or pass "
                         f"--force to replace an earlier `ia3-dist export` there")
    if previous is None:
        raise UsageError(f"--out {out} holds files `ia3-dist export` did not write ({few(entries)}; no {MARKER}); "
                         f"--force only replaces an earlier export, so pick a new or empty dir")
    return [f for f in previous if (o / f).is_file() and not (o / f).is_symlink()]


def export_merged(adapter: str, out: str, base: str | None = None, dtype: str = "fp32", force: bool = False) -> Path:
    """Merge IA3 into the base weights (PEFT ``merge_and_unload``) and save a plain HF model + tokenizer + prompt
    template into ``out`` (see the module docstring for what may be there already)."""
    previous = check_target(out, force)
    model, tok, template, is_adapter = load_for_inference(adapter, base, dtype)
    if not is_adapter:
        raise UsageError(f"{adapter}: not an adapter dir (no adapter_config.json)")
    merged = model.merge_and_unload()
    o = Path(out).expanduser()
    o.mkdir(parents=True, exist_ok=True)
    # What a killed export left (a whole merged model, GBs): ours by name, never part of an export. (Two exports
    # into one dir at once would clash anyway.)
    for d in o.iterdir():
        if d.name.startswith(STAGING_PREFIX) and d.is_dir() and not d.is_symlink():
            shutil.rmtree(d, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(dir=o, prefix=STAGING_PREFIX))
    try:
        merged.save_pretrained(str(staging), safe_serialization=True)
        save_tokenizer(tok, staging)
        if (Path(adapter).expanduser() / TEMPLATE_FILE).is_file():
            # The template as it was checked and loaded, not the file again: it may have changed since.
            template.save(staging)
        _publish(staging, o, previous, {"adapter": str(adapter), "base": base, "dtype": dtype})
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return o


def _publish(staging: Path, o: Path, previous: list[str], info: dict[str, Any]) -> None:
    """Move the staged export into ``o``: first check that no name collides with a file the earlier export did not
    write (someone put it there since), then drop the earlier export's files this one does not write (stale
    shards), move the new ones in and record them."""
    new = sorted(p.name for p in staging.iterdir())
    theirs = [n for n in new if n not in previous and ((o / n).exists() or (o / n).is_symlink())]
    if theirs:
        raise UsageError(f"--out {o}: {few(theirs)} would be overwritten and an earlier export did not write it; "
                         f"move it away or pick a new or empty dir")
    for name in previous:
        if name not in new and name != MARKER:
            (o / name).unlink(missing_ok=True)
    for name in new:
        os.replace(staging / name, o / name)
    tmp = o / (MARKER + ".tmp")
    tmp.write_text(json.dumps({"tool": "ia3-dist export", "version": __version__, **info, "files": new}, indent=1)
                   + "\n", encoding="utf-8")
    os.replace(tmp, o / MARKER)
