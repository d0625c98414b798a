"""Preference training (issue 32) against TRL itself: per-step losses and TRL's reward metrics within 1e-5
relative (a reward is beta times the difference of two summed log-probs of magnitude ~10, which fp32 resolves to
~1e-6 absolute, and ORPO's log odds are differences too: those are compared against a floor of 0.1 when near 0,
log-probs and the rest against 1e-2), IA3
vectors within 5e-4 absolute (VEC_TOL)
after 10 steps, for ``dpo``, ``orpo`` and ``simpo``, tiny Bloom and tiny Llama, one process ZeRO-0 and 2 ranks
ZeRO-3, two micro-batch splits of the global batch of 8 pairs; DPO's other losses and label smoothing; SFT then
DPO from the SFT adapter, whose reference is that adapter; the embedded demo.

The reference side is TRL run in this process on the tokens ia3-dist made (see ``_trl_ref.py``)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _trl_ref import max_rel, pair_ids, run_trl, vectors_close
from _util import adapter_tensors, check, launch, metrics, random_pairs

from ia3_dist.config import DataSection
from ia3_dist.data.records import load_records
from ia3_dist.data.tokenize import tokenize
from ia3_dist.train.demo import make_pairs

pytestmark = pytest.mark.slow
STEPS, LR = 10, 1e-2
RTOL, FLOOR, REWARD_FLOOR = 1e-5, 1e-2, 0.1
# IA3 vectors, absolute (they start at 1 and move up to ~0.1 in these 10 steps at lr 1e-2). Other sums than TRL's
# (batch layout, chunked log-probs) round otherwise, and AdamW amplifies that in the few coordinates whose gradient
# is mostly cancellation: on the pretrained demo Bloom, measured 3.7e-6 to 4.6e-5 with ATen's AVX512 kernels, up to
# 7.7e-5 with its AVX2 and 7.2e-5 with its default ones (ATEN_CPU_CAPABILITY; the CPU decides which a box runs), and
# once 2.0e-4 in CI (ipo); tiny random Llama 1.2e-7 to 2.4e-7. A step more or less, or another beta, moves them by
# ~1e-2.
VEC_TOL = 5e-4
# (ranks, ZeRO config, micro-batch, accumulation): 8 pairs per step in every case.
LAYOUTS = {"w1-zero0-1x8": (1, "zero0", 1, 8), "w1-zero0-2x4": (1, "zero0", 2, 4),
           "w2-zero3-1x4": (2, "zero3", 1, 4), "w2-zero3-2x2": (2, "zero3", 2, 2)}
KEYS = {"dpo": (), "orpo": ("nll_loss", "log_odds_ratio", "log_odds_chosen"), "simpo": ("nll_loss",)}
COMMON = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
          "logps/rejected")


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    f = tmp_path_factory.mktemp("pairs") / "pairs.json"
    f.write_text(json.dumps(make_pairs(STEPS * 8, seed=9), ensure_ascii=False), encoding="utf-8")
    return f


@pytest.fixture(scope="module")
def models(demo_model: Path, family_models: dict) -> dict[str, Path]:
    return {"bloom": demo_model, "llama": family_models["llama"]}


@pytest.fixture(scope="module")
def trl_runs(pair_file: Path, models: dict, tmp_path_factory: pytest.TempPathFactory):
    """TRL's run for (model, objective, micro, accum, settings), once per module."""
    import importlib.util
    import os
    import sys

    from transformers import AutoTokenizer

    if importlib.util.find_spec("trl") is None and not os.environ.get("CI"):
        # requirements-dev.txt installs TRL's pinned version only on Python 3.11+ (it needs it); CI runs 3.11.
        pytest.skip(f"TRL is not installed (its pinned version needs Python 3.11+; this is {sys.version.split()[0]})")

    done: dict = {}

    def get(model: str, objective: str, micro: int, accum: int, init_adapter: Path | None = None, **kw) -> dict:
        key = (model, objective, micro, accum, init_adapter, tuple(sorted(kw.items())))
        if key not in done:
            tok = AutoTokenizer.from_pretrained(str(models[model]))
            cfg = DataSection(path=str(pair_file), max_length=256)
            pairs = pair_ids(tokenize(load_records(cfg, pairs=True), tok, cfg))
            done[key] = run_trl(objective, models[model], tok, pairs, tmp_path_factory.mktemp("trl"), micro, accum,
                                STEPS, LR, init_adapter=init_adapter, **kw)
        return done[key]

    return get


