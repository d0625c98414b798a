"""Preprocessing equals the reference recipe's function; truncation, masking, dropping; cache; sharding; padding."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from reference_recipe import process_func  # noqa: E402

from ia3_dist.config import DataSection
from ia3_dist.data.collate import collate
from ia3_dist.data.records import load_records
from ia3_dist.data.sampler import Layout, iter_steps, plan_epoch, rank_slice, steps_per_epoch
from ia3_dist.data.tokenize import load_or_tokenize
from ia3_dist.train.demo import make_records


def reference_process_func(example: dict, tokenizer, max_length: int = 256) -> dict:
    """The reference recipe's preprocessing, verbatim apart from the max-length parameter (one copy, in bench/)."""
    return process_func(example, tokenizer, max_length)


def _edge_records() -> list[dict]:
    recs = make_records(150, seed=7, style=None)
    recs += [
        {"instruction": "  空白指令  ", "input": "", "output": "好。"},
        {"instruction": "翻译", "input": "  hello world \n", "output": ""},
        {"instruction": "长" * 400, "input": "", "output": "短"},            # prompt alone exceeds max_length
        {"instruction": "问", "input": "", "output": "答" * 600},            # response truncated
        {"instruction": "emoji 😀", "input": "x\ty", "output": "混合 mixed 文本"},
    ]
    return recs


def _check_identical(path: Path, tok, max_length: int, cache: Path, unlabeled: str = "drop") -> tuple[int, int]:
    cfg = DataSection(path=str(path), max_length=max_length, cache_dir=str(cache), unlabeled=unlabeled)
    data = load_or_tokenize(cfg, tok)
    recs = json.loads(path.read_text(encoding="utf-8"))
    dropped = set(data.dropped.tolist())
    j = 0
    for i, r in enumerate(recs):
        ref = reference_process_func(r, tok, max_length)
        if i in dropped:
            assert all(v == -100 for v in ref["labels"][1:]), i
            continue
        ids, mask, labels = data.example(j)
        assert ids == ref["input_ids"] and mask == ref["attention_mask"] and labels == ref["labels"], i
        j += 1
    assert j == len(data) and data.n_records == len(recs)
    return len(dropped), data.truncated


def test_unlabeled_keep_is_the_reference_for_every_record(tmp_path: Path, tiny_tokenizer) -> None:
    """data.unlabeled=keep: every record, including those whose prompt alone fills max_length, is exactly the
    reference recipe's example; drop removes exactly those and counts them."""
    f = tmp_path / "d.json"
    f.write_text(json.dumps(_edge_records(), ensure_ascii=False), encoding="utf-8")
    assert _check_identical(f, tiny_tokenizer, 24, tmp_path, unlabeled="keep")[0] == 0
    kept = load_or_tokenize(DataSection(path=str(f), max_length=24, cache_dir=str(tmp_path), unlabeled="keep"),
                            tiny_tokenizer)
    dropped = load_or_tokenize(DataSection(path=str(f), max_length=24, cache_dir=str(tmp_path)), tiny_tokenizer)
    assert kept.unlabeled == dropped.unlabeled == len(dropped.dropped) > 0
    assert len(kept) == len(dropped) + len(dropped.dropped) == len(_edge_records())


def test_preprocessing_identical_on_generated_data(tmp_path: Path, tiny_tokenizer) -> None:
    f = tmp_path / "gen.json"
    f.write_text(json.dumps(_edge_records(), ensure_ascii=False), encoding="utf-8")
    dropped, truncated = _check_identical(f, tiny_tokenizer, 256, tmp_path)
    assert dropped == 1 and truncated == 2
    dropped, truncated = _check_identical(f, tiny_tokenizer, 24, tmp_path)
    assert dropped > 1 and truncated > 2


@pytest.mark.parametrize("max_length", [256, pytest.param(64, marks=pytest.mark.slow)])
def test_preprocessing_identical_on_shared_alpaca(shared_data: Path, tiny_tokenizer, tmp_path: Path,
                                                  max_length: int) -> None:
    dropped, truncated = _check_identical(shared_data, tiny_tokenizer, max_length, tmp_path)
    assert truncated > 0
    if max_length == 64:
        assert dropped > 0


