"""Conversations -> token ids with labels on the assistant spans, cached by content.

For a single-turn record this is the reference recipe's ``process_func`` done in batches:

    prompt = "\\n".join(["Human: " + instruction, input]).strip() + "\\n\\nAssistant: "
    ids = tok(prompt).input_ids + tok(output + eos).input_ids     # labels -100 over the prompt
    truncate ids, attention mask and labels to max_length

and a multi-turn conversation is its template's segments (see template.py), each tokenized alone. The cache stores
flat ids, offsets and a per-token label mask (numpy), keyed by a content hash of the data, the tokenizer, the
template, the truncation settings and the max length.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..config import DataSection
from ..errors import UsageError
from .cache import cache_root, file_lock
from .records import Records, load_records
from .template import Template

IGNORE_INDEX = -100
# Bump when the cached format or the preprocessing changes meaning.
CACHE_VERSION = 3


def tokenizer_fingerprint(tok: Any) -> str:
    h = hashlib.sha256()
    backend = getattr(tok, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else json.dumps(tok.get_vocab(), sort_keys=True)
             .encode())
    h.update(repr((tok.eos_token, tok.pad_token, type(tok).__name__)).encode())
    return h.hexdigest()


@dataclass
class TokenizedData:
    """Flat token ids with offsets, and a flat per-token label mask: labels are the ids where the mask is set and
    ``IGNORE_INDEX`` elsewhere."""

    ids: np.ndarray          # int32, all examples back to back
    offsets: np.ndarray      # int64, len n+1
    label_mask: np.ndarray   # uint8, one per token: 1 where the token is a label
    n_records: int           # before dropping
    dropped: np.ndarray      # record indices dropped (no label token after truncation, data.unlabeled=drop)
    truncated: int           # examples cut at max_length
    unlabeled: int = 0       # examples with no label token after truncation (dropped or kept)
    seconds: float = 0.0     # tokenization time (0 when served from cache)
    cache_file: str = ""
    skipped: list[str] = field(default_factory=list)  # bad records skipped (data.on_bad_record=skip)
    formats: dict[str, str] = field(default_factory=dict)  # source file -> record format read from it

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def label_tokens(self) -> int:
        """Label tokens the loss sees: position 0 of an example is never predicted."""
        return int(self.label_mask.sum()) - int(self.label_mask[self.offsets[:-1]].sum()) if len(self) else 0

    def subset(self, idx: Sequence[int]) -> TokenizedData:
        """The examples at ``idx``, in that order (train/eval splits)."""
        idx = np.asarray(idx, dtype=np.int64)
        offsets = _offsets(self.lengths[idx])
        pick = [slice(self.offsets[i], self.offsets[i + 1]) for i in idx]
        ids = np.concatenate([self.ids[s] for s in pick]) if len(idx) else self.ids[:0]
        mask = np.concatenate([self.label_mask[s] for s in pick]) if len(idx) else self.label_mask[:0]
        return TokenizedData(ids=ids, offsets=offsets, label_mask=mask, n_records=len(idx),
                             dropped=self.dropped[:0], truncated=0, cache_file=self.cache_file)

    def example(self, i: int) -> tuple[list[int], list[int], list[int]]:
        """``(input_ids, attention_mask, labels)`` exactly as the reference recipe returns them."""
        s = slice(self.offsets[i], self.offsets[i + 1])
        ids = self.ids[s]
        labels = np.where(self.label_mask[s].astype(bool), ids, IGNORE_INDEX)
        return ids.tolist(), [1] * len(ids), labels.tolist()


def _offsets(lengths: np.ndarray) -> np.ndarray:
    """Example boundaries in the flat id array: 0, then the running sum of the lengths."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def truncate(ids: list[int], mask: list[int], last_response: int, max_length: int, mode: str
             ) -> tuple[list[int], list[int]]:
    """Fit one example into ``max_length`` tokens. ``right``: cut the end (the reference recipe). ``prompt``: cut
    the oldest text first, but never into the last response (which starts at ``last_response``); if that alone is
    too long, cut its end."""
    excess = len(ids) - max_length
    if excess <= 0:
        return ids, mask
    if mode == "prompt":
        cut = min(excess, last_response)
        ids, mask = ids[cut:], mask[cut:]
    return ids[:max_length], mask[:max_length]


def _pack(examples: list[list[tuple[list[int], bool]]], cfg: DataSection
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int], int, int]:
    """Per-example segment ids -> (flat ids, flat label mask, lengths, dropped record indices, truncated count,
    unlabeled count)."""
    flat: list[int] = []
    flat_mask: list[int] = []
    lens, dropped = [], []
    truncated = unlabeled = 0
    for j, segs in enumerate(examples):
        ids: list[int] = []
        mask: list[int] = []
        last_response = 0
        for seg_ids, is_label in segs:
            if is_label:
                last_response = len(ids)
            ids += seg_ids
            mask += [int(is_label)] * len(seg_ids)
        if len(ids) > cfg.max_length:
            truncated += 1
            ids, mask = truncate(ids, mask, last_response, cfg.max_length, cfg.truncation)
        # No label past position 0 (which is never predicted): no loss signal. The reference recipe keeps such
        # examples in its batches (zero contribution); dropping them saves their compute.
        if not any(mask[1:]):
            unlabeled += 1
            if cfg.unlabeled == "drop":
                dropped.append(j)
                continue
        flat += ids
        flat_mask += mask
        lens.append(len(ids))
    return (np.asarray(flat, dtype=np.int32), np.asarray(flat_mask, dtype=np.uint8),
            np.asarray(lens, dtype=np.int64), dropped, truncated, unlabeled)


