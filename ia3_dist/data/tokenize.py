"""Instruction records -> token ids with prompt-masked labels, cached; and the per-rank sharding plan.

Preprocessing is the reference recipe's ``process_func`` done in batches:

    prompt = "\\n".join(["Human: " + instruction, input]).strip() + "\\n\\nAssistant: "
    ids = tok(prompt).input_ids + tok(output + eos).input_ids     # labels -100 over the prompt
    truncate ids, attention mask and labels to max_length

Labels are fully determined by the ids and the prompt length, so the cache stores only the flat ids, offsets and
prompt lengths (numpy), keyed by a content hash of the data, the tokenizer, the template and the max length.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..config import DataSection
from ..errors import UsageError
from .cache import cache_root, file_lock
from .records import Records, load_records
from .template import build_prompt

IGNORE_INDEX = -100
# Bump when the cached format or the preprocessing changes meaning.
CACHE_VERSION = 2


def tokenizer_fingerprint(tok: Any) -> str:
    h = hashlib.sha256()
    backend = getattr(tok, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else json.dumps(tok.get_vocab(), sort_keys=True)
             .encode())
    h.update(repr((tok.eos_token, tok.pad_token, type(tok).__name__)).encode())
    return h.hexdigest()


@dataclass
class TokenizedData:
    """Flat token ids with offsets; labels are ids with the first ``prompt_len`` positions masked."""

    ids: np.ndarray          # int32, all examples back to back
    offsets: np.ndarray      # int64, len n+1
    prompt_lens: np.ndarray  # int32, masked prefix length per example (<= length)
    n_records: int           # before dropping
    dropped: np.ndarray      # record indices dropped (all labels masked after truncation)
    truncated: int           # examples cut at max_length
    seconds: float = 0.0     # tokenization time (0 when served from cache)
    cache_file: str = ""
    skipped: list[str] = field(default_factory=list)  # bad records skipped (data.on_bad_record=skip)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def subset(self, idx: Sequence[int]) -> TokenizedData:
        """The examples at ``idx``, in that order (train/eval splits)."""
        idx = np.asarray(idx, dtype=np.int64)
        offsets = _offsets(self.lengths[idx])
        ids = np.concatenate([self.ids[self.offsets[i]:self.offsets[i + 1]] for i in idx]) if len(idx) else \
            self.ids[:0]
        return TokenizedData(ids=ids, offsets=offsets, prompt_lens=self.prompt_lens[idx], n_records=len(idx),
                             dropped=self.dropped[:0], truncated=0, cache_file=self.cache_file)

    def example(self, i: int) -> tuple[list[int], list[int], list[int]]:
        """``(input_ids, attention_mask, labels)`` exactly as the reference recipe returns them."""
        ids = self.ids[self.offsets[i]: self.offsets[i + 1]].tolist()
        p = int(self.prompt_lens[i])
        return ids, [1] * len(ids), [IGNORE_INDEX] * p + ids[p:]


def _offsets(lengths: np.ndarray) -> np.ndarray:
    """Example boundaries in the flat id array: 0, then the running sum of the lengths."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def _pack(p_ids: list[list[int]], r_ids: list[list[int]], max_length: int
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int], int]:
    """Prompt and response ids -> (flat ids, lengths, prompt lengths, dropped record indices, truncated count)."""
    flat: list[int] = []
    lens, plens, dropped = [], [], []
    truncated = 0
    for j, (p, r) in enumerate(zip(p_ids, r_ids, strict=True)):
        n = len(p) + len(r)
        if n > max_length:
            truncated += 1
            n = max_length
        plen = min(len(p), n)
        # Labels all -100 (or only at position 0, which is never predicted): no loss signal; the reference
        # recipe gives NaN/zero loss on these.
        if n - max(plen, 1) <= 0:
            dropped.append(j)
            continue
        flat += p[:n]
        flat += r[:n - plen]
        lens.append(n)
        plens.append(plen)
    return (np.asarray(flat, dtype=np.int32), np.asarray(lens, dtype=np.int64), np.asarray(plens, dtype=np.int32),
            dropped, truncated)


