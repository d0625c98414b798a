"""Instruction records -> token ids with prompt-masked labels, cached; and the per-rank sharding plan.

Preprocessing is the reference recipe's ``process_func`` done in batches:

    prompt = "\\n".join(["Human: " + instruction, input]).strip() + "\\n\\nAssistant: "
    ids = tok(prompt).input_ids + tok(output + eos).input_ids     # labels -100 over the prompt
    truncate ids, attention mask and labels to max_length

Labels are fully determined by the ids and the prompt length, so the cache stores only the flat ids, offsets and
prompt lengths (numpy), keyed by a content hash of the data, the tokenizer, the template and the max length.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import DataConfig
from .errors import UsageError

IGNORE_INDEX = -100
# Bump when the cached format or the preprocessing changes meaning.
CACHE_VERSION = 2
FIELDS = ("instruction", "input", "output")


def cache_root(cfg: DataConfig) -> Path:
    root = cfg.cache_dir or os.environ.get("IA3_DIST_CACHE") or os.path.join(Path.home(), ".cache", "ia3-dist")
    return Path(root).expanduser()


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive lock shared by every process on the node (and on a shared filesystem that supports flock), so
    one rank builds a cache entry while the others wait on a file, never on a collective with a timeout."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


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


def load_records(cfg: DataConfig) -> Records:
    """Read the records named by ``data.path``; every problem is a :class:`UsageError` naming file and record."""
    path = cfg.path
    if path.startswith("demo:"):
        from . import demo

        path = str(demo.ensure_data(cfg, path))
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


def build_prompt(cfg: DataConfig, instruction: str, inp: str) -> str:
    prompt = cfg.prompt_template.format(instruction=instruction, input=inp)
    if cfg.strip_prompt:
        prompt = prompt.strip()
    return prompt + cfg.response_prefix


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


def tokenize(records: Records, tok: Any, cfg: DataConfig, chunk: int = 4000) -> TokenizedData:
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


def cache_key(records: Records, tok: Any, cfg: DataConfig) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({
        "v": CACHE_VERSION, "data": records.fingerprint, "tok": tokenizer_fingerprint(tok),
        "template": cfg.prompt_template, "strip": cfg.strip_prompt, "prefix": cfg.response_prefix,
        "eos": cfg.append_eos, "max_length": cfg.max_length, "limit": cfg.limit, "bad": cfg.on_bad_record,
    }, sort_keys=True).encode())
    return h.hexdigest()[:32]


def load_or_tokenize(cfg: DataConfig, tok: Any) -> TokenizedData:
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


# ---------------------------------------------------------------------------------------------------------------
# Sharding: which examples each rank sees in each optimizer step.


def split_eval(data: TokenizedData, ratio: float, seed: int) -> tuple[TokenizedData, TokenizedData]:
    """(train, eval): a seeded random ``ratio`` of the examples is held out; train keeps file order."""
    n_eval = max(1, round(len(data) * ratio))
    if n_eval >= len(data):
        raise UsageError(f"data.eval_ratio={ratio} leaves no training examples out of {len(data)}")
    held = np.sort(np.random.default_rng([seed, 7919]).permutation(len(data))[:n_eval])
    keep = np.setdiff1d(np.arange(len(data)), held)
    return data.subset(keep), data.subset(held)


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch]).permutation(n)


def steps_per_epoch(n: int, global_batch: int) -> int:
    return -(-n // global_batch)


ORDER_VERSION = 2
"""Bumped whenever plan_epoch orders examples differently: a checkpoint of another order is not resumed."""


@dataclass(frozen=True)
class Layout:
    """How examples are cut into optimizer steps: global batch = micro x accum x world."""

    micro: int
    accum: int
    world: int
    seed: int
    shuffle: bool
    group_by_length: bool
    group_steps: int = 64
    """Steps per length group (grouped mode): large enough to sort well, small enough to keep order random."""

    @property
    def global_batch(self) -> int:
        return self.micro * self.accum * self.world


def rank_micro_batches(batch: Sequence[int], rank: int, world: int, micro: int, accum: int) -> list[list[int]]:
    """Split one global batch (<= micro*accum*world example indices) into this rank's ``accum`` micro-batches.

    Rank r takes every world-th example, so a short last batch stays spread over the ranks. Empty micro-batches
    are kept as empty lists: every rank must still run ``accum`` micro-steps so collectives line up.
    """
    mine = list(batch[rank::world])
    out = [mine[i * micro:(i + 1) * micro] for i in range(accum)]
    if sum(len(m) for m in out) != len(mine):
        raise ValueError(f"global batch of {len(batch)} does not fit micro={micro} x accum={accum} x world={world}")
    return out


def plan_epoch(lengths: np.ndarray, lay: Layout, epoch: int) -> list[list[list[int]]]:
    """Every step of one epoch as ``world x accum`` micro-batches (rank r's are ``[r*accum:(r+1)*accum]``).

    Plain mode: consecutive global batches of the epoch order. Length-grouped mode: the epoch order is cut into
    groups of ``group_steps`` global batches; inside a group examples are sorted by length and cut into
    micro-batches of similar lengths (little padding); runs of one step's worth of neighbouring micro-batches
    are shuffled within the group and dealt round-robin to the ranks. Either way each example appears exactly
    once per epoch and the plan is a pure function of (seed, epoch).
    """
    n = len(lengths)
    order = epoch_order(n, lay.seed, epoch, lay.shuffle)
    per_step = lay.world * lay.accum
    steps: list[list[list[int]]] = []
    if not lay.group_by_length:
        for k in range(steps_per_epoch(n, lay.global_batch)):
            batch = order[k * lay.global_batch:(k + 1) * lay.global_batch].tolist()
            steps.append([mb for r in range(lay.world)
                          for mb in rank_micro_batches(batch, r, lay.world, lay.micro, lay.accum)])
        return steps
    rng = np.random.default_rng([lay.seed, epoch, 2])
    group = lay.global_batch * lay.group_steps
    for g in range(0, n, group):
        idx = order[g:g + group]
        idx = idx[np.argsort(-lengths[idx], kind="stable")]
        chunk = [idx[i:i + lay.micro].tolist() for i in range(0, len(idx), lay.micro)]
        # Whole steps of neighbouring micro-batches are shuffled, not single micro-batches, and a step's
        # micro-batches are dealt round-robin to the ranks: every rank of a step gets about the same number of
        # tokens, so none waits for another at the gradient all-reduce.
        blocks = [chunk[i:i + per_step] for i in range(0, len(chunk), per_step)]
        for j in rng.permutation(len(blocks)):
            b = blocks[j] + [[] for _ in range(per_step - len(blocks[j]))]
            steps.append([b[a * lay.world + r] for r in range(lay.world) for a in range(lay.accum)])
    return steps


def iter_steps(lengths: np.ndarray, lay: Layout, total_steps: int,
               start_step: int = 0) -> Iterator[tuple[int, int, list[list[int]]]]:
    """Yield ``(step, epoch, micro_batches)`` for steps ``start_step .. total_steps-1``; positions are computed,
    never replayed, so starting at step k costs nothing."""
    spe = steps_per_epoch(len(lengths), lay.global_batch)
    plan_of, plan = -1, []
    for step in range(start_step, total_steps):
        epoch, k = divmod(step, spe)
        if epoch != plan_of:
            plan, plan_of = plan_epoch(lengths, lay, epoch), epoch
            if len(plan) != spe:
                raise AssertionError(f"epoch plan has {len(plan)} steps, expected {spe}")
        yield step, epoch, plan[k]


def rank_slice(step: list[list[int]], rank: int, accum: int) -> list[list[int]]:
    return step[rank * accum:(rank + 1) * accum]


def collate(data: TokenizedData, idx: Sequence[int], pad_id: int, padding_side: str = "right"
            ) -> dict[str, torch.Tensor]:
    """Pad like ``DataCollatorForSeq2Seq(padding=True)``: pad id / mask 0 / label -100 on the tokenizer's side."""
    rows = [data.example(i) for i in idx]
    width = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for j, (i_, m_, l_) in enumerate(rows):
        n = len(i_)
        sl = slice(width - n, width) if padding_side == "left" else slice(0, n)
        ids[j, sl] = torch.tensor(i_)
        mask[j, sl] = torch.tensor(m_)
        labels[j, sl] = torch.tensor(l_)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
