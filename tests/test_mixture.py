"""Weighted mixtures (``data.sources``): realised shares by examples and by tokens, an order fixed by the seed and
kept in the cache (the same in another process, from the draws file or drawn again, on 1 or 2 ranks and after a
resume), held-out examples per source with a loss per source, each source in its own format, the report, and
bad input named by its key."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _util import ROOT, adapter_tensors, check, launch, metrics

from ia3_dist.cli import main
from ia3_dist.config import load_config
from ia3_dist.data.report import data_lines
from ia3_dist.errors import UsageError
from ia3_dist.train.prepare import load_data

TINY = str(ROOT / "configs" / "tiny-cpu.yaml")
WEIGHTS = (0.7, 0.2, 0.1)


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def _three(d: Path, n: tuple[int, int, int] = (5000, 3000, 2000)) -> list[Path]:
    """An alpaca, a sharegpt and a messages file of different sizes and answer lengths."""
    return [
        _jsonl(d / "instruct.jsonl", [{"instruction": f"问题{i}", "output": "答" * (1 + i % 7)} for i in range(n[0])]),
        _jsonl(d / "domain.jsonl", [{"conversations": [{"from": "human", "value": f"你好{i}"},
                                                       {"from": "gpt", "value": "好" * (3 + i % 11)}]}
                                    for i in range(n[1])]),
        _jsonl(d / "safety.jsonl", [{"messages": [{"role": "user", "content": f"早{i}"},
                                                  {"role": "assistant", "content": "不" * (9 + i % 4)}]}
                                    for i in range(n[2])]),
    ]


def _cfg(files: list[Path], cache: Path, *extra: str, weights: tuple[float, ...] = WEIGHTS):
    sources = ", ".join(f"{{path: {f}, weight: {w}}}" for f, w in zip(files, weights, strict=True))
    return load_config(None, [f"data.sources=[{sources}]", f"data.cache_dir={cache}", *extra])


def _source_of(data, order_positions: np.ndarray) -> np.ndarray:
    bounds = np.asarray([s.first for s in data.mix.sources] + [data.mix.sources[-1].end])
    return np.searchsorted(bounds, order_positions, side="right") - 1


def _shares(data, by: str, upto: int | None = None) -> np.ndarray:
    order = data.mix.order[:upto]
    which = _source_of(data, order)
    cost = np.diff(data.offsets)[order] if by == "tokens" else np.ones(len(order))
    return np.asarray([cost[which == i].sum() for i in range(3)]) / cost.sum()


@pytest.mark.slow  # tokenizes a three-source mixture twice
@pytest.mark.parametrize("by", ["examples", "tokens"])
def test_realised_shares_match_the_weights(tmp_path: Path, tiny_tokenizer, by: str) -> None:
    files = _three(tmp_path)
    data, held = load_data(_cfg(files, tmp_path / "cache", f"data.mix_by={by}"), tiny_tokenizer)
    assert held is None
    n = len(data)
    # By examples the mixture holds as many draws as the sources' examples, 10,000; by tokens as many tokens.
    if by == "examples":
        assert n == 10_000
    else:
        assert int(np.diff(data.offsets)[data.mix.order].sum()) == pytest.approx(
            int(data.offsets[-1]), abs=int(np.diff(data.offsets).max()))
    assert np.abs(_shares(data, by) - WEIGHTS).max() < 0.01
    # Any part of the order is mixed too (no source comes in one block): every 500-draw prefix is within 1%.
    for upto in range(500, n, 500):
        assert np.abs(_shares(data, by, upto) - WEIGHTS).max() < 0.01, upto
    # The first source is over-sampled (0.7 of 10,000 > its 5,000: each example once or twice), the others are
    # seeded subsets without repeats.
    which = _source_of(data, data.mix.order)
    counts = [np.bincount(data.mix.order[which == i]) for i in range(3)]
    assert counts[0][data.mix.sources[0].first:].min() >= 1 and counts[0].max() == 2
    assert counts[1].max() == 1 and counts[2].max() == 1
    report = "\n".join(data_lines(data, _cfg(files, tmp_path / "cache")))
    assert "mixture of 3 sources by " + by in report and "instruct (alpaca): 5000 records" in report
    assert "domain (sharegpt)" in report and "safety (messages)" in report and "weight 70.0%" in report


@pytest.mark.slow  # tokenizes the mixture three times over
def test_order_is_fixed_by_the_cache_and_the_seed(tmp_path: Path, tiny_tokenizer) -> None:
    files = _three(tmp_path, (300, 200, 100))
    cache = tmp_path / "cache"
    cfg = _cfg(files, cache, "data.eval_ratio=0.1")
    data, held = load_data(cfg, tiny_tokenizer)
    [draws] = (cache / "mixtures").glob("*.npz")
    assert data.mix.file == draws
    # Read back from the draws file, drawn again without it, and drawn in another process: the same order.
    again, _ = load_data(cfg, tiny_tokenizer)
    assert np.array_equal(again.mix.order, data.mix.order)
    draws.unlink()
    fresh, fresh_held = load_data(cfg, tiny_tokenizer)
    assert np.array_equal(fresh.mix.order, data.mix.order) and draws.is_file()
    assert np.array_equal(np.asarray(fresh_held.rows), np.asarray(held.rows))
    code = ("import sys; from transformers import AutoTokenizer; from ia3_dist.config import load_config;"
            "from ia3_dist.train.prepare import load_data;"
            "tok = AutoTokenizer.from_pretrained(sys.argv[1]);"
            "d, _ = load_data(load_config(None, sys.argv[2:]), tok);"
            "sys.stdout.write(','.join(map(str, d.mix.order.tolist())))")
    sources = ", ".join(f"{{path: {f}, weight: {w}}}" for f, w in zip(files, WEIGHTS, strict=True))
    other = tmp_path / "other-cache"
    out = subprocess.run([sys.executable, "-c", code, str(tiny_tokenizer.name_or_path), f"data.sources=[{sources}]",
                          f"data.cache_dir={other}", "data.eval_ratio=0.1"], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert [int(x) for x in out.stdout.split(",")] == data.mix.order.tolist()
    # Another seed or weight draws differently, under another key.
    seeded, _ = load_data(_cfg(files, cache, "data.eval_ratio=0.1", "train.seed=7"), tiny_tokenizer)
    reweighted, _ = load_data(_cfg(files, cache, "data.eval_ratio=0.1", weights=(0.5, 0.25, 0.25)), tiny_tokenizer)
    assert len({data.mix.key, seeded.mix.key, reweighted.mix.key}) == 3
    assert not np.array_equal(seeded.mix.order, data.mix.order)
    # One token cache entry serves all of them: the weights and seed change the draws, not the tokens.
    assert len([d for d in (cache / "tokenized").iterdir() if d.is_dir()]) == 1


def test_held_out_examples_come_from_each_source_before_the_draws(tmp_path: Path, tiny_tokenizer) -> None:
    files = _three(tmp_path, (300, 200, 100))
    data, held = load_data(_cfg(files, tmp_path / "cache", "data.eval_ratio=0.1"), tiny_tokenizer)
    assert [name for name, _ in held.parts] == ["instruct", "domain", "safety"]
    assert [len(pos) for _, pos in held.parts] == [30, 20, 10]
    held_rows = np.asarray(held.rows)
    for i, (_, pos) in enumerate(held.parts):
        s = data.mix.sources[i]
        assert ((held_rows[pos] >= s.first) & (held_rows[pos] < s.end)).all()
    # No held-out example is ever drawn for training.
    assert not set(held_rows.tolist()) & set(data.mix.order.tolist())
    assert len(data) == 540


def test_sources_that_overlap_never_train_on_a_held_out_example(tmp_path: Path, tiny_tokenizer) -> None:
    """One file listed twice (its first 150 records the second time, as a curated subset beside the whole): a
    record held out of one source is a copy of a training example of the other, and was drawn for training (26 of
    35 held-out examples): now no held-out example's tokens are among the draws', the report says how many copies
    stayed out, and a mixture with no such copies keeps its draws' name."""
    f = _jsonl(tmp_path / "a.jsonl", [{"instruction": f"q{i}", "output": "a" * (1 + i % 5)} for i in range(200)])
    cfg = load_config(None, [f"data.sources=[{{path: {f}}}, {{path: {f}, max_examples: 150}}]",
                             f"data.cache_dir={tmp_path / 'cache'}", "data.eval_ratio=0.1"])
    train, held = load_data(cfg, tiny_tokenizer)

    def seqs(d) -> set[tuple[int, ...]]:
        return {tuple(np.asarray(d.example(i)[0]).tolist()) for i in range(len(d))}

    assert len(held) == 35 and not seqs(held) & seqs(train)
    assert train.mix.held_copies > 0
    assert any("copies of held-out examples" in line for line in train.mix.lines())
    apart = load_data(_cfg(_three(tmp_path, (300, 200, 100)), tmp_path / "cache", "data.eval_ratio=0.1"),
                      tiny_tokenizer)[0]
    assert apart.mix.held_copies == 0


