#!/usr/bin/env python
"""Tokenization speed: the reference recipe's unbatched ``Dataset.map(process_func)`` against ia3-dist's batched
tokenization (fast tokenizer, flat numpy arrays, multi-process over chunks), on the shared Alpaca records
replicated to --records (default 50,000). Both produce identical ids and labels; the script checks that.

    python bench/bench_tokenize.py [--records 50000] [--num-proc N]
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


if __name__ == "__main__":
    main()