def _ours(out: Path, model: Path, pair_file: Path, objective: str, layout: tuple, *extra: str) -> list[dict]:
    """Our run in ``out``, with its own cache (tokens, DPO reference) beside it: a reference computed on another
    layout differs in the last bits, enough to turn a first-step tie (every margin 0) into a coin flip."""
    nproc, zero, micro, accum = layout
    check(launch(["--config", "configs/tiny-dpo-cpu.yaml", f"model.path={model}", f"data.path={pair_file}",
                  "data.eval_ratio=0", "train.eval_every=0", f"train.objective={objective}",
                  f"train.micro_batch_size={micro}", f"train.grad_accum={accum}", f"train.max_steps={STEPS}",
                  f"train.lr={LR}", "train.log_every=1", "data.shuffle=false", f"deepspeed.config={zero}",
                  f"output.dir={out}", "output.overwrite=true", f"data.cache_dir={out.parent / 'cache'}", *extra],
                 nproc=nproc))
    return [r for r in metrics(out) if "loss" in r]


def _close(key: str, ours: float, ref: float) -> bool:
    floor = REWARD_FLOOR if key.startswith(("rewards/", "log_odds")) else FLOOR
    return abs(ours - ref) <= RTOL * max(abs(ref), floor)


def _compare(out: Path, lines: list[dict], ref: dict, objective: str) -> None:
    assert [r["step"] for r in lines] == list(range(1, STEPS + 1))
    losses = [r["loss"] for r in lines]
    rel = max_rel(losses, ref["losses"])
    assert rel < RTOL, (losses, ref["losses"])
    assert len(ref["metrics"]) == STEPS
    worst = 0.0
    for key in (*COMMON, *KEYS[objective]):
        for ours, theirs in zip(lines, ref["metrics"], strict=True):
            assert _close(key, ours[key], theirs[key]), (key, ours["step"], ours[key], theirs[key])
            worst = max(worst, abs(ours[key] - theirs[key]))
    vec = vectors_close(adapter_tensors(out / "adapter"), ref["vectors"])
    print(f"parity {out.parent.name} {objective}: losses {rel:.1e} relative, metrics {worst:.1e} absolute, "
          f"IA3 vectors {vec:.1e}")
    assert vec < VEC_TOL


# Each (model, objective) once, the four layouts (one process ZeRO-0 and two ranks ZeRO-3, micro-batch 1 or 2) dealt
# in turn: every objective on both models and every layout at least once, in a quarter of the runs of the full
# product (suite time; the full 24 were measured, see README).
MATRIX = [(model, objective, list(LAYOUTS)[i % 4]) for i, (model, objective) in
          enumerate((m, o) for m in ("bloom", "llama") for o in ("dpo", "orpo", "simpo"))]


@pytest.mark.parametrize("model, objective, layout", MATRIX, ids=["-".join(c) for c in MATRIX])
def test_matches_trl(model: str, objective: str, layout: str, models: dict, pair_file: Path, trl_runs,
                     tmp_path: Path) -> None:
    nproc, _, micro, accum = LAYOUTS[layout]
    ref = trl_runs(model, objective, micro, accum * nproc)
    lines = _ours(tmp_path / "run", models[model], pair_file, objective, LAYOUTS[layout])
    _compare(tmp_path / "run", lines, ref, objective)


@pytest.mark.parametrize("objective, settings", [
    ("dpo", {"loss_type": "ipo"}), ("dpo", {"loss_type": "robust", "label_smoothing": 0.2}),
    ("simpo", {"cpo_alpha": 1.0, "label_smoothing": 0.1, "simpo_gamma": 0.3})],
    ids=["ipo", "robust", "simpo-alpha"])  # hinge matched as well (measured); left out for suite time
def test_losses_and_settings_match_trl(objective: str, settings: dict, models: dict, pair_file: Path, trl_runs,
                                       tmp_path: Path) -> None:
    ref = trl_runs("bloom", objective, 2, 4, **settings)
    lines = _ours(tmp_path / "run", models["bloom"], pair_file, objective, LAYOUTS["w1-zero0-2x4"],
                  *[f"train.{k}={v}" for k, v in settings.items()])
    _compare(tmp_path / "run", lines, ref, objective)