def test_repeated_records_of_one_file_never_train_on_a_held_out_example(tmp_path: Path, tiny_tokenizer) -> None:
    """A file that repeats records (the built-in demo:zh-styles repeats 104 of its 400): under ``data.path`` the
    copies of a held-out example were trained on, so the eval scored them as unseen (a mixture of sources that
    overlap already left them out). Now neither trains on them, the report says how many, a one-source mixture of
    the file trains on the same examples as ``data.path``, and a file without repeats keeps all of its examples."""
    f = _jsonl(tmp_path / "rep.jsonl", [{"instruction": f"q{i % 120}", "output": "a" * (1 + i % 120 % 5)}
                                        for i in range(300)])

    def seqs(d) -> list[tuple[int, ...]]:
        return [tuple(np.asarray(d.example(i)[0]).tolist()) for i in range(len(d))]

    cache = f"data.cache_dir={tmp_path / 'cache'}"
    cfg = load_config(None, [f"data.path={f}", cache, "data.eval_ratio=0.1"])
    train, held = load_data(cfg, tiny_tokenizer)
    assert len(held) == 30 and not set(seqs(held)) & set(seqs(train))
    # Every held-out record has 1 or 2 copies among the other 270: all of them stayed out.
    distinct_held = len(set(seqs(held)))
    assert train.held_copies == 300 - 30 - len(train) > distinct_held - 1
    assert len(set(seqs(train)) | set(seqs(held))) == 120  # nothing else left out
    lines = data_lines(train, cfg)
    assert any(f"{train.held_copies} example(s) left out of training: copies of held-out examples" in line
               for line in lines), lines
    mixed, mixed_held = load_data(load_config(None, [f"data.sources=[{{path: {f}}}]", cache, "data.eval_ratio=0.1"]),
                                  tiny_tokenizer)
    assert mixed.mix.held_copies == train.held_copies
    assert sorted(seqs(mixed)) == sorted(seqs(train)) and seqs(mixed_held) == seqs(held)
    distinct = _jsonl(tmp_path / "distinct.jsonl", [{"instruction": f"q{i}", "output": "a"} for i in range(300)])
    alone, _ = load_data(load_config(None, [f"data.path={distinct}", cache, "data.eval_ratio=0.1"]), tiny_tokenizer)
    assert len(alone) == 270 and alone.held_copies == 0
    assert not any("left out of training" in line for line in data_lines(alone, cfg))


