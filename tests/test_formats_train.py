"""The same conversations written as alpaca .json, ShareGPT .jsonl and messages .parquet train identically: the
per-step losses of real runs are equal (each format is only a spelling of the same examples)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _util import check, launch, metrics

from ia3_dist.train.demo import make_records

pytestmark = pytest.mark.slow


def _conversations() -> list[tuple[str, list[tuple[str, str]]]]:
    """(system, [(user, assistant), ...]) for 24 examples, a third of them multi-turn."""
    recs = make_records(48, seed=5, style=None)
    out = []
    for k in range(24):
        a, b = recs[2 * k], recs[2 * k + 1]
        turns = [(a["instruction"], a["output"])] + ([(b["instruction"], b["output"])] if k % 3 == 0 else [])
        out.append(("你是助手。" if k % 4 == 0 else "", turns))
    return out


def _write(tmp: Path) -> dict[str, Path]:
    convs = _conversations()
    alpaca = [{"instruction": t[-1][0], "input": "", "output": t[-1][1], "history": [list(p) for p in t[:-1]],
               **({"system": s} if s else {})} for s, t in convs]
    sharegpt = [{"conversations": [m for u, a in t for m in ({"from": "human", "value": u},
                                                                {"from": "gpt", "value": a})],
                 **({"system": s} if s else {})} for s, t in convs]
    messages = [{"messages": ([{"role": "system", "content": s}] if s else [])
                 + [m for u, a in t for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})]}
                for s, t in convs]
    files = {"alpaca": tmp / "d.json", "sharegpt": tmp / "d.jsonl", "messages": tmp / "d.parquet"}
    files["alpaca"].write_text(json.dumps(alpaca, ensure_ascii=False), encoding="utf-8")
    files["sharegpt"].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in sharegpt),
                                 encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(messages), files["messages"])
    return files


def test_three_spellings_train_identically(tmp_path: Path, tiny_model: Path) -> None:
    losses = {}
    for fmt, f in _write(tmp_path).items():
        out = tmp_path / fmt
        check(launch(["--config", "configs/tiny-cpu.yaml", f"model.path={tiny_model}", f"data.path={f}",
                      "deepspeed.config=zero0", "train.micro_batch_size=2", "train.grad_accum=4", "train.epochs=1",
                      "train.log_every=1", "data.shuffle=false", f"output.dir={out}", "checkpoint.at_end=false"]))
        losses[fmt] = [r["loss"] for r in metrics(out)]
    assert len(losses["alpaca"]) == 3
    assert losses["alpaca"] == losses["sharegpt"] == losses["messages"], losses
