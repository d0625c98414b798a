"""The LR schedule equals HF Trainer's ``get_{linear,cosine,constant}_schedule_with_warmup`` step for step."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

from ia3_dist.config import TrainSection
from ia3_dist.train.schedule import lr_schedule

HF = {
    "linear": lambda opt, w, n: get_linear_schedule_with_warmup(opt, w, n),
    "cosine": lambda opt, w, n: get_cosine_schedule_with_warmup(opt, w, n),
    "constant": lambda opt, w, n: get_constant_schedule_with_warmup(opt, w),
}


def _lrs(sched, opt, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("kind", list(HF))
@pytest.mark.parametrize("warmup, total", [(0, 1), (0, 12), (3, 12), (12, 12), (5, 40), (1, 2)])
def test_schedule_matches_transformers(kind: str, warmup: int, total: int) -> None:
    lr = 3e-3
    t = TrainSection(lr=lr, scheduler=kind, warmup_steps=warmup)
    ours_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    ref_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    ours = _lrs(lr_schedule(t, total)(ours_opt), ours_opt, total + 2)
    ref = _lrs(HF[kind](ref_opt, warmup, total), ref_opt, total + 2)
    assert ours == pytest.approx(ref, rel=1e-12, abs=1e-15)
    assert ours[0] == (0.0 if warmup else lr)  # HF trains the first step at lr 0 during warmup, full lr without


def test_a_warmup_the_run_never_finishes_is_said(tiny_model, capsys) -> None:
    """warmup_steps >= the run's steps: the peak lr is never reached (HF Trainer runs it too): the preflight says
    so, with the fraction of train.lr the last step gets."""
    from pathlib import Path

    from ia3_dist.cli import main

    tiny = str(Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml")
    assert main(["check", "--config", tiny, f"model.path={tiny_model}", "train.warmup_steps=1000"]) == 0
    out = capsys.readouterr().out
    assert "note: train.warmup_steps=1000 is not below the run's 150 optimizer steps" in out, out
    assert "its last step's is 0.149 of it" in out, out
    assert main(["check", "--config", tiny, f"model.path={tiny_model}", "train.warmup_steps=10"]) == 0
    assert "never reaches train.lr" not in capsys.readouterr().out