def test_dropped_records_are_counted_and_logged(tmp_path: Path, tiny_tokenizer) -> None:
    recs = [{"instruction": "长" * 300, "input": "", "output": "短"}] + make_records(5, 1, 0)
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in recs), encoding="utf-8")
    data = load_or_tokenize(DataSection(path=str(f), cache_dir=str(tmp_path)), tiny_tokenizer)
    assert data.dropped.tolist() == [0] and len(data) == 5
    # Held-out data split off: the preflight's report still tells what was read, dropped and truncated.
    from ia3_dist.config import RunConfig
    from ia3_dist.data.report import data_lines
    from ia3_dist.data.sampler import split_eval

    train, held = split_eval(data, 0.2, 0)
    assert len(train) == 4 and len(held) == 1
    report = "\n".join(data_lines(train, RunConfig(data=DataSection(path=str(f)))))
    assert "data: 6 records read" in report and "4 examples; 1 dropped" in report, report
    assert f"data.unlabeled=drop), first: {f}:1\n" in report, report


def test_the_report_names_dropped_records_where_they_were_read(tmp_path: Path, tiny_tokenizer) -> None:
    """A dropped record is named by its file and line, also after a bad line skipped before it and through the
    token cache (its index among the records read was 1: no line of the file)."""
    from ia3_dist.config import RunConfig
    from ia3_dist.data.report import data_lines

    f = tmp_path / "d.jsonl"
    long = json.dumps({"instruction": "长" * 300, "output": "x"}, ensure_ascii=False)
    f.write_text("{bad\n" + json.dumps({"instruction": "hi", "output": "ok"}) + "\n" + long + "\n",
                 encoding="utf-8")
    cfg = DataSection(path=str(f), on_bad_record="skip", cache_dir=str(tmp_path / "cache"))
    for _ in range(2):  # tokenized, then read back from the cache
        report = "\n".join(data_lines(load_or_tokenize(cfg, tiny_tokenizer), RunConfig(data=cfg)))
        assert f"1 examples; 1 dropped (no label token after truncation, data.unlabeled=drop), first: {f}:3\n" \
            in report, report
    # Several from one file: the file said once.
    f.write_text(f.read_text(encoding="utf-8") + long + "\n", encoding="utf-8")
    report = "\n".join(data_lines(load_or_tokenize(cfg, tiny_tokenizer), RunConfig(data=cfg)))
    assert f"2 dropped (no label token after truncation, data.unlabeled=drop), first, in {f}: line 3, line 4\n" \
        in report, report
    # The same content under another name, served from the cache its first name filled: this file is named.
    g = tmp_path / "elsewhere" / "copy.jsonl"
    g.parent.mkdir()
    g.write_bytes(f.read_bytes())
    other = DataSection(path=str(g), on_bad_record="skip", cache_dir=str(tmp_path / "cache"))
    report = "\n".join(data_lines(load_or_tokenize(other, tiny_tokenizer), RunConfig(data=other)))
    assert f"first, in {g}: line 3, line 4\n" in report and str(f) not in report, report


def test_records_weighed_out_are_told_apart_from_truncation(tmp_path: Path, tiny_tokenizer) -> None:
    """A record whose answers to train on all have ``"weight": 0`` (or, with data.train_on=last, its last) has no
    label token whatever data.max_length is: the report and the refusal say so, through the token cache too,
    instead of blaming truncation or the template."""
    from ia3_dist.config import RunConfig
    from ia3_dist.data.report import data_lines
    from ia3_dist.errors import UsageError

    def conv(w: int) -> dict:
        return {"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                             {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2", "weight": w}]}
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps(conv(1)) + "\n" + json.dumps(conv(0)) + "\n", encoding="utf-8")
    cfg = DataSection(path=str(f), train_on="last", cache_dir=str(tmp_path / "cache"))
    for _ in range(2):  # tokenized, then read back from the cache
        data = load_or_tokenize(cfg, tiny_tokenizer)
        assert (len(data), data.answerless, data.truncated) == (1, 1, 0)
        report = "\n".join(data_lines(data, RunConfig(data=cfg)))
        assert (f"1 dropped (no label token after truncation, data.unlabeled=drop; 1 of them weight 0 on every answer "
                f"to train on, data.train_on=last), first: {f}:2\n") in report, report
    assert load_or_tokenize(DataSection(path=str(f), cache_dir=str(tmp_path / "cache")), tiny_tokenizer).answerless \
        == 0  # train_on=all: the first answer of the second record trains
    f.write_text(json.dumps(conv(0)) + "\n", encoding="utf-8")
    with pytest.raises(UsageError, match=r"no record has an answer token to train on: 1 record\(s\) give the last "
                                         r"answer \"weight\": 0 \(data.train_on=last\), the others label nothing; "
                                         r"give an answer weight 1 or set data.train_on=all"):
        load_or_tokenize(cfg, tiny_tokenizer)