_WORKER: dict[str, Any] = {}


def _encoder(tok: Any) -> Any:
    """``texts -> ids`` equal to ``tok(texts).input_ids``. With a fast tokenizer it calls the Rust backend directly
    (truncation and padding off, as ``tok(text)`` has them), skipping the Python wrapper's per-text overhead."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return lambda texts: tok(texts).input_ids
    import copy

    bt = copy.deepcopy(backend)
    bt.no_truncation()
    bt.no_padding()
    return lambda texts: [e.ids for e in bt.encode_batch(texts, add_special_tokens=True)]


def _worker_init(tok: Any) -> None:
    _WORKER["encode"] = _encoder(tok)


def _worker_task(texts: list[str]) -> list[list[int]]:
    return _WORKER["encode"](texts)


def tokenize(records: Records, tok: Any, cfg: DataSection, chunk: int = 4000) -> TokenizedData:
    """The reference preprocessing for all records: each distinct prompt/response text is encoded once (datasets
    repeat instructions, empty inputs and whole records), in ``data.num_proc`` processes for large inputs."""
    t0 = time.perf_counter()
    eos = tok.eos_token if cfg.append_eos else ""
    if cfg.append_eos and eos is None:
        raise UsageError("the tokenizer has no eos token; set data.append_eos=false or use a tokenizer with one")
    prompts = [build_prompt(cfg, a, b) for a, b in zip(records.instruction, records.input, strict=True)]
    responses = [o + eos for o in records.output]
    uniq = list(dict.fromkeys(prompts + responses))
    chunks = [uniq[i:i + chunk] for i in range(0, len(uniq), chunk)]
    procs = cfg.num_proc or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
    procs = min(procs, len(chunks))
    if procs > 1:
        import multiprocessing as mp

        # fork: workers inherit the tokenizer instead of unpickling it.
        with mp.get_context("fork").Pool(procs, initializer=_worker_init, initargs=(tok,)) as pool:
            encoded = [ids for part in pool.map(_worker_task, chunks) for ids in part]
    else:
        enc = _encoder(tok)
        encoded = [ids for part in chunks for ids in enc(part)]
    ids_of = dict(zip(uniq, encoded, strict=True))
    flat, lens, plens, dropped, truncated = _pack([ids_of[t] for t in prompts], [ids_of[t] for t in responses],
                                                  cfg.max_length)
    if not len(lens):
        raise UsageError(f"{records.source}: every record is all prompt after truncation to data.max_length="
                         f"{cfg.max_length}; raise data.max_length")
    return TokenizedData(ids=flat, offsets=_offsets(lens), prompt_lens=plens, n_records=len(records),
                         dropped=np.asarray(dropped, dtype=np.int64), truncated=truncated,
                         seconds=time.perf_counter() - t0, skipped=list(records.skipped))


def cache_key(records: Records, tok: Any, cfg: DataSection) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({
        "v": CACHE_VERSION, "data": records.fingerprint, "tok": tokenizer_fingerprint(tok),
        "template": cfg.prompt_template, "strip": cfg.strip_prompt, "prefix": cfg.response_prefix,
        "eos": cfg.append_eos, "max_length": cfg.max_length, "limit": cfg.limit, "bad": cfg.on_bad_record,
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
            return TokenizedData(ids=z["ids"], offsets=z["offsets"], prompt_lens=z["prompt_lens"],
                                 n_records=int(z["n_records"]), dropped=z["dropped"],
                                 truncated=int(z["truncated"]), cache_file=str(f),
                                 # Same content, but perhaps another path: name this run's files.
                                 skipped=list(records.skipped))
        data = tokenize(records, tok, cfg)
        tmp = d / f".{key}.{os.getpid()}.tmp.npz"
        np.savez(tmp, ids=data.ids, offsets=data.offsets, prompt_lens=data.prompt_lens,
                 n_records=data.n_records, dropped=data.dropped, truncated=data.truncated)
        os.replace(tmp, f)
        data.cache_file = str(f)
        return data
