"""Weighted mixtures of data sources (``data.sources``): each source read in its own format, columns and template,
tokenized into one token cache, then drawn by weight into a fixed order.

The draws. The mixture holds as much as the sources hold together: their training examples (``data.mix_by:
examples``) or tokens (``tokens``). Source i's share is ``p_i = w_i / sum(w)``. Each source offers a stream of its
examples: seeded permutations of them, one after another (a source drawn more than it holds repeats them; less,
uses the first part of its first permutation: a seeded subset). The streams are merged by *virtual finish time*
(weighted fair queueing): the j-th draw of source i finishes at ``(cost of its first j draws) / p_i``, and the
mixture takes draws in that order until its cost reaches the total. Every prefix of the order then holds each
source within about one example's cost of its share (the last draw may overshoot the total; a source whose share
is less than one example may get none, which the report shows), over the whole mixture and any part of it,
whatever the sampler later does with the order.

Where it lives. The tokens of every source sit in one cache entry (:mod:`.token_cache`, keyed by the sources'
content, formats, columns, templates and the tokenizer), the sources one after another; the draws (and, with
``data.eval_ratio``, the examples held out of each source before drawing) in ``<cache>/mixtures/<key>.npz``, keyed
by that entry, the weights, ``mix_by``, the seed and the eval ratio. ``ia3-dist prepare`` writes both; every rank,
every epoch and every resume reads the same draws.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..config import DataSection
from ..config.schema import DataSource
from ..errors import UsageError
from .cache import cache_root, publish_once
from .sampler import EVAL_SALT, copies_of, held_out
from .tokens import TokenizedData

MIX_VERSION = 1
"""Bumped whenever the same sources, weights and seed would draw differently."""
_DRAW_SALT = 6007


def source_section(cfg: DataSection, s: DataSource) -> DataSection:
    """The data section that reads one source: its path, format, columns, template and record limit; every other
    data.* setting (max_length, truncation, train_on, ...) is the run's."""
    return replace(cfg, sources=None, path=s.path, format=s.format or cfg.format,
                   columns=s.columns if s.columns is not None else cfg.columns, template=s.template or cfg.template,
                   limit=s.max_examples)


def labels_of(sources: list[DataSource]) -> list[str]:
    """A short name per source for reports and metric keys (``eval_loss/<name>``): its file stem (or hub name),
    made unique with ``-<index>``."""
    stems = [re.sub(r"[^\w.-]+", "_", Path(s.path).stem if Path(s.path).suffix else Path(s.path).name) or "source"
             for s in sources]
    labels = [f"{st}-{i}" if stems.count(st) > 1 else st for i, st in enumerate(stems)]
    while len(set(labels)) < len(labels):  # a suffixed name may equal another source's own stem
        labels = [f"{lab}-{i}" if labels.count(lab) > 1 else lab for i, lab in enumerate(labels)]
    return labels


@dataclass
class SourceStats:
    """One source's part of the token cache (written in its manifest) and of the draws."""

    name: str
    """The source's path(s), as given."""
    label: str
    weight: float
    first: int
    """Its examples are ``[first, end)`` of the cache entry."""
    end: int
    records: int
    skipped: int
    dropped: int
    truncated: int
    tokens: int
    formats: dict[str, str]
    held: int = 0
    """Examples held out for eval (``data.eval_ratio``)."""
    drawn: int = 0
    """Draws of its examples in the mixture (repeats counted)."""
    drawn_tokens: int = 0

    @property
    def examples(self) -> int:
        return self.end - self.first

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("name", "label", "first", "end", "records", "skipped", "dropped",
                                              "truncated", "tokens", "formats")}