def test_save_to_disk_dir_matches_json(tmp_path: Path, tiny_tokenizer) -> None:
    import datasets

    recs = make_records(40, seed=3, style=None)
    (tmp_path / "a.json").write_text(json.dumps(recs, ensure_ascii=False), encoding="utf-8")
    datasets.Dataset.from_list(recs).save_to_disk(str(tmp_path / "alpaca_data_zh"))
    a = load_or_tokenize(DataSection(path=str(tmp_path / "a.json"), cache_dir=str(tmp_path)), tiny_tokenizer)
    b = load_or_tokenize(DataSection(path=str(tmp_path / "alpaca_data_zh"), cache_dir=str(tmp_path)),
                         tiny_tokenizer)
    assert np.array_equal(a.ids, b.ids) and np.array_equal(a.label_mask, b.label_mask)


def _entries(cache: Path) -> list[Path]:
    """The published token caches (temp dirs of writers start with a dot)."""
    return [d for d in (cache / "tokenized").iterdir() if d.is_dir() and not d.name.startswith(".")]


def test_cache_reuse_and_invalidation(tmp_path: Path, tiny_tokenizer) -> None:
    f = tmp_path / "c.json"
    recs = make_records(30, seed=4, style=None)
    f.write_text(json.dumps(recs, ensure_ascii=False), encoding="utf-8")
    cfg = DataSection(path=str(f), cache_dir=str(tmp_path / "cache"))
    first = load_or_tokenize(cfg, tiny_tokenizer)
    assert first.seconds > 0
    again = load_or_tokenize(cfg, tiny_tokenizer)
    assert again.seconds == 0 and again.cache_file == first.cache_file
    assert np.array_equal(again.ids, first.ids)
    assert len(_entries(tmp_path / "cache")) == 1
    # Content change (same path, same size class) -> new entry.
    recs[0]["output"] += "改"
    f.write_text(json.dumps(recs, ensure_ascii=False), encoding="utf-8")
    changed = load_or_tokenize(cfg, tiny_tokenizer)
    assert changed.seconds > 0 and changed.cache_file != first.cache_file
    # Template and max length are part of the key too.
    for other in (DataSection(path=str(f), cache_dir=cfg.cache_dir, max_length=32),
                  DataSection(path=str(f), cache_dir=cfg.cache_dir, response_prefix="\n\nAI: ")):
        assert load_or_tokenize(other, tiny_tokenizer).cache_file not in (first.cache_file, changed.cache_file)
    assert len(_entries(tmp_path / "cache")) == 4


def test_cache_invalidated_by_tokenizer_change(tmp_path: Path, tiny_tokenizer) -> None:
    import copy

    f = tmp_path / "t.json"
    f.write_text(json.dumps(make_records(10, 5, 0), ensure_ascii=False), encoding="utf-8")
    cfg = DataSection(path=str(f), cache_dir=str(tmp_path))
    a = load_or_tokenize(cfg, tiny_tokenizer)
    tok2 = copy.deepcopy(tiny_tokenizer)
    tok2.add_tokens(["新词"])
    assert load_or_tokenize(cfg, tok2).cache_file != a.cache_file


def test_a_pad_token_set_for_batching_is_not_written(tmp_path: Path, tiny_model: Path) -> None:
    """A tokenizer without a pad token batches with its eos as pad, but the adapter's (and an export's) copy is
    written as it was read: shipped with pad = eos, collators that mask pad labels would mask the eos too."""
    from transformers import AutoTokenizer

    from ia3_dist.config.schema import ModelSection
    from ia3_dist.models.load import load_tokenizer, save_tokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    save_tokenizer(tok, tmp_path / "own")  # a pad of its own is kept
    assert AutoTokenizer.from_pretrained(str(tmp_path / "own")).pad_token == tok.pad_token is not None
    tok.pad_token = None
    tok.save_pretrained(str(tmp_path / "nopad"))
    loaded = load_tokenizer(ModelSection(), str(tmp_path / "nopad"))
    assert loaded.pad_token == loaded.eos_token
    save_tokenizer(loaded, tmp_path / "out")
    assert AutoTokenizer.from_pretrained(str(tmp_path / "out")).pad_token is None
    assert loaded.pad_token == loaded.eos_token  # still batching