def test_copies_of_pairs_compare_both_sides(tmp_path: Path, tiny_tokenizer) -> None:
    """Preference pairs are copies only when both sides are: a pair that shares its chosen answer with a held-out
    pair but not its rejected one still trains."""
    from ia3_dist.data.sampler import copies_of

    rows = [{"instruction": f"q{i % 40}", "chosen": "好" * (1 + i % 40 % 3), "rejected": "不" * (1 + i % 7)}
            for i in range(120)]
    f = _jsonl(tmp_path / "pairs.jsonl", rows)
    cfg = load_config(None, [f"data.path={f}", f"data.cache_dir={tmp_path / 'cache'}", "data.eval_ratio=0",
                             "train.objective=dpo", "train.eval_every=0"])
    data, _ = load_data(cfg, tiny_tokenizer)
    assert data.group == 2 and len(data) == 120
    held = np.asarray([0, 1])
    # Pairs 40 and 80 share pair 0's prompt and chosen answer (i = 0 mod 40), not its rejected one (i mod 7).
    assert data.example(80)[0] == data.example(0)[0] and data.example(81)[0] != data.example(1)[0]
    assert copies_of(data, held).tolist() == []
    rows_same = [*rows, rows[0], rows[1], {**rows[0], "rejected": "别"}]
    g = _jsonl(tmp_path / "pairs2.jsonl", rows_same)
    data2, _ = load_data(load_config(None, [f"data.path={g}", f"data.cache_dir={tmp_path / 'cache'}",
                                            "data.eval_ratio=0", "train.objective=dpo", "train.eval_every=0"]),
                         tiny_tokenizer)
    assert copies_of(data2, held).tolist() == [120, 121]