_WORKER: dict[str, Any] = {}


def _encoder(tok: Any, add_special_tokens: bool = True) -> Any:
    """``texts -> ids`` equal to ``tok(texts, add_special_tokens=...).input_ids``. With a fast tokenizer it calls
    the Rust backend directly (truncation and padding off, as ``tok(text)`` has them), skipping the Python
    wrapper's per-text overhead."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return lambda texts: tok(texts, add_special_tokens=add_special_tokens).input_ids
    bt = copy.deepcopy(backend)
    bt.no_truncation()
    bt.no_padding()
    return lambda texts: [e.ids for e in bt.encode_batch(texts, add_special_tokens=add_special_tokens)]


def _worker_init(tok: Any, add_special_tokens: bool) -> None:
    _WORKER["encode"] = _encoder(tok, add_special_tokens)


def _worker_task(texts: list[str]) -> list[list[int]]:
    return _WORKER["encode"](texts)


def encode_texts(texts: list[str], tok: Any, add_special_tokens: bool, num_proc: int, chunk: int = 4000
                 ) -> list[list[int]]:
    """Ids of each text, in ``num_proc`` processes for large inputs (0: one per available core)."""
    chunks = [texts[i:i + chunk] for i in range(0, len(texts), chunk)]
    procs = num_proc or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
    procs = min(procs, len(chunks))
    if procs > 1:
        import multiprocessing as mp

        # fork: workers inherit the tokenizer instead of unpickling it.
        with mp.get_context("fork").Pool(procs, initializer=_worker_init, initargs=(tok, add_special_tokens)) as pool:
            return [ids for part in pool.map(_worker_task, chunks) for ids in part]
    enc = _encoder(tok, add_special_tokens)
    return [ids for part in chunks for ids in enc(part)]


def tokenize(records: Records, tok: Any, cfg: DataSection, chunk: int = 4000) -> TokenizedData:
    """Every conversation rendered to labelled segments by the template, each distinct segment text encoded once
    (datasets repeat instructions, empty inputs, system prompts and whole records), then concatenated, truncated
    and masked per example."""
    t0 = time.perf_counter()
    template = Template.of(cfg, tok)
    rendered = [template.segments(conv, tok, cfg.train_on) for conv in records.examples]
    uniq = list(dict.fromkeys(text for segs in rendered for text, _ in segs))
    ids_of = dict(zip(uniq, encode_texts(uniq, tok, template.add_special_tokens, cfg.num_proc, chunk), strict=True))
    flat, mask, lens, dropped, truncated, unlabeled = _pack(
        [[(ids_of[text], is_label) for text, is_label in segs] for segs in rendered], cfg)
    if not len(lens):
        raise UsageError(f"{records.source}: every record is all prompt after truncation to data.max_length="
                         f"{cfg.max_length}; raise data.max_length (or data.truncation=prompt)")
    return TokenizedData(ids=flat, offsets=_offsets(lens), label_mask=mask, n_records=len(records),
                         dropped=np.asarray(dropped, dtype=np.int64), truncated=truncated, unlabeled=unlabeled,
                         seconds=time.perf_counter() - t0, skipped=list(records.skipped))


def cache_key(records: Records, tok: Any, cfg: DataSection) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({
        "v": CACHE_VERSION, "data": records.fingerprint, "tok": tokenizer_fingerprint(tok),
        "template": asdict(Template.of(cfg, tok)), "train_on": cfg.train_on, "truncation": cfg.truncation,
        "unlabeled": cfg.unlabeled, "max_length": cfg.max_length, "limit": cfg.limit, "bad": cfg.on_bad_record,
    }, sort_keys=True).encode())
    return h.hexdigest()[:32]


def load_or_tokenize(cfg: DataSection, tok: Any) -> TokenizedData:
    """Tokenize once per content; concurrent ranks wait on a file lock while one of them builds the entry."""
    records = load_records(cfg)
    key = cache_key(records, tok, cfg)
    d = cache_root(cfg) / "tokenized"
    f = d / f"{key}.npz"
    with file_lock(d / f"{key}.lock"):
        if f.exists():
            z = np.load(f)
            return TokenizedData(ids=z["ids"], offsets=z["offsets"], label_mask=z["label_mask"],
                                 n_records=int(z["n_records"]), dropped=z["dropped"],
                                 truncated=int(z["truncated"]), unlabeled=int(z["unlabeled"]), cache_file=str(f),
                                 # Same content, but perhaps another path: name this run's files.
                                 skipped=list(records.skipped), formats=dict(records.formats))
        data = tokenize(records, tok, cfg)
        tmp = d / f".{key}.{os.getpid()}.tmp.npz"
        np.savez(tmp, ids=data.ids, offsets=data.offsets, label_mask=data.label_mask, n_records=data.n_records,
                 dropped=data.dropped, truncated=data.truncated, unlabeled=data.unlabeled)
        os.replace(tmp, f)
        data.cache_file = str(f)
        data.formats = dict(records.formats)
        return data
