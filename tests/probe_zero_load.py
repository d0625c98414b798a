"""Load model dirs with the ZeRO-3 loader on every rank, then gather each parameter and compare it with the
checkpoint read whole. Run as ``deepspeed --num_accelerators 2 tests/probe_zero_load.py OUT.json DIR[:dtype] ...``;
rank 0 writes one result per dir: max abs difference, and per rank the bytes it read and the largest read (the
loader's own counters), the bytes its read syscalls returned and its peak RSS growth (measured by the kernel).
``DIR:fp32:hf`` loads through transformers' own ZeRO-3 path (``from_pretrained`` under ``HfDeepSpeedConfig``)
instead, for comparison."""

from __future__ import annotations

import ctypes
import gc
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ia3_dist.models.families import checkpoint_names  # noqa: E402
from ia3_dist.models.files import checkpoint_files  # noqa: E402
from ia3_dist.models.load import DTYPES  # noqa: E402
from ia3_dist.models.zero3_load import (  # noqa: E402
    build_partitioned,
    checkpoint_keys,
    load_partitions,
    stored_apart,
    untied,
)
from ia3_dist.runtime import dist  # noqa: E402

DS = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
      "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}


def whole(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    sd: dict[str, torch.Tensor] = {}
    for f in checkpoint_files(model_dir):
        sd.update(load_file(str(f)) if f.suffix == ".safetensors" else torch.load(f, weights_only=True))
    return sd


def rchar() -> int:
    """Bytes returned to this process by read-type syscalls (read, pread, preadv; page-cache hits included),
    from the kernel's per-process I/O accounting. The loader reads safetensors with preadv, so this counts every
    weight byte it takes from a file without trusting its own counters. (read_bytes would count only what came from
    the disk, missing cached files; and a memory-mapped .bin is read by page faults, which rchar does not see.)"""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/self/io")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak_rss() -> int:
    """Reset the kernel's high-water mark of this process's RSS (``5`` to clear_refs, Linux >= 4.0); returns the
    current RSS in bytes, the baseline the peak is compared with.

    The earlier loads' freed memory is handed back to the kernel first: pages the allocator kept would serve the
    next load without raising the RSS, hiding part of a full-size buffer (transformers' own load once grew by only
    0.63x its weights, after the loads before it)."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS") * 1024


def peak_rss() -> int:
    """The RSS high-water mark since the last reset, in bytes (anonymous and file-backed pages: a full-size buffer
    and the touched pages of a memory-mapped file both count)."""
    return _status_kib("VmHWM") * 1024


def main() -> None:
    import deepspeed
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
    env = dist.detect()
    dist.init(env)
    results = []
    for spec in args[1:]:
        path, _, rest = spec.partition(":")
        prec, _, how = rest.partition(":")
        dtype = DTYPES[prec or "fp32"]
        ds = {**DS, "bf16": {"enabled": dtype == torch.bfloat16}}
        model_config = AutoConfig.from_pretrained(path)
        if stored_apart(model_config, Path(path), dtype):  # as the preflight decides (prepare.py), before any ZeRO
            model_config = untied(model_config)
        keep = HfDeepSpeedConfig(ds)
        dist.barrier()
        if how == "hf":
            from transformers import AutoModelForCausalLM

            # Building and loading are one call here: the growth covers both.
            base, r0 = reset_peak_rss(), rchar()
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
            stats = {"bytes_read": 0, "largest_read": 0}
        else:
            # The growth covers the load only: building under zero.Init materialises each parameter whole for a
            # moment before partitioning it (DeepSpeed's, before any weight is read), which is not the loader's.
            model = build_partitioned(model_config, ds, dtype)
            base, r0 = reset_peak_rss(), rchar()
            stats = load_partitions(model, Path(path))
        syscall_bytes, rss_growth = rchar() - r0, peak_rss() - base
        ref = whole(Path(path))
        worst = 0.0
        prefix, renames = checkpoint_names(model)
        for name, p in model.named_parameters():
            with deepspeed.zero.GatheredParameters([p]):
                key = next(k for k in checkpoint_keys(name, prefix, renames) if k in ref)
                want = ref[key].to(dtype)
                assert p.shape == want.shape, (name, p.shape, want.shape)
                worst = max(worst, (p.data.float() - want.float()).abs().max().item())
        # Buffers the constructors compute (rotary inv_freq) match a plain from_pretrained's.
        plain = dict(AutoModelForCausalLM.from_pretrained(path, dtype=dtype).named_buffers())
        for name, b in model.named_buffers():
            worst = max(worst, (b.float() - plain[name].float()).abs().max().item() if b.numel() else 0.0)
        per_rank = torch.tensor([stats["bytes_read"], stats["largest_read"], syscall_bytes, rss_growth],
                                dtype=torch.float64)
        gathered = [torch.zeros_like(per_rank) for _ in range(env.world_size)]
        torch.distributed.all_gather(gathered, per_rank)
        files = checkpoint_files(Path(path))
        tied = len(list(model.named_parameters(remove_duplicate=False))) > len(list(model.named_parameters()))
        results.append({"dir": path, "dtype": prec or "fp32", "loader": how or "ia3", "max_diff": worst, "tied": tied,
                        "model_type": model.config.model_type,
                        "bytes_read": [int(g[0]) for g in gathered], "largest_read": [int(g[1]) for g in gathered],
                        "syscall_bytes": [int(g[2]) for g in gathered], "rss_growth": [int(g[3]) for g in gathered],
                        "file_bytes": sum(f.stat().st_size for f in files),
                        "safetensors": all(f.suffix == ".safetensors" for f in files),
                        "weight_bytes": sum(v.numel() * v.element_size() for v in ref.values())})
        del keep, model, ref, plain
    if env.is_main:
        Path(args[0]).write_text(json.dumps(results, indent=1))
    dist.destroy()


if __name__ == "__main__":
    main()