def test_a_one_source_mixture_holds_out_what_data_path_would() -> None:
    from ia3_dist.data.mixture import SourceStats, hold_out
    from ia3_dist.data.sampler import held_out

    one = SourceStats(name="a.json", label="a", weight=1.0, first=0, end=500, records=500, skipped=0, dropped=0,
                      truncated=0, tokens=0, formats={})
    two = SourceStats(name="b.json", label="b", weight=1.0, first=500, end=800, records=300, skipped=0, dropped=0,
                      truncated=0, tokens=0, formats={})
    for seed in (0, 42):
        alone = held_out(500, 0.1, [seed, 7919])
        assert alone is not None and len(alone) == 50
        assert np.array_equal(hold_out([one], 0.1, seed)[0], alone)
        # A second source draws from its own stream, offset into its part of the cache.
        b = hold_out([one, two], 0.1, seed)[1]
        assert len(b) == 30 and b.min() >= 500 and b.max() < 800
    assert held_out(1, 0.1, [0, 7919]) is None and held_out(5, 0.95, [0, 7919]) is None  # none left to train


def test_source_labels_are_unique() -> None:
    from ia3_dist.config.schema import DataSource
    from ia3_dist.data.mixture import labels_of

    labels = labels_of([DataSource("a.jsonl"), DataSource("b/a.jsonl"), DataSource("x/a-1.jsonl"), DataSource("hub/x")])
    assert len(set(labels)) == 4 and labels[3] == "x", labels


def test_sources_keep_their_own_format_columns_and_limit(tmp_path: Path, tiny_tokenizer) -> None:
    a = _jsonl(tmp_path / "qa.jsonl", [{"question": f"问{i}", "answer": f"答{i}"} for i in range(40)])
    b = _jsonl(tmp_path / "chat.jsonl", [{"conversations": [{"from": "human", "value": f"你{i}"},
                                                            {"from": "gpt", "value": f"好{i}"}]} for i in range(40)])
    cfg = load_config(None, [f"data.sources=[{{path: {a}, weight: 1, format: alpaca, columns: {{instruction: question, "
                             f"output: answer}}}}, {{path: {b}, weight: 3, max_examples: 10}}]",
                             f"data.cache_dir={tmp_path / 'cache'}"])
    data, _ = load_data(cfg, tiny_tokenizer)
    assert [(s.records, s.examples) for s in data.mix.sources] == [(40, 40), (10, 10)]
    # 50 draws at 1:3: 12 or 13 from the first (its subset), 37 or 38 from the ten of the second, repeated.
    assert [s.drawn for s in data.mix.sources] in ([13, 37], [12, 38])
    first = tiny_tokenizer.decode(data.example(0)[0])
    assert first.startswith("Human: ")