def _answer_logps(model_dir: Path, adapter: Path | None, pairs: list, n: int) -> np.ndarray:
    """Summed log-probs of the first ``n`` pairs' answers, by plain transformers (+ PEFT)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    out = np.zeros((n, 2))
    with torch.no_grad():
        for i, (prompt, chosen, rejected) in enumerate(pairs[:n]):
            for j, answer in enumerate((chosen, rejected)):
                ids = torch.tensor([prompt + answer])
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
                tgt = ids[0, 1:]
                out[i, j] = logp[torch.arange(len(tgt)), tgt][len(prompt) - 1:].sum().item()
    return out


def test_sft_then_dpo_uses_the_sft_adapter_as_reference(models: dict, pair_file: Path, trl_runs,
                                                         tmp_path: Path) -> None:
    """An SFT run's adapter is the DPO run's start and reference: the stored reference log-probs are the SFT
    adapter's (not the base's), the first step's rewards are exactly 0, and TRL with the SFT adapter loaded as its
    ``ref`` adapter by hand gives the same steps."""
    from transformers import AutoTokenizer

    sft = tmp_path / "sft"
    check(launch(["--config", "configs/tiny-cpu.yaml", f"model.path={models['bloom']}", "train.max_steps=8",
                  f"output.dir={sft}", "output.overwrite=true"]))
    lines = _ours(tmp_path / "dpo", models["bloom"], pair_file, "dpo", LAYOUTS["w1-zero0-2x4"],
                  f"ia3.init_from={sft / 'adapter'}")
    assert all(lines[0][k] == 0.0 for k in ("rewards/chosen", "rewards/rejected", "rewards/margins"))
    ref = trl_runs("bloom", "dpo", 2, 4, init_adapter=sft / "adapter")
    assert ref["ref_was_base"]  # TRL alone would have trained against the base model
    _compare(tmp_path / "dpo", lines, ref, "dpo")

    new = list((tmp_path / "cache" / "reference").glob("*.npy"))
    assert len(new) == 1, new
    stored = np.load(new[0])
    tok = AutoTokenizer.from_pretrained(str(models["bloom"]))
    cfg = DataSection(path=str(pair_file), max_length=256)
    pairs = pair_ids(tokenize(load_records(cfg, pairs=True), tok, cfg))
    with_sft = _answer_logps(models["bloom"], sft / "adapter", pairs, 4)
    base = _answer_logps(models["bloom"], None, pairs, 4)
    assert np.allclose(stored[:4], with_sft, rtol=1e-5, atol=1e-4), (stored[:4], with_sft)
    assert np.abs(with_sft - base).max() > 1e-2  # the SFT adapter's log-probs are not the base's


@pytest.mark.parametrize("group_by_length", [False, True])
def test_the_reference_is_scored_in_the_first_epochs_micro_batches(group_by_length: bool, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Each rank scores the reference in its own micro-batches of the first epoch, as training runs them
    (shuffled, length-grouped): a pair's summed log-probs depend on the batch it is padded in (in bf16, and on
    GPUs), so only then are step 1's margins exactly 0. They were scored in file order. A run resumed on another
    allocation whose micro-batches hold the same pairs names the same table."""
    from types import SimpleNamespace

    from ia3_dist.config import DataSection
    from ia3_dist.data.sampler import Layout, plan_epoch, rank_slice
    from ia3_dist.train.objectives import reference as R

    data = _pairs(11)
    data.cache_file = str(tmp_path / "pairs.bin")
    seen: list[list[int]] = []
    real = R.pair_batch
    monkeypatch.setattr(R, "pair_batch", lambda d, idx, pad, nll: seen.append(list(idx)) or real(d, idx, pad, nll))
    monkeypatch.setattr(R.dist, "all_reduce_sum", lambda a, *_: a)  # this rank's share: nothing cached is read

    class Engine:
        device = torch.device("cpu")
        module = torch.nn.Module()

        def __call__(self, input_ids, pos, target, attention_mask=None):
            return -(target.double() % 7 + 1).float() * 0.1

    def tr(lay: Layout, rank: int) -> SimpleNamespace:
        cfg = SimpleNamespace(data=DataSection(path="x.json", cache_dir=str(tmp_path / "cache")),
                              train=SimpleNamespace(micro_batch_size=lay.micro, precision="bf16"),
                              model=SimpleNamespace(attention="eager"), ia3=SimpleNamespace(init_from=None))
        p = SimpleNamespace(cfg=cfg, env=SimpleNamespace(rank=rank, world_size=lay.world, local_rank=rank,
                                                         is_main=rank == 0),
                            layout=lay, meta={"model_key": "m", "ia3": "{}"}, weights_dir=tmp_path, model_path="m")
        return SimpleNamespace(p=p, engine=Engine(), pad_id=0)

    lay = Layout(micro=2, accum=2, world=2, seed=3, shuffle=True, group_by_length=group_by_length, group_steps=2)
    plan = plan_epoch(data.lengths, lay, 0)
    for rank in range(2):
        seen.clear()
        R.reference_logps(tr(lay, rank), data, "train")
        want = [mb for st in plan for mb in rank_slice(st, rank, lay.accum)]
        assert [b for b, w in zip(seen, want, strict=True) if w] == [w for w in want if w]
        assert len(seen) == len(want)  # as many forward passes on every rank (ZeRO-3 gathers in each)
    assert sorted(i for st in plan for mb in st for i in mb) == list(range(11))
    # The held-out pairs in the evaluation's own batches (Preference.evaluate: rank r takes r, r+world, ...).
    for rank in range(2):
        seen.clear()
        R.reference_logps(tr(lay, rank), data, "eval")
        own = list(range(rank, 11, 2))
        assert seen == [own[j * 2:(j + 1) * 2] or [0] for j in range(3)], seen  # [0]: an empty slot's filler
    # Micro-batches of one pair: the same table on 1 rank x 8 as on 2 ranks x 4 (what a resume there reads).
    one = [mb for st in plan_epoch(data.lengths, Layout(1, 8, 1, 3, True, group_by_length), 0) for mb in st]
    two = [mb for st in plan_epoch(data.lengths, Layout(1, 4, 2, 3, True, group_by_length), 0) for mb in st]
    p = tr(lay, 0).p
    assert R.reference_key(p, data, one) == R.reference_key(p, data, two) != R.reference_key(p, data, [[0, 1]])


