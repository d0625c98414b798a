"""ZeRO-3 loading on 2 real gloo ranks: every parameter equals the checkpoint, and each rank reads only its half
(single file, shards, bigscience-style keys without the ``transformer.`` prefix, a PyTorch .bin, bf16 from fp32;
and sharded safetensors of each other tested family: Llama, Qwen2 with its tied LM head, Mistral, GPT-NeoX)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _util import check, launch

pytestmark = pytest.mark.slow


def _variants(demo_model: Path, root: Path, family_models: dict[str, Path]) -> list[str]:
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(demo_model))
    sharded = root / "sharded"
    model.save_pretrained(str(sharded), max_shard_size="300KB")
    assert len(list(sharded.glob("*.safetensors"))) > 1
    sd = load_file(str(demo_model / "model.safetensors"))
    bare = root / "bare-keys"  # how bigscience/bloom-* store their weights
    bare.mkdir()
    save_file({k.removeprefix("transformer."): v for k, v in sd.items()}, str(bare / "model.safetensors"))
    torchbin = root / "torch-bin"
    torchbin.mkdir()
    torch.save(sd, torchbin / "pytorch_model.bin")
    for d in (bare, torchbin):
        (d / "config.json").write_text((demo_model / "config.json").read_text())
    families = []
    for model_type, d in family_models.items():
        out = root / model_type
        AutoModelForCausalLM.from_pretrained(str(d)).save_pretrained(str(out), max_shard_size="200KB")
        assert len(list(out.glob("*.safetensors"))) > 2, model_type
        families.append(str(out))
    return [str(demo_model), str(sharded), str(bare), str(torchbin), f"{demo_model}:bf16", *families]


def test_zero3_load_exact_and_partitioned(tmp_path: Path, demo_model: Path, family_models: dict) -> None:
    specs = _variants(demo_model, tmp_path, family_models)
    out = tmp_path / "res.json"
    check(launch([str(out), *specs], nproc=2, script="tests/probe_zero_load.py"))
    results = json.loads(out.read_text())
    assert len(results) == len(specs)
    assert {r["model_type"] for r in results} == {"bloom", *family_models}
    for r in results:
        assert r["max_diff"] == 0.0, r
        total = sum(r["bytes_read"])
        if r["dtype"] == "fp32":
            # The two ranks' reads add up to the weights (the file minus headers; the tied lm_head is stored once)
            # and split evenly: nobody read the model.
            assert 0.95 * r["file_bytes"] < total <= r["file_bytes"], r
        for b, big in zip(r["bytes_read"], r["largest_read"], strict=True):
            assert abs(b - total / 2) <= 0.02 * total, r
            assert big < 0.5 * total, r