def test_split_special_tokens_is_refused_for_training_and_keyed(tmp_path: Path, tiny_model: Path) -> None:
    """A tokenizer that splits special-token text would split the eos every training example ends with: training
    refuses it naming the setting. The ids and the cache key still follow the setting (the fast encoder once lost
    it in a copy of the backend)."""
    from transformers import AutoTokenizer

    from ia3_dist.config.schema import ModelSection
    from ia3_dist.data.tokenize import _encoder, tokenizer_fingerprint
    from ia3_dist.errors import UsageError
    from ia3_dist.models.load import load_tokenizer

    plain, split = (AutoTokenizer.from_pretrained(str(tiny_model), split_special_tokens=flag)
                   for flag in (False, True))
    texts = ["hi" + plain.eos_token + "ok", "ok"]
    assert _encoder(split)(texts) == split(texts).input_ids != plain(texts).input_ids
    assert tokenizer_fingerprint(split) != tokenizer_fingerprint(plain)
    d = tmp_path / "tok"
    split.save_pretrained(str(d))
    with pytest.raises(UsageError, match="split_special_tokens is true in its tokenizer_config.json"):
        load_tokenizer(ModelSection(), str(d))


def test_a_slow_tokenizer_is_keyed_by_its_settings_not_where_it_was_loaded_from() -> None:
    """A tokenizer without a fast backend is keyed by its init settings: loaded by hub name (`ia3-dist prepare`)
    or from that snapshot's dir (a training rank, transformers then records is_local), the same cache."""
    from types import SimpleNamespace

    from ia3_dist.data.tokenize import tokenizer_fingerprint

    def slow(**kw: object) -> SimpleNamespace:
        return SimpleNamespace(get_vocab=lambda: {"a": 0, "b": 1}, eos_token="</s>", pad_token=None, bos_token=None,
                               init_kwargs={"add_bos_token": True, "vocab_file": "/x/spiece.model", **kw})

    by_name = tokenizer_fingerprint(slow(name_or_path="org/m", is_local=False))
    assert tokenizer_fingerprint(slow(name_or_path="/hub/snapshots/c0ffee", is_local=True,
                                      local_files_only=True, _commit_hash="c0ffee")) == by_name
    assert tokenizer_fingerprint(slow(name_or_path="org/m", is_local=False, add_bos_token=False)) != by_name


def test_a_slow_tokenizer_is_keyed_by_its_model_files_content(tmp_path: Path) -> None:
    """get_vocab() leaves out SentencePiece scores and BPE merges: a tokenizer.model with the same pieces and other
    scores tokenizes otherwise, so its bytes are keyed, wherever the file lies."""
    from types import SimpleNamespace

    from ia3_dist.data.tokenize import tokenizer_fingerprint

    def slow(f: Path) -> SimpleNamespace:
        return SimpleNamespace(get_vocab=lambda: {"a": 0}, eos_token="</s>", pad_token=None, bos_token=None,
                               init_kwargs={"vocab_file": str(f), "name_or_path": str(f.parent)})

    a, b, c = (tmp_path / n / "tokenizer.model" for n in "abc")
    for f, body in ((a, b"scores 1"), (b, b"scores 1"), (c, b"scores 2")):
        f.parent.mkdir()
        f.write_bytes(body)
    assert tokenizer_fingerprint(slow(a)) == tokenizer_fingerprint(slow(b)) != tokenizer_fingerprint(slow(c))
    os.mkfifo(tmp_path / "fifo")  # never opened for reading (it would block): keyed as no file
    assert tokenizer_fingerprint(slow(tmp_path / "fifo")) == tokenizer_fingerprint(slow(tmp_path / "none"))


def test_every_special_token_is_keyed(tmp_path: Path, tiny_model: Path) -> None:
    """A chat template may render any special token by name ({{ sep_token }}), which tokenizer.json does not
    record: another sep_token is another tokenizer for the cache."""
    from transformers import AutoTokenizer

    from ia3_dist.data.tokenize import tokenizer_fingerprint

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    other = AutoTokenizer.from_pretrained(str(tiny_model), sep_token=tok.eos_token)
    assert other.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tok)


