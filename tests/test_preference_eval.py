"""Held-out preference metrics on a real (tiny, random) Llama through the losses' own module: the NLL of ORPO and of
SimPO with ``cpo_alpha`` (``eval_nll_loss``, and the NLL part of ``eval_loss``) is a token mean over the whole
held-out set, so the eval micro-batch size and the number of ranks do not move it (it was a per-batch token mean).
Training keeps TRL's per-micro-batch definition."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from _util import random_pairs

from ia3_dist.config import IA3Section
from ia3_dist.data.collate import pair_batch
from ia3_dist.data.tokens import TokenizedData
from ia3_dist.models.ia3 import apply_ia3
from ia3_dist.models.loss import TokenLogpLM
from ia3_dist.train.objectives import preference as P

N_PAIRS = 7


def _pairs(n: int) -> TokenizedData:
    """``n`` pairs of random tokens: a 3-token prompt and answers of 2 to 12 tokens, lengths far enough apart that
    a per-batch token mean differs from the whole set's."""
    return random_pairs(n, seed=1, max_answer=12, vocab_hi=60)


@pytest.fixture(scope="module")
def engine() -> Any:
    """A stand-in for the DeepSpeed engine: the module the preference objective trains, on a tiny Llama."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")
    module = TokenLogpLM(apply_ia3(AutoModelForCausalLM.from_config(cfg), IA3Section()))

    class Engine:
        device = torch.device("cpu")

        def __init__(self) -> None:
            self.module = module

        def __call__(self, **kw: torch.Tensor) -> torch.Tensor:
            return self.module(**kw)

    return Engine()


def _evaluate(engine: Any, t: Any, data: TokenizedData, world: int, micro: int,
              monkeypatch: pytest.MonkeyPatch) -> dict[str, float]:
    """Preference.evaluate on each of ``world`` ranks, the all-reduce summing what they computed."""
    parts: list[torch.Tensor] = []
    monkeypatch.setattr(P.dist, "all_reduce_sum", lambda a: parts.append(a.clone()) or a)
    trs = [SimpleNamespace(p=SimpleNamespace(eval_data=data, env=SimpleNamespace(rank=r, world_size=world),
                                             cfg=SimpleNamespace(train=SimpleNamespace(micro_batch_size=micro))),
                           engine=engine, pad_id=0, device=engine.device) for r in range(world)]
    for tr in trs:
        P.Preference(t).evaluate(tr, None)
    total = torch.stack(parts).sum(0)
    monkeypatch.setattr(P.dist, "all_reduce_sum", lambda a: total.clone())
    return P.Preference(t).evaluate(trs[0], None)


@pytest.mark.parametrize("objective,cpo_alpha", [("orpo", 0.0), ("simpo", 0.7)])
def test_held_out_nll_is_a_token_mean_over_the_whole_set(objective: str, cpo_alpha: float, engine: Any,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    t = SimpleNamespace(objective=objective, beta=0.2, simpo_gamma=0.5, cpo_alpha=cpo_alpha, label_smoothing=0.0,
                        loss_type="sigmoid")
    data = _pairs(N_PAIRS)
    obj = P.Preference(t)
    # The definition, straight: every pair alone, its NLL tokens' negative log-probs summed, over their count.
    nll_sum, nll_n, per_pair = 0.0, 0, []
    with torch.no_grad():
        for i in range(N_PAIRS):
            b = pair_batch(data, [i], 0, obj.nll)
            lp = engine(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pos=b["pos"],
                        target=b["target"])
            s, n = P.nll_parts(lp, b)
            nll_sum, nll_n = nll_sum + float(s), nll_n + int(n)
            per_pair.append(float(s) / int(n))
    want_nll = nll_sum / nll_n
    # The per-pair means differ enough that a per-batch mean would show: the test can see the old definition.
    assert max(per_pair) - min(per_pair) > 1e-3 * abs(want_nll)

    want = _evaluate(engine, t, data, 1, 1, monkeypatch)
    assert want["eval_nll_loss"] == pytest.approx(want_nll, rel=1e-6)
    for world, micro in [(1, 2), (1, 3), (1, N_PAIRS), (2, 2), (3, 1), (2, 4)]:
        got = _evaluate(engine, t, data, world, micro, monkeypatch)
        assert got == pytest.approx(want, rel=1e-6), (world, micro)

    # eval_loss is its pair part (pair-weighted) plus the weighted whole-set NLL: what the loss of one batch of
    # every pair is, where TRL's per-batch NLL is the whole set's.
    b = pair_batch(data, list(range(N_PAIRS)), 0, obj.nll)
    with torch.no_grad():
        lp = engine(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pos=b["pos"], target=b["target"])
        loss, _ = obj.loss(lp, b, None)
        s, n = P.nll_parts(lp, b)
    assert float(s) / int(n) == pytest.approx(want_nll, rel=1e-5)
    assert want["eval_loss"] == pytest.approx(float(loss), rel=1e-5)


def test_training_keeps_trls_per_micro_batch_nll(engine: Any) -> None:
    """The training term (what the optimizer sees) is unchanged: ORPO's NLL is the token mean of its micro-batch."""
    t = SimpleNamespace(objective="orpo", beta=0.2, simpo_gamma=0.5, cpo_alpha=0.0, label_smoothing=0.0,
                        loss_type="sigmoid")
    data = _pairs(N_PAIRS)
    obj = P.Preference(t)
    b = pair_batch(data, [0, 3], 0, obj.nll)
    with torch.no_grad():
        lp = engine(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pos=b["pos"], target=b["target"])
        _, metrics = obj.loss(lp, b, None)
    sel = b["is_nll"]
    assert float(metrics[obj.keys.index("nll_loss")]) == pytest.approx(float(-lp[sel].sum() / sel.sum()), rel=1e-6)