@dataclass
class Mixture:
    """The draws of a mixture and how they came out, source by source."""

    key: str
    """Names the draws file; a resume checks it (the checkpoint's data key)."""
    file: Path
    mix_by: str
    sources: list[SourceStats]
    order: np.ndarray
    """Example indices of the cache entry, in draw order (repeats allowed)."""
    held: list[np.ndarray]
    """Per source, the examples held out for eval (ascending)."""
    held_copies: int = 0
    """Examples left out of the draws as copies of held-out ones (repeated records, sources that overlap)."""

    def lines(self) -> list[str]:
        """The data report's lines: each source's records, drops, tokens, weight and realised share."""
        total_w = sum(s.weight for s in self.sources)
        n = max(sum(s.drawn for s in self.sources), 1)
        t = max(sum(s.drawn_tokens for s in self.sources), 1)
        out = [f"  mixture of {len(self.sources)} sources by {self.mix_by}: {n} draws, {t} tokens ({self.file})"]
        for s in self.sources:
            fmt = ", ".join(sorted(set(s.formats.values()))) or "?"
            share = s.drawn / n if self.mix_by == "examples" else s.drawn_tokens / t
            reuse = s.drawn / max(s.examples - s.held, 1)
            out.append(f"  - {s.label} ({fmt}): {s.records} records, {s.dropped} dropped, {s.skipped} skipped, "
                       f"{s.truncated} truncated, {s.examples} examples, {s.tokens} tokens"
                       + (f", {s.held} held out" if s.held else "")
                       + f"; weight {s.weight / total_w:.1%} -> drawn {s.drawn} ({share:.2%} of the {self.mix_by}, "
                       f"{reuse:.2f}x its examples)")
        if self.held_copies:
            out.append(f"  {self.held_copies} example(s) left out of the draws: copies of held-out examples "
                       f"(the eval would score what the run trained on)")
        return out


def cache_sources(meta: dict[str, Any], sources: list[DataSource]) -> list[SourceStats]:
    """The per-source stats a mixture's cache manifest records, with this config's weights and labels."""
    parts = meta.get("mixture")
    if not isinstance(parts, list) or len(parts) != len(sources):
        raise UsageError(f"{meta.get('key', '?')}: token cache of a mixture without its source table; delete it and "
                         f"run `ia3-dist prepare` again")
    labels = labels_of(sources)
    return [SourceStats(**{**part, "label": labels[i]}, weight=sources[i].weight) for i, part in enumerate(parts)]


def _costs(data: TokenizedData, idx: np.ndarray, mix_by: str) -> np.ndarray:
    if mix_by == "examples":
        return np.ones(len(idx), dtype=np.int64)
    rows = np.diff(data.offsets)
    return rows[data.sequence_rows(idx)].reshape(len(idx), data.group).sum(1).astype(np.int64)


def hold_out(stats: list[SourceStats], ratio: float, seed: int) -> list[np.ndarray]:
    """Per source, a seeded ``ratio`` of its examples (at least one) kept out of the draws for eval; a source
    left with no training example is an error naming it."""
    held = []
    for i, s in enumerate(stats):
        if not ratio:
            held.append(np.zeros(0, dtype=np.int64))
            continue
        picked = held_out(s.examples, ratio, [seed, EVAL_SALT, i])
        if picked is None:
            raise UsageError(f"data.sources[{i}] ({s.name}): data.eval_ratio={ratio} holds out all of its "
                             f"{s.examples} examples; give it more data or lower data.eval_ratio")
        held.append(picked.astype(np.int64) + s.first)
    return held


def draw(pools: list[np.ndarray], costs: list[np.ndarray], weights: list[float], seed: int) -> np.ndarray:
    """The mixture order (see the module doc): indices from ``pools`` merged by virtual finish time until their
    cost reaches the pools' total. ``costs[i]`` is the cost of each entry of ``pools[i]``."""
    total = int(sum(int(c.sum()) for c in costs))
    w = np.asarray(weights, dtype=np.float64)
    shares = w / w.sum()
    finish, picks, spent, src = [], [], [], []
    for i, (pool, cost) in enumerate(zip(pools, costs, strict=True)):
        # Enough of the stream to cover the source's share of the total, plus one example.
        need = shares[i] * total + int(cost.max())
        have, k, order = 0, 0, []
        while have < need:
            perm = np.random.default_rng([seed, _DRAW_SALT, i, k]).permutation(len(pool))
            order.append(perm)
            have += int(cost.sum())
            k += 1
        perm = np.concatenate(order)
        picks.append(pool[perm])
        spent.append(cost[perm])
        finish.append(np.cumsum(cost[perm]) / shares[i])
        src.append(np.full(len(perm), i))
    by_time = np.lexsort((np.concatenate(src), np.concatenate(finish)))  # ties: the lower source index first
    csum = np.cumsum(np.concatenate(spent)[by_time])
    n = int(np.searchsorted(csum, total, side="left")) + 1  # the draw that reaches the total is the last
    return np.concatenate(picks)[by_time[:n]].astype(np.int64)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:32]


