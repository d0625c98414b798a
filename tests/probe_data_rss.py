"""One rank's data path, as a training run has it: the preflight (which opens the token cache) and the rank's
micro-batches of the first steps, collated. Prints one JSON line: the peak RSS and whether the cache was read.

Run as ``RANK=r WORLD_SIZE=n python tests/probe_data_rss.py --config X [overrides]`` (tests/test_prepare.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ia3_dist.cli import _train_parser  # noqa: E402
from ia3_dist.config import load_config  # noqa: E402
from ia3_dist.data.collate import collate  # noqa: E402
from ia3_dist.data.sampler import iter_steps, rank_slice  # noqa: E402
from ia3_dist.runtime import dist, hostmem  # noqa: E402
from ia3_dist.train.prepare import prepare  # noqa: E402

STEPS = 40


def main() -> None:
    args = _train_parser("probe").parse_args(sys.argv[1:])
    cfg = load_config(args.config, args.overrides)
    env = dist.detect()
    p = prepare(cfg, env)
    tokens = 0
    for _, _, step in iter_steps(p.data.lengths, p.layout, min(STEPS, p.total_steps)):
        for mb in rank_slice(step, env.rank, p.layout.accum):
            if mb:
                tokens += int(collate(p.data, mb, p.tokenizer.pad_token_id)["attention_mask"].sum())
    print(json.dumps({"rank": env.rank, "peak_rss_mib": hostmem.peak_rss_gib() * 1024, "tokens": tokens,
                      "from_cache": p.data.seconds == 0, "examples": len(p.data)}))


if __name__ == "__main__":
    main()
