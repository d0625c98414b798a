"""Preference pair data (issue 32), unit tier: the formats people bring, their errors naming file and record, the
pair kept aligned through truncation, two rows per pair in the token cache, the collated batch TRL's layout, the
config checks and ``plan`` counting two sequences per pair."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from ia3_dist.cli import main
from ia3_dist.config import DataSection, load_config
from ia3_dist.data.collate import pair_batch
from ia3_dist.data.pairs import truncate_pair
from ia3_dist.data.records import load_records
from ia3_dist.data.sampler import Layout, plan_epoch
from ia3_dist.data.tokenize import load_or_tokenize, tokenize
from ia3_dist.errors import UsageError
from ia3_dist.train.objectives.preference import Preference, log1mexp

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny-dpo-cpu.yaml")

FORMATS = {
    "prompt": {"prompt": "什么是猫？", "chosen": "猫是动物。", "rejected": "不知道。"},
    "prompt-messages": {"prompt": [{"role": "system", "content": "你是助手。"},
                                   {"role": "user", "content": "什么是猫？"}],
                        "chosen": [{"role": "assistant", "content": "猫是动物。"}],
                        "rejected": [{"role": "assistant", "content": "不知道。"}]},
    "alpaca": {"instruction": "什么是猫？", "input": "", "chosen": "猫是动物。", "rejected": "不知道。"},
    "sharegpt": {"conversations": [{"from": "human", "value": "什么是猫？"}],
                 "chosen": {"from": "gpt", "value": "猫是动物。"}, "rejected": {"from": "gpt", "value": "不知道。"}},
    "messages": {"messages": [{"role": "user", "content": "什么是猫？"}],
                 "chosen": {"role": "assistant", "content": "猫是动物。"}, "rejected": "不知道。"},
}


def _write(tmp_path: Path, records: list, name: str = "pairs.jsonl") -> Path:
    f = tmp_path / name
    f.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return f


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_format_reads_as_two_conversations_differing_in_the_last_answer(fmt: str, tmp_path: Path) -> None:
    recs = load_records(DataSection(path=str(_write(tmp_path, [FORMATS[fmt]] * 2))), pairs=True)
    p = recs.examples[0]
    assert p.chosen.turns[-1].output == "猫是动物。" and p.rejected.turns[-1].output == "不知道。"
    assert p.chosen.turns[-1].instruction == p.rejected.turns[-1].instruction == "什么是猫？"
    assert p.chosen.system == p.rejected.system == ("你是助手。" if fmt == "prompt-messages" else "")
    assert recs.formats[str(tmp_path / "pairs.jsonl")] == fmt.split("-")[0]


def test_renamed_columns(tmp_path: Path) -> None:
    rec = {"q": "什么是猫？", "good": "猫是动物。", "bad": "不知道。"}
    cfg = DataSection(path=str(_write(tmp_path, [rec])), columns={"prompt": "q", "chosen": "good",
                                                                  "rejected": "bad"})
    assert load_records(cfg, pairs=True).examples[0].rejected.turns[0].output == "不知道。"
    # A column mapped explicitly decides the format: role/content messages stored under `conversations` are
    # messages, not the sharegpt the detection order alone would take them for (as for SFT records).
    rec = {"conversations": [{"role": "user", "content": "什么是猫？"}], "chosen": "猫是动物。", "rejected": "不知道。"}
    cfg = DataSection(path=str(_write(tmp_path, [rec], "conv.jsonl")), columns={"messages": "conversations"})
    recs = load_records(cfg, pairs=True)
    assert recs.examples[0].chosen.turns[0].instruction == "什么是猫？"
    assert recs.formats[str(tmp_path / "conv.jsonl")] == "messages"


@pytest.mark.parametrize("rec, message", [
    ({"prompt": "x", "chosen": "same", "rejected": "same"}, "are the same text"),
    ({"prompt": "x", "chosen": "  ", "rejected": "b"}, "'chosen' is empty"),
    ({"prompt": "x", "chosen": "a"}, "missing field 'rejected'"),
    ({"prompt": "x", "chosen": "a", "rejected": ["b", "c"]}, "list of 2 messages"),
    ({"prompt": "x", "chosen": {"role": "user", "content": "a"}, "rejected": "b"}, "must be the assistant's"),
    ({"prompt": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "chosen": "a",
      "rejected": "b"}, "ends with an assistant message"),
    ({"prompt": "x", "chosen": 3, "rejected": "b"}, "must be a string or an assistant message"),
    # Roles that are no strings (a TypeError, unhashable, escaped the skip policy and ended the run in a traceback).
    ({"prompt": "x", "chosen": {"role": ["assistant"], "content": "a"}, "rejected": "b"}, "has role ['assistant']"),
    ({"prompt": [{"role": "user", "content": "x"}, {"role": {"a": 1}, "content": "y"}], "chosen": "a",
      "rejected": "b"}, "unknown role {'a': 1}"),
])
def test_bad_pairs_name_file_and_line(rec: dict, message: str, tmp_path: Path) -> None:
    """A file's format comes from its first record (as for SFT data); a later bad one is named by line."""
    f = _write(tmp_path, [FORMATS["prompt"], rec])
    with pytest.raises(UsageError) as e:
        load_records(DataSection(path=str(f)), pairs=True)
    assert f"{f}:2" in str(e.value) and message in str(e.value), str(e.value)
    # The explicit policy: drop and count instead.
    recs = load_records(DataSection(path=str(f), on_bad_record="skip"), pairs=True)
    assert len(recs) == 1 and len(recs.skipped) == 1