def load_or_mix(cfg: DataSection, tok: Any, seed: int, eval_ratio: float, *, build: bool | None = None,
                lock: bool = True, progress: bool = False, pairs: bool = False
                ) -> tuple[TokenizedData, TokenizedData | None]:
    """(training draws, held-out examples or None) of ``data.sources``: the sources' token cache entry (tokenized
    first when missing, as :func:`.tokenize.load_or_tokenize`) and the draws file (drawn first when missing)."""
    from .records import RecordStream
    from .template import Template
    from .tokenize import (
        CHUNK_RECORDS,
        cache_key,
        cached,
        check_not_all_skipped,
        rename_report,
        renaming,
        tokenize_stream,
    )

    sources = list(cfg.sources or [])
    secs = [source_section(cfg, s) for s in sources]
    streams = []
    for i, sec in enumerate(secs):
        try:
            key = f"data.sources[{i}].columns" if sources[i].columns is not None else "data.columns"
            streams.append(RecordStream(sec, pairs, key))  # checks and hashes the source, reads no record
        except UsageError as e:
            raise UsageError(f"data.sources[{i}].path: {str(e).removeprefix('data.path ')}") from None
    templates = []  # once each: the key's and the tokens'
    for i, (src, sec) in enumerate(zip(sources, secs, strict=True)):
        try:
            templates.append(Template.of(sec, tok))
        except UsageError as e:
            if not src.template:  # the run's data.template, as the message says
                raise
            raise UsageError(f"data.sources[{i}].template: {str(e).removeprefix('data.template ')}") from None
    keys = [cache_key(st.fingerprint, tok, sec, tm) for st, sec, tm in zip(streams, secs, templates, strict=True)]
    key = _digest({"mix": MIX_VERSION, "sources": keys, "pairs": pairs})
    names = [st.source for st in streams]

    def write(w: Any) -> dict[str, Any]:
        parts, formats, skipped, n_skipped = [], {}, [], 0
        for i, (st, sec, tm) in enumerate(zip(streams, secs, templates, strict=True)):
            first, records, tokens, truncated, unrendered = (w.n_examples, w.n_records, w.n_tokens, w.truncated,
                                                             w.n_skipped)
            shown = len(w.skipped)
            dropped = sum(len(d) for d in w.dropped)
            tokenize_stream(st, tok, sec, w, CHUNK_RECORDS, progress, tm)
            st.check_unchanged()
            group = 2 if pairs else 1
            check_not_all_skipped(f"data.sources[{i}] ({st.source})", w.n_records - records,
                                  st.skipped + w.skipped[shown:], st.n_skipped + w.n_skipped - unrendered)
            if w.n_examples == first:
                raise UsageError(f"data.sources[{i}] ({st.source}): no example left (every record dropped: no label "
                                 f"token within data.max_length={cfg.max_length}); a weighted source needs examples")
            parts.append({"name": st.source, "first": first // group, "end": w.n_examples // group,
                          "records": w.n_records - records, "skipped": st.n_skipped + w.n_skipped - unrendered,
                          "dropped": sum(len(d) for d in w.dropped) - dropped, "truncated": w.truncated - truncated,
                          "tokens": w.n_tokens - tokens, "formats": dict(st.formats)})
            formats.update(st.formats)
            skipped += st.skipped + w.skipped[shown:]
            n_skipped += st.n_skipped + w.n_skipped - unrendered
        return {"sources": names, "files": files, "formats": formats, "skipped": skipped,
                "skipped_total": n_skipped, "mixture": parts}

    files = [n for st in streams for n in st.names]
    data, meta = cached(cfg, key, len(tok), ", ".join(names), write, build=build, lock=lock)
    data.group = 2 if pairs else 1
    # Reused from a cache built from the same contents under other names: this run's names in what it reports.
    rename = renaming(meta.get("files"), files)
    rename_report(data, rename)
    stats = cache_sources(meta, sources)
    for s, name in zip(stats, names, strict=True):
        s.name = name
        if rename is not None:
            s.formats = {rename(k): v for k, v in s.formats.items()}
    mix = _draws(cfg, data, stats, key, seed, eval_ratio)
    # The report describes everything read (records, drops, truncation), not the draws alone.
    train = data.subset(mix.order).with_report_of(data)
    train.mix = mix
    held = None
    if eval_ratio:
        held = data.subset(np.concatenate(mix.held))
        bounds = np.cumsum([0, *(len(h) for h in mix.held)])
        held.parts = [(s.label, np.arange(bounds[i], bounds[i + 1])) for i, s in enumerate(stats)]
    return train, held