def test_a_tokenizer_keeps_its_key_after_it_encodes(tiny_model: Path) -> None:
    """tok(..., padding=True) or truncation=True leave those settings on the Rust backend, and a tokenizer.json may
    ship a truncation block that the next plain call clears: neither changes the tokens the cache holds (they are
    encoded with both off), so neither may change its key (a prepared cache would be missed by the job)."""
    from transformers import AutoTokenizer

    from ia3_dist.data.tokenize import tokenizer_fingerprint

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    before = tokenizer_fingerprint(tok)
    tok(["a", "bb cc d e"], padding=True, truncation=True, max_length=2)
    assert tok.backend_tokenizer.truncation is not None and tok.backend_tokenizer.padding is not None
    assert tokenizer_fingerprint(tok) == before


def _lengths(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(8, 257, size=n)


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("micro, accum", [(1, 8), (2, 3), (4, 1)])
def test_sharding_disjoint_complete_reshuffled(world: int, micro: int, accum: int, grouped: bool) -> None:
    n = 53
    lengths = _lengths(n)
    lay = Layout(micro, accum, world, seed=3, shuffle=True, group_by_length=grouped, group_steps=2)
    spe = steps_per_epoch(n, lay.global_batch)
    orders = []
    for epoch in range(2):
        seen: list[int] = []
        per_rank: list[set[int]] = [set() for _ in range(world)]
        for _, ep, step in iter_steps(lengths, lay, total_steps=(epoch + 1) * spe, start_step=epoch * spe):
            assert ep == epoch and len(step) == world * accum
            for r in range(world):
                mbs = rank_slice(step, r, accum)
                assert len(mbs) == accum and all(len(m) <= micro for m in mbs)
                for m in mbs:
                    per_rank[r].update(m)
                    seen += m
        assert sorted(seen) == list(range(n))                       # complete, each example once
        assert sum(len(s) for s in per_rank) == n                   # disjoint across ranks
        orders.append(seen)
    assert orders[0] != orders[1]                                   # new order each epoch
    again = [mb for _, _, st in iter_steps(lengths, lay, total_steps=spe) for mb in st]
    assert sum(again, []) == orders[0]                              # reproducible from the seed
    other = Layout(micro, accum, world, seed=4, shuffle=True, group_by_length=grouped, group_steps=2)
    assert sum([mb for _, _, st in iter_steps(lengths, other, total_steps=spe) for mb in st], []) != orders[0]


@pytest.mark.parametrize("n, lay", [
    (21, Layout(2, 1, 2, seed=0, shuffle=True, group_by_length=True)),  # the short step mid-epoch: [4,4,4,1,4,4]
    (53, Layout(2, 3, 2, seed=3, shuffle=True, group_by_length=True, group_steps=2)),
    (53, Layout(4, 1, 3, seed=1, shuffle=False, group_by_length=False)),
    (7, Layout(1, 1, 3, seed=5, shuffle=True, group_by_length=True, group_steps=1)),
])
def test_examples_consumed_is_exact_where_grouping_moves_the_short_step(n: int, lay: Layout) -> None:
    """The checkpoint's examples_consumed counts what the plan trained, wherever the epoch's short step sits."""
    from ia3_dist.data.sampler import examples_consumed

    lengths = _lengths(n)
    spe = steps_per_epoch(n, lay.global_batch)
    done = 0
    for step, _, micro_batches in iter_steps(lengths, lay, total_steps=2 * spe):
        assert examples_consumed(step, n, lay) == done, step
        done += sum(len(mb) for mb in micro_batches)
    assert examples_consumed(2 * spe, n, lay) == done == 2 * n


def test_the_logged_epoch_is_hf_trainers() -> None:
    """HF Trainer logs ``epoch + micro-batches done / micro-batches per epoch``: with an epoch's last step short
    (674 examples in steps of 8), a fraction of examples, not of steps; 1.0 at the epoch's end, 2.0 at the second's."""
    import math

    from ia3_dist.data.sampler import epochs_done

    def hf(steps: int, n: int, micro: int, accum: int, world: int) -> float:
        """transformers' Trainer: ``epoch + (step + 1) / len(dataloader)`` at each optimizer step, over one rank's
        dataloader (DistributedSampler pads each rank to ceil(n / world) examples, drop_last off)."""
        per_rank = math.ceil(math.ceil(n / world) / micro)
        done, epoch = 0, 0.0
        for _ in range(steps):
            done += accum
            if done >= per_rank:
                done, epoch = 0, epoch + 1.0
        return epoch + done / per_rank

    for micro, accum, world, n in ((1, 8, 1, 674), (4, 2, 1, 674), (2, 2, 2, 101), (3, 1, 2, 10)):
        lay = Layout(micro, accum, world, seed=0, shuffle=True, group_by_length=False)
        steps = 3 * math.ceil(n / (micro * accum * world))
        got = [epochs_done(k, n, lay) for k in range(steps + 1)]
        assert got == pytest.approx([hf(k, n, micro, accum, world) for k in range(steps + 1)]), (micro, accum, world)
    lay = Layout(1, 8, 1, seed=0, shuffle=True, group_by_length=False)
    assert epochs_done(10, 674, lay) == pytest.approx(80 / 674) and epochs_done(85, 674, lay) == 1.0


def test_sequential_order_and_resume_position() -> None:
    lay = Layout(1, 2, 2, seed=0, shuffle=False, group_by_length=False)
    steps = list(iter_steps(np.ones(10, dtype=int), lay, total_steps=6))
    flat = [sum(st, []) for _, _, st in steps[:3]]
    assert [sorted(f) for f in flat] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [s[1] for s in steps] == [0, 0, 0, 1, 1, 1]
    assert list(iter_steps(np.ones(10, dtype=int), lay, total_steps=6, start_step=4)) == steps[4:]


def _efficiency(lengths: np.ndarray, lay: Layout) -> float:
    from ia3_dist.train.report import padding_efficiency

    return padding_efficiency(lengths, lay)


def test_length_grouping_cuts_padding() -> None:
    lengths = _lengths(4000, seed=1)
    plain = Layout(8, 1, 1, seed=0, shuffle=True, group_by_length=False)
    grouped = Layout(8, 1, 1, seed=0, shuffle=True, group_by_length=True)
    assert _efficiency(lengths, plain) < 0.75
    assert _efficiency(lengths, grouped) > 0.97


@pytest.mark.parametrize("world, accum", [(2, 1), (2, 2), (4, 2)])
def test_length_grouping_balances_ranks(world: int, accum: int) -> None:
    """Ranks of one step get about the same padded tokens, so none waits long for another at the all-reduce.
    Utilisation = mean rank work / busiest rank work, summed over the epoch; dealing the sorted micro-batches
    out at random (the first version) gave 71-81% here."""
    lengths = _lengths(4000, seed=3)
    lay = Layout(4, accum, world, seed=0, shuffle=True, group_by_length=True)
    busiest = mean = 0.0
    for step in plan_epoch(lengths, lay, 0):
        work = [sum(int(lengths[mb].max()) * len(mb) for mb in rank_slice(step, r, accum) if mb)
                for r in range(world)]
        busiest += max(work)
        mean += sum(work) / world
    assert mean / busiest > 0.98, mean / busiest


def test_length_grouping_on_shared_alpaca(shared_data: Path, tiny_tokenizer, tmp_path: Path) -> None:
    data = load_or_tokenize(DataSection(path=str(shared_data), cache_dir=str(tmp_path)), tiny_tokenizer)
    for world in (1, 2):
        lay = Layout(8, 1, world, seed=0, shuffle=True, group_by_length=True)
        assert _efficiency(data.lengths, lay) >= 0.97


@pytest.mark.parametrize("side", ["left", "right"])
def test_collate_matches_datacollator_for_seq2seq(tmp_path: Path, tiny_tokenizer, side: str) -> None:
    from transformers import DataCollatorForSeq2Seq

    f = tmp_path / "p.json"
    f.write_text(json.dumps(make_records(12, 6, None), ensure_ascii=False), encoding="utf-8")
    data = load_or_tokenize(DataSection(path=str(f), cache_dir=str(tmp_path)), tiny_tokenizer)
    tiny_tokenizer.padding_side = side
    try:
        ref = DataCollatorForSeq2Seq(tiny_tokenizer, padding=True)([dict(zip(
            ("input_ids", "attention_mask", "labels"), data.example(i))) for i in (0, 3, 7)])
        mine = collate(data, [0, 3, 7], tiny_tokenizer.pad_token_id, side)
    finally:
        tiny_tokenizer.padding_side = "left"
    for k in ("input_ids", "attention_mask", "labels"):
        assert mine[k].tolist() == ref[k].tolist(), k


def test_records_reader_accepts_missing_input(tmp_path: Path) -> None:
    f = tmp_path / "r.jsonl"
    f.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "input": null, "output": "d"}\n')
    r = load_records(DataSection(path=str(f)))
    assert [(t.input, t.output) for c in r.examples for t in c.turns] == [("", "b"), ("", "d")]


