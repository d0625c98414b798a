"""Reading instruction records from files and datasets; every problem is a :class:`UsageError` naming file and
record (or, with ``data.on_bad_record=skip``, a counted skip)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import DataSection
from ..errors import UsageError

FIELDS = ("instruction", "input", "output")


@dataclass
class Records:
    """Columns of raw records plus where they came from (for error messages and the cache key)."""

    instruction: list[str]
    input: list[str]
    output: list[str]
    source: str
    fingerprint: str
    skipped: list[str]
    """Messages for records dropped by ``data.on_bad_record=skip``."""

    def __len__(self) -> int:
        return len(self.output)


def _hash_path(p: Path, h: Any) -> None:
    if p.is_dir():
        for f in sorted(x for x in p.rglob("*") if x.is_file()):
            h.update(str(f.relative_to(p)).encode())
            _hash_path(f, h)
    else:
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)


def _check_record(rec: Any, where: str) -> tuple[str, str, str]:
    if not isinstance(rec, dict):
        raise UsageError(f"{where}: expected an object with instruction/input/output, got {type(rec).__name__}")
    vals = []
    for f in FIELDS:
        v = rec.get(f)
        if v is None and f == "input":
            v = ""
        if v is None:
            raise UsageError(f"{where}: missing field '{f}' (every record needs instruction and output strings; "
                             f"input is optional)")
        if not isinstance(v, str):
            raise UsageError(f"{where}: field '{f}' must be a string, got {type(v).__name__}")
        vals.append(v)
    if not vals[0].strip() and not vals[2].strip():
        raise UsageError(f"{where}: empty record (instruction and output are both empty)")
    return vals[0], vals[1], vals[2]


class _Collector:
    """Applies ``data.on_bad_record``: raise on the first bad record, or skip it and remember where it was."""

    def __init__(self, policy: str) -> None:
        self.policy = policy
        self.rows: list[tuple[str, str, str]] = []
        self.skipped: list[str] = []

    def bad(self, err: UsageError) -> None:
        if self.policy == "error":
            raise UsageError(f"{err} (or set data.on_bad_record=skip to drop bad records)") from None
        self.skipped.append(str(err))

    def add(self, rec: Any, where: str) -> None:
        try:
            self.rows.append(_check_record(rec, where))
        except UsageError as e:
            self.bad(e)


def _columns(c: _Collector, source: str, fingerprint: str, limit: int | None) -> Records:
    rows = c.rows[:limit] if limit is not None else c.rows
    if not rows:
        extra = f" ({len(c.skipped)} bad records skipped)" if c.skipped else ""
        raise UsageError(f"{source}: the dataset has no usable records{extra}")
    ins, inp, out = (list(col) for col in zip(*rows, strict=True))
    return Records(ins, inp, out, source, fingerprint, c.skipped)


def _read_json(p: Path, c: _Collector) -> None:
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = p.read_bytes()[: e.start].count(b"\n") + 1
        raise UsageError(f"{p}:{line}: not UTF-8 ({e.reason} at byte {e.start}); re-encode the file as UTF-8") \
            from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{p}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    except RecursionError:
        raise UsageError(f"{p}: JSON nested too deeply") from None
    if not isinstance(data, list):
        raise UsageError(f"{p}: expected a JSON list of records, got {type(data).__name__} "
                         f"(use .jsonl for one record per line)")
    for i, r in enumerate(data):
        c.add(r, f"{p}: record {i}")


def _read_jsonl(p: Path, c: _Collector) -> None:
    with open(p, "rb") as fh:
        for n, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                c.bad(UsageError(f"{p}:{n}: not UTF-8 ({e.reason}); re-encode the file as UTF-8"))
                continue
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                c.bad(UsageError(f"{p}:{n}:{e.colno}: invalid JSON: {e.msg}"))
                continue
            except RecursionError:
                c.bad(UsageError(f"{p}:{n}: JSON nested too deeply"))
                continue
            c.add(rec, f"{p}:{n}")


def _read_hf(ds: Any, source: str, c: _Collector) -> None:
    missing = [f for f in ("instruction", "output") if f not in ds.column_names]
    if missing:
        raise UsageError(f"{source}: dataset has no column(s) {missing}; columns are {ds.column_names}")
    cols = {f: ds[f] if f in ds.column_names else [""] * len(ds) for f in FIELDS}
    for i in range(len(ds)):
        c.add({f: cols[f][i] for f in FIELDS}, f"{source}: record {i}")


def load_records(cfg: DataSection) -> Records:
    """Read the records named by ``data.path``; every problem is a :class:`UsageError` naming file and record."""
    path = cfg.path
    p = Path(path).expanduser()
    c = _Collector(cfg.on_bad_record)
    if p.is_dir():
        import datasets

        if not ((p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists()
                or (p / "state.json").exists()):
            raise UsageError(f"{p}: directory is not a datasets save_to_disk dataset (no dataset_info.json, "
                             f"state.json or dataset_dict.json); point data.path at a .json/.jsonl file instead")
        try:
            ds = datasets.load_from_disk(str(p))
        except Exception as e:  # datasets raises many types for corrupt dirs; the user needs the path
            raise UsageError(f"{p}: cannot load the save_to_disk dataset: {e}") from None
        if isinstance(ds, datasets.DatasetDict):
            if cfg.split not in ds:
                raise UsageError(f"{p}: no split '{cfg.split}' (has {list(ds)}); set data.split")
            ds = ds[cfg.split]
        h = hashlib.sha256()
        _hash_path(p, h)
        _read_hf(ds, str(p), c)
    elif p.is_file():
        h = hashlib.sha256()
        _hash_path(p, h)
        if p.suffix == ".jsonl":
            _read_jsonl(p, c)
        elif p.suffix == ".json":
            _read_json(p, c)
        else:
            raise UsageError(f"{p}: unknown data format '{p.suffix}'; use .json, .jsonl or a save_to_disk dir")
    elif p.suffix in (".json", ".jsonl") or path.startswith((".", "/", "~")):
        raise UsageError(f"data.path {path}: file not found")
    else:
        import datasets

        try:
            ds = datasets.load_dataset(path, split=cfg.split)
        except Exception as e:  # offline, missing or private dataset: all mean "cannot use this name"
            raise UsageError(f"data.path {path}: not a local file/dir and the hub dataset could not be "
                             f"loaded ({type(e).__name__}: {e})") from None
        h = hashlib.sha256(f"hub:{path}:{cfg.split}:{getattr(ds, '_fingerprint', '')}".encode())
        _read_hf(ds, path, c)
    return _columns(c, str(p), h.hexdigest(), cfg.limit)