def test_demo_learns_the_preference_on_two_ranks(tmp_path: Path) -> None:
    """configs/tiny-dpo-cpu.yaml on 2 CPU ranks: held-out pair accuracy >= 0.8 (it starts at 0: the policy is its
    own reference, every margin 0), in under 2 minutes from the command to the adapter."""
    out = tmp_path / "demo"
    t0 = time.perf_counter()
    proc = check(launch(["--config", "configs/tiny-dpo-cpu.yaml", f"output.dir={out}"], nproc=2))
    took = time.perf_counter() - t0
    evals = [r for r in metrics(out) if "eval_rewards/accuracies" in r]
    first, last = evals[0], evals[-1]
    print(f"demo: {took:.1f} s; held-out pair accuracy {first['eval_rewards/accuracies']:.3f} at step "
          f"{first['step']} -> {last['eval_rewards/accuracies']:.3f} at step {last['step']}")
    assert last["eval_rewards/accuracies"] >= 0.8, evals
    assert last["eval_rewards/margins"] > first["eval_rewards/margins"] > 0
    assert "pair accuracy" in proc.stdout + proc.stderr
    # The result is a plain IA3 adapter: generate from it, and from its merged export, the same answers.
    from ia3_dist.cli import main

    merged = tmp_path / "merged"
    assert main(["export", "--adapter", str(out / "adapter"), "--out", str(merged)]) == 0
    answers = []
    for src in (out / "adapter", merged):
        f = tmp_path / f"{src.name}.jsonl"
        assert main(["generate", "--adapter", str(src), "--max-new-tokens", "24", "--out", str(f),
                     "请介绍一下熊猫。", "说说你对咖啡的看法。"]) == 0
        answers.append([json.loads(line)["response"] for line in f.read_text().splitlines()])
    assert answers[0] == answers[1] and all(answers[0]), answers


