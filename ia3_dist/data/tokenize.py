"""Conversations -> token ids with labels on the assistant spans, cached by content.

For a single-turn record this is the reference recipe's ``process_func`` done in batches:

    prompt = "\\n".join(["Human: " + instruction, input]).strip() + "\\n\\nAssistant: "
    ids = tok(prompt).input_ids + tok(output + eos).input_ids     # labels -100 over the prompt
    truncate ids, attention mask and labels to max_length

and a multi-turn conversation is its template's segments (see template.py), each tokenized alone. Records stream
through in chunks (in ``data.num_proc`` processes), so memory does not grow with the dataset; the result is the
token cache of :mod:`.token_cache`, which ranks read memory-mapped.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import re
import stat
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict
from typing import Any

import numpy as np

from ..config import DataSection
from ..errors import UsageError
from ..runtime.cpus import usable_cpus
from .cache import cache_root, file_lock
from .chat_render import rendered_date, special_tokens
from .pairs import Pair, split_pair, truncate_pair
from .records import MAX_SKIPPED_KEPT, Conversation, Records, RecordStream
from .template import CHAT_TEMPLATE, Template, leading_added
from .tokens import IGNORE_INDEX, MAX_DROPPED_NAMED, Chunk, TokenizedData  # noqa: F401 - IGNORE_INDEX re-exported

# Bump when the cached format or the preprocessing changes meaning.
# 5: a chat template's conversation encoded whole; 6: human_assistant's BOS once per example; 7: a chat template's
# preference prompt encoded whole; 8: truncation=prompt keeps the leading BOS; 9: a chat template's user message of
# an alpaca record with an empty instruction is its input alone
CACHE_VERSION = 9
# Records per chunk: a worker's unit of work, and what bounds the memory of tokenizing.
CHUNK_RECORDS = 2000


LOADED_FROM = frozenset({"name_or_path", "is_local", "local_files_only", "_commit_hash"})
"""A slow tokenizer's init_kwargs that say where it was loaded from, not how it tokenizes."""


MAX_TOKENIZER_FILE = 256 << 20
"""A slow tokenizer's model files (a SentencePiece model, a vocab, merges) are hashed up to this size each."""


def tokenizer_fingerprint(tok: Any) -> str:
    h = hashlib.sha256()
    backend = getattr(tok, "backend_tokenizer", None)
    # The backend without its truncation and padding: settings that any tok(...) call changes and that tokenizing
    # turns off (_backend_copy), so the same tokenizer keeps one key before and after it encodes.
    h.update(_backend_copy(tok).to_str().encode() if backend is not None else
             json.dumps(tok.get_vocab(), sort_keys=True).encode())
    # What the backend's serialisation leaves out but changes the ids: the special tokens (every one a chat
    # template may render as text, sep_token or additional_special_tokens as much as eos), and whether
    # special-token text is split.
    h.update(json.dumps([special_tokens(tok), tok.eos_token, tok.pad_token, tok.bos_token, type(tok).__name__,
                         getattr(tok, "split_special_tokens", False)], sort_keys=True, default=str).encode())
    if backend is None:
        # A slow tokenizer's settings (add_bos_token, legacy, ...), less where it was read from: the same files by
        # hub name (`ia3-dist prepare`) or from their snapshot dir (a training rank) are the same tokenizer. Its
        # model files by content: get_vocab() leaves out BPE merges and SentencePiece scores and normalisation.
        kwargs = getattr(tok, "init_kwargs", {})
        h.update(json.dumps({k: v for k, v in kwargs.items() if not k.endswith("_file") and k not in LOADED_FROM},
                            sort_keys=True, default=str).encode())
        for k in sorted(k for k in kwargs if k.endswith("_file")):
            h.update(f"{k}:".encode() + _file_digest(kwargs[k]))
    return h.hexdigest()


def _file_digest(path: Any) -> bytes:
    """sha256 of a tokenizer file's bytes; ``b"-"`` where there is none (None, or not a regular file: a FIFO is
    not opened for reading, which would block)."""
    if not isinstance(path, (str, os.PathLike)):
        return b"-"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return b"-"
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_TOKENIZER_FILE:
            return b"-" if not stat.S_ISREG(st.st_mode) else f"size {st.st_size}".encode()
        h = hashlib.sha256()  # hashlib.file_digest is Python 3.11's
        while chunk := fh.read(1 << 20):
            h.update(chunk)
        return h.digest()


