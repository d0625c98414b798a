#!/usr/bin/env python
"""Peak memory of the LM-head loss at Bloom's 250,880-token vocabulary, full logits against chunked
(``train.loss_chunk_mib``), forward + backward of the same label rows, each in a fresh process.

    python bench/bench_loss_memory.py                       # 1024 label rows, hidden 1024 (bloom-560m's)
    python bench/bench_loss_memory.py --rows 2048 --hidden 2048 --json out.json

Peak host RSS above the process's RSS just before the loss (CPU); on a GPU, peak allocated above the allocation
before it. Prints one line per variant with the loss, the time and the memory, and the ratio of the two peaks;
the losses and the gradient of the hidden rows must agree to fp32 rounding.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
import torch
from torch import nn
sys.path.insert(0, sys.argv[1])
from ia3_dist.models.loss import TokenSumLM

rows, hidden, vocab, chunk_mib = (int(a) for a in sys.argv[2:6])
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
torch.manual_seed(0)


class LM(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(hidden, vocab, bias=False).requires_grad_(False)

    def get_output_embeddings(self):
        return self.head


lm = LM().to(dev)
h = torch.randn(rows, hidden, device=dev, requires_grad=True)
t = torch.randint(0, vocab, (rows,), device=dev)
wrapper = TokenSumLM(nn.Identity(), chunk_bytes=chunk_mib << 20)


def rss_mib():
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:")) / 1024


if dev.type == "cuda":
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated() / 2**20
    torch.cuda.reset_peak_memory_stats()
else:
    before = rss_mib()
t0 = time.perf_counter()
loss = wrapper.head_loss(lm, h, t)
loss.backward()
if dev.type == "cuda":
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**20 - before
else:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
print(json.dumps({"loss": loss.item(), "grad_sum": h.grad.double().abs().sum().item(), "peak_mib": peak,
                  "seconds": time.perf_counter() - t0, "device": dev.type}))
"""


def run(rows: int, hidden: int, vocab: int, chunk_mib: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), str(rows), str(hidden), str(vocab),
                          str(chunk_mib)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1024, help="label rows in the micro-batch")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=250880)
    ap.add_argument("--chunk-mib", type=int, default=256, help="train.loss_chunk_mib of the chunked side")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    res = {"full": run(a.rows, a.hidden, a.vocab, 0), "chunked": run(a.rows, a.hidden, a.vocab, a.chunk_mib)}
    for name, r in res.items():
        print(f"{name:8s} loss {r['loss']:.6f}  |grad| {r['grad_sum']:.6f}  peak {r['peak_mib']:8.1f} MiB  "
              f"{r['seconds']:6.2f} s  ({r['device']})")
    f, c = res["full"], res["chunked"]
    print(f"rows {a.rows}, hidden {a.hidden}, vocab {a.vocab}: chunked peak {c['peak_mib'] / f['peak_mib']:.3f}x "
          f"of full, time {c['seconds'] / f['seconds']:.2f}x, loss rel. diff "
          f"{abs(c['loss'] - f['loss']) / abs(f['loss']):.1e}, grad rel. diff "
          f"{abs(c['grad_sum'] - f['grad_sum']) / f['grad_sum']:.1e}")
    if a.json:
        a.json.write_text(json.dumps({"args": vars(a) | {"json": str(a.json)}, **res}, indent=1))


if __name__ == "__main__":
    main()
