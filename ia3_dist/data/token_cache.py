"""The token cache on disk: one directory per content key, read memory-mapped, written safely by many processes.

Layout of ``<cache_dir>/tokenized/<key>/`` (``key``: hash of the data's content, the tokenizer and the data.*
settings that change tokens, :func:`.tokenize.cache_key`):

- ``tokens.bin``: every kept example's ids back to back, raw, in the smallest unsigned type that holds the
  vocabulary (uint16 up to 65,536 tokens, else uint32);
- ``label_mask.bin``: one uint8 per token, 1 where the token is a label;
- ``offsets.npy`` (int64, examples + 1), ``label_counts.npy`` (int32 per example), ``dropped.npy`` (int64);
- ``manifest.json``: counts, dtype, sources, skipped-record messages; written last.

Concurrency without ``flock`` (which shared filesystems may not honour): a writer fills a private temp dir
(``.tmp-<key>.<host>.<pid>.<random>``), fsyncs it, writes the manifest last and renames the dir to its final
name in one ``rename(2)``. If another writer got there first the rename fails (the target is a non-empty dir) and
this copy is discarded: the content is the same by construction of the key. Readers open only final names, and
only with a manifest, so a half-written cache is never read; temp dirs left by killed writers are ignored and
swept after a day.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UsageError
from .records import MAX_SKIPPED_KEPT
from .tokens import MAX_DROPPED_NAMED, Chunk, TokenizedData

FORMAT = 1
MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-"
STALE_TMP_S = 24 * 3600
"""A temp dir untouched this long belongs to a writer that died; the next writer removes it."""
FILES = ("tokens.bin", "label_mask.bin", "offsets.npy", "label_counts.npy", "dropped.npy")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


def sweep_stale(root: Path, now: float | None = None) -> list[Path]:
    """Remove temp dirs whose newest file is older than :data:`STALE_TMP_S` (their writer died); returns them."""
    now = time.time() if now is None else now
    gone = []
    for d in root.glob(f"{TMP_PREFIX}*"):
        try:
            newest = max([d.stat().st_mtime, *(f.stat().st_mtime for f in d.iterdir())])
        except OSError:  # another sweeper removed it meanwhile
            continue
        if now - newest > STALE_TMP_S:
            shutil.rmtree(d, ignore_errors=True)
            gone.append(d)
    return gone


class CacheWriter:
    """A :func:`.tokenize.tokenize_stream` sink that appends each chunk to a private temp dir; :meth:`commit`
    publishes it under its final name."""

    def __init__(self, root: Path, key: str, vocab_size: int) -> None:
        root.mkdir(parents=True, exist_ok=True)
        sweep_stale(root)
        self.root, self.key = root, key
        self.dtype = token_dtype(vocab_size)
        self.tmp = root / f"{TMP_PREFIX}{key}.{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}"
        self.tmp.mkdir()
        self._ids = open(self.tmp / "tokens.bin", "wb")  # noqa: SIM115 - closed in commit/abort
        self._mask = open(self.tmp / "label_mask.bin", "wb")  # noqa: SIM115
        self.lengths: list[np.ndarray] = []
        self.counts: list[np.ndarray] = []
        self.dropped: list[np.ndarray] = []
        self.dropped_where: list[str] = []
        self.n_records = self.n_tokens = self.truncated = self.unlabeled = self.answerless = 0
        self.skipped: list[str] = []
        """Records the template could not render (data.on_bad_record=skip): the first messages; all counted in
        :attr:`n_skipped`. The caller records them with the reader's skips."""
        self.n_skipped = 0

    @property
    def n_examples(self) -> int:
        """Kept examples (sequences) written so far."""
        return sum(len(x) for x in self.lengths)

    def __call__(self, c: Chunk) -> None:
        if c.ids.size and (int(c.ids.max()) > np.iinfo(self.dtype).max or int(c.ids.min()) < 0):
            raise RuntimeError(f"token id outside the vocabulary's {self.dtype} range")  # a tokenizer bug
        self._ids.write(c.ids.astype(self.dtype).tobytes())
        self._mask.write(c.label_mask.tobytes())
        self.lengths.append(c.lengths)
        self.counts.append(c.label_counts)
        self.dropped.append(c.dropped + self.n_records)
        self.dropped_where += c.dropped_where[:max(0, MAX_DROPPED_NAMED - len(self.dropped_where))]
        self.n_records += c.n_records
        self.n_tokens += int(c.ids.size)
        self.truncated += c.truncated
        self.unlabeled += c.unlabeled
        self.answerless += c.answerless
        self.n_skipped += len(c.skipped)
        self.skipped += c.skipped[:max(0, MAX_SKIPPED_KEPT - len(self.skipped))]

    def commit(self, meta: dict[str, Any]) -> bool:
        """Write the small arrays and the manifest (last), fsync, rename into place. False when another writer
        published the same key first (this copy is discarded)."""
        for fh in (self._ids, self._mask):
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()
        lens = np.concatenate(self.lengths) if self.lengths else np.zeros(0, dtype=np.int64)
        offsets = np.zeros(len(lens) + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        arrays = {"offsets.npy": offsets,
                  "label_counts.npy": np.concatenate(self.counts) if self.counts else np.zeros(0, np.int32),
                  "dropped.npy": np.concatenate(self.dropped) if self.dropped else np.zeros(0, np.int64)}
        for name, arr in arrays.items():
            with open(self.tmp / name, "wb") as fh:
                np.save(fh, arr)
                fh.flush()
                os.fsync(fh.fileno())
        manifest = {"format": FORMAT, "key": self.key, "dtype": self.dtype.name, "n_tokens": self.n_tokens,
                    "n_examples": len(lens), "n_records": self.n_records, "truncated": self.truncated,
                    "unlabeled": self.unlabeled, "answerless": self.answerless,
                    "label_tokens": int(arrays["label_counts.npy"].sum(dtype=np.int64)),
                    "dropped_where": self.dropped_where,
                    "host": socket.gethostname(), "pid": os.getpid(), "written": time.time(), **meta}
        with open(self.tmp / MANIFEST, "w", encoding="utf-8") as fh:
            json.dump(manifest, fh, ensure_ascii=False)
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_dir(self.tmp)
        final = self.root / self.key
        try:
            os.rename(self.tmp, final)
        except OSError as e:
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY) and (final / MANIFEST).exists():
                shutil.rmtree(self.tmp, ignore_errors=True)
                return False
            raise
        _fsync_dir(self.root)
        return True

    def abort(self) -> None:
        for fh in (self._ids, self._mask):
            fh.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _corrupt(d: Path, why: str) -> UsageError:
    return UsageError(f"{d}: token cache is incomplete or corrupt ({why}); delete that directory and run "
                      f"`ia3-dist prepare` again")