def test_dpo_resumes_exactly_on_another_allocation(models: dict, pair_file: Path, tmp_path: Path) -> None:
    """2 ranks ZeRO-2 stopped after 4 steps (checkpoint), resumed on 1 rank with the same global batch
    (train.global_batch_size): the resumed steps' losses and reward metrics and the adapter equal the
    uninterrupted 2-rank run's."""
    layout = (2, "zero2", 1, 4)
    straight = _ours(tmp_path / "straight", models["bloom"], pair_file, "dpo", layout)
    out = tmp_path / "cut"
    first = _ours(out, models["bloom"], pair_file, "dpo", layout, "train.stop_after_steps=4")
    assert [r["step"] for r in first] == [1, 2, 3, 4]
    proc = check(launch(["--config", "configs/tiny-dpo-cpu.yaml", f"model.path={models['bloom']}",
                         f"data.path={pair_file}", "data.eval_ratio=0", "train.eval_every=0", "train.objective=dpo",
                         "train.micro_batch_size=1", "train.global_batch_size=8", f"train.max_steps={STEPS}",
                         f"train.lr={LR}", "train.log_every=1", "data.shuffle=false", "deepspeed.config=zero2",
                         f"output.dir={out}", "train.resume=auto", f"data.cache_dir={tmp_path / 'cache'}"]))
    log = proc.stdout + proc.stderr
    assert "resuming step 4 saved on 2 ranks, now on 1 ranks" in log and "log-probs read from" in log, log[-3000:]
    resumed = [r for r in metrics(out) if "loss" in r]
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    for ours, ref in zip(resumed[4:], straight[4:], strict=True):
        for key in ("loss", *COMMON):
            assert abs(ours[key] - ref[key]) <= 1e-5 * max(abs(ref[key]), REWARD_FLOOR), (key, ours, ref)
    assert vectors_close(adapter_tensors(out / "adapter"), adapter_tensors(tmp_path / "straight" / "adapter")) < 1e-5


def _pairs(n: int):
    """``n`` preference pairs of random tokens (a 3-token prompt, answers of 2 to 8 tokens)."""
    return random_pairs(n, seed=0, max_answer=8, vocab_hi=50)


@pytest.mark.parametrize("objective,cpo_alpha", [("dpo", 0.0), ("orpo", 0.0), ("simpo", 0.0), ("simpo", 0.5)])
def test_held_out_pair_metrics_do_not_depend_on_ranks_or_micro_batch(objective: str, cpo_alpha: float,
                                                                     monkeypatch) -> None:
    """Preference.evaluate on each rank of 1 to 3 (a stand-in engine whose log-probs follow the tokens, the
    all-reduce summing what the ranks computed): eval_loss and the pair metrics are pair-weighted and the NLL
    (ORPO's, SimPO's with cpo_alpha) a token mean over the whole set, so neither the world size nor the
    micro-batch size moves them (eval_loss was the mean of the micro-batches' means; the NLL a per-batch token
    mean). A rank with no pair in a logging window all-reduces its zeros on the engine's device (NCCL takes no CPU
    tensor)."""
    from types import SimpleNamespace

    from ia3_dist.train.objectives import preference as P

    data = _pairs(7)
    t = SimpleNamespace(objective=objective, beta=0.5, simpo_gamma=0.5, cpo_alpha=cpo_alpha, label_smoothing=0.0,
                        loss_type="sigmoid")

    class Engine:
        device = torch.device("cpu")
        module = torch.nn.Module()  # what evaluate switches to eval mode and back

        def __call__(self, input_ids, attention_mask, pos, target):
            return -(target.double() % 7 + 1).float() * 0.1

    def run(world: int, micro: int) -> dict[str, float]:
        parts: list[torch.Tensor] = []
        monkeypatch.setattr(P.dist, "all_reduce_sum", lambda a: parts.append(a.clone()) or a)
        for r in range(world):
            tr = SimpleNamespace(p=SimpleNamespace(eval_data=data, env=SimpleNamespace(rank=r, world_size=world),
                                                   cfg=SimpleNamespace(train=SimpleNamespace(micro_batch_size=micro))),
                                 engine=Engine(), pad_id=0, device=Engine.device)
            obj = P.Preference(t)
            if objective == "dpo":  # the reference is the policy itself: margins 0
                obj.ref["eval"] = torch.zeros(7, 2, dtype=torch.float64)
            obj.evaluate(tr, None)
        total = torch.stack(parts).sum(0)
        monkeypatch.setattr(P.dist, "all_reduce_sum", lambda a, total=total: total.clone())
        return obj.evaluate(tr, None)

    want = run(1, 1)
    assert want["eval_pairs"] == 7
    for world, micro in [(1, 4), (2, 4), (3, 2), (2, 1)]:
        assert run(world, micro) == pytest.approx(want, rel=1e-6), (world, micro)  # fp32 sums per batch
    seen = []
    monkeypatch.setattr(P.dist, "all_reduce_sum", lambda a: seen.append(a.device) or torch.zeros(a.shape))
    obj = P.Preference(t)
    obj.device = torch.device("meta")  # as setup() sets it from the engine
    obj.window_metrics(1.0)
    assert seen == [torch.device("meta")]
