"""Exact sequence packing (``data.packing``), unit tier: the layout, the collator, and per family that a packed
document computes what it computes alone (isolation) and that a packed batch's loss and IA3 gradients equal the
padded batch's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ia3_dist.config import DataSection, IA3Section
from ia3_dist.data.collate import collate, label_positions
from ia3_dist.data.packing import choose_pack_length, collate_packed, efficiency, first_fit, pack_step
from ia3_dist.data.sampler import Layout, plan_epoch
from ia3_dist.data.tokenize import IGNORE_INDEX, load_or_tokenize
from ia3_dist.models.families import apply_speedups, batch_inputs
from ia3_dist.models.ia3 import apply_ia3
from ia3_dist.models.loss import TokenSumLM
from ia3_dist.train.demo import make_records

FAMILY_TYPES = ("bloom", "llama", "qwen2", "mistral", "gpt_neox")


def test_first_fit_places_every_example_once_within_the_row() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        lengths = rng.integers(1, 100, size=int(rng.integers(1, 40)))
        bins = first_fit(lengths.tolist(), 128)
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        assert all(sum(int(lengths[i]) for i in b) <= 128 for b in bins)
        # First-fit decreasing is within 11/9 OPT + 1; OPT >= total / cap.
        assert len(bins) <= 11 / 9 * -(-int(lengths.sum()) // 128) + 1
    with pytest.raises(ValueError, match="does not fit"):
        first_fit([10, 200], 128)


def test_pack_step_keeps_the_steps_examples_and_its_micro_step_count() -> None:
    lengths = np.array([30, 90, 10, 60, 60, 20, 100, 5])
    mbs = [[0, 1], [2, 3], [4, 5], [6, 7]]
    out = pack_step(mbs, lengths, 128)
    assert len(out) == 4
    assert sorted(i for mb in out for row in mb for i in row) == list(range(8))
    counts = [len(mb) for mb in out]
    assert max(counts) - min(counts) <= 1 and counts == sorted(counts, reverse=True)
    assert all(sum(int(lengths[i]) for i in row) <= 128 for mb in out for row in mb)


def _data(tmp_path: Path, tok, n: int = 12, turns: int = 1):
    f = tmp_path / "d.json"
    recs = make_records(n, 5, None)
    if turns > 1:  # multi-turn: earlier exchanges as history, every assistant turn labelled
        for i, r in enumerate(recs):
            r["history"] = [[recs[(i + k) % n]["instruction"], recs[(i + k) % n]["output"]] for k in range(1, turns)]
    f.write_text(json.dumps(recs, ensure_ascii=False), encoding="utf-8")
    return load_or_tokenize(DataSection(path=str(f), cache_dir=str(tmp_path), max_length=96), tok)


def test_collated_rows_restart_positions_and_never_label_across_documents(tmp_path: Path, tiny_tokenizer) -> None:
    data = _data(tmp_path, tiny_tokenizer)
    rows = [[0, 1, 2], [3]]
    cap = sum(len(data.example(i)[0]) for i in rows[0]) + 5
    b = collate_packed(data, rows, tiny_tokenizer.pad_token_id, cap)
    assert b["input_ids"].shape == (2, cap)
    at = 0
    for d, i in enumerate(rows[0], start=1):
        ids, mask, labels = data.example(i)
        n = len(ids)
        assert b["input_ids"][0, at:at + n].tolist() == list(ids)
        assert b["position_ids"][0, at:at + n].tolist() == list(range(n))
        assert (b["seq_ids"][0, at:at + n] == d).all()
        assert b["labels"][0, at].item() == IGNORE_INDEX
        assert b["labels"][0, at + 1:at + n].tolist() == list(labels[1:])
        at += n
    assert (b["seq_ids"][0, at:] == 0).all() and (b["attention_mask"][0, at:] == 0).all()
    assert b["position_ids"][0, at:].tolist() == list(range(cap - at))
    # The label count is exactly the unpacked batch's: no target crosses a document boundary.
    flat = collate(data, [0, 1, 2, 3], tiny_tokenizer.pad_token_id)
    assert len(label_positions(b["labels"])) == len(label_positions(flat["labels"]))


def _model_dir(model_type: str, family_models: dict, tiny_model: Path) -> Path:
    return tiny_model if model_type == "bloom" else family_models[model_type]


def _packed_model(model_type: str, family_models: dict, tiny_model: Path, rows_at_labels: bool = False):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ia3_dist.config import ModelSection

    d = _model_dir(model_type, family_models, tiny_model)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)
    selector = apply_speedups(base, ModelSection(last_mlp_at_labels=rows_at_labels), False)
    inputs = batch_inputs(base, packing=True)
    peft = apply_ia3(base, IA3Section())
    with torch.no_grad():
        for _, p in peft.named_parameters():
            if p.requires_grad:
                p.uniform_(0.5, 1.5)
    return TokenSumLM(peft, selector, inputs=inputs), AutoTokenizer.from_pretrained(str(d))


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_a_packed_document_sees_only_itself(model_type: str, family_models: dict, tiny_model: Path,
                                            tmp_path: Path) -> None:
    """Document B's logits are the same next to A, next to C (at another offset) and alone, unpadded (fp32)."""
    model, tok = _packed_model(model_type, family_models, tiny_model)
    data = _data(tmp_path, tok)
    lm = model.peft.get_base_model()
    lens = [len(data.example(i)[0]) for i in range(len(data))]
    a, c, b = 0, int(np.argmax(lens[1:])) + 1, 2
    cap = max(lens[a], lens[c]) + lens[b] + 3

    def logits_of_b(rows: list[list[int]], row: int, offset: int) -> torch.Tensor:
        batch = collate_packed(data, rows, tok.pad_token_id, cap)
        kw = model.base_inputs(batch["input_ids"], None, batch["seq_ids"], batch["position_ids"])
        with torch.no_grad():
            out = lm(input_ids=batch["input_ids"], use_cache=False, **kw).logits
        return out[row, offset:offset + lens[b]]

    alone_ids = torch.tensor([data.example(b)[0]])
    with torch.no_grad():
        alone = lm(input_ids=alone_ids, attention_mask=torch.ones_like(alone_ids), use_cache=False).logits[0]
    after_a = logits_of_b([[a, b], [c]], 0, lens[a])
    after_c = logits_of_b([[a], [c, b]], 1, lens[c])
    # Bigger row and same-length other documents: B at offset lens[a] in a row of other contents.
    torch.testing.assert_close(after_a, alone, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(after_c, alone, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
@pytest.mark.parametrize("turns", [1, 3])
def test_packed_loss_and_ia3_gradients_equal_the_padded_batch(model_type: str, turns: int, family_models: dict,
                                                              tiny_model: Path, tmp_path: Path) -> None:
    model, tok = _packed_model(model_type, family_models, tiny_model, rows_at_labels=True)
    data = _data(tmp_path, tok, n=10, turns=turns)
    idx = list(range(10))
    cap = -(-max(len(data.example(i)[0]) for i in idx) // 64) * 64 * 2

    def loss_and_grads(batches: list[dict]) -> tuple[float, int, dict]:
        model.zero_grad()
        total, count = 0.0, 0
        for batch in batches:
            batch = {**batch, "label_pos": label_positions(batch["labels"])}
            loss, n = model(**batch)
            loss.backward()
            total += float(loss.detach())
            count += int(n)
        return total, count, {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}

    padded = loss_and_grads([collate(data, idx[:5], tok.pad_token_id), collate(data, idx[5:], tok.pad_token_id)])
    rows = pack_step([idx[:5], idx[5:]], data.lengths, cap)
    packed = loss_and_grads([collate_packed(data, r, tok.pad_token_id, cap) for r in rows])
    assert packed[1] == padded[1]
    assert packed[0] == pytest.approx(padded[0], rel=1e-6)
    for k, g in padded[2].items():
        torch.testing.assert_close(packed[2][k], g, rtol=1e-5, atol=1e-7)


def test_auto_pack_length_and_efficiency_on_the_shared_alpaca_records(shared_data: Path, tmp_path: Path,
                                                                      tiny_tokenizer) -> None:
    """The shared records at the default width: >= 97% of row slots are real tokens with 64 examples per rank
    step; the row width is fixed and the row count per micro-step bounded by the micro-batch."""
    data = load_or_tokenize(DataSection(path=str(shared_data), cache_dir=str(tmp_path)),
                            tiny_tokenizer)
    lay = Layout(micro=8, accum=8, world=1, seed=0, shuffle=True, group_by_length=False)
    steps = plan_epoch(data.lengths, lay, 0)
    cap = choose_pack_length(steps, data.lengths, lay.accum, lay.world)
    assert cap % 64 == 0 and cap >= int(data.lengths.max())
    eff, rows_per_step = efficiency(steps, data.lengths, lay.accum, lay.world, cap)
    assert eff >= 0.97, (cap, eff)
    shapes = set()
    for step in steps:
        for mb in pack_step(step, data.lengths, cap):
            if mb:
                shapes.add(collate_packed(data, mb, 0, cap)["input_ids"].shape)
    assert {w for _, w in shapes} == {cap}
    assert max(r for r, _ in shapes) <= lay.micro, shapes
    print(f"pack_length {cap}: efficiency {eff:.3f}, {rows_per_step:.1f} rows per step, shapes {sorted(shapes)}")


def test_packed_steps_end_at_the_last_micro_step_any_rank_has_a_row_in() -> None:
    """At micro-batch 1 x accumulation 8, eight 10-token examples pack into 2 rows of 64: the 6 micro-steps left
    empty on every rank are not run (they ran a filler row each at weight 0: 4x the compute here, 6x on short
    data). A rank with fewer rows than another runs a filler row up to the other's last: every rank runs as many
    forward passes (ZeRO-3 gathers in each). The efficiency counts what runs."""
    from ia3_dist.data.packing import step_micro_steps

    lengths = np.full(16, 10)
    one = [[[i] for i in range(8)]]
    assert step_micro_steps(one[0], lengths, 64, 8, 1) == 2
    assert efficiency(one, lengths, 8, 1, 64) == (80 / 128, 2.0)
    assert efficiency([[list(range(8))]], lengths, 1, 1, 64) == (80 / 128, 2.0)  # micro 8 x 1
    # Two ranks: rank 0 packs 8 examples into 2 rows, rank 1 its one example into 1 row and a filler.
    two = [[[i] for i in range(8)] + [[8]] + [[] for _ in range(7)]]
    assert step_micro_steps(two[0], lengths, 64, 8, 2) == 2
    assert efficiency(two, lengths, 8, 2, 64) == (90 / 256, 4.0)
    # A rank full to grad_accum ends the search: every micro-step runs.
    assert step_micro_steps(one[0], np.full(16, 60), 64, 8, 1, own=8) == 8
    assert choose_pack_length(one, lengths, 8, 1) == 64


@pytest.mark.parametrize("args, key, says", [
    (["data.packing=true", "data.pack_length=32"], "data.pack_length", "longest example"),
    (["data.packing=true", "train.micro_batch_size=auto"], "data.packing", "micro_batch_size=auto"),
    (["data.packing=true", "data.pack_length=wide"], "data.pack_length", "positive integer or auto"),
])
def test_bad_packing_settings_exit_2_before_anything_starts(args: list[str], key: str, says: str, tmp_path: Path,
                                                           tiny_model: Path, capsys) -> None:
    from test_config_hardening import check_exits_2

    err = check_exits_2(tmp_path, tiny_model, capsys, args)
    assert key in err and says in err, err


def test_rope_rebuilt_from_the_batch_is_packed_only_within_its_length(tmp_path: Path, family_models: dict,
                                                                       capsys) -> None:
    """transformers' dynamic and longrope rotary types rebuild their frequencies from the batch's longest position
    once it passes a length: packed rows wider than that would give a document other angles than it has alone
    (max logit error 6e-5 against 6e-8 measured). Refused, naming the key and the widest exact row; rows within
    it are exact and run."""
    from test_config_hardening import check_exits_2

    from ia3_dist.models.families.packed import rescaled_rope

    d = tmp_path / "llama"
    shutil.copytree(family_models["llama"], d)
    c = json.loads((d / "config.json").read_text())
    c.update(rope_scaling={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=40)
    (d / "config.json").write_text(json.dumps(c))
    err = check_exits_2(tmp_path, d, capsys, ["data.packing=true", "data.pack_length=64"])
    assert "data.packing" in err and "rope_type 'dynamic'" in err and "data.pack_length to at most 40" in err, err
    c["max_position_embeddings"] = 64
    (d / "config.json").write_text(json.dumps(c))
    from ia3_dist.cli import main

    rc = main(["check", "--config", "configs/tiny-cpu.yaml", f"model.path={d}", "data.packing=true",
               "data.pack_length=64", f"output.dir={tmp_path / 'ok'}"])
    assert rc == 0, capsys.readouterr().err
    per_layer = SimpleNamespace(max_position_embeddings=4096, rope_parameters={
        "full_attention": {"rope_type": "longrope", "original_max_position_embeddings": 2048},
        "sliding_attention": {"rope_type": "default"}})
    assert rescaled_rope(per_layer) == ("longrope", 2048)
    assert rescaled_rope(SimpleNamespace(rope_parameters={"rope_type": "llama3"}, max_position_embeddings=8)) is None
    assert rescaled_rope(SimpleNamespace(rope_scaling={"type": "dynamic"}, max_position_embeddings=8)) == ("dynamic", 8)


def test_check_reports_the_packed_layout(tmp_path: Path, tiny_model: Path, capsys) -> None:
    from ia3_dist.cli import main

    rc = main(["check", "--config", "configs/tiny-cpu.yaml", f"model.path={tiny_model}", "data.packing=true",
               f"output.dir={tmp_path / 'out'}"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "packed in rows of 64 tokens (data.pack_length), packing efficiency" in out, out
