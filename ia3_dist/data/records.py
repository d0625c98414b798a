"""Reading instruction records from files and datasets into :class:`Conversation` s (formats: :mod:`.formats`);
every problem is a :class:`UsageError` naming file and record (or, with ``data.on_bad_record=skip``, a counted
skip)."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import DataSection
from ..config.schema import show
from ..errors import UsageError
from .formats import (
    FORMATS,
    MESSAGE_KEYS,
    REQUIRED,
    Columns,
    Conversation,
    Turn,
    detect,
    requirement,
    text_length,
    to_conversation,
    undetected,
)
from .pairs import PAIR_REQUIRED, Pair, detect_pair, pair_requirement, to_pair, undetected_pair

__all__ = ["MAX_JSON_BYTES", "MAX_RECORD_BYTES", "Conversation", "RecordStream", "Records", "Turn", "load_records"]

# One JSONL line (or one record's text together, in characters) may be at most this long: lines are read with a
# bounded readline, so a file with no newlines fails here instead of being read whole into memory.
MAX_RECORD_BYTES = 16 << 20
# A .json list is parsed whole (text plus Python objects, several times the file size); past this, use .jsonl.
MAX_JSON_BYTES = 1 << 30
# Rows per batch read from Parquet files and Arrow datasets (each batch becomes Python dicts).
BATCH_ROWS = 256
SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".arrow")
# Messages kept for skipped records (all are counted): a badly broken large file must not fill memory with them.
MAX_SKIPPED_KEPT = 1000
# Bump when the same files and settings come to mean different conversations.
# 5: content parts and role aliases read (data.on_bad_record=skip skipped them); 6: alpaca's tools column read, a
# sharegpt "tool" role read as a tool result; 7: a record's format detected from the keys that hold a value, message
# lists stored as Arrow structs of lists (datasets' Sequence({...})) and Arrow maps read (all were refused)
RECORDS_VERSION = 7
# In the digest of sources read through Arrow (Parquet, Arrow files, save_to_disk dirs, hub datasets) only:
# "arrow-nulls-1", their tool schemas and call arguments read without Arrow's null fill (_arrow_row).
ARROW_ROWS = "arrow-nulls-1\n"
# In the digest of CSV files only: "csv-history-1", an alpaca history cell read as JSON text (it was refused, and
# skipped under data.on_bad_record=skip).
CSV_ROWS = "csv-history-1\n"
# Preference data's own version, in its fingerprint only (SFT caches keep their names). True: the first;
# 2: a chat template's sides encoded whole (prompt + answer), and sides that truncate to the same tokens dropped.
PAIRS_VERSION = 2


@dataclass
class Records:
    """The conversations read, plus where they came from (for error messages and the cache key)."""

    examples: list[Conversation]
    source: str
    """The path, or the paths joined by ", "."""
    fingerprint: str
    """Content hash of all files plus the data.format and data.columns settings."""
    skipped: list[str]
    """Messages for records dropped by ``data.on_bad_record=skip``."""
    formats: dict[str, str]
    """Each source file/dir/hub name -> the format read from it (absent: no record identified one)."""

    def __len__(self) -> int:
        return len(self.examples)


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


def _hash_files_outside(ds: Any, p: Path, h: Any) -> None:
    """The Arrow files a save_to_disk dataset reads from outside its dir (its state.json may name
    ``../other/data.arrow``; datasets follows it), hashed too: an edit there must not go unseen by the token cache."""
    root = Path(os.path.realpath(p))
    for f in sorted({os.path.realpath(c["filename"]) for c in getattr(ds, "cache_files", None) or []
                     if isinstance(c, dict) and isinstance(c.get("filename"), str)}):
        if root not in Path(f).parents:
            h.update(f"outside:{f}\n".encode())
            _hash_path(Path(f), h)


class _Collector:
    """Applies ``data.on_bad_record``: raise on the first bad record, or skip it and remember where it was."""

    def __init__(self, policy: str) -> None:
        self.policy = policy
        self.skipped: list[str] = []
        self.n_skipped = 0

    def bad(self, err: UsageError) -> None:
        if self.policy == "error":
            raise UsageError(f"{err} (or set data.on_bad_record=skip to drop bad records)") from None
        self.n_skipped += 1
        if len(self.skipped) < MAX_SKIPPED_KEPT:
            self.skipped.append(str(err))


class _Source:
    """One file, dir or hub dataset: its format (``data.format``, or detected from its first record's keys) and
    its records, converted and checked."""

    def __init__(self, name: str, cfg: DataSection, cols: Columns, c: _Collector, pairs: bool = False) -> None:
        self.name, self.cols, self.c, self.pairs = name, cols, c, pairs
        self.fmt: str | None = None if cfg.format == "auto" else cfg.format
        if self.fmt is not None and not pairs and self.fmt not in FORMATS:
            raise UsageError(f"data.format: {self.fmt} is a preference-pair format; set train.objective to dpo, "
                             f"orpo or simpo, or choose {', '.join(FORMATS)}")
        self.detect = detect_pair if pairs else detect
        self.undetected = undetected_pair if pairs else undetected
        self.required = PAIR_REQUIRED if pairs else REQUIRED
        self.requirement = pair_requirement if pairs else requirement
        self.seen: set[str] = set()  # renamed optional columns some record has
        self.first_keys: list[Any] | None = None

    def add(self, rec: Any, where: str) -> Conversation | Pair | None:
        """The record as a conversation, or None when it is bad and skipped."""
        try:
            return self._convert(rec, where)
        except UsageError as e:
            self.c.bad(e)
            return None

    def _convert(self, rec: Any, where: str) -> Conversation | Pair:
        if not isinstance(rec, dict):
            what = (self.requirement(self.fmt, self.cols) if self.fmt else
                    "a record in alpaca, sharegpt or messages format" if not self.pairs else
                    "a preference record with chosen and rejected")
            raise UsageError(f"{where}: expected an object ({what}), got {type(rec).__name__}")
        if self.first_keys is None:
            self.first_keys = list(rec)[:64]
        if self.fmt is None:
            # From the keys that hold a value first: a table exported with every format's columns (a DataFrame's
            # to_json) writes null under the ones a record does not use. A record whose only such keys are null
            # is then told which field is null.
            self.fmt = self.detect([k for k, v in rec.items() if v is not None], self.cols) \
                or self.detect(rec, self.cols)
            if self.fmt is None:
                raise UsageError(f"{where}: {self.undetected(rec, self.cols)}")
        for ours in self.cols.mapped_optional(self.fmt) if self.fmt in REQUIRED else ():
            if self.cols.name(ours) in rec:
                self.seen.add(ours)
        if self.pairs:
            pair = to_pair(rec, self.fmt, self.cols, where)
            n = text_length(pair.chosen) + len(pair.rejected.turns[-1].output)
            if n > MAX_RECORD_BYTES:
                raise UsageError(f"{where}: record of {n} characters, more than the limit of {MAX_RECORD_BYTES} "
                                 f"(data.max_length keeps only the first tokens anyway); shorten it")
            pair.where = where
            return pair
        conv = to_conversation(rec, self.fmt, self.cols, where)
        n = text_length(conv)
        if n > MAX_RECORD_BYTES:
            raise UsageError(f"{where}: record of {n} characters, more than the limit of {MAX_RECORD_BYTES} "
                             f"(data.max_length keeps only the first tokens anyway); shorten it")
        conv.where = where
        return conv

    def check_columns(self, names: list[str]) -> None:
        """For tables (Parquet, CSV, Arrow, datasets): the format from the column names, which must include the
        format's required columns and every column data.columns renames."""
        if self.fmt is None:
            self.fmt = self.detect(names, self.cols)
            if self.fmt is None:
                raise UsageError(f"{self.name}: {self.undetected(names, self.cols)}")
        need = [*self.required[self.fmt], *(self.cols.mapped_optional(self.fmt) if self.fmt in REQUIRED else ())]
        missing = [self.cols.name(ours) for ours in need if self.cols.name(ours) not in names]
        if missing:
            mapped = {o: self.cols.name(o) for o in need if o in self.cols.mapping}
            note = f"; {self.cols.key} maps {show(mapped)}" if mapped else ""
            need_text = self.requirement(self.fmt, self.cols)
            raise UsageError(f"{self.name}: dataset has no column(s) {show(missing)} ({need_text}{note}); columns are "
                             f"{show(names)}. Rename yours with {self.cols.key} "
                             f"(e.g. {self.cols.key}.instruction=question)")
        if self.fmt in REQUIRED:
            self.seen.update(self.cols.mapped_optional(self.fmt))

    def check_mapped_seen(self) -> None:
        """For record files, once read: a column that data.columns renames must occur in some record."""
        if self.fmt is None or self.fmt not in REQUIRED:
            return
        missing = [ours for ours in self.cols.mapped_optional(self.fmt) if ours not in self.seen]
        if missing:
            mapped = ", ".join(f"{o} -> {show(self.cols.name(o))}" for o in missing)
            raise UsageError(f"{self.name}: {self.cols.key} maps {mapped}, but no record has such a field; the first "
                             f"record has keys {show(self.first_keys)}. Fix or remove the mapping")


def parse_json(text: str, where: str, one_line: bool = False) -> Any:
    """``json.loads`` whose every failure is a UsageError starting with ``where`` and the position (``line:column``,
    or the column alone for ``one_line`` text, whose ``where`` names the line already)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        at = f"{e.colno}" if one_line else f"{e.lineno}:{e.colno}"
        # A second value after a complete first line: one record per line, JSON Lines under another name.
        lines = " (one record per line is JSON Lines: name the file .jsonl)" \
            if not one_line and e.msg == "Extra data" and e.colno == 1 and e.lineno == 2 else ""
        raise UsageError(f"{where}:{at}: invalid JSON: {e.msg}{lines}") from None
    except ValueError as e:  # an integer literal past Python's digit limit
        raise UsageError(f"{where}: invalid JSON: {e}") from None
    except RecursionError:
        raise UsageError(f"{where}: JSON nested too deeply") from None


def _too_big_json(p: Path, size: str) -> UsageError:
    return UsageError(f"{p}: {size} bytes; a .json list is parsed whole and may be at most {MAX_JSON_BYTES} bytes. "
                      f"Write one record per line as .jsonl, which is read a line at a time")


Rows = Iterator[tuple[Any, str]]
"""What a reader yields: each raw record and where it is (for messages)."""


def _read_json(p: Path, src: _Source) -> Rows:
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
        # A byte-order mark (Windows editors, utf-8-sig exports) is not part of the JSON.
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UsageError(f"{p}:{line}: not UTF-8 ({e.reason} at byte {e.start}); re-encode the file as UTF-8") \
            from None
    del raw
    data = parse_json(text, str(p))
    if not isinstance(data, list):
        raise UsageError(f"{p}: expected a JSON list of records, got {type(data).__name__} "
                         f"(use .jsonl for one record per line)")
    for i, r in enumerate(data):
        yield r, f"{p}: record {i}"
    src.check_mapped_seen()


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


def _read_jsonl(p: Path, src: _Source) -> Rows:
    c = src.c
    with _open(p) as fh:
        for n, raw in _lines(p, fh, c):
            try:
                line = raw.decode("utf-8")
                if n == 1:
                    line = line.removeprefix("\ufeff")  # a byte-order mark opening the file
            except UnicodeDecodeError as e:
                c.bad(UsageError(f"{p}:{n}: not UTF-8 ({e.reason}); re-encode the file as UTF-8"))
                continue
            if not line.strip():
                continue
            try:
                # Without its line end: a record cut short is then reported at its last column, not at 1.
                rec = parse_json(line.rstrip("\r\n"), f"{p}:{n}", one_line=True)
            except UsageError as e:
                c.bad(e)
                continue
            yield rec, f"{p}:{n}"
    src.check_mapped_seen()


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 300 else text[:300] + "..."


def _broken(p: Path | str, kind: str, e: BaseException) -> UsageError:
    return UsageError(f"{p}: cannot read the {kind} file ({type(e).__name__}: {_one_line(e)}); check that it is a "
                      f"complete, valid {kind} file")


def _guarded(it: Iterator[Any], rows: Callable[[Any], list[dict[str, Any]]], p: Path | str, kind: str
             ) -> Iterator[dict[str, Any]]:
    """The rows of each batch ``it`` yields; pyarrow's and datasets' exceptions (a corrupt file shows up only as
    it is read) become a :class:`UsageError` naming the file."""
    while True:
        try:
            batch = next(it, None)
            if batch is None:
                return
            got = rows(batch)
        except UsageError:
            raise
        except Exception as e:  # pyarrow and datasets raise many types for corrupt data
            raise _broken(p, kind, e) from None
        yield from got


def _dict_rows(batch: dict[str, list[Any]]) -> list[dict[str, Any]]:
    keys = list(batch)
    return [dict(zip(keys, vals)) for vals in zip(*batch.values())]


def _no_nulls(x: Any) -> Any:
    """``x`` without the mapping keys whose value is None, at every depth."""
    if isinstance(x, dict):
        return {k: _no_nulls(v) for k, v in x.items() if v is not None}
    if isinstance(x, list):
        return [_no_nulls(v) for v in x]
    return x


def _unzipped(x: Any) -> Any:
    """A list of objects that datasets stored as one object of lists (a ``Sequence({...})`` feature, as many hub
    datasets declare their conversations: ``{"from": ["human", "gpt"], "value": [...]}``) as the list it stands for;
    anything else as it is. A member a row lacks (an optional ``weight``) is null rather than a list: the objects
    lack it too. A message itself (a role and a content) has a value that is neither."""
    if not isinstance(x, dict):
        return x
    lists = {k: v for k, v in x.items() if isinstance(v, list)}
    if not lists or any(v is not None for k, v in x.items() if k not in lists) \
            or len({len(v) for v in lists.values()}) != 1:
        return x
    return [dict(zip(lists, vals, strict=True)) for vals in zip(*lists.values(), strict=True)]


@dataclass(frozen=True)
class _ArrowKeys:
    """The data's names :func:`_arrow_row` reads, resolved once per source rather than per row."""

    tools: str
    lists: frozenset[str]
    """Conversations, and a preference record's prompt / answers given as message lists (TRL's layout)."""
    content: frozenset[str]
    """A message's content key in every message format (content parts are stored as the messages are)."""

    @classmethod
    def of(cls, cols: Columns) -> _ArrowKeys:
        return cls(cols.name("tools"),
                   frozenset(cols.name(k) for k in ("messages", "conversations", "prompt", "chosen", "rejected")),
                   frozenset(cols.keys(fmt)[1] for fmt in MESSAGE_KEYS))


def _arrow_row(row: dict[str, Any], keys: _ArrowKeys) -> dict[str, Any]:
    """A row read from Arrow (Parquet, Arrow files, datasets): Arrow stores a column of objects as one struct type
    holding every key any record has, and fills the keys a record lacks with null. In tool schemas and call
    arguments those nulls would be trained as if the record had them (``get_weather(city, query=null,
    limit=null)``, another tool's parameters): they are dropped there, as the record was written. Lists that
    datasets gives as an object of lists (:func:`_unzipped`) are read as lists."""
    if keys.tools in row:
        row[keys.tools] = _unzipped(row[keys.tools])
        if isinstance(row[keys.tools], list):
            row[keys.tools] = _no_nulls(row[keys.tools])
    for key in keys.lists:
        if key not in row:
            continue
        msgs = row[key] = _unzipped(row[key])
        if isinstance(msgs, list):
            for m in msgs:
                if not isinstance(m, dict):
                    continue
                for c in keys.content & m.keys():
                    m[c] = _unzipped(m[c])
                if "tool_calls" in m:
                    m["tool_calls"] = _unzipped(m["tool_calls"])
                    if isinstance(m["tool_calls"], list):
                        m["tool_calls"] = _no_nulls(m["tool_calls"])
    return row


def _read_dataset(ds: Any, src: _Source, kind: str = "dataset") -> Rows:
    src.check_columns(list(ds.column_names))
    rows = _guarded(iter(ds.iter(batch_size=BATCH_ROWS)), _dict_rows, src.name, kind)
    keys = _ArrowKeys.of(src.cols)
    for i, row in enumerate(rows):
        yield _arrow_row(row, keys), f"{src.name}: record {i}"


@dataclass
class _BadRow:
    """A table row that cannot become a record (a map holding a key twice): refused, or skipped, as a bad record."""

    why: str


def _table_rows(batch: Any) -> list[dict[str, Any] | _BadRow]:
    """An Arrow record batch's rows; a map column (Spark's ``MapType``: messages as ``array<map<string,string>>``)
    as objects, not lists of key-value pairs. A row whose map holds a key twice is a :class:`_BadRow`, alone."""
    try:
        return batch.to_pylist(maps_as_pydicts="strict")
    except KeyError:
        rows: list[dict[str, Any] | _BadRow] = []
        for j in range(batch.num_rows):
            try:
                rows += batch.slice(j, 1).to_pylist(maps_as_pydicts="strict")
            except KeyError as e:
                rows.append(_BadRow(f"a map holds a key twice ({str(e.args[0] if e.args else e)[:200]})"))
        return rows


def _table_records(rows: Iterator[dict[str, Any] | _BadRow], p: Path, src: _Source) -> Rows:
    """``(record, where)`` of a table's rows; a :class:`_BadRow` goes to ``data.on_bad_record``."""
    keys = _ArrowKeys.of(src.cols)
    for i, row in enumerate(rows):
        if isinstance(row, _BadRow):
            src.c.bad(UsageError(f"{p}: record {i}: {row.why}"))
            continue
        yield _arrow_row(row, keys), f"{p}: record {i}"


def _read_parquet(p: Path, src: _Source) -> Rows:
    import pyarrow.parquet as pq

    with _open(p) as fh:
        try:
            pf = pq.ParquetFile(fh)
            names = list(pf.schema_arrow.names)
            batches = pf.iter_batches(batch_size=BATCH_ROWS)
        except Exception as e:  # ArrowInvalid, OSError, ...: not a Parquet file
            raise _broken(p, "Parquet", e) from None
        src.check_columns(names)
        yield from _table_records(_guarded(batches, _table_rows, p, "Parquet"), p, src)


def _not_utf8(p: Path) -> UsageError:
    return UsageError(f"{p}: not UTF-8 (a row of another width than the header could not be read as text); "
                      f"re-encode the file as UTF-8")


def _ends_inside_quotes(text: str) -> bool:
    """Whether a CSV row's text ends inside a quoted cell, read as pyarrow reads it: a quote opens a cell only as
    its first character, ``""`` inside one is a quote, and any other quote is a character (``5" screen``)."""
    inside, cell_start, i = False, True, 0
    while i < len(text):
        c = text[i]
        if inside:
            if c == '"':
                if text[i + 1:i + 2] == '"':
                    i += 2
                    continue
                inside = False
        elif c == ",":
            cell_start = True
            i += 1
            continue
        elif c == '"' and cell_start:
            inside = True
        cell_start = False
        i += 1
    return inside


@contextmanager
def _handler_decode_errors(got: list[BaseException], *handlers: Callable[..., Any]) -> Iterator[None]:
    """The UnicodeDecodeErrors pyarrow meets decoding a row's text for the CSV invalid-row ``handlers`` (a row that
    is not UTF-8), put in ``got`` instead of printed as "Exception ignored" tracebacks; any other unraisable goes
    on. Held only around pyarrow's own calls (never across a yield to the reader's caller)."""
    previous = sys.unraisablehook

    def hook(u: Any) -> None:
        if isinstance(u.exc_value, UnicodeDecodeError) and any(u.object is h for h in handlers):
            got.append(u.exc_value)
        else:
            previous(u)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = previous


def _read_csv(p: Path, src: _Source) -> Rows:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    # A block must hold the longest row; quoted cells may span lines.
    read = pacsv.ReadOptions(block_size=max(1 << 20, MAX_RECORD_BYTES + (1 << 16)))
    undecodable: list[BaseException] = []

    # The header read first: a ragged row in its block is reported by the pass below.
    def skip_row(row: Any) -> str:
        return "skip"

    with _open(p) as fh:
        try:
            with _handler_decode_errors(undecodable, skip_row), pacsv.open_csv(
                    fh, read_options=read, parse_options=pacsv.ParseOptions(
                        newlines_in_values=True, invalid_row_handler=skip_row)) as r:
                names = list(r.schema.names)
        except Exception as e:
            if undecodable:
                raise _not_utf8(p) from None
            raise _broken(p, "CSV", e) from None
    src.check_columns(names)
    ragged: list[UsageError] = []
    broken: list[UsageError] = []
    skipped = [0]

    def bad_row(row: Any) -> str:
        # pyarrow numbers no row where quoted cells may span lines: the row's text says which it is. The handler
        # cannot raise (pyarrow prints and ignores it): a refusal stops the read, and is told below.
        text = row.text if len(row.text) <= 120 else row.text[:117] + "..."
        if _ends_inside_quotes(row.text):  # the file is cut short or mangled, not one bad row
            broken.append(UsageError(f"{p}: cannot read the CSV file (a quoted cell never closed: {text!r}); "
                                     f"check that it is a complete, valid CSV file"))
            return "error"
        ragged.append(UsageError(f"{p}: a row of {row.actual_columns} cell(s) where the header has "
                                 f"{row.expected_columns}: {text!r}; quote cells that hold commas"))
        if src.c.policy == "skip":
            src.c.bad(ragged.pop())
            skipped[0] += 1
            return "skip"
        return "error"

    def told() -> None:
        if undecodable:
            raise _not_utf8(p)
        if broken:
            raise broken[0]
        if ragged:
            src.c.bad(ragged[0])  # data.on_bad_record=error: raises, with how to skip instead

    def batches(reader: Any) -> Iterator[Any]:
        it = iter(reader)
        while True:
            with _handler_decode_errors(undecodable, bad_row):
                batch = next(it, None)
            if batch is None:
                return
            yield batch

    parse = pacsv.ParseOptions(newlines_in_values=True, invalid_row_handler=bad_row)
    # Every cell a string (no type guessing: "1" stays "1"); an empty cell is "".
    convert = pacsv.ConvertOptions(column_types={n: pa.string() for n in names}, strings_can_be_null=False)
    with _open(p) as fh:
        try:
            with _handler_decode_errors(undecodable, bad_row):
                reader = pacsv.open_csv(fh, read_options=read, parse_options=parse, convert_options=convert)
        except Exception as e:
            told()
            raise _broken(p, "CSV", e) from None
        with reader:
            try:
                for i, row in enumerate(_guarded(batches(reader), lambda b: b.to_pylist(), p, "CSV")):
                    # pyarrow parses a block before its rows come out, so a skipped row's place among them is not
                    # known: once one was skipped, a record is numbered among the rows kept.
                    yield row, f"{p}: record {i}" + (" (numbered among the rows kept; ragged rows were skipped)"
                                                     if skipped[0] else "")
            except UsageError:
                told()
                raise


ARROW_FILE_MAGIC = b"ARROW1"
"""How an Arrow IPC *file* (Feather v2: pandas' to_feather, Polars' write_ipc, ``pa.ipc.new_file``) begins; datasets
writes, and ``Dataset.from_file`` reads, the IPC *stream* format."""


def _read_ipc_file(p: Path, src: _Source) -> Rows:
    import pyarrow as pa

    with _open(p) as fh:
        try:
            reader = pa.ipc.open_file(fh)
            names = list(reader.schema.names)
        except Exception as e:  # ArrowInvalid, OSError, ...: truncated or not Arrow
            raise _broken(p, "Arrow", e) from None
        src.check_columns(names)

        def batches() -> Iterator[Any]:
            for k in range(reader.num_record_batches):
                b = reader.get_batch(k)
                # A file written in one batch holds every row in it: read as rows a slice at a time.
                for start in range(0, b.num_rows, BATCH_ROWS):
                    yield b.slice(start, BATCH_ROWS)

        yield from _table_records(_guarded(batches(), _table_rows, p, "Arrow"), p, src)


def _read_arrow(p: Path, src: _Source) -> Rows:
    import datasets

    with _open(p) as fh:  # a readable file, or the usual message
        magic = fh.read(len(ARROW_FILE_MAGIC))
    if magic == ARROW_FILE_MAGIC:
        yield from _read_ipc_file(p, src)
        return
    try:
        ds = datasets.Dataset.from_file(str(p))
    except Exception as e:  # not an Arrow stream, truncated, ...
        raise _broken(p, "Arrow", e) from None
    yield from _read_dataset(ds, src, "Arrow")


READERS: dict[str, Callable[[Path, _Source], Rows]] = {
    ".json": _read_json, ".jsonl": _read_jsonl, ".parquet": _read_parquet, ".csv": _read_csv, ".arrow": _read_arrow}


@dataclass
class _Resolved:
    """One ``data.path`` entry, checked and hashed before any record is read."""

    name: str
    digest: str
    path: Path | None = None
    """A data file (read by its suffix's reader)."""
    dataset: Any = None
    """A save_to_disk dir or hub dataset (Arrow, memory-mapped)."""
    stamp: tuple[int, int, int, int] | None = None
    """A data file's (device, inode, size, mtime_ns) before it was hashed: :meth:`RecordStream.check_unchanged`."""


def _stamp(p: Path) -> tuple[int, int, int, int]:
    st = os.stat(p)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _resolve(path: str, cfg: DataSection) -> _Resolved:
    """Check one ``data.path`` entry and hash its content (the file is read in 1 MiB blocks, never held)."""
    p = Path(path).expanduser()
    try:
        os.stat(p)
    except (FileNotFoundError, NotADirectoryError):
        pass  # a hub dataset name, or not found: said below
    except OSError as e:  # pathlib's is_dir/is_file raise these (EACCES under another user's 0700 home dir)
        raise UsageError(f"data.path {path}: cannot access it ({e.strerror or e}); check the permissions of the "
                         f"directories on its path (each needs x for you)") from None
    if p.is_dir():
        import datasets

        if not ((p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists()
                or (p / "state.json").exists()):
            raise UsageError(f"{p}: directory is not a datasets save_to_disk dataset (no dataset_info.json, "
                             f"state.json or dataset_dict.json); point data.path at a data file instead "
                             f"({', '.join(SUFFIXES)})")
        try:
            ds = datasets.load_from_disk(str(p))
        except Exception as e:  # datasets raises many types for corrupt dirs; the user needs the path
            raise UsageError(f"{p}: cannot load the save_to_disk dataset: {_one_line(e)}") from None
        if isinstance(ds, datasets.DatasetDict):
            if cfg.split not in ds:
                raise UsageError(f"{p}: no split '{cfg.split}' (has {list(ds)}); set data.split")
            ds = ds[cfg.split]
        h = hashlib.sha256(f"dir:{cfg.split}\n{ARROW_ROWS}".encode())
        _hash_path(p, h)
        _hash_files_outside(ds, p, h)
        return _Resolved(str(p), h.hexdigest(), dataset=ds)
    if p.is_file():
        if p.suffix.lower() not in READERS:
            raise UsageError(f"{p}: unknown data format '{p.suffix}'; use {', '.join(SUFFIXES)} or a save_to_disk "
                             f"dir")
        if p.suffix.lower() == ".json":
            # Refused before the file is hashed end to end.
            with _open(p) as fh:
                size = os.fstat(fh.fileno()).st_size
            if size > MAX_JSON_BYTES:
                raise _too_big_json(p, str(size))
        stamp = _stamp(p)  # before the hash: an edit while it is hashed is seen too
        arrow = ARROW_ROWS if p.suffix.lower() in (".parquet", ".arrow") else \
            CSV_ROWS if p.suffix.lower() == ".csv" else ""
        h = hashlib.sha256(f"file:{p.suffix.lower()}\n{arrow}".encode())
        _hash_path(p, h)
        return _Resolved(str(p), h.hexdigest(), path=p, stamp=stamp)
    if p.exists():
        raise UsageError(f"data.path {path}: not a regular file or directory (a device, pipe or socket); "
                         f"point it at a data file ({', '.join(SUFFIXES)}) or a save_to_disk dir")
    if p.suffix.lower() in SUFFIXES or path.startswith((".", "/", "~")):
        raise UsageError(f"data.path {path}: file not found")
    import datasets

    try:
        ds = datasets.load_dataset(path, split=cfg.split)
    except Exception as e:  # offline, missing or private dataset: all mean "cannot use this name"
        raise UsageError(f"data.path {path}: not a local file/dir and the hub dataset could not be "
                         f"loaded ({type(e).__name__}: {_one_line(e)})") from None
    digest = hashlib.sha256(f"hub:{path}:{cfg.split}:{getattr(ds, '_fingerprint', '')}{ARROW_ROWS}".encode()
                            ).hexdigest()
    return _Resolved(path, digest, dataset=ds)


def _rows(r: _Resolved, src: _Source) -> Rows:
    if r.path is not None:
        return READERS[r.path.suffix.lower()](r.path, src)
    return _read_dataset(r.dataset, src)


class RecordStream:
    """The conversations named by ``data.path`` (one source or a list, concatenated in order, each in its own
    format), read one record at a time: memory does not grow with the dataset. Constructing it checks and hashes
    every source (the :attr:`fingerprint` a cache is keyed by) without reading a record; iterating reads them,
    counting skips (``data.on_bad_record=skip``) in :attr:`skipped` and each source's format in :attr:`formats`.
    Every problem is a :class:`UsageError` naming file and record."""

    def __init__(self, cfg: DataSection, pairs: bool = False, columns_key: str = "data.columns") -> None:
        self.cfg, self.pairs = cfg, pairs
        self.columns_key = columns_key
        """Where the source's ``columns`` come from, for messages: ``data.sources[i].columns`` for a mixture
        source's own."""
        paths = cfg.path if isinstance(cfg.path, list) else [cfg.path]
        self.sources = [_resolve(path, cfg) for path in paths]
        self.names = [s.name for s in self.sources]
        self.source = ", ".join(self.names)
        # The settings that change what the same bytes mean are part of the content hash (the cache key).
        h = hashlib.sha256(json.dumps({"v": RECORDS_VERSION, "format": cfg.format, "columns": cfg.columns or {},
                                       **({"pairs": PAIRS_VERSION} if pairs else {})}, sort_keys=True).encode())
        for s in self.sources:
            h.update(f"{s.digest}\n".encode())
        self.fingerprint = h.hexdigest()
        self.formats: dict[str, str] = {}
        self.count = 0
        self._c = _Collector(cfg.on_bad_record)

    def check_unchanged(self) -> None:
        """Every data file as it was when it was hashed: a file written or replaced since (while it was
        tokenized) would put its new records under the old content's cache key. A UsageError naming it."""
        for r in self.sources:
            if r.path is None or r.stamp is None:
                continue
            try:
                now = _stamp(r.path)
            except OSError:
                now = None
            if now != r.stamp:
                raise UsageError(f"{r.name}: changed while it was tokenized (the token cache is named by the "
                                 f"content it had before); nothing was cached: run again once the file is "
                                 f"written")

    @property
    def skipped(self) -> list[str]:
        """Messages of the first :data:`MAX_SKIPPED_KEPT` records skipped (``data.on_bad_record=skip``)."""
        return self._c.skipped

    @property
    def n_skipped(self) -> int:
        return self._c.n_skipped

    def __iter__(self) -> Iterator[Conversation | Pair]:
        cols = Columns(self.cfg.columns, self.columns_key)
        c = self._c = _Collector(self.cfg.on_bad_record)
        self.formats, self.count = {}, 0
        limit = self.cfg.limit
        for r in self.sources:
            src = _Source(r.name, self.cfg, cols, c, self.pairs)
            try:
                for rec, where in _rows(r, src):
                    conv = src.add(rec, where)
                    if conv is None:
                        continue
                    self.count += 1
                    yield conv
                    if limit is not None and self.count >= limit:
                        return
            finally:
                if src.fmt is not None:
                    self.formats[r.name] = src.fmt
        if not self.count:
            extra = f" ({c.n_skipped} bad records skipped)" if c.n_skipped else ""
            raise UsageError(f"{self.source}: the dataset has no usable records{extra}")


def load_records(cfg: DataSection, pairs: bool = False) -> Records:
    """All of :class:`RecordStream` in a list (small data, tests); training streams instead."""
    stream = RecordStream(cfg, pairs)
    rows = list(stream)
    return Records(rows, stream.source, stream.fingerprint, stream.skipped, stream.formats)
