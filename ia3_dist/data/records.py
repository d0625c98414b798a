"""Reading instruction records from files and datasets; every problem is a :class:`UsageError` naming file and
record (or, with ``data.on_bad_record=skip``, a counted skip)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import DataSection
from ..errors import UsageError

FIELDS = ("instruction", "input", "output")
# One JSONL line (or one record's fields together, in characters) may be at most this long: lines are read with a
# bounded readline, so a file with no newlines fails here instead of being read whole into memory.
MAX_RECORD_BYTES = 16 << 20
# A .json list is parsed whole (text plus Python objects, several times the file size); past this, use .jsonl.
MAX_JSON_BYTES = 1 << 30


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


def _open(p: Path) -> Any:
    try:
        return open(p, "rb")  # noqa: SIM115 - the callers close it
    except OSError as e:
        raise UsageError(f"{p}: cannot open the data file ({e.strerror or e}); check its permissions") from None


def _hash_path(p: Path, h: Any) -> None:
    if p.is_dir():
        for f in sorted(x for x in p.rglob("*") if x.is_file()):
            h.update(str(f.relative_to(p)).encode())
            _hash_path(f, h)
    else:
        with _open(p) as fh:
            try:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            except OSError as e:
                raise UsageError(f"{p}: cannot read the data file ({e.strerror or e})") from None


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
        if not v.isascii():
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate from a JSON \ud800 escape; tokenizers reject it
                raise UsageError(f"{where}: field '{f}' holds an unpaired UTF-16 surrogate (a \\uD800-\\uDFFF "
                                 f"escape without its pair); fix the escape") from None
        vals.append(v)
    if sum(map(len, vals)) > MAX_RECORD_BYTES:
        raise UsageError(f"{where}: record of {sum(map(len, vals))} characters, more than the limit of "
                         f"{MAX_RECORD_BYTES} (data.max_length keeps only the first tokens anyway); shorten it")
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


def _too_big_json(p: Path, size: str) -> UsageError:
    return UsageError(f"{p}: {size} bytes; a .json list is parsed whole and may be at most {MAX_JSON_BYTES} bytes. "
                      f"Write one record per line as .jsonl, which is read a line at a time")


def _read_json(p: Path, c: _Collector) -> None:
    with _open(p) as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > MAX_JSON_BYTES:
            raise _too_big_json(p, str(size))
        try:
            # The size check again on what is read: /proc-style files report 0 and a file may grow meanwhile.
            raw = fh.read(MAX_JSON_BYTES + 1)
        except OSError as e:
            raise UsageError(f"{p}: cannot read the data file ({e.strerror or e})") from None
    if len(raw) > MAX_JSON_BYTES:
        raise _too_big_json(p, f"more than {MAX_JSON_BYTES}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UsageError(f"{p}:{line}: not UTF-8 ({e.reason} at byte {e.start}); re-encode the file as UTF-8") \
            from None
    del raw
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{p}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    except ValueError as e:  # an integer literal past Python's digit limit
        raise UsageError(f"{p}: invalid JSON: {e}") from None
    except RecursionError:
        raise UsageError(f"{p}: JSON nested too deeply") from None
    if not isinstance(data, list):
        raise UsageError(f"{p}: expected a JSON list of records, got {type(data).__name__} "
                         f"(use .jsonl for one record per line)")
    for i, r in enumerate(data):
        c.add(r, f"{p}: record {i}")


def _lines(p: Path, fh: Any, c: _Collector) -> Any:
    """``(line number, bytes)`` of each line no longer than :data:`MAX_RECORD_BYTES`; an over-long line is a bad
    record, and is skipped (with the skip policy) without ever being held whole."""
    n = 0
    while True:
        try:
            raw = fh.readline(MAX_RECORD_BYTES + 1)
        except OSError as e:
            raise UsageError(f"{p}: cannot read the data file ({e.strerror or e})") from None
        if not raw:
            return
        n += 1
        if len(raw) > MAX_RECORD_BYTES and not raw.endswith(b"\n"):
            c.bad(UsageError(f"{p}:{n}: line longer than {MAX_RECORD_BYTES} bytes, the limit for one record; "
                             f"is this really one JSON record per line?"))
            while raw and not raw.endswith(b"\n"):
                raw = fh.readline(1 << 20)
            continue
        yield n, raw


def _read_jsonl(p: Path, c: _Collector) -> None:
    with _open(p) as fh:
        for n, raw in _lines(p, fh, c):
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
            except ValueError as e:  # an integer literal past Python's digit limit
                c.bad(UsageError(f"{p}:{n}: invalid JSON: {e}"))
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
        if p.suffix == ".jsonl":
            _read_jsonl(p, c)
        elif p.suffix == ".json":
            _read_json(p, c)
        else:
            raise UsageError(f"{p}: unknown data format '{p.suffix}'; use .json, .jsonl or a save_to_disk dir")
        # Hashed after reading, so a file over the size limits is refused before it is scanned end to end.
        h = hashlib.sha256()
        _hash_path(p, h)
    elif p.exists():
        raise UsageError(f"data.path {path}: not a regular file or directory (a device, pipe or socket); "
                         f"point it at a .json/.jsonl file or a save_to_disk dir")
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
