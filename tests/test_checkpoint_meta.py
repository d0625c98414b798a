"""Resume refuses a checkpoint whose run differs in anything that would make the continuation inexact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ia3_dist.errors import UsageError
from ia3_dist.runtime.checkpoint import MUST_MATCH, check_compatible

META = {"world_size": 2, "micro_batch_size": 1, "grad_accum": 4, "seed": 42, "shuffle": True, "total_steps": 12,
        "data_key": "abc123", "n_examples": 96, "eval_ratio": 0.0, "group_by_length": False, "order_version": 2}
CHANGED = {"world_size": 1, "micro_batch_size": 2, "grad_accum": 8, "seed": 7, "shuffle": False, "total_steps": 24,
           "data_key": "def456", "n_examples": 95, "group_by_length": True, "order_version": 1}


def _ckpt(tmp_path: Path) -> Path:
    d = tmp_path / "checkpoints" / "step3"
    d.mkdir(parents=True)
    (d / "meta.json").write_text(json.dumps({**META, "step": 3}))
    return d


def test_same_run_is_accepted(tmp_path: Path) -> None:
    assert check_compatible(_ckpt(tmp_path), dict(META))["step"] == 3


def test_every_key_is_checked() -> None:
    assert set(CHANGED) == set(MUST_MATCH)


@pytest.mark.parametrize("key", list(CHANGED))
def test_each_difference_is_refused_naming_it(tmp_path: Path, key: str) -> None:
    with pytest.raises(UsageError, match=f"saved with {key}=.*this run has"):
        check_compatible(_ckpt(tmp_path), {**META, key: CHANGED[key]})