def test_bad_sources_are_named_by_their_key(tmp_path: Path, tiny_tokenizer) -> None:
    good = _jsonl(tmp_path / "ok.jsonl", [{"instruction": "一", "output": "二"}] * 4)
    cache = tmp_path / "cache"
    with pytest.raises(UsageError, match=r"data\.sources\[1\]\.path: .*missing\.jsonl: file not found"):
        load_data(load_config(None, [f"data.sources=[{{path: {good}}}, {{path: {tmp_path}/missing.jsonl}}]",
                                     f"data.cache_dir={cache}"]), tiny_tokenizer)
    # A source's own template is named by its key; the run's data.template by its own.
    with pytest.raises(UsageError, match=r"^data\.sources\[1\]\.template: .*nope\.jinja: not human_assistant"):
        load_data(load_config(None, [f"data.sources=[{{path: {good}}}, {{path: {good}, template: "
                                     f"{tmp_path}/nope.jinja}}]", f"data.cache_dir={cache}"]), tiny_tokenizer)
    with pytest.raises(UsageError, match=r"^data\.template chat_template: this tokenizer ships no chat template"):
        load_data(load_config(None, [f"data.sources=[{{path: {good}}}]", "data.template=chat_template",
                                     f"data.cache_dir={cache}"]), tiny_tokenizer)
    bad = _jsonl(tmp_path / "bad.jsonl", [{"instruction": "一", "output": "二"}, {"question": "三"}])
    with pytest.raises(UsageError, match=r"bad\.jsonl:2: missing field"):
        load_data(load_config(None, [f"data.sources=[{{path: {good}}}, {{path: {bad}, format: alpaca}}]",
                                     f"data.cache_dir={cache}"]), tiny_tokenizer)
    # A source's own columns are named by their key (data.columns may not be set at all), the run's by theirs.
    q = _jsonl(tmp_path / "q.jsonl", [{"question": "三", "answer": "四"}] * 2)
    with pytest.raises(UsageError, match=r"q\.jsonl: data\.sources\[1\]\.columns maps system -> 'sys', but no "
                                         r"record has such a field"):
        load_data(load_config(None, [f"data.sources=[{{path: {good}}}, {{path: {q}, columns: {{instruction: "
                                     f"question, output: answer, system: sys}}}}]", f"data.cache_dir={cache}"]),
                  tiny_tokenizer)
    with pytest.raises(UsageError, match=r"q\.jsonl: data\.columns maps system -> 'sys'"):
        load_data(load_config(None, [f"data.sources=[{{path: {q}}}]", "data.columns={instruction: question, "
                                     "output: answer, system: sys}", f"data.cache_dir={cache}"]), tiny_tokenizer)
    held_all = r"data\.sources\[0\] \(.*ok\.jsonl\): data\.eval_ratio=0\.9 holds out all of its 4 examples"
    with pytest.raises(UsageError, match=held_all):
        load_data(load_config(None, [f"data.sources=[{{path: {good}}}]", "data.eval_ratio=0.9",
                                     f"data.cache_dir={cache}"]), tiny_tokenizer)
    for override, msg in [
        (f"data.sources=[{{path: {good}, wieght: 2}}]", r"data\.sources\[0\]\.wieght': unknown key"),
        (f"data.sources=[{{path: {good}, weight: -1}}]", r"data\.sources\[0\]\.weight': must be a finite number > 0"),
        (f"data.sources=[{{path: {good}, weight: .nan}}]", r"data\.sources\[0\]\.weight'"),
        (f"data.sources=[{{path: {good}}}, {{path: demo:zh-styles}}]", r"data\.sources\[1\]\.path'.*demo"),
        (f"data.sources=[{{path: {good}, format: xml}}]", r"data\.sources\[0\]\.format'"),
        (f"data.sources=[{{path: {good}, columns: {{nope: x}}}}]", r"data\.sources\[0\]\.columns'"),
        ("data.sources=[]", r"'data\.sources': a mixture needs at least one source"),
        ("data.mix_by=bytes", r"'data\.mix_by': must be one of examples\|tokens"),
    ]:
        with pytest.raises(UsageError, match=msg):
            load_config(None, [override])
    with pytest.raises(UsageError, match="set either data.path or data.sources"):
        load_config(None, [f"data.sources=[{{path: {good}}}]", f"data.path={good}"])
    with pytest.raises(UsageError, match=r"data\.limit'.*max_examples"):
        load_config(None, [f"data.sources=[{{path: {good}}}]", "data.limit=3"])