def _conv(*pairs: tuple[str, str]) -> list[dict]:
    return [{"role": r, "content": c} for r, c in pairs]


@pytest.mark.parametrize("shape", ["ultrafeedback", "bare", "bare-system-multiturn"])
def test_implicit_prompt_pairs_read_as_trl_extracts_them(shape: str, tmp_path: Path) -> None:
    """TRL's implicit prompt (UltraFeedback binarized, the most common hub DPO layout): chosen and rejected are
    whole conversations, their shared messages the prompt, as trl.data_utils.maybe_extract_prompt splits them. It
    was refused in every format ('chosen' is a list of 2 messages); a 'messages' or 'prompt' string beside them is
    left aside, as TRL does, and chosen/rejected alone are detected."""
    from trl.data_utils import maybe_extract_prompt

    head = _conv(("user", "什么是猫？")) if shape != "bare-system-multiturn" else _conv(
        ("system", "你是助手。"), ("user", "你好"), ("assistant", "你好！"), ("user", "什么是猫？"))
    rec = {"chosen": [*head, *_conv(("assistant", "猫是动物。"))],
           "rejected": [*head, *_conv(("assistant", "不知道。"))]}
    if shape == "ultrafeedback":
        rec = {"prompt": "什么是猫？", "prompt_id": "abc", **rec, "messages": rec["chosen"], "score_chosen": 8.0,
               "score_rejected": 3.0}
    trl = maybe_extract_prompt(dict(rec))
    recs = load_records(DataSection(path=str(_write(tmp_path, [rec] * 2))), pairs=True)
    p = recs.examples[0]
    explicit = load_records(DataSection(path=str(_write(tmp_path, [{
        "prompt": trl["prompt"], "chosen": trl["chosen"], "rejected": trl["rejected"]}], "explicit.jsonl"))),
        pairs=True).examples[0]
    assert (p.chosen, p.rejected) == (explicit.chosen, explicit.rejected)
    assert p.chosen.turns[-1].output == "猫是动物。" and p.rejected.turns[-1].output == "不知道。"
    assert len(p.chosen.turns) == (2 if shape == "bare-system-multiturn" else 1)
    assert p.chosen.system == ("你是助手。" if shape == "bare-system-multiturn" else "")


def test_implicit_prompt_pairs_in_sharegpt_messages(tmp_path: Path) -> None:
    """The implicit prompt with ShareGPT's from/value messages reads as the ranking record it spells out."""
    sg = [{"from": "human", "value": "什么是猫？"}]
    rec = {"chosen": [*sg, {"from": "gpt", "value": "猫是动物。"}],
           "rejected": [*sg, {"from": "gpt", "value": "不知道。"}]}
    p = load_records(DataSection(path=str(_write(tmp_path, [rec]))), pairs=True).examples[0]
    explicit = load_records(DataSection(path=str(_write(tmp_path, [FORMATS["sharegpt"]], "sg.jsonl"))),
                            pairs=True).examples[0]
    assert (p.chosen, p.rejected) == (explicit.chosen, explicit.rejected)


