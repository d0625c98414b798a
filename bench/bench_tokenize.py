#!/usr/bin/env python
"""Tokenization speed: the reference recipe's unbatched ``Dataset.map(process_func)`` against ia3-dist's batched
tokenization (fast tokenizer, flat numpy arrays, multi-process over chunks), on the shared Alpaca records
replicated to --records (default 50,000). Both produce identical ids and labels; the script checks that.

    python bench/bench_tokenize.py [--records 50000] [--num-proc N] [--unique] [--multi-turn]

``--multi-turn`` groups the records into ShareGPT conversations of three turns with a system prompt (one .jsonl
line each) and compares against the straightforward per-conversation ``Dataset.map`` that tokenizes each turn's
prompt and answer as the human_assistant template defines them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
SHARED = ROOT.parent / "shared" / "data" / "alpaca_zh_demo.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=50_000)
    ap.add_argument("--num-proc", type=int, default=0, help="tokenizer processes for ia3-dist (0: all cores)")
    ap.add_argument("--unique", action="store_true", help="make every record distinct (a numbered instruction), "
                    "so encoding each distinct text once gains nothing")
    ap.add_argument("--multi-turn", action="store_true", help="3-turn ShareGPT conversations with a system prompt")
    a = ap.parse_args()
    from datasets import Dataset
    from reference_recipe import process_func
    from transformers import AutoTokenizer

    from ia3_dist.config import DataSection
    from ia3_dist.data.records import load_records
    from ia3_dist.data.tokenize import tokenize
    from ia3_dist.train.demo import ensure_assets, ensure_data

    demo = ensure_assets(None)
    src = SHARED if SHARED.exists() else ensure_data(None)
    base = json.loads(src.read_text(encoding="utf-8"))
    records = (base * (a.records // len(base) + 1))[: a.records]
    if a.unique:
        records = [{**r, "instruction": f"{i}. {r['instruction']}", "output": f"{r['output']} ({i})"}
                   for i, r in enumerate(records)]
    tok = AutoTokenizer.from_pretrained(str(demo / "model"))
    if a.multi_turn:
        return multi_turn(records, tok, a.num_proc, src.name)
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "records.json"
        f.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
        t0 = time.perf_counter()
        ds = Dataset.from_list(records)
        ref = ds.map(lambda ex: process_func(ex, tok), remove_columns=ds.column_names)
        t_ref = time.perf_counter() - t0
        cfg = DataSection(path=str(f), num_proc=a.num_proc)
        t0 = time.perf_counter()
        data = tokenize(load_records(cfg), tok, cfg)
        t_ours = time.perf_counter() - t0
    dropped = set(data.dropped.tolist())
    j = 0
    for i in range(0, len(records), max(1, len(records) // 500)):  # spot-check 500 examples for identity
        if i in dropped:
            continue
        j = i - sum(1 for x in dropped if x < i)
        ids, _, labels = data.example(j)
        assert ids == ref[i]["input_ids"] and labels == ref[i]["labels"], i
    print(f"{len(records)} records ({src.name} {'made distinct' if a.unique else 'replicated'}), "
          f"{os.cpu_count()} cores")
    print(f"reference unbatched map: {t_ref:7.2f}s  {len(records) / t_ref:9.0f} records/s")
    print(f"ia3-dist batched:        {t_ours:7.2f}s  {len(records) / t_ours:9.0f} records/s  "
          f"({t_ref / t_ours:.1f}x; includes reading and checking the JSON)")


def multi_turn(records: list[dict], tok, num_proc: int, src_name: str) -> None:
    from datasets import Dataset

    from ia3_dist.config import DataSection
    from ia3_dist.data.records import load_records
    from ia3_dist.data.tokenize import tokenize

    system = "你是一个乐于助人的助手。"
    convs = [{"system": system, "conversations": [m for r in records[i:i + 3] for m in (
        {"from": "human", "value": "\n".join([r["instruction"], r["input"]]).strip()},
        {"from": "gpt", "value": r["output"]})]} for i in range(0, len(records) - 2, 3)]

    def naive(ex: dict) -> dict:
        ids: list[int] = []
        labels: list[int] = []
        msgs = ex["conversations"]
        for k in range(0, len(msgs), 2):
            prompt = ("Human: " + msgs[k]["value"]).strip() + "\n\nAssistant: "
            if k == 0:
                prompt = ex["system"] + "\n\n" + prompt
            p = tok(prompt).input_ids
            r = tok(msgs[k + 1]["value"] + tok.eos_token).input_ids
            ids += p + r
            labels += [-100] * len(p) + r
        return {"input_ids": ids[:256], "labels": labels[:256]}

    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "conversations.jsonl"
        f.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in convs), encoding="utf-8")
        t0 = time.perf_counter()
        ds = Dataset.from_list(convs)
        ref = ds.map(naive, remove_columns=ds.column_names)
        t_ref = time.perf_counter() - t0
        cfg = DataSection(path=str(f), num_proc=num_proc, unlabeled="keep")
        t0 = time.perf_counter()
        data = tokenize(load_records(cfg), tok, cfg)
        t_ours = time.perf_counter() - t0
    for i in range(0, len(convs), max(1, len(convs) // 500)):
        ids, _, labels = data.example(i)
        assert ids == ref[i]["input_ids"] and labels == ref[i]["labels"], i
    n_tok = int(data.lengths.sum())
    print(f"{len(convs)} 3-turn conversations ({src_name} records), {n_tok} tokens, {os.cpu_count()} cores")
    print(f"per-conversation map: {t_ref:7.2f}s  {len(convs) / t_ref:9.0f} conversations/s")
    print(f"ia3-dist batched:     {t_ours:7.2f}s  {len(convs) / t_ours:9.0f} conversations/s  "
          f"({t_ref / t_ours:.1f}x; includes reading and checking the JSONL)")


if __name__ == "__main__":
    main()