def open_cache(d: Path) -> tuple[TokenizedData, dict[str, Any]] | None:
    """The cache at ``d`` memory-mapped (read-only), with its manifest; None when there is none. Only a complete
    dir can carry the final name, so anything inconsistent there was damaged after the fact: an error naming it."""
    if not d.is_dir():
        return None
    try:
        meta = json.loads((d / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _corrupt(d, f"no {MANIFEST}") from None
    except (OSError, ValueError) as e:
        raise _corrupt(d, f"unreadable {MANIFEST}: {e}") from None
    try:
        if meta.get("format") != FORMAT:
            raise _corrupt(d, f"format {meta.get('format')}, this version reads {FORMAT}")
        dtype = np.dtype(meta["dtype"])
        n_tok, n_ex = int(meta["n_tokens"]), int(meta["n_examples"])
        for name, size in (("tokens.bin", n_tok * dtype.itemsize), ("label_mask.bin", n_tok)):
            have = (d / name).stat().st_size
            if have != size:
                raise _corrupt(d, f"{name} has {have} bytes, the manifest says {size}")
        offsets = np.load(d / "offsets.npy")
        label_counts = np.load(d / "label_counts.npy")
        dropped = np.load(d / "dropped.npy")
        if len(offsets) != n_ex + 1 or int(offsets[-1]) != n_tok or len(label_counts) != n_ex:
            raise _corrupt(d, "example offsets do not match the token count")
        ids = np.memmap(d / "tokens.bin", dtype=dtype, mode="r", shape=(n_tok,))
        mask = np.memmap(d / "label_mask.bin", dtype=np.uint8, mode="r", shape=(n_tok,))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise _corrupt(d, f"{type(e).__name__}: {e}") from None
    skipped = list(meta.get("skipped", []))
    named = meta.get("dropped_where", [])
    dropped_where = [w for w in named if isinstance(w, str)][:MAX_DROPPED_NAMED] if isinstance(named, list) else []
    data = TokenizedData(ids=ids, offsets=offsets, label_mask=mask, n_records=int(meta["n_records"]),
                         dropped=dropped, truncated=int(meta["truncated"]), unlabeled=int(meta["unlabeled"]),
                         answerless=int(meta.get("answerless", 0)),
                         cache_file=str(d), skipped=skipped, formats=dict(meta.get("formats", {})),
                         label_counts=label_counts, skipped_total=int(meta.get("skipped_total", len(skipped))),
                         dropped_where=dropped_where)
    return data, meta


def cache_bytes(d: Path) -> int:
    return sum((d / f).stat().st_size for f in (*FILES, MANIFEST) if (d / f).exists())