def test_reasoning_of_preference_answers_reaches_the_template(tmp_path: Path) -> None:
    """An answer message's reasoning_content is the answer turn's reasoning (it was dropped: under Qwen3's template
    both sides rendered an empty think block), in the explicit and the implicit form."""
    a = {"role": "assistant", "content": "猫是动物。", "reasoning_content": "想一想"}
    b = {"role": "assistant", "content": "不知道。"}
    q = {"role": "user", "content": "什么是猫？"}
    recs = [{"prompt": [q], "chosen": a, "rejected": b}, {"chosen": [q, a], "rejected": [q, b]}]
    for rec in recs:
        p = load_records(DataSection(path=str(_write(tmp_path, [rec]))), pairs=True).examples[0]
        assert p.chosen.turns[-1].reasoning == "想一想" and p.rejected.turns[-1].reasoning == ""


@pytest.mark.parametrize("chosen, rejected, message", [
    (_conv(("user", "a"), ("assistant", "x"), ("user", "b"), ("assistant", "y")),
     _conv(("user", "a"), ("assistant", "z"), ("user", "b"), ("assistant", "w")), "share their first 1 message(s)"),
    (_conv(("user", "a"), ("assistant", "x")), _conv(("user", "b"), ("assistant", "y")), "share their first 0"),
])
def test_implicit_pairs_that_differ_before_the_answer_are_named(chosen: list, rejected: list, message: str,
                                                                tmp_path: Path) -> None:
    f = _write(tmp_path, [{"chosen": _conv(("user", "q"), ("assistant", "a")),
                           "rejected": _conv(("user", "q"), ("assistant", "b"))},
                          {"chosen": chosen, "rejected": rejected}])
    with pytest.raises(UsageError, match=f"{f}:2: .*{re.escape(message)}"):
        load_records(DataSection(path=str(f)), pairs=True)


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
                                           "parameters": {"type": "object", "properties": {}}}}