@pytest.mark.slow  # a process pool: seconds on a busy 2-core box
def test_multi_process_tokenization_equals_one_process(shared_data: Path, tiny_tokenizer, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """data.num_proc=2 with a small chunk (the default 4,000 distinct texts never split the test data): the
    worker pool really starts (each worker records its pid) and gives the same ids, masks and offsets as one
    process."""
    from ia3_dist.data import tokenize as tokmod

    pids = tmp_path / "pids"
    pids.mkdir()
    init = tokmod._worker_init

    def recording_init(*a) -> None:  # runs in each forked worker
        (pids / str(os.getpid())).touch()
        init(*a)

    monkeypatch.setattr(tokmod, "_worker_init", recording_init)
    cfg = DataSection(path=str(shared_data), limit=300)
    records = load_records(cfg)
    one = tokmod.tokenize(records, tiny_tokenizer, replace(cfg, num_proc=1), chunk=40)
    assert not any(pids.iterdir())
    two = tokmod.tokenize(records, tiny_tokenizer, replace(cfg, num_proc=2), chunk=40)
    workers = {int(p.name) for p in pids.iterdir()}
    assert len(workers) == 2 and os.getpid() not in workers, workers
    for k in ("ids", "offsets", "label_mask", "dropped"):
        assert np.array_equal(getattr(one, k), getattr(two, k)), k
    assert len(one) == 300 - len(one.dropped) and one.ids.size > 30_000


@pytest.mark.slow  # a process pool
def test_a_template_file_edited_during_a_build_is_read_once(shared_data: Path, tiny_tokenizer, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache entry is named by the template the key was made from: a Jinja file edited while data.num_proc
    workers tokenize must not reach them (each read it again), or the entry holds the new template's tokens under
    the old one's key."""
    from ia3_dist.data import tokenize as tokmod
    from ia3_dist.data.template import Template

    f = tmp_path / "t.jinja"
    before = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    f.write_text(before)
    cfg = DataSection(path=str(shared_data), limit=200, template=str(f), cache_dir=str(tmp_path / "a"), num_proc=2)
    of = Template.of.__func__

    def edited_right_after(cls: type, c: DataSection, tok: object) -> Template:
        t = of(cls, c, tok)
        f.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
        return t

    monkeypatch.setattr(Template, "of", classmethod(edited_right_after))
    monkeypatch.setattr(tokmod, "CHUNK_RECORDS", 40)  # several chunks: the workers tokenize most of them
    built = load_or_tokenize(cfg, tiny_tokenizer)
    monkeypatch.undo()
    f.write_text(before)
    fresh = load_or_tokenize(replace(cfg, cache_dir=str(tmp_path / "b"), num_proc=1), tiny_tokenizer)
    assert np.array_equal(built.ids, fresh.ids) and np.array_equal(built.label_mask, fresh.label_mask)


def test_a_lock_file_planted_as_a_link_is_not_followed(tmp_path: Path) -> None:
    """In a cache dir others write too (a shared IA3_DIST_CACHE), a key's lock file planted as a link would have
    the run create (or open for writing) whatever file it points to: never followed. Where the lock is optional
    (the token cache) the build goes on without it; a required one fails."""
    import pytest

    from ia3_dist.data.cache import file_lock

    victim = tmp_path / "victim" / "made-by-the-run"
    victim.parent.mkdir()
    lock = tmp_path / "cache" / "key.lock"
    lock.parent.mkdir()
    lock.symlink_to(victim)
    with file_lock(lock, required=False):
        pass
    assert not victim.exists() and lock.is_symlink()
    with pytest.raises(OSError), file_lock(lock):
        pass
    assert not victim.exists()
    with file_lock(tmp_path / "cache" / "plain.lock"):  # an ordinary lock file is made and taken as before
        assert (tmp_path / "cache" / "plain.lock").is_file()