def _draws(cfg: DataSection, data: TokenizedData, stats: list[SourceStats], key: str, seed: int,
           eval_ratio: float) -> Mixture:
    """The draws file of this mixture, read, or drawn and written (atomically: every rank may race to it and
    writes the same bytes)."""
    weights = [s.weight for s in stats]
    held = hold_out(stats, eval_ratio, seed)  # seeded: the same here and when the draws were written
    copies = copies_of(data, np.concatenate(held), sum(s.end - s.first for s in stats))
    # Named apart only where copies leave the draws (the draws of every other mixture keep their name).
    mkey = _digest({"v": MIX_VERSION, "cache": key, "weights": weights, "by": cfg.mix_by, "seed": seed,
                    "eval_ratio": eval_ratio, **({"held_copies": len(copies)} if len(copies) else {})})
    f = cache_root(cfg) / "mixtures" / f"{mkey}.npz"
    got = _read_draws(f, len(data), len(stats))
    if got is None:
        pools = [np.setdiff1d(np.arange(s.first, s.end, dtype=np.int64), np.concatenate([h, copies]))
                 for s, h in zip(stats, held, strict=True)]
        empty = [s.name for s, pool in zip(stats, pools, strict=True) if not len(pool)]
        if empty:
            raise UsageError(f"data.sources ({empty[0]}): every training example of it is a copy of an example "
                             f"another source holds out for eval (data.eval_ratio); drop the duplicate source or "
                             f"use data.eval_path")
        order = draw(pools, [_costs(data, p, cfg.mix_by) for p in pools], weights, seed)
        _write_draws(f, order, held)
    else:
        order, held = got
    bounds = np.asarray([s.first for s in stats] + [stats[-1].end])
    which = np.searchsorted(bounds, order, side="right") - 1
    tokens = _costs(data, order, "tokens")
    for i, s in enumerate(stats):
        s.held = len(held[i])
        s.drawn = int((which == i).sum())
        s.drawn_tokens = int(tokens[which == i].sum())
    return Mixture(mkey, f, cfg.mix_by, stats, order, held, len(copies))


def _read_draws(f: Path, n: int, n_sources: int) -> tuple[np.ndarray, list[np.ndarray]] | None:
    if not f.is_file():
        return None
    try:
        with np.load(f, allow_pickle=False) as z:
            order, held, bounds = z["order"], z["held"], z["held_bounds"]
        ok = (order.ndim == 1 and len(order) and bounds.shape == (n_sources + 1,) and int(bounds[-1]) == len(held)
              and int(order.min()) >= 0 and int(order.max()) < n and (not len(held) or int(held.max()) < n))
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"{f}: unreadable mixture draws ({type(e).__name__}: {e}); delete the file and run "
                         f"`ia3-dist prepare` again") from None
    if not ok:
        raise UsageError(f"{f}: mixture draws that do not fit their token cache; delete the file and run "
                         f"`ia3-dist prepare` again")
    return order.astype(np.int64), [held[bounds[i]:bounds[i + 1]].astype(np.int64) for i in range(n_sources)]


def _write_draws(f: Path, order: np.ndarray, held: list[np.ndarray]) -> None:
    import sys

    bounds = np.cumsum([0, *(len(h) for h in held)]).astype(np.int64)
    tmp = f.with_name(f".tmp-{f.stem}.{os.getpid()}.{secrets.token_hex(4)}.npz")
    try:
        f.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            np.savez(fh, order=order, held=np.concatenate([np.zeros(0, np.int64), *held]), held_bounds=bounds)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            publish_once(tmp, f)  # first wins: another rank (on NFS, another node) may be reading the file
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as e:
        # The draws are a pure function of the cache entry, weights and seed: a rank that cannot keep them (a
        # read-only cache) draws the same again next time.
        with contextlib.suppress(OSError):  # EROFS, not ENOENT, for a missing file on a read-only mount
            tmp.unlink()
        print(f"warning: cannot keep the mixture draws in {f} ({e.strerror or e}); drawn in memory", file=sys.stderr)