CALL = {"role": "assistant", "content": None,
        "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}


def test_pairs_keep_the_records_tools_as_sft_does(tmp_path: Path, tiny_tokenizer) -> None:
    """The tool schemas reach both conversations (renamed with data.columns as for SFT), the template writes them
    before the prompt, and a call to a tool the record does not declare is refused as in SFT."""
    msgs = [{"role": "user", "content": "巴黎天气？"}, CALL, {"role": "tool", "content": '{"t": 21}'}]
    rec = {"messages": msgs, "functions": [WEATHER], "chosen": "21 度。", "rejected": "不知道。"}
    listed = {"prompt": msgs, "functions": [WEATHER], "chosen": "21 度。", "rejected": "不知道。"}
    for name, r in (("messages.jsonl", rec), ("prompt.jsonl", listed)):
        cfg = DataSection(path=str(_write(tmp_path, [r], name)), columns={"tools": "functions"}, max_length=1024)
        p = load_records(cfg, pairs=True).examples[0]
        assert p.chosen.tools == p.rejected.tools == (WEATHER,), name
        (ids, _, labels) = tokenize(load_records(cfg, pairs=True), tiny_tokenizer, cfg).example(0)
        n = next(k for k, v in enumerate(labels) if v != -100)
        assert "get_weather" in tiny_tokenizer.decode(ids[:n]).split("巴黎")[0], name
    other = {**rec, "functions": [{"name": "other", "parameters": {}}]}
    cfg = DataSection(path=str(_write(tmp_path, [other], "undeclared.jsonl")), columns={"tools": "functions"})
    with pytest.raises(UsageError, match="calls tool 'get_weather', which the record's tools do not declare"):
        load_records(cfg, pairs=True)


@pytest.mark.parametrize("fmt", ["prompt", "alpaca"])
def test_tools_on_a_plain_text_prompt_are_refused(fmt: str, tmp_path: Path) -> None:
    f = _write(tmp_path, [{**FORMATS[fmt], "tools": [WEATHER]}])
    with pytest.raises(UsageError, match=f"{f}:1: field 'tools' declares tools, but .* cannot carry them"):
        load_records(DataSection(path=str(f)), pairs=True)
    # An empty tools column (what a table with the column for other rows holds) declares nothing.
    assert len(load_records(DataSection(path=str(_write(tmp_path, [{**FORMATS[fmt], "tools": []}], "e.jsonl"))),
                            pairs=True)) == 1


def test_sft_records_are_no_pairs(tmp_path: Path) -> None:
    f = _write(tmp_path, [{"instruction": "x", "output": "y"}])
    with pytest.raises(UsageError, match="missing field 'chosen'"):
        load_records(DataSection(path=str(f)), pairs=True)


def test_bad_pair_data_is_exit_2_before_anything_starts(tmp_path: Path, tiny_model: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    f = _write(tmp_path, [FORMATS["prompt"], {"prompt": "x", "chosen": "a", "rejected": "a"}])
    out = tmp_path / "run"
    rc = main(["train", "--config", TINY, f"model.path={tiny_model}", f"data.path={f}", f"output.dir={out}",
               f"data.cache_dir={tmp_path / 'cache'}"])
    err = capsys.readouterr().err
    assert rc == 2 and f"{f}:2" in err and "are the same text" in err and not out.exists(), err


def test_truncation_keeps_the_pair_aligned() -> None:
    prompt, c, r = list(range(10)), [100, 101, 102, 103], [200, 201]
    assert truncate_pair(prompt, c, r, 20, "right") == (prompt, c, r, False)
    # right: both rows end at max_length, the prompt intact.
    assert truncate_pair(prompt, c, r, 12, "right") == (prompt, [100, 101], [200, 201], True)
    # prompt: the oldest prompt tokens go (the same on both rows) so the longer answer fits whole.
    assert truncate_pair(prompt, c, r, 12, "prompt") == (prompt[2:], c, r, True)
    # A prompt that fills max_length leaves no answer: the pair is dropped at tokenization (below).
    assert truncate_pair(prompt, c, r, 8, "right")[1:3] == ([], [])


def test_a_pair_cut_to_the_same_tokens_is_dropped() -> None:
    """Truncation before the answers differ leaves two equal rows: a margin of 0 for ever, no gradient, and a pair
    counted wrong in the accuracies. Dropped and counted with the pairs that kept no answer token."""
    from ia3_dist.data.tokenize import _pack_pairs

    pairs = [([1, 2, 3], [4, 5, 6, 7, 2], [4, 5, 6, 8, 9, 2]), ([1, 2, 3], [4, 5, 2], [6, 2])]
    c = _pack_pairs(pairs, DataSection(path="x", max_length=5), ["d.jsonl:1", "d.jsonl:2"])
    assert c.dropped.tolist() == [0] and c.unlabeled == 1 and c.dropped_where == ["d.jsonl:1"]
    assert c.ids.tolist() == [1, 2, 3, 4, 5, 1, 2, 3, 6, 2] and c.truncated == 2
    assert _pack_pairs(pairs, DataSection(path="x", max_length=7), ["a", "b"]).dropped.tolist() == []


def test_pairs_are_two_rows_with_labels_on_the_answers(tmp_path: Path, tiny_tokenizer) -> None:
    recs = [FORMATS["alpaca"], {**FORMATS["alpaca"], "instruction": "长" * 300},
            {**FORMATS["alpaca"], "instruction": "什么是狗？"}]
    cfg = DataSection(path=str(_write(tmp_path, recs)), max_length=64)
    data = tokenize(load_records(cfg, pairs=True), tiny_tokenizer, cfg)
    assert len(data) == 2 and data.group == 2 and data.unlabeled == 1  # the long prompt left no answer: dropped
    from ia3_dist.config import RunConfig
    from ia3_dist.data.report import data_lines

    report = "\n".join(data_lines(data, RunConfig(data=cfg)))
    assert "2 preference pairs (2 rows each); 1 dropped (the prompt left no answer token" in report
    assert "dropped (the prompt left no answer token on a side, or the two sides the same tokens, after " \
           f"truncation to data.max_length), first: {cfg.path}:2" in report, report
    for i in range(len(data)):
        (ci, _, cl), (ri, _, rl) = data.example(2 * i), data.example(2 * i + 1)
        n = next(k for k, v in enumerate(cl) if v != -100)
        assert ci[:n] == ri[:n] and all(v == -100 for v in rl[:n]) and rl[n] != -100
        assert tiny_tokenizer.decode(ci[n:]).startswith("猫是动物") and ci[-1] == tiny_tokenizer.eos_token_id
        assert data.lengths[i] == max(len(ci), len(ri))
    sub = data.subset([1])
    assert len(sub) == 1 and sub.example(0) == data.example(2) and sub.example(1) == data.example(3)


def test_pair_and_sft_caches_are_apart(tmp_path: Path, tiny_tokenizer) -> None:
    rec = {**FORMATS["alpaca"], "output": "猫是动物。"}
    cfg = DataSection(path=str(_write(tmp_path, [rec] * 3)), cache_dir=str(tmp_path / "cache"))
    sft = load_or_tokenize(cfg, tiny_tokenizer)
    pairs = load_or_tokenize(cfg, tiny_tokenizer, pairs=True)
    assert sft.cache_file != pairs.cache_file and len(sft) == len(pairs) == 3 and pairs.group == 2
    assert len(sft.offsets) == 4 and len(pairs.offsets) == 7


def test_batch_is_trls_layout(tmp_path: Path, tiny_tokenizer) -> None:
    answers = ["猫是动物。", "不知道。", "猫是一种很可爱的小动物，喜欢睡觉。", "好", "猫会抓老鼠。"]
    recs = [{"prompt": f"问题{i}", "chosen": answers[i], "rejected": answers[(i + 1) % 5]} for i in range(5)]
    cfg = DataSection(path=str(_write(tmp_path, recs)))
    data = tokenize(load_records(cfg, pairs=True), tiny_tokenizer, cfg)
    b = pair_batch(data, [1, 3], tiny_tokenizer.pad_token_id, "all")
    ids, mask = b["input_ids"], b["attention_mask"]
    assert ids.shape[0] == 4
    # Rows: chosen of pair 1, chosen of pair 3, rejected of pair 1, rejected of pair 3; right-padded.
    for row, seq in enumerate((2, 6, 3, 7)):
        want = data.example(seq)[0]
        assert ids[row, :len(want)].tolist() == want and mask[row].sum() == len(want)
    width = ids.shape[1]
    lab = b["is_label"]
    # Answer positions: the ones whose next token is a label; NLL ("all") positions: every real next token of a
    # chosen row.
    assert int(lab.sum()) == sum(int((torch.tensor(data.example(s)[2]) != -100).sum()) for s in (2, 6, 3, 7))
    assert int(b["is_nll"].sum()) == sum(len(data.example(s)[0]) - 1 for s in (2, 6))
    assert (b["row"] == b["pos"] // width).all() and b["n_answer"].tolist()[0] == float(lab[b["row"] == 0].sum())
    assert b["pair_index"].tolist() == [1, 3]
    # row_gather: each row's kept positions in order, padded with the index of an appended zero; row sums through
    # it are index_add's (exactly here: integers) over a fixed shape.
    from ia3_dist.models.loss import row_sums

    g, n = b["row_gather"], len(b["pos"])
    assert g.shape == (4, int(torch.bincount(b["row"]).max()))
    assert [r[r < n].tolist() for r in g] == [torch.nonzero(b["row"] == i).flatten().tolist() for i in range(4)]
    vals = torch.arange(n, dtype=torch.float64)
    assert row_sums(vals, g).tolist() == torch.zeros(4, dtype=torch.float64).index_add(0, b["row"], vals).tolist()


def test_consecutive_micro_batches_for_pairs() -> None:
    """Pairs: micro-batch c of a step is examples [c*micro, (c+1)*micro) and goes to rank c % world, so ORPO's
    per-micro-batch NLL sees TRL's micro-batches whatever the number of ranks."""
    lay = Layout(2, 2, 2, 0, False, False, consecutive=True)
    steps = plan_epoch(np.full(10, 5), lay, 0)
    assert steps[0] == [[0, 1], [4, 5], [2, 3], [6, 7]]  # rank 0: runs 0 and 2; rank 1: runs 1 and 3
    assert steps[1] == [[8, 9], [], [], []]
    plain = plan_epoch(np.full(10, 5), Layout(2, 2, 2, 0, False, False), 0)
    assert plain[0] == [[0, 2], [4, 6], [1, 3], [5, 7]]


def test_log1mexp_is_stable_on_both_sides() -> None:
    x = torch.tensor([-1e-8, -0.5, -0.6931471805599453, -1.0, -50.0], dtype=torch.float64)
    assert torch.allclose(log1mexp(x), torch.log(-torch.expm1(x)), rtol=1e-12)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "robust", "hinge"])
def test_dpo_losses_by_hand(loss_type: str) -> None:
    from types import SimpleNamespace

    t = SimpleNamespace(objective="dpo", beta=0.5, loss_type=loss_type, label_smoothing=0.1, cpo_alpha=0.0,
                        simpo_gamma=0.5)
    obj = Preference(t)
    # One pair; per-token log-probs at positions of row 0 (chosen: 2 tokens) and row 1 (rejected: 1 token).
    lp = torch.tensor([-1.0, -2.0, -4.0])
    b = {"row_gather": torch.tensor([[0, 1], [2, 3]]), "is_label": torch.tensor([True, True, True]),
         "is_nll": torch.zeros(3, dtype=torch.bool), "n_answer": torch.tensor([2.0, 1.0])}
    ref = torch.tensor([[-2.5, -3.0]], dtype=torch.float64)
    loss, metrics = obj.loss(lp, b, ref)
    c, r = -3.0 - -2.5, -4.0 - -3.0  # log ratios
    d = c - r
    want = {"sigmoid": -np.log(1 / (1 + np.exp(-0.5 * d))), "hinge": max(0.0, 1 - 0.5 * d),
            "ipo": (c / 2 - r / 1 - 1 / (2 * 0.5)) ** 2,
            "robust": (-(0.9) * np.log(1 / (1 + np.exp(-0.5 * d))) + 0.1 * np.log(1 / (1 + np.exp(0.5 * d)))) / 0.8}
    assert loss.item() == pytest.approx(want[loss_type], rel=1e-6)
    assert metrics.tolist()[:4] == pytest.approx([0.5 * c, 0.5 * r, 1.0, 0.5 * d])


@pytest.mark.parametrize("override, key", [
    (["train.objective=dpo", "data.packing=true"], "data.packing"),
    (["train.objective=orpo", "train.micro_batch_size=auto"], "train.micro_batch_size"),
    (["train.objective=sft", "data.format=prompt"], "data.format"),
    (["train.objective=orpo", "train.loss_type=ipo"], "train.loss_type"),
    (["train.objective=dpo", "train.label_smoothing=0.1"], "train.label_smoothing"),
    (["train.objective=dpo", "train.loss_type=robust", "train.label_smoothing=0.5"], "train.label_smoothing"),
    (["train.objective=kto"], "train.objective"),
    (["train.beta=0"], "train.beta"),
])
def test_config_refusals(override: list[str], key: str) -> None:
    with pytest.raises(UsageError) as e:
        load_config(TINY, override)
    assert key in str(e.value)


def test_init_from_that_does_not_fit_is_refused_before_the_run(tmp_path: Path, tiny_model: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    from safetensors.torch import save_file

    bad = tmp_path / "adapter"
    bad.mkdir()
    save_file({"base_model.model.transformer.h.0.mlp.dense_4h_to_h.ia3_l": torch.ones(3)},
              str(bad / "adapter_model.safetensors"))
    out = tmp_path / "run"
    rc = main(["train", "--config", TINY, f"model.path={tiny_model}", f"ia3.init_from={bad}", f"output.dir={out}",
               f"data.cache_dir={tmp_path / 'cache'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "ia3.init_from" in err and "was it trained on this base model" in err and not out.exists()
    rc = main(["train", "--config", TINY, f"model.path={tiny_model}", f"ia3.init_from={tmp_path / 'none'}",
               f"output.dir={out}"])
    assert rc == 2 and "not found" in capsys.readouterr().err


def test_plan_counts_two_sequences_per_pair(capsys: pytest.CaptureFixture) -> None:
    cfg = str(ROOT / "configs" / "bloom-7b1.yaml")
    assert main(["plan", "--config", cfg]) == 0
    sft = capsys.readouterr().out
    assert main(["plan", "--config", cfg, "train.objective=dpo"]) == 0
    dpo = capsys.readouterr().out
    assert "pairs (" in dpo and "sequences)" in dpo and "pairs (" not in sft


@pytest.mark.parametrize("content", ["Checking.", None])
def test_a_preference_answer_with_tool_calls_is_refused(content: str | None) -> None:
    """Compared as text, the answer's calls were dropped without a word (the pair then preferred the answer with
    its calls removed; with no content the error spoke of a null string)."""
    from ia3_dist.data.formats import MESSAGES, Columns
    from ia3_dist.data.pairs import to_pair
    from ia3_dist.errors import UsageError

    call = {"type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    rec = {"messages": [{"role": "user", "content": "weather?"}],
           "chosen": {"role": "assistant", "content": content, "tool_calls": [call]}, "rejected": "Sunny."}
    with pytest.raises(UsageError, match=r"p.jsonl:3: field 'chosen' calls tools \(tool_calls\); a preference "
                                         r"answer is compared as text"):
        to_pair(rec, MESSAGES, Columns({}), "p.jsonl:3")
