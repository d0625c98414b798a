"""``ia3-dist prepare`` and the token cache: a prepared run never tokenizes, ``data.require_prepared`` refuses a
missing cache before the process group, concurrent and killed writers never leave a cache that is read
half-written, and a rank's memory does not grow with the dataset."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from _util import ROOT, check, launch

from ia3_dist.cli import main
from ia3_dist.config import DataSection, load_config
from ia3_dist.data import token_cache as tc
from ia3_dist.data import tokenize as tk
from ia3_dist.data.records import load_records
from ia3_dist.errors import UsageError
from ia3_dist.runtime import dist
from ia3_dist.train.demo import make_records

TINY = str(ROOT / "configs" / "tiny-cpu.yaml")


def _data(tmp_path: Path, n: int = 120, name: str = "d.jsonl") -> Path:
    f = tmp_path / name
    f.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in make_records(n, seed=11, style=None)),
                 encoding="utf-8")
    return f


def _published(cache: Path) -> list[Path]:
    return sorted(d for d in (cache / "tokenized").iterdir() if d.is_dir() and not d.name.startswith("."))


def _temps(cache: Path) -> list[Path]:
    return sorted((cache / "tokenized").glob(f"{tc.TMP_PREFIX}*"))


def _same_as_in_memory(data: tk.TokenizedData, cfg: DataSection, tok) -> None:
    ref = tk.tokenize(load_records(cfg), tok, cfg)
    assert len(data) == len(ref) and data.dropped.tolist() == ref.dropped.tolist()
    assert np.array_equal(np.asarray(data.ids), ref.ids) and np.array_equal(np.asarray(data.label_mask),
                                                                            ref.label_mask)
    assert data.label_tokens() == ref.label_tokens() and data.truncated == ref.truncated


def _never_tokenize(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self, convs):
        raise AssertionError("tokenized although the cache was prepared")

    monkeypatch.setattr(tk._ChunkTokenizer, "__call__", refuse)


def test_prepare_then_run_reads_the_cache_and_never_tokenizes(tmp_path: Path, tiny_model: Path, tiny_tokenizer,
                                                              capsys: pytest.CaptureFixture,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    f = _data(tmp_path)
    cache, out = tmp_path / "shared-fs", tmp_path / "run"
    args = ["--config", TINY, f"model.path={tiny_model}", f"data.path={f}", f"data.cache_dir={cache}",
            f"output.dir={out}", "data.require_prepared=true"]
    assert main(["prepare", *args]) == 0
    text = capsys.readouterr().out
    [entry] = _published(cache)
    assert "120 records read" in text and "tokenized in" in text and f"cache: {entry}" in text
    assert not out.exists() and not _temps(cache)
    manifest = json.loads((entry / tc.MANIFEST).read_text())
    assert manifest["n_records"] == 120 and manifest["dtype"] == "uint16" and manifest["sources"] == [str(f)]

    # The run's preflight (every rank runs it before the process group) finds it and tokenizes nothing.
    _never_tokenize(monkeypatch)
    from ia3_dist.train.prepare import prepare
    from ia3_dist.train.report import report

    p = prepare(load_config(TINY, args[2:]), dist.DistEnv(0, 0, 1, 1))
    assert isinstance(p.data.ids, np.memmap) and isinstance(p.data.label_mask, np.memmap)
    assert p.data.seconds == 0 and p.data.cache_file == str(entry) and p.meta["data_key"] == entry.name
    assert f"from cache {entry}" in report(p)
    monkeypatch.undo()
    _same_as_in_memory(p.data, DataSection(path=str(f)), tiny_tokenizer)
    # A second prepare of the same content is a cache hit too: nothing rewritten.
    mtime = (entry / tc.MANIFEST).stat().st_mtime_ns
    _never_tokenize(monkeypatch)
    assert main(["prepare", *args]) == 0
    assert f"from cache {entry}" in capsys.readouterr().out
    assert (entry / tc.MANIFEST).stat().st_mtime_ns == mtime and _published(cache) == [entry]


def test_require_prepared_without_cache_exits_2_before_the_process_group(
        tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture) -> None:
    import torch.distributed as tdist

    f = _data(tmp_path)
    cache, out = tmp_path / "cache", tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    rc = main(["--config", TINY, f"model.path={tiny_model}", f"data.path={f}", f"data.cache_dir={cache}",
               f"output.dir={out}", "data.require_prepared=true"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "data.require_prepared: no prepared token cache" in err and "ia3-dist prepare" in err, err
    assert str(cache / "tokenized") in err
    assert not tdist.is_initialized()
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and (out / "keep.txt").read_text() == "user data"
    assert not (cache / "tokenized").exists() or not _published(cache)


def _prepare_in_child(cfg: DataSection, tok, barrier, q) -> None:
    barrier.wait()
    data = tk.load_or_tokenize(cfg, tok, build=True, lock=False)
    q.put((data.cache_file, int(np.asarray(data.ids, dtype=np.int64).sum()), len(data)))


def test_concurrent_preparers_without_a_lock_publish_one_cache(tmp_path: Path, tiny_tokenizer) -> None:
    """Two processes (no flock between them, as on a shared filesystem without one) prepare the same data at
    once: one cache, equal to in-memory tokenization, both read the published one, no temp dir left."""
    cfg = DataSection(path=str(_data(tmp_path, 300)), cache_dir=str(tmp_path / "c"), num_proc=1)
    ctx = mp.get_context("fork")
    barrier, q = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_prepare_in_child, args=(cfg, tiny_tokenizer, barrier, q)) for _ in range(2)]
    for p in procs:
        p.start()
    got = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    [entry] = _published(tmp_path / "c")
    assert got[0] == got[1] and got[0][0] == str(entry) and not _temps(tmp_path / "c")
    _same_as_in_memory(tk.load_or_tokenize(cfg, tiny_tokenizer, build=False), cfg, tiny_tokenizer)


def test_second_publisher_of_a_key_discards_its_copy(tmp_path: Path, tiny_tokenizer) -> None:
    """The rename race itself, made certain: two complete temp dirs of one key; the first publishes, the second
    finds the name taken and removes its copy; the published cache is intact."""
    cfg = DataSection(path=str(_data(tmp_path, 40)), cache_dir=str(tmp_path / "c"))
    chunk = tk._ChunkTokenizer(tiny_tokenizer, cfg)(load_records(cfg).examples)
    root = tmp_path / "c" / "tokenized"
    writers = [tc.CacheWriter(root, "k" * 32, len(tiny_tokenizer)) for _ in range(2)]
    for w in writers:
        w(chunk)
    assert writers[0].commit({"sources": ["a"]}) is True
    assert writers[1].commit({"sources": ["b"]}) is False
    assert not writers[1].tmp.exists() and [d.name for d in root.iterdir()] == ["k" * 32]
    data, meta = tc.open_cache(root / ("k" * 32))
    assert meta["sources"] == ["a"] and np.array_equal(np.asarray(data.ids), chunk.ids)


def _slow_writer(cfg: DataSection, tok, lock: bool = False) -> None:
    tk.CHUNK_RECORDS = 20
    write = tc.CacheWriter.__call__

    def slowly(self, c):
        write(self, c)
        self._ids.flush()
        time.sleep(0.5)

    tc.CacheWriter.__call__ = slowly
    tk.load_or_tokenize(cfg, tok, build=True, lock=lock)


def test_killed_preparer_leaves_nothing_that_is_read(tmp_path: Path, tiny_tokenizer) -> None:
    cfg = DataSection(path=str(_data(tmp_path, 200)), cache_dir=str(tmp_path / "c"), num_proc=1)
    cache = tmp_path / "c"
    p = mp.get_context("fork").Process(target=_slow_writer, args=(cfg, tiny_tokenizer))
    p.start()
    deadline = time.time() + 60
    while time.time() < deadline and not any((t / "tokens.bin").exists() and (t / "tokens.bin").stat().st_size
                                             for t in (_temps(cache) if (cache / "tokenized").exists() else [])):
        time.sleep(0.02)
    os.kill(p.pid, signal.SIGKILL)  # mid-write: some chunks on disk, no manifest, not renamed
    p.join()
    [half] = _temps(cache)
    assert not (half / tc.MANIFEST).exists() and not _published(cache)
    with pytest.raises(UsageError, match="no prepared token cache"):
        tk.load_or_tokenize(cfg, tiny_tokenizer, build=False)
    # The next preparer writes its own copy beside the dead one's and publishes it.
    data = tk.load_or_tokenize(cfg, tiny_tokenizer, build=True)
    _same_as_in_memory(data, cfg, tiny_tokenizer)
    assert _temps(cache) == [half]
    # A day later the dead writer's dir is swept; the published cache stays.
    assert tc.sweep_stale(cache / "tokenized", now=time.time() + tc.STALE_TMP_S + 60) == [half]
    assert not _temps(cache) and len(_published(cache)) == 1


@pytest.mark.slow  # forked tokenizer workers and a kill: a few seconds
def test_a_killed_builders_workers_die_with_it_and_free_the_lock(tmp_path: Path, tiny_tokenizer) -> None:
    """A builder SIGKILLed mid-build (the OOM killer, a launcher ending a rank) left its forked tokenizer workers
    blocked for ever, holding the flock the fork gave them: every later build on the node waited without a word.
    They now die with it, and the next builder takes the lock and publishes."""
    import fcntl

    cfg = DataSection(path=str(_data(tmp_path, 400)), cache_dir=str(tmp_path / "c"), num_proc=2)
    cache = tmp_path / "c"
    p = mp.get_context("fork").Process(target=_slow_writer, args=(cfg, tiny_tokenizer, True))
    p.start()
    kids: list[int] = []
    deadline = time.time() + 60
    while time.time() < deadline:
        kids = [int(k) for k in Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()]
        if len(kids) >= 2 and any((t / "tokens.bin").exists() and (t / "tokens.bin").stat().st_size
                                  for t in (_temps(cache) if (cache / "tokenized").exists() else [])):
            break
        time.sleep(0.02)
    assert len(kids) >= 2, kids
    os.kill(p.pid, signal.SIGKILL)
    p.join()

    def alive(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
        except (FileNotFoundError, IndexError):
            return False

    deadline = time.time() + 10
    while any(map(alive, kids)) and time.time() < deadline:
        time.sleep(0.05)
    orphans = [k for k in kids if alive(k)]
    for k in orphans:  # never left behind holding the lock and the test run's pipes
        os.kill(k, signal.SIGKILL)
    assert not orphans, orphans
    [lock] = (cache / "tokenized").glob("*.lock")
    with open(lock, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises BlockingIOError while an orphan holds it
    _same_as_in_memory(tk.load_or_tokenize(cfg, tiny_tokenizer, build=True), cfg, tiny_tokenizer)


def test_damaged_cache_is_refused_by_name(tmp_path: Path, tiny_tokenizer) -> None:
    cfg = DataSection(path=str(_data(tmp_path, 30)), cache_dir=str(tmp_path / "c"))
    d = Path(tk.load_or_tokenize(cfg, tiny_tokenizer).cache_file)
    with open(d / "tokens.bin", "r+b") as fh:
        fh.truncate(10)
    with pytest.raises(UsageError, match=r"token cache is incomplete or corrupt \(tokens.bin has 10 bytes"):
        tk.load_or_tokenize(cfg, tiny_tokenizer)


def test_stream_reads_jsonl_without_holding_it(tmp_path: Path, tiny_tokenizer) -> None:
    """The records reach the tokenizer chunk by chunk: the reader is never more than the in-flight chunks ahead
    of what has been written."""
    from ia3_dist.data.records import RecordStream

    cfg = DataSection(path=str(_data(tmp_path, 250)), num_proc=1)
    stream = RecordStream(cfg)
    ahead = []

    def sink(c: tk.Chunk) -> None:
        ahead.append(stream.count - sum(x for x in written) - c.n_records)
        written.append(c.n_records)

    written: list[int] = []
    assert tk.tokenize_stream(stream, tiny_tokenizer, cfg, sink, chunk=50) == 250
    assert written == [50] * 5 and max(ahead) <= 50


def _synthetic(path: Path, n: int) -> Path:
    """``n`` distinct records: the shared records with a numbered suffix (a temp file, never committed)."""
    base = json.loads((ROOT.parent / "shared" / "data" / "alpaca_zh_demo.json").read_text(encoding="utf-8"))
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            r = base[i % len(base)]
            fh.write(json.dumps({**r, "instruction": f"{r['instruction']} #{i}", "output": f"{r['output']} ({i})"},
                                ensure_ascii=False) + "\n")
    return path


@pytest.mark.slow
def test_rank_memory_does_not_grow_with_the_dataset(tmp_path: Path, tiny_model: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    """Two ranks' preflight and 40 steps of micro-batches from a prepared cache of 10,000 records, against 1,000:
    the peak RSS per rank grows by the per-example arrays only (the in-memory path before the token cache grew
    ~0.15 GiB here). Then a real 2-rank training run on the prepared cache with data.require_prepared=true says
    it read the cache and does not tokenize."""
    import subprocess
    import sys

    small = _synthetic(tmp_path / "small.jsonl", 1000)
    big = _synthetic(tmp_path / "big.jsonl", 10_000)
    cache = tmp_path / "cache"
    common = ["--config", TINY, f"model.path={tiny_model}", f"data.cache_dir={cache}", "data.require_prepared=true",
              "data.group_by_length=true"]
    for f in (small, big):
        assert main(["prepare", *common, f"data.path={f}"]) == 0
    capsys.readouterr()
    peaks = {}
    for f in (small, big):
        procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "probe_data_rss.py"), *common,
                                   f"data.path={f}", f"output.dir={tmp_path / 'o'}"], cwd=ROOT,
                                  env={**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                       "LOCAL_WORLD_SIZE": "2"}, stdout=subprocess.PIPE, text=True)
                 for r in range(2)]
        outs = [json.loads(p.communicate(timeout=300)[0].strip().splitlines()[-1]) for p in procs]
        assert all(p.returncode == 0 for p in procs)
        assert all(o["from_cache"] and o["examples"] > 0 and o["tokens"] > 0 for o in outs)
        peaks[f.name] = max(o["peak_rss_mib"] for o in outs)
    growth = peaks["big.jsonl"] - peaks["small.jsonl"]
    assert growth < 40, peaks  # MiB for 9,000 more records

    out = tmp_path / "run"
    r = check(launch([*common, f"data.path={big}", f"output.dir={out}", "train.max_steps=2",
                      "checkpoint.at_end=false"], nproc=2))
    assert f"from cache {cache / 'tokenized'}" in r.stdout, r.stdout
    assert "tokenizing" not in r.stderr and "tokenized in" not in r.stdout


def _dies_on_marked_chunk(convs):
    if convs[0].turns[0].instruction == "DIE":
        os._exit(3)
    return tk._WORKER["run"](convs)


def _stalls_on_marked_chunk(convs):
    if convs[0].turns[0].instruction == "DIE":
        time.sleep(600)
    return tk._WORKER["run"](convs)


class _Slowly(list):
    """Records read with a pause before record ``at``: reading a real file takes the main process time, during
    which a worker's death is noticed at the next submit, not at a result."""

    def __init__(self, items, at: int) -> None:
        super().__init__(items)
        self.at = at

    def __iter__(self):
        for i, c in enumerate(super().__iter__()):
            if i == self.at:
                time.sleep(1)
            yield c