def _offsets(lengths: np.ndarray) -> np.ndarray:
    """Example boundaries in the flat id array: 0, then the running sum of the lengths."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def truncate(ids: list[int], mask: list[int], last_response: int, max_length: int, mode: str, head: int = 0
             ) -> tuple[list[int], list[int]]:
    """Fit one example into ``max_length`` tokens. ``right``: cut the end (the reference recipe). ``prompt``: cut
    the oldest text first, after the first ``head`` tokens (a BOS, see :func:`head_length`), but never into the
    last response (which starts at ``last_response``); if that alone is too long, cut its end."""
    excess = len(ids) - max_length
    if excess <= 0:
        return ids, mask
    if mode == "prompt":
        head = head if head <= last_response and head < max_length else 0
        cut = min(excess, last_response - head)
        ids, mask = ids[:head] + ids[head + cut:], mask[:head] + mask[head + cut:]
    return ids[:max_length], mask[:max_length]


def head_length(ids: list[int], lead: tuple[int, ...], bos: int | None) -> int:
    """How many tokens at the start of ``ids`` a cut from the left keeps: the tokenizer's :func:`.template.
    leading_added` ones (Llama's BOS under human_assistant), or the BOS a chat template writes first. The model
    saw them first in every sequence it was trained on, and attends to them throughout."""
    if lead and tuple(ids[:len(lead)]) == lead:
        return len(lead)
    return 1 if bos is not None and ids[:1] == [bos] else 0


def _pack(examples: list[list[tuple[list[int], bool]]], cfg: DataSection, wheres: list[str],
          lead: tuple[int, ...] = (), bos: int | None = None, weighed_out: list[bool] | None = None) -> Chunk:
    """Per-example segment ids -> one :class:`Chunk` (truncated, masked, unlabeled examples dropped or kept);
    ``wheres``: where each example's record was read; ``lead``, ``bos``: what a cut keeps (:func:`head_length`);
    ``weighed_out``: per example, whether every answer it would train on has weight 0 (counted apart: such an
    example has no label token, truncated or not)."""
    flat: list[int] = []
    flat_mask: list[int] = []
    lens, counts, dropped = [], [], []
    truncated = unlabeled = answerless = 0
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
            ids, mask = truncate(ids, mask, last_response, cfg.max_length, cfg.truncation,
                                 head_length(ids, lead, bos))
        # No label past position 0 (which is never predicted): no loss signal. The reference recipe keeps such
        # examples in its batches (zero contribution); dropping them saves their compute.
        n_labels = sum(mask[1:])
        if not n_labels:
            unlabeled += 1
            answerless += bool(weighed_out and weighed_out[j])
            if cfg.unlabeled == "drop":
                dropped.append(j)
                continue
        flat += ids
        flat_mask += mask
        lens.append(len(ids))
        counts.append(n_labels)
    return Chunk(len(examples), np.asarray(flat, dtype=np.int32), np.asarray(flat_mask, dtype=np.uint8),
                 np.asarray(lens, dtype=np.int64), np.asarray(counts, dtype=np.int32),
                 np.asarray(dropped, dtype=np.int64), truncated, unlabeled,
                 dropped_where=[wheres[j] for j in dropped[:MAX_DROPPED_NAMED]], answerless=answerless)


def _pack_pairs(pairs: list[tuple[list[int], list[int], list[int]]], cfg: DataSection, wheres: list[str],
                lead: tuple[int, ...] = (), bos: int | None = None) -> Chunk:
    """Per pair ``(prompt, chosen, rejected)`` ids -> a :class:`Chunk` of two rows per pair (prompt + chosen, prompt
    + rejected; labels on the answers), cut to ``data.max_length`` with the prompt the same on both rows. A pair
    whose prompt leaves no answer token on a side, or whose sides are the same tokens, compares nothing: it is
    dropped and counted as unlabeled (the data report's line), whatever ``data.unlabeled`` says."""
    flat: list[int] = []
    flat_mask: list[int] = []
    lens, counts, dropped = [], [], []
    truncated = unlabeled = 0
    for j, (prompt, chosen, rejected) in enumerate(pairs):
        prompt, chosen, rejected, cut = truncate_pair(prompt, chosen, rejected, cfg.max_length, cfg.truncation,
                                                      head_length(prompt, lead, bos))
        truncated += cut
        # Two sides that became the same tokens (cut before they differ, or texts the template makes alike):
        # a margin of exactly 0 for ever, no gradient, and a pair counted wrong in the accuracies.
        if not chosen or not rejected or chosen == rejected or \
                (not prompt and (len(chosen) < 2 or len(rejected) < 2)):
            unlabeled += 1
            dropped.append(j)
            continue
        for answer in (chosen, rejected):
            flat += prompt + answer
            flat_mask += [0] * len(prompt) + [1] * len(answer)
            lens.append(len(prompt) + len(answer))
            counts.append(len(answer) - (0 if prompt else 1))
    return Chunk(len(pairs), np.asarray(flat, dtype=np.int32), np.asarray(flat_mask, dtype=np.uint8),
                 np.asarray(lens, dtype=np.int64), np.asarray(counts, dtype=np.int32),
                 np.asarray(dropped, dtype=np.int64), truncated, unlabeled,
                 dropped_where=[wheres[j] for j in dropped[:MAX_DROPPED_NAMED]])


_WORKER: dict[str, Any] = {}


def _backend_copy(tok: Any) -> Any | None:
    """A private copy of a fast tokenizer's Rust backend that encodes as ``tok(text)`` does (truncation and
    padding off; the copy is ours, so turning them off leaves the caller's tokenizer as it was); None for a slow
    tokenizer."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return None
    bt = copy.deepcopy(backend)
    bt.encode_special_tokens = backend.encode_special_tokens  # a runtime setting: a copy starts without it
    bt.no_truncation()
    bt.no_padding()
    return bt


def _encoder(tok: Any, add_special_tokens: bool = True) -> Any:
    """``texts -> ids`` equal to ``tok(texts, add_special_tokens=...).input_ids``. With a fast tokenizer it calls
    the Rust backend directly (truncation and padding off, as ``tok(text)`` has them), skipping the Python
    wrapper's per-text overhead."""
    bt = _backend_copy(tok)
    if bt is None:
        return lambda texts: tok(texts, add_special_tokens=add_special_tokens).input_ids
    return lambda texts: [e.ids for e in bt.encode_batch(texts, add_special_tokens=add_special_tokens)]


def _whole_encoder(tok: Any) -> Callable[[list[str]], list[tuple[list[int], list[tuple[int, int]]]]] | None:
    """``texts -> [(ids, character offsets)]`` of each whole text, without added special tokens (as
    ``apply_chat_template(tokenize=True)`` encodes); None for a tokenizer without a Rust backend."""
    bt = _backend_copy(tok)
    if bt is None:
        return None
    return lambda texts: [(e.ids, e.offsets) for e in bt.encode_batch(texts, add_special_tokens=False)]


def _labelled_runs(text_segs: list[tuple[str, bool]], ids: list[int], offsets: list[tuple[int, int]]
                   ) -> list[tuple[list[int], bool]]:
    """The whole text's tokens cut into runs of the same label: a token is labelled when any of its characters is
    in a labelled segment (as transformers' assistant-token masks are made: a token merged across the end of a
    prompt and the start of an answer is the answer's)."""
    ends = np.cumsum([len(t) for t, _ in text_segs])
    labelled = np.concatenate([[0], np.cumsum([lab for _, lab in text_segs])])
    last = len(text_segs) - 1
    first_seg = np.minimum(np.searchsorted(ends, [a for a, _ in offsets], side="right"), last)
    last_seg = np.minimum(np.searchsorted(ends, [max(b - 1, a) for a, b in offsets], side="right"), last)
    labels = (labelled[last_seg + 1] - labelled[first_seg]) > 0
    runs: list[tuple[list[int], bool]] = []
    for t, lab in zip(ids, labels.tolist(), strict=True):
        if runs and runs[-1][1] == lab:
            runs[-1][0].append(t)
        else:
            runs.append(([t], lab))
    return runs


def weighed_out(conv: Conversation, train_on: str) -> bool:
    """Whether every answer ``conv`` would train on has weight 0 (OpenAI's ``"weight": 0``): all of them, or with
    ``data.train_on=last`` the last one."""
    turns = conv.turns[-1:] if train_on == "last" else conv.turns
    return bool(turns) and not any(t.train for t in turns)


class _ChunkTokenizer:
    """Conversations -> :class:`Chunk`: every conversation rendered to labelled segments by the template, then
    encoded, truncated and masked per example. ``human_assistant`` encodes each segment on its own, as the reference
    recipe does (``tok(prompt) + tok(output + eos)``), each distinct segment text of the chunk once (datasets
    repeat instructions, empty inputs and system prompts). A chat template's conversation is encoded whole and
    labelled by character offsets, as ``apply_chat_template`` encodes it for inference: a SentencePiece-style
    tokenizer (Llama 2, Mistral) starts every separate encoding with a word-start marker the whole text has not."""

    def __init__(self, tok: Any, cfg: DataSection, template: Template | None = None) -> None:
        self.tok, self.cfg = tok, cfg
        self.template = template if template is not None else Template.of(cfg, tok)
        self.encode = _encoder(tok, self.template.add_special_tokens)
        self.encode_whole = None if self.template.add_special_tokens else _whole_encoder(tok)
        self.lead = leading_added(tok) if self.template.add_special_tokens else ()

    def __call__(self, convs: list[Conversation] | list[Pair]) -> Chunk:
        if convs and isinstance(convs[0], Pair):
            return self.pairs(convs)
        done, skipped = self._each(convs, lambda c: self.template.segments(c, self.tok, self.cfg.train_on))
        rendered = [segs for _, segs in done]
        if self.encode_whole is not None:
            whole = self.encode_whole(["".join(text for text, _ in segs) for segs in rendered])
            examples = [_labelled_runs(segs, ids, offs) for segs, (ids, offs) in zip(rendered, whole, strict=True)]
        else:
            uniq = list(dict.fromkeys(text for segs in rendered for text, _ in segs))
            ids_of = dict(zip(uniq, self.encode(uniq), strict=True))
            examples = [[(self.template.piece_ids(ids_of[text], k, self.lead), is_label)
                         for k, (text, is_label) in enumerate(segs)] for segs in rendered]
        c = _pack(examples, self.cfg, [conv.where for conv, _ in done], self.lead, self.tok.bos_token_id,
                  [weighed_out(conv, self.cfg.train_on) for conv, _ in done])
        c.skipped = skipped
        return c

    def pairs(self, pairs: list[Pair]) -> Chunk:
        """Both sides of each pair rendered like an SFT conversation with labels on the last answer only. Under a
        chat template each side (prompt and answer) is encoded whole and labelled by character offsets, as SFT
        and inference encode it (and TRL's DPO: prompt + completion as one text): encoded on its own, the answer
        of a SentencePiece-style tokenizer (Llama 2, Mistral) started with a word-start marker the whole text has
        not. The prompt is the tokens both sides share; a token merged across the prompt's end belongs to the
        answer."""
        def render(c: Conversation) -> list[tuple[str, bool]]:
            segs = self.template.segments(c, self.tok, "last")
            if self.template.add_special_tokens:
                return segs
            return [("".join(text for text, _ in segs[:-1]), False), segs[-1]]

        done, skipped = self._each(pairs, lambda p: (render(p.chosen), render(p.rejected)))
        if self.encode_whole is not None:
            sides = [segs for _, both in done for segs in both]
            whole = self.encode_whole(["".join(text for text, _ in segs) for segs in sides])
            runs = [_labelled_runs(segs, ids, offs) for segs, (ids, offs) in zip(sides, whole, strict=True)]
            tokenized = [(both, (runs[2 * i], runs[2 * i + 1])) for i, (_, both) in enumerate(done)]
        else:
            uniq = list(dict.fromkeys(text for _, both in done for segs in both for text, _ in segs))
            ids_of = dict(zip(uniq, self.encode(uniq), strict=True))
            tokenized = [(both, tuple([(self.template.piece_ids(ids_of[text], k, self.lead), lab)
                                       for k, (text, lab) in enumerate(segs)] for segs in both)) for _, both in done]
        # The two sides must share their prompt: a pair whose template renders them apart is named too.
        split, unsplit = self._each([(pair, tk) for (pair, _), tk in zip(done, tokenized, strict=True)],
                                    lambda r: split_pair(*r[1][1], "data.template", *r[1][0]),
                                    lambda r: r[0].where)
        c = _pack_pairs([parts for _, parts in split], self.cfg, [pair.where for (pair, _), _ in split], self.lead,
                        self.tok.bos_token_id)
        c.skipped = skipped + unsplit
        return c

    def _each(self, items: list[Any], render: Callable[[Any], Any],
              where: Callable[[Any], str] = lambda it: it.where) -> tuple[list[tuple[Any, Any]], list[str]]:
        """``(record, render(record))`` of each record; one the template cannot render (a template that raises on
        it, a limit) is named by where it was read and, under data.on_bad_record=skip, left out with its
        message."""
        out, skipped = [], []
        day = self.cfg.template_day()
        for it in items:
            try:
                with rendered_date(day):
                    out.append((it, render(it)))
            except UsageError as e:
                msg = f"{where(it)}: {e}" if where(it) else str(e)
                if self.cfg.on_bad_record != "skip":
                    raise UsageError(f"{msg} (or set data.on_bad_record=skip to drop the records it cannot "
                                     f"render)") from None
                skipped.append(msg)
        return out, skipped


def _worker_init(run: _ChunkTokenizer, parent: int) -> None:
    # The parent's own tokenizer, inherited by the fork: the template the cache is keyed by, not read again.
    _WORKER["run"] = run
    # A worker outlives a SIGKILLed parent (the OOM killer, a launcher ending a rank) blocked on the pool's pipes,
    # and holds what the fork gave it: the cache build's flock, so every later build on the node waited for ever.
    # The kernel kills it with its parent instead (Linux; elsewhere the check below is all there is).
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)


def _worker_task(convs: list[Conversation]) -> Chunk:
    return _WORKER["run"](convs)


def _chunks(convs: Iterable[Conversation], size: int) -> Iterator[list[Conversation]]:
    buf: list[Conversation] = []
    for conv in convs:
        buf.append(conv)
        if len(buf) == size:
            yield buf
            buf = []
    if buf:
        yield buf


def _procs(num_proc: int) -> int:
    return num_proc or usable_cpus()


def tokenize_stream(convs: Iterable[Conversation], tok: Any, cfg: DataSection, sink: Callable[[Chunk], None],
                    chunk: int = CHUNK_RECORDS, progress: bool = False, template: Template | None = None) -> int:
    """Tokenize ``convs`` chunk by chunk, handing each :class:`Chunk` to ``sink`` in record order; returns the
    record count. Records are read here, in this process, only as fast as ``data.num_proc`` workers tokenize
    them (at most two chunks per worker in flight), so memory is bounded by the chunk size, not the dataset.
    ``template``: the one the cache key was made from (a template file is read once: edited meanwhile, the entry
    would hold another template's tokens under this one's key)."""
    run = _ChunkTokenizer(tok, cfg, template)  # checks the template before any worker starts
    bar = _progress(progress)
    n = 0

    def emit(c: Chunk) -> None:
        nonlocal n
        sink(c)
        n += c.n_records
        if bar is not None:
            bar.update(c.n_records)

    try:
        it = _chunks(convs, chunk)
        first = next(it, None)
        if first is None:
            return 0
        second = next(it, None)
        procs = _procs(cfg.num_proc)
        if second is None or procs <= 1:
            for part in _prepend(first, second, it):
                emit(run(part))
            return n
        for c in _pooled(_prepend(first, second, it), procs, run):
            emit(c)
        return n
    finally:
        if bar is not None:
            bar.close()


# A chunk of 2,000 records takes well under a second; a worker silent for this long is stuck, not slow.
_WORKER_STALL_S = 300.0


def _pooled(parts: Iterator[list[Conversation]], procs: int, run: _ChunkTokenizer) -> Iterator[Chunk]:
    """The parts tokenized in ``procs`` forked workers, in submission order (at most two parts per worker in
    flight). A worker that dies or stalls does not hang the job: a forked child can inherit a lock that another
    thread held at the fork (torch's and tokenizers' thread pools) - seen as a launcher waiting for ever on a lost
    task under ``multiprocessing.Pool``. Then the rest is tokenized here, with a warning; the tokens are the same."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures import TimeoutError as FutureTimeout
    from concurrent.futures.process import BrokenProcessPool

    # fork: workers inherit the tokenizer instead of unpickling it, and never re-import the caller's __main__.
    pool = ProcessPoolExecutor(procs, mp_context=mp.get_context("fork"), initializer=_worker_init,
                               initargs=(run, os.getpid()))
    pending: deque[tuple[list[Conversation], Any]] = deque()
    failed = None
    try:
        for part in parts:
            # Queued before submit: a pool already broken raises there, and this part is then redone here too.
            pending.append((part, None))
            pending[-1] = (part, pool.submit(_worker_task, part))
            while len(pending) >= 2 * procs:
                yield pending[0][1].result(timeout=_WORKER_STALL_S)
                pending.popleft()
        while pending:
            yield pending[0][1].result(timeout=_WORKER_STALL_S)
            pending.popleft()
    except (BrokenProcessPool, FutureTimeout) as e:
        failed = e
    finally:
        # A stalled worker must be killed: the executor would join it at interpreter exit. The executor has no
        # public handle on its processes; _processes has held them since Python 3.2.
        procs_left = list(getattr(pool, "_processes", {}).values())
        pool.shutdown(wait=failed is None, cancel_futures=True)
        if failed is not None:
            for p in procs_left:
                p.kill()
    if failed is None:
        return
    print(f"warning: a tokenizer worker {'died' if isinstance(failed, BrokenProcessPool) else 'stalled'}; "
          "tokenizing the rest in this process (set data.num_proc=1 to skip the workers)", file=sys.stderr)
    for part, _ in pending:
        yield run(part)
    for part in parts:
        yield run(part)


def _prepend(first: list[Conversation], second: list[Conversation] | None, rest: Iterator[list[Conversation]]
             ) -> Iterator[list[Conversation]]:
    """The chunks again, after the first two were taken to decide whether workers pay off."""
    yield first
    if second is not None:
        yield second
        yield from rest


def _progress(show: bool) -> Any:
    """A records/s progress bar on stderr (updates every second on a terminal, every 30 s in a log file), shown
    only once tokenizing has taken a few seconds: small data keeps a clean log."""
    if not show:
        return None
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    return tqdm(desc="tokenizing", unit=" records", unit_scale=True, file=sys.stderr, mininterval=1 if tty else 30,
                dynamic_ncols=tty, delay=3)


class _Collect:
    """A sink that keeps every chunk in memory (small data: the demo, tests)."""

    def __init__(self) -> None:
        self.parts: list[Chunk] = []

    def __call__(self, c: Chunk) -> None:
        self.parts.append(c)


def tokenize(records: Records, tok: Any, cfg: DataSection, chunk: int = CHUNK_RECORDS) -> TokenizedData:
    """Tokenize in memory (small data: the demo, tests); a dataset for training goes through the token cache
    (:func:`load_or_tokenize`)."""
    t0 = time.perf_counter()
    sink = _Collect()
    tokenize_stream(records.examples, tok, cfg, sink, chunk)
    rendered = [m for c in sink.parts for m in c.skipped]
    check_not_all_skipped(records.source, sum(c.n_records for c in sink.parts), list(records.skipped) + rendered,
                          len(records.skipped) + len(rendered))
    data = join_chunks(sink.parts, records.source, cfg)
    if records.examples and isinstance(records.examples[0], Pair):
        data.group = 2
    data.seconds = time.perf_counter() - t0
    data.skipped = (list(records.skipped) + rendered)[:MAX_SKIPPED_KEPT]
    data.skipped_total = len(records.skipped) + len(rendered)
    data.formats = dict(records.formats)
    return data


def join_chunks(parts: list[Chunk], source: str, cfg: DataSection) -> TokenizedData:
    lens = np.concatenate([c.lengths for c in parts]) if parts else np.zeros(0, dtype=np.int64)
    if not len(lens):
        raise no_examples(source, cfg, sum(c.truncated for c in parts) if parts else None,
                          sum(c.answerless for c in parts))
    base = np.cumsum([0] + [c.n_records for c in parts])
    return TokenizedData(ids=np.concatenate([c.ids for c in parts]), offsets=_offsets(lens),
                         label_mask=np.concatenate([c.label_mask for c in parts]),
                         n_records=int(base[-1]),
                         dropped=np.concatenate([c.dropped + b for c, b in zip(parts, base, strict=False)]),
                         dropped_where=[w for c in parts for w in c.dropped_where][:MAX_DROPPED_NAMED],
                         truncated=sum(c.truncated for c in parts), unlabeled=sum(c.unlabeled for c in parts),
                         answerless=sum(c.answerless for c in parts),
                         label_counts=np.concatenate([c.label_counts for c in parts]))


def check_not_all_skipped(source: str, rendered: int, skipped: list[str], n_skipped: int) -> None:
    """UsageError when no record was left to tokenize because ``data.on_bad_record: skip`` skipped every one (the
    reader's bad records and the template's refusals): that, not truncation or the template's labels, is why
    there are no examples."""
    if rendered or not n_skipped:
        return
    first = f", the first: {skipped[0]}" if skipped else ""
    raise UsageError(f"{source}: every record was skipped (data.on_bad_record=skip; {n_skipped} skipped{first}); "
                     f"fix the records (or the template that refuses them), or set data.on_bad_record=error to stop "
                     f"at the first with its line")


def no_examples(source: str, cfg: DataSection, truncated: int | None = None, answerless: int = 0) -> UsageError:
    """No record has a label token. ``truncated``: how many records were cut at ``data.max_length``; ``answerless``:
    how many have weight 0 on every answer they would train on; none cut and none weighed out, the template is what
    labels nothing."""
    if answerless:
        which = "the last answer" if cfg.train_on == "last" else "every answer"
        return UsageError(f"{source}: no record has an answer token to train on: {answerless} record(s) give "
                          f"{which} \"weight\": 0 (data.train_on={cfg.train_on}), the others"
                          f"{' were cut at data.max_length' if truncated else ' label nothing'}; give an answer "
                          f"weight 1" + (" or set data.train_on=all" if cfg.train_on == "last" else ""))
    if truncated == 0:
        return UsageError(f"{source}: no record has an answer token to train on, and none was cut at "
                          f"data.max_length={cfg.max_length}: data.template={cfg.template} renders no assistant "
                          f"text as an answer (a chat template must write each assistant message's content)")
    return UsageError(f"{source}: every record is all prompt after truncation to data.max_length={cfg.max_length}; "
                      f"raise data.max_length (or data.truncation=prompt)")


def cache_key(fingerprint: str, tok: Any, cfg: DataSection, template: Template | None = None) -> str:
    """The token cache's name: a hash of the data's content, the tokenizer and every setting that changes the
    tokens (``template``: the data's, :meth:`.Template.of` by default)."""
    h = hashlib.sha256()
    h.update(json.dumps({
        "v": CACHE_VERSION, "data": fingerprint, "tok": tokenizer_fingerprint(tok),
        "template": asdict(template if template is not None else Template.of(cfg, tok)), "train_on": cfg.train_on,
        "truncation": cfg.truncation,
        "unlabeled": cfg.unlabeled, "max_length": cfg.max_length, "limit": cfg.limit, "bad": cfg.on_bad_record,
        # Only when set, so the caches of every other config keep their names.
        **({"date": cfg.template_date} if cfg.template_date is not None else {}),
        # A template that reads an answer's reasoning renders what records carry there since it is passed on
        # (before, it was dropped): such caches are named apart.
        **({"reasoning": 1} if _reads_reasoning(template if template is not None else Template.of(cfg, tok))
           else {}),
    }, sort_keys=True).encode())
    return h.hexdigest()[:32]


_READS_REASONING = re.compile(r"(?:\.|\[\s*['\"])(?:reasoning_content|thinking|reasoning)\b")
"""A template reading a message's reasoning field (``message.reasoning_content``, ``m['thinking']``); a flag
such as ``enable_thinking`` is not one."""


def _reads_reasoning(template: Template) -> bool:
    return template.kind == CHAT_TEMPLATE and bool(_READS_REASONING.search(template.chat_template or ""))


def _renamed(text: str, old: list[str], new: list[str]) -> str:
    """``text`` with each of the ``old`` names replaced by its ``new`` one, in one pass: replaced one after another, a
    new name that is also an old one (files renamed in a rotation, ``a b`` -> ``b c``) was replaced again. Longest
    first, so a name that begins another is not taken out of it."""
    swap: dict[str, str] = {}
    for a, b in zip(old, new, strict=False):
        swap.setdefault(a, b)  # the same file listed twice: its first place names it
    if all(a == b for a, b in swap.items()):
        return text
    pattern = "|".join(re.escape(a) for a in sorted(swap, key=len, reverse=True) if a)
    return re.sub(pattern, lambda m: swap[m.group(0)], text) if pattern else text


def load_or_tokenize(cfg: DataSection, tok: Any, *, build: bool | None = None, lock: bool = True,
                     progress: bool = False, pairs: bool = False) -> TokenizedData:
    """The data's token cache, memory-mapped; tokenized into it first when there is none and ``build`` (default:
    unless ``data.require_prepared``). ``lock``: processes of a node wait on a file lock so one of them
    tokenizes (best effort: correctness rests on the atomic publish, see :mod:`.token_cache`)."""
    stream = RecordStream(cfg, pairs)  # pairs: part of the fingerprint, so of the key
    template = Template.of(cfg, tok)  # once: the key's and the tokens'

    def write(w: Any) -> dict[str, Any]:
        tokenize_stream(stream, tok, cfg, w, CHUNK_RECORDS, progress, template)
        stream.check_unchanged()
        check_not_all_skipped(stream.source, w.n_records, stream.skipped + w.skipped, stream.n_skipped + w.n_skipped)
        return {"sources": stream.names, "formats": stream.formats,
                "skipped": (stream.skipped + w.skipped)[:MAX_SKIPPED_KEPT],
                "skipped_total": stream.n_skipped + w.n_skipped}

    data, meta = cached(cfg, cache_key(stream.fingerprint, tok, cfg, template), len(tok), stream.source, write,
                        build=build, lock=lock)
    data.group = 2 if pairs else 1
    rename_report(data, renaming(meta.get("sources"), stream.names))
    return data


def renaming(old: Any, new: list[str]) -> Callable[[str], str] | None:
    """A cache entry is named by content: built from the same data under other file names (``old``, as its
    manifest records them), what it reports is made to name this run's files (``new``) by the function returned;
    None when the names are the same (or the manifest records none)."""
    if not isinstance(old, list) or len(old) != len(new) or old == new:
        return None
    names = [str(x) for x in old]
    return lambda text: _renamed(text, names, new)


def rename_report(data: TokenizedData, rename: Callable[[str], str] | None) -> None:
    """The messages and formats of ``data`` through ``rename`` (:func:`renaming`)."""
    if rename is None:
        return
    data.skipped = [rename(m) for m in data.skipped]
    data.formats = {rename(k): v for k, v in data.formats.items()}
    data.dropped_where = [rename(m) for m in data.dropped_where]


def cached(cfg: DataSection, key: str, vocab_size: int, source: str, write: Callable[[Any], dict[str, Any]], *,
           build: bool | None = None, lock: bool = True) -> tuple[TokenizedData, dict[str, Any]]:
    """The token cache entry ``key`` (and its manifest), memory-mapped; when there is none and ``build`` (default:
    unless ``data.require_prepared``), ``write(writer)`` fills a :class:`.token_cache.CacheWriter` first and
    returns what the manifest records besides the counts."""
    from . import token_cache as tc

    root = cache_root(cfg) / "tokenized"
    final = root / key
    got = tc.open_cache(final)
    seconds = 0.0
    if got is None:
        if not (build if build is not None else not cfg.require_prepared):
            raise UsageError(f"data.require_prepared: no prepared token cache for {source} (expected "
                             f"{final}, named by the data's content, the tokenizer and the data.* settings); run "
                             f"`ia3-dist prepare --config <this config> [the same overrides]` first, with the same "
                             f"data.cache_dir, or set data.require_prepared=false to tokenize in the job")
        with file_lock(root / f"{key}.lock", required=False) if lock else contextlib.nullcontext():
            got = tc.open_cache(final)
            if got is None:
                t0 = time.perf_counter()
                _build(root, key, vocab_size, source, cfg, write)
                seconds = time.perf_counter() - t0
                got = tc.open_cache(final)
                if got is None:
                    raise RuntimeError(f"{final}: missing right after it was written")
    data, meta = got
    data.seconds = seconds
    return data, meta


def _build(root: Any, key: str, vocab_size: int, source: str, cfg: DataSection,
           write: Callable[[Any], dict[str, Any]]) -> None:
    from . import token_cache as tc

    try:
        w = tc.CacheWriter(root, key, vocab_size)
    except OSError as e:
        raise UsageError(f"{root}: cannot write the token cache there ({e.strerror or e}); set data.cache_dir to a "
                         f"writable directory") from None
    try:
        t0 = time.perf_counter()
        meta = write(w)
        if not w.n_tokens:
            raise no_examples(source, cfg, w.truncated if w.n_records else None, w.answerless)
        seconds = time.perf_counter() - t0
        w.commit({**meta, "seconds": round(seconds, 3),
                  "records_per_s": round(w.n_records / max(seconds, 1e-9), 1)})
    except OSError as e:
        w.abort()
        raise UsageError(f"{w.tmp}: cannot write the token cache ({e.strerror or e}); free space there or set "
                         f"data.cache_dir") from None
    except BaseException:
        w.abort()
        raise
