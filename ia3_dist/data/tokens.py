"""The tokenized data's types, shared by the tokenizer (:mod:`.tokenize`) and the token cache
(:mod:`.token_cache`), which each build them."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

IGNORE_INDEX = -100


@dataclass
class TokenizedData:
    """Flat token ids with offsets, and a flat per-token label mask: labels are the ids where the mask is set and
    ``IGNORE_INDEX`` elsewhere. From the token cache the flat arrays are memory-mapped (read-only): a rank's
    memory holds only the per-example arrays (offsets, label counts, the subset's rows)."""

    ids: np.ndarray          # uint16/uint32 (cache) or int32, all examples back to back
    offsets: np.ndarray      # int64, len n+1 (n: every example of ``ids``)
    label_mask: np.ndarray   # uint8, one per token: 1 where the token is a label
    n_records: int           # before dropping
    dropped: np.ndarray      # record indices dropped (no label token after truncation, data.unlabeled=drop)
    truncated: int           # examples cut at max_length
    unlabeled: int = 0       # examples with no label token after truncation (dropped or kept)
    answerless: int = 0      # of them, those whose every answer to train on has weight 0 ("weight": 0)
    seconds: float = 0.0     # tokenization time (0 when served from cache)
    cache_file: str = ""     # the token cache dir (its name is the cache key)
    skipped: list[str] = field(default_factory=list)  # bad records skipped (data.on_bad_record=skip)
    formats: dict[str, str] = field(default_factory=dict)  # source file -> record format read from it
    label_counts: np.ndarray | None = None
    """int32 per example of ``ids``: its label tokens past position 0 (which is never predicted)."""
    rows: np.ndarray | None = None
    """A subset's examples (indices into ``offsets``), in order; None: all of them."""
    skipped_total: int | None = None
    """Bad records skipped when ``skipped`` keeps only the first messages (from the cache)."""
    dropped_where: list[str] = field(default_factory=list)
    """Where the first :data:`MAX_DROPPED_NAMED` dropped records were read (file and line or record), for the data
    report: their indices in ``dropped`` count only the records read and rendered."""
    group: int = 1
    """Sequences per example: 1, or 2 for preference pairs (sequence 2i is pair i's chosen, 2i+1 its rejected:
    see :mod:`.pairs`). Lengths, subsets and the sampler count examples."""
    mix: Any = None
    """A mixture's draws (:class:`.mixture.Mixture`) when this is the training data of ``data.sources``."""
    held_copies: int = 0
    """Examples left out of this training data as copies of held-out ones (``data.eval_ratio``)."""
    parts: list[tuple[str, np.ndarray]] | None = None
    """Named parts of this data, each its examples' positions (a mixture's held-out examples, source by source):
    the eval reports a loss per part."""

    def __len__(self) -> int:
        return (len(self.rows) if self.rows is not None else len(self.offsets) - 1) // self.group

    @functools.cached_property
    def lengths(self) -> np.ndarray:
        """Per example; a pair's is its longer sequence (what its rows are padded to)."""
        lens = np.diff(self.offsets)
        lens = lens[self.rows] if self.rows is not None else lens
        return lens.reshape(-1, self.group).max(1) if self.group > 1 else lens

    def sequence_rows(self, idx: Sequence[int]) -> np.ndarray:
        """The sequences (indices into this data's rows) of examples ``idx``, each example's together."""
        idx = np.asarray(idx, dtype=np.int64)
        return (idx[:, None] * self.group + np.arange(self.group)).reshape(-1) if self.group > 1 else idx

    def _label_counts(self) -> np.ndarray:
        if self.label_counts is None:
            starts = self.offsets[:-1]
            csum = np.concatenate([[0], np.cumsum(self.label_mask, dtype=np.int64)])
            first = np.asarray(self.label_mask[starts[np.diff(self.offsets) > 0]], dtype=np.int64)
            counts = csum[self.offsets[1:]] - csum[starts]
            counts[np.diff(self.offsets) > 0] -= first
            self.label_counts = counts.astype(np.int32)
        return self.label_counts

    def single_label_examples(self) -> int:
        """Examples (of SFT data) whose loss sees one label token: an empty answer, whose end token is all it trains
        (the reference recipe keeps such records), or an answer cut to one token by truncation."""
        if self.group != 1:
            return 0
        counts = self._label_counts()
        return int(np.count_nonzero((counts[self.rows] if self.rows is not None else counts) == 1))

    def label_tokens(self) -> int:
        """Label tokens the loss sees: position 0 of an example is never predicted."""
        counts = self._label_counts()
        return int((counts[self.rows] if self.rows is not None else counts).sum(dtype=np.int64))

    def subset(self, idx: Sequence[int]) -> TokenizedData:
        """The examples at ``idx``, in that order (train/eval splits): a view on the same flat arrays."""
        seq = self.sequence_rows(idx)
        rows = self.rows[seq] if self.rows is not None else seq
        return TokenizedData(ids=self.ids, offsets=self.offsets, label_mask=self.label_mask, n_records=len(idx),
                             dropped=self.dropped[:0], truncated=0, cache_file=self.cache_file,
                             label_counts=self._label_counts(), rows=rows, group=self.group)

    def with_report_of(self, whole: TokenizedData) -> TokenizedData:
        """This subset (training examples split off or drawn from ``whole``), reporting everything ``whole`` read:
        records, drops, truncation, skips, formats, time."""
        for name in ("n_records", "dropped", "dropped_where", "truncated", "unlabeled", "answerless", "seconds",
                     "skipped",
                     "skipped_total", "formats"):
            setattr(self, name, getattr(whole, name))
        return self

    def example(self, i: int) -> tuple[list[int], list[int], list[int]]:
        """``(input_ids, attention_mask, labels)`` of sequence ``i`` (an example, or one side of a pair) exactly as
        the reference recipe returns them."""
        j = int(self.rows[i]) if self.rows is not None else i
        s = slice(int(self.offsets[j]), int(self.offsets[j + 1]))
        ids = np.asarray(self.ids[s], dtype=np.int64)
        labels = np.where(np.asarray(self.label_mask[s]).astype(bool), ids, IGNORE_INDEX)
        return ids.tolist(), [1] * len(ids), labels.tolist()


MAX_DROPPED_NAMED = 5
"""Dropped records the data report names."""


@dataclass
class Chunk:
    """One chunk of records, tokenized: the unit workers return and the cache writer appends."""

    n_records: int
    ids: np.ndarray          # int32, the kept examples back to back
    label_mask: np.ndarray   # uint8
    lengths: np.ndarray      # int64, per kept example
    label_counts: np.ndarray  # int32, per kept example: labels past position 0
    dropped: np.ndarray      # int64, record indices within the chunk
    truncated: int
    unlabeled: int
    skipped: list[str] = field(default_factory=list)
    """Records the template could not render (data.on_bad_record=skip), each message naming the record; they are
    not among ``n_records``."""
    dropped_where: list[str] = field(default_factory=list)
    """Where the chunk's first dropped records were read (at most :data:`MAX_DROPPED_NAMED`)."""
    answerless: int = 0
    """Of :attr:`unlabeled`, the examples whose every answer to train on has weight 0."""