def test_prepare_reports_each_source(tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture) -> None:
    files = _three(tmp_path, (60, 40, 20))
    sources = ", ".join(f"{{path: {f}, weight: {w}}}" for f, w in zip(files, WEIGHTS, strict=True))
    cache = tmp_path / "cache"
    args = ["--config", TINY, f"model.path={tiny_model}", f"data.sources=[{sources}]", f"data.cache_dir={cache}",
            "data.mix_by=tokens", "data.eval_ratio=0.1", f"output.dir={tmp_path / 'run'}"]
    assert main(["prepare", *args]) == 0
    text = capsys.readouterr().out
    assert "data.sources:" in text and "mixture of 3 sources by tokens" in text and "held out for eval: 12" in text
    assert len(list((cache / "mixtures").glob("*.npz"))) == 1 and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_mixture_trains_on_two_ranks_with_a_loss_per_source_and_resumes_on_one(tmp_path: Path,
                                                                                 demo_model: Path) -> None:
    files = _three(tmp_path, (60, 40, 20))
    sources = ", ".join(f"{{path: {f}, weight: {w}}}" for f, w in zip(files, WEIGHTS, strict=True))
    base = ["--config", TINY, f"data.sources=[{sources}]", "data.eval_ratio=0.1", "train.eval_every=3",
            "train.log_every=1", "train.max_steps=6", "checkpoint.every=3", "train.micro_batch_size=2"]
    a, b = tmp_path / "a", tmp_path / "b"
    # a: 2 ranks x accum 2, stopped after step 3, resumed on 1 rank x accum 4 (the same global batch of 8).
    check(launch([*base, f"output.dir={a}", "train.grad_accum=2", "train.stop_after_steps=3"], nproc=2))
    run = check(launch([*base, f"output.dir={a}", "train.grad_accum=4", "train.resume=auto"], nproc=1))
    assert "by source: instruct" in run.stdout + run.stderr
    # b: straight through on 1 rank.
    check(launch([*base, f"output.dir={b}", "train.grad_accum=4"], nproc=1))
    la = {r["step"]: r for r in metrics(a) if "loss" in r}
    lb = {r["step"]: r for r in metrics(b) if "loss" in r}
    assert sorted(la) == sorted(lb) == list(range(1, 7))
    for s in range(1, 7):
        assert la[s]["loss"] == pytest.approx(lb[s]["loss"], rel=1e-5)
    evals = [r for r in metrics(a) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    for r in evals:
        per = {k: v for k, v in r.items() if k.startswith("eval_loss/")}
        assert set(per) == {"eval_loss/instruct", "eval_loss/domain", "eval_loss/safety"}
        # The sources' losses, weighted by their tokens, make the overall loss.
        assert min(per.values()) <= r["eval_loss"] <= max(per.values())
    ta, tb = adapter_tensors(a / "adapter"), adapter_tensors(b / "adapter")
    for k in ta:
        np.testing.assert_allclose(ta[k].numpy(), tb[k].numpy(), rtol=1e-4, atol=1e-6)


def test_a_mixture_trained_on_no_source_of_data_template_says_so(tmp_path: Path) -> None:
    """The adapter saves data.template (what generate, chat and eval prompt it in): a mixture whose every source
    sets another template gets a note in the data report; one source on data.template, or none set, gets none."""
    from ia3_dist.data.report import _template_note

    a, b = _jsonl(tmp_path / "a.jsonl", []), _jsonl(tmp_path / "b.jsonl", [])

    def note(*templates: str | None) -> list[str]:
        src = ", ".join(f"{{path: {f}" + (f", template: {t}}}" if t else "}") for f, t in zip((a, b), templates,
                                                                                            strict=True))
        return _template_note(load_config(None, [f"data.sources=[{src}]"]))

    assert note("chat_template", "chat_template") == [
        "  note: the adapter's prompts at inference follow data.template (human_assistant), which no source trains "
        "on (they use chat_template); set data.template to the one to prompt it in"]
    assert note("chat_template", None) == note(None, None) == note("human_assistant", "chat_template") == []


def test_a_mixture_read_from_the_cache_names_this_runs_files(tmp_path: Path, tiny_tokenizer) -> None:
    """The cache is named by content: the same sources under other file names reuse it, and what is reported (the
    skipped records, the formats, the source names) names this run's files, not those of the run that built it."""
    recs = [{"instruction": f"问{i}", "output": f"答{i}"} for i in range(8)]
    a = _jsonl(tmp_path / "a.jsonl", recs)
    with a.open("a", encoding="utf-8") as fh:
        fh.write('{"question": "坏"}\n')  # line 9: no instruction
    other = _jsonl(tmp_path / "other.jsonl", recs[:4])
    cache = tmp_path / "cache"

    def load(path: Path) -> object:
        cfg = load_config(None, [f"data.sources=[{{path: {other}}}, {{path: {path}}}]", "data.format=alpaca",
                                 "data.on_bad_record=skip", f"data.cache_dir={cache}"])
        return load_data(cfg, tiny_tokenizer)[0]

    first = load(a)
    assert any(m.startswith(f"{a}:9: ") for m in first.skipped), first.skipped
    built = sorted((cache / "tokenized").iterdir())
    b = tmp_path / "b.jsonl"
    b.write_bytes(a.read_bytes())
    again = load(b)
    assert sorted((cache / "tokenized").iterdir()) == built  # reused, not built again
    assert any(m.startswith(f"{b}:9: ") for m in again.skipped) and not any(str(a) in m for m in again.skipped)
    assert str(b) in again.formats and str(a) not in again.formats
    assert [s.name for s in again.mix.sources] == [str(other), str(b)]
    assert str(b) in again.mix.sources[1].formats and str(a) not in again.mix.sources[1].formats


def test_names_swapped_in_a_rotation_are_renamed_once() -> None:
    """Files renamed in a rotation (the cache built from a.jsonl, b.jsonl; this run reads the same bytes as b.jsonl,
    c.jsonl): each message names the file it means. Replaced one name after another, the first became c.jsonl."""
    from ia3_dist.data.tokenize import renaming

    f = renaming(["/d/a.jsonl", "/d/b.jsonl"], ["/d/b.jsonl", "/d/c.jsonl"])
    assert (f("/d/a.jsonl:3: bad"), f("/d/b.jsonl:7: bad")) == ("/d/b.jsonl:3: bad", "/d/c.jsonl:7: bad")
    swap = renaming(["/d/a.jsonl", "/d/b.jsonl"], ["/d/b.jsonl", "/d/a.jsonl"])
    assert swap("/d/a.jsonl:1; /d/b.jsonl:2") == "/d/b.jsonl:1; /d/a.jsonl:2"
    # A name that begins another is not replaced inside it.
    assert renaming(["/d/x", "/d/x.jsonl"], ["/e/y", "/e/z.jsonl"])("/d/x.jsonl:1, /d/x: record 2") == \
        "/e/z.jsonl:1, /e/y: record 2"
    assert renaming(["/d/a"], ["/d/a"]) is None


def test_draws_are_kept_first_wins_and_an_unwritable_cache_draws_in_memory(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    """The draws file is linked in once and never renamed over (a rank reading it on NFS got ESTALE and was told to
    delete a good file). A cache where it cannot be written (a read-only mount, a path through a file) is a
    warning, not an OSError from cleaning up a temp file that was never made."""
    import os

    import numpy as np

    from ia3_dist.data.mixture import _read_draws, _write_draws

    f = tmp_path / "mixtures" / "k.npz"
    _write_draws(f, np.arange(5), [np.asarray([1]), np.asarray([], dtype=np.int64)])
    ino = os.stat(f).st_ino
    _write_draws(f, np.arange(5), [np.asarray([1]), np.asarray([], dtype=np.int64)])
    assert os.stat(f).st_ino == ino and [p.name for p in f.parent.iterdir()] == ["k.npz"]
    order, held = _read_draws(f, 10, 2)
    assert order.tolist() == list(range(5)) and [h.tolist() for h in held] == [[1], []]
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    _write_draws(blocker / "mixtures" / "k.npz", np.arange(5), [np.asarray([1])])
    assert "cannot keep the mixture draws" in capsys.readouterr().err
