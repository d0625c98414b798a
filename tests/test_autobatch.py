"""``train.micro_batch_size: auto`` (unit tier): the schema, the divisor arithmetic and the plan's pick. The probe,
its step-down and the exact continuation run on 2 real ranks in test_resume.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from ia3_dist.config import load_config
from ia3_dist.errors import UsageError
from ia3_dist.models import memory
from ia3_dist.models.load import load_model_config
from ia3_dist.runtime.dist import DistEnv
from ia3_dist.train import autobatch


def test_schema_accepts_auto_and_refuses_other_words(tmp_path: Path) -> None:
    cfg = load_config(None, ["train.micro_batch_size=auto", "train.grad_accum=12"])
    assert cfg.train.micro_batch_size == "auto"
    for bad, why in (("big", "positive integer or auto"), ("0", ">= 1"), ("2.5", "positive integer or auto")):
        with pytest.raises(UsageError, match=r"train\.micro_batch_size") as e:
            load_config(None, [f"train.micro_batch_size={bad}"])
        assert why in str(e.value)


def test_with_micro_keeps_the_examples_per_step() -> None:
    cfg = load_config(None, ["train.micro_batch_size=auto", "train.grad_accum=12"])
    assert autobatch.divisors_desc(12) == [12, 6, 4, 3, 2, 1]
    for m in autobatch.divisors_desc(12):
        t = autobatch.with_micro(cfg, m, 12).train
        assert (t.micro_batch_size, t.micro_batch_size * t.grad_accum) == (m, 12)


def test_plan_pick_is_the_largest_divisor_the_memory_model_fits(tiny_model: Path) -> None:
    cfg = load_config(None, [f"model.path={tiny_model}", "train.grad_accum=12", "data.max_length=64"])
    mc = load_model_config(str(tiny_model), cfg.model)
    env = DistEnv(0, 0, 2, 2)
    ds = {"zero_optimization": {"stage": 2}}
    ample = autobatch.plan_pick(cfg, mc, env, ds, 64)
    assert ample.planned == 12 and ample.samples_per_rank == 12
    # A budget between the model's needs at micro-batch 5 and 6 (CPU ranks: the framework's RSS counts too):
    # 5 does not divide 12, so the pick is 4.
    s = memory.shape_of(mc, cfg.ia3)
    need = [memory.rank_memory(s, "", 2, False, 2, 64, m, 4, False, memory.framework_rss()).gpu_total
            for m in (5, 6)]
    picked = autobatch.plan_pick(cfg, mc, env, ds, 64, budget=(need[0] + need[1]) / 2)
    assert picked.planned == 4
    assert "plan picked 4" in autobatch.AutoBatch(12, 4, 1.0, micro=4, probe_peak_gib=0.5, source="probe").line()