@pytest.mark.slow  # worker processes and a stall timeout: seconds, not the unit tier's milliseconds
@pytest.mark.parametrize("task,word,pause", [(_dies_on_marked_chunk, "died", None),
                                             (_dies_on_marked_chunk, "died", 40),
                                             (_stalls_on_marked_chunk, "stalled", None)],
                         ids=["died", "died-before-a-submit", "stalled"])
def test_a_lost_tokenizer_worker_does_not_hang_the_job(tmp_path: Path, tiny_tokenizer, monkeypatch, capsys,
                                                       task, word, pause) -> None:
    """A forked worker that dies (or hangs on a lock inherited at the fork) once left ``Pool`` waiting for ever on
    its task: now the rest is tokenized in this process, with a warning, and the tokens are unchanged (also when
    the death is noticed at a submit: that chunk was once lost)."""
    recs = make_records(60, seed=11, style=None)
    recs[20]["instruction"] = "DIE"  # the first record of the third chunk of 10
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    one = DataSection(path=str(f), num_proc=1)
    ref = tk.tokenize(load_records(one), tiny_tokenizer, one, chunk=10)
    monkeypatch.setattr(tk, "_worker_task", task)  # forked workers inherit the patched module
    monkeypatch.setattr(tk, "_WORKER_STALL_S", 5.0)
    two = DataSection(path=str(f), num_proc=2)
    t0 = time.monotonic()
    records = load_records(two)
    if pause is not None:
        records = dataclasses.replace(records, examples=_Slowly(records.examples, pause))
    got = tk.tokenize(records, tiny_tokenizer, two, chunk=10)
    assert time.monotonic() - t0 < 60
    assert f"a tokenizer worker {word}" in capsys.readouterr().err
    assert np.array_equal(got.ids, ref.ids) and np.array_equal(got.label_mask, ref.label_mask)
    assert got.offsets.tolist() == ref.offsets.tolist()


def test_a_data_file_written_while_it_is_tokenized_is_not_cached(tmp_path: Path, tiny_tokenizer,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache entry is named by the file's content when it was hashed: a file appended to while it is
    tokenized (a job still writing it) would put records the key never saw under it. Refused naming the file,
    nothing published; once the file is written, the next run caches all of it."""
    f = _data(tmp_path, 60)
    cfg = DataSection(path=str(f), cache_dir=str(tmp_path / "c"), num_proc=1)
    tokenize_stream = tk.tokenize_stream

    def appended_meanwhile(*a: object, **k: object) -> int:
        n = tokenize_stream(*a, **k)
        with open(f, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(make_records(1, seed=5, style=None)[0], ensure_ascii=False) + "\n")
        return n

    monkeypatch.setattr(tk, "tokenize_stream", appended_meanwhile)
    with pytest.raises(UsageError, match=f"{f}: changed while it was tokenized"):
        tk.load_or_tokenize(cfg, tiny_tokenizer)
    assert _published(tmp_path / "c") == [] and not _temps(tmp_path / "c")
    monkeypatch.undo()
    data = tk.load_or_tokenize(cfg, tiny_tokenizer)
    assert len(data) + len(data.dropped) == 61
