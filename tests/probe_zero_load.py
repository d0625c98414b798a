"""Load model dirs with the ZeRO-3 loader on every rank, then gather each parameter and compare it with the
checkpoint read whole. Run as ``deepspeed --num_accelerators 2 tests/probe_zero_load.py OUT.json DIR[:dtype] ...``;
rank 0 writes one result per dir: max abs difference, and per rank the bytes it read and the largest read."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ia3_dist.models.families import checkpoint_names  # noqa: E402
from ia3_dist.models.files import checkpoint_files  # noqa: E402
from ia3_dist.models.load import DTYPES  # noqa: E402
from ia3_dist.models.zero3_load import build_partitioned, checkpoint_keys, load_partitions  # noqa: E402
from ia3_dist.runtime import dist  # noqa: E402

DS = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
      "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}


def whole(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    sd: dict[str, torch.Tensor] = {}
    for f in checkpoint_files(model_dir):
        sd.update(load_file(str(f)) if f.suffix == ".safetensors" else torch.load(f, weights_only=True))
    return sd


def main() -> None:
    import deepspeed
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
    env = dist.detect()
    dist.init(env)
    results = []
    for spec in args[1:]:
        path, _, prec = spec.partition(":")
        dtype = DTYPES[prec or "fp32"]
        ds = {**DS, "bf16": {"enabled": dtype == torch.bfloat16}}
        keep = HfDeepSpeedConfig(ds)
        model = build_partitioned(AutoConfig.from_pretrained(path), ds, dtype)
        stats = load_partitions(model, Path(path))
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
        per_rank = torch.tensor([stats["bytes_read"], stats["largest_read"]], dtype=torch.float64)
        gathered = [torch.zeros_like(per_rank) for _ in range(env.world_size)]
        torch.distributed.all_gather(gathered, per_rank)
        results.append({"dir": path, "dtype": prec or "fp32", "max_diff": worst, "model_type": model.config.model_type,
                        "bytes_read": [int(g[0]) for g in gathered], "largest_read": [int(g[1]) for g in gathered],
                        "file_bytes": sum(f.stat().st_size for f in checkpoint_files(Path(path)))})
        del keep, model
    if env.is_main:
        Path(args[0]).write_text(json.dumps(results, indent=1))
    dist.destroy()


if __name__ == "__main__":
    main()
