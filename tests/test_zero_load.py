"""ZeRO-3 loading on 2 real gloo ranks: every parameter equals the checkpoint, and each rank reads only its half
(single file, shards, bigscience-style keys without the ``transformer.`` prefix, a PyTorch .bin, bf16 from fp32;
and sharded safetensors of each other tested family: Llama, Qwen2 with its tied LM head, Mistral, GPT-NeoX).
The halves are checked against the kernel's accounting as well as the loader's counters: the bytes each rank's
read syscalls returned (/proc/self/io), and its peak RSS growth during the load (VmHWM after a reset), on a model
large enough for a full-size buffer to stand out, next to transformers' own ZeRO-3 loader, which has one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from _util import check, launch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ranges_read_from_the_file_are_the_tensors(tmp_path: Path, dtype: torch.dtype) -> None:
    """The unit under every ZeRO-3 load: any flat element range of any tensor (each rank's slice starts mid-tensor)
    equals that range of the tensor safetensors saved, read into a buffer of the file's dtype or another."""
    from safetensors.torch import save_file

    from ia3_dist.models.zero3_load import SafetensorsFile

    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(7, 5, generator=g).to(dtype), "b": torch.randn(33, generator=g).to(dtype),
               "c": torch.arange(12, dtype=torch.float32).to(dtype)}
    save_file(tensors, str(tmp_path / "m.safetensors"))
    f = SafetensorsFile(tmp_path / "m.safetensors")
    try:
        for key, t in tensors.items():
            flat = t.reshape(-1)
            for start, n in ((0, flat.numel()), (1, 3), (flat.numel() // 2, flat.numel() - flat.numel() // 2)):
                for out_dtype in (dtype, torch.float64):
                    out = torch.empty(n, dtype=out_dtype)
                    f.read_into(key, start, out)
                    assert torch.equal(out, flat[start:start + n].to(out_dtype)), (key, start, n, out_dtype)
    finally:
        f.close()


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
        # bf16 too: zero.Init casts the buffers constructors make (rotary inv_freq) unless they are rebuilt.
        families += [str(out), f"{out}:bf16"]
    return [str(demo_model), str(sharded), str(bare), str(torchbin), f"{demo_model}:bf16", *families,
            str(_untied(family_models["qwen2"], root))]


def _untied(tied: Path, root: Path) -> Path:
    """Qwen2's tied config with a checkpoint holding its own LM head (an untied fine-tune that kept the flag)."""
    from safetensors.torch import load_file, save_file

    out = root / "untied-qwen2"
    shutil.copytree(tied, out)
    sd = load_file(str(out / "model.safetensors"))
    assert "lm_head.weight" not in sd and json.loads((out / "config.json").read_text())["tie_word_embeddings"]
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"] * 3
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_a_head_stored_apart_from_tied_embeddings_is_trained_untied(tmp_path: Path, family_models: dict) -> None:
    """from_pretrained leaves such a model untied (its stored head); the ZeRO-3 loader tied it and filled the head
    from the embeddings. Stored alike (a .bin holds both names), the weights stay tied."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ia3_dist.models.zero3_load import stored_apart

    tied = family_models["qwen2"]
    assert not stored_apart(AutoConfig.from_pretrained(str(tied)), tied)
    untied = _untied(tied, tmp_path)
    assert stored_apart(AutoConfig.from_pretrained(str(untied)), untied)
    hf = AutoModelForCausalLM.from_pretrained(str(untied))
    assert not torch.equal(hf.lm_head.weight, hf.model.embed_tokens.weight)  # what it matches
    both = tmp_path / "bin"
    both.mkdir()
    sd = AutoModelForCausalLM.from_pretrained(str(tied)).state_dict()
    (both / "config.json").write_text((tied / "config.json").read_text())
    embed = sd["model.embed_tokens.weight"]
    for head in (embed, embed.clone()):  # one storage under two names (as a .bin of a tied model), or two copies
        torch.save({**sd, "lm_head.weight": head}, both / "pytorch_model.bin")
        assert not stored_apart(AutoConfig.from_pretrained(str(both)), both)
    # Compared in the training dtype, as from_pretrained compares the parameters it loaded: a head apart only below
    # bf16's precision is the same head in bf16.
    exact = embed.to(torch.bfloat16).float()  # bf16 values: 2**-20 relative apart rounds back to them
    torch.save({**sd, "model.embed_tokens.weight": exact, "lm_head.weight": exact * (1 + 2**-20)},
               both / "pytorch_model.bin")
    cfg = AutoConfig.from_pretrained(str(both))
    assert stored_apart(cfg, both, torch.float32) and not stored_apart(cfg, both, torch.bfloat16)
    # The preflight asks it of the check's own build and open files: the same answers, and none without a dtype.
    from ia3_dist.models.zero3_load import check_checkpoint

    assert check_checkpoint(cfg, both, tie_dtype=torch.float32)
    assert not check_checkpoint(cfg, both, tie_dtype=torch.bfloat16) and not check_checkpoint(cfg, both)
    assert not check_checkpoint(AutoConfig.from_pretrained(str(tied)), tied, tie_dtype=torch.float32)
    # The preflight leaves the config as read: the resume key is the same on every stage (the build unties).
    from ia3_dist.config import load_config
    from ia3_dist.runtime.dist import DistEnv
    from ia3_dist.train.prepare import prepare

    one = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1)
    got = {ds: prepare(load_config(ROOT / "configs" / "tiny-cpu.yaml",
                                   [f"model.path={untied}", f"deepspeed.config={ds}", "train.max_steps=2",
                                    f"output.dir={tmp_path / ds}"]), one) for ds in ("zero2", "zero3")}
    assert (got["zero2"].untie_head, got["zero3"].untie_head) == (False, True)
    assert got["zero2"].meta["model_key"] == got["zero3"].meta["model_key"]
    assert got["zero3"].model_config.tie_word_embeddings


def _larger_model(root: Path) -> Path:
    """A 2-layer Bloom of ~66 MB (fp32): its half stands well above the RSS noise of a load (a few MB)."""
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(0)
    d = root / "larger"
    BloomForCausalLM(BloomConfig(vocab_size=20000, hidden_size=512, n_layer=2, n_head=8)).save_pretrained(str(d))
    return d


@pytest.mark.slow
def test_zero3_load_exact_and_partitioned(tmp_path: Path, demo_model: Path, family_models: dict) -> None:
    larger = _larger_model(tmp_path)
    specs = [*_variants(demo_model, tmp_path, family_models), str(larger), f"{larger}:fp32:hf"]
    out = tmp_path / "res.json"
    check(launch([str(out), *specs], nproc=2, script="tests/probe_zero_load.py"))
    results = json.loads(out.read_text())
    assert len(results) == len(specs)
    assert {r["model_type"] for r in results} == {"bloom", *family_models}
    for r in results:
        assert r["max_diff"] == 0.0, r
        # Qwen2's head is tied unless the checkpoint stores its own (checked against that stored head above).
        if r["model_type"] == "qwen2":
            assert r["tied"] is not r["dir"].endswith("untied-qwen2"), r
        mib = [round(x / 2**20, 1) for x in r["rss_growth"]]
        print(f"{r['loader']:>4} {r['dtype']} {Path(r['dir']).name}: weights {r['weight_bytes'] / 2**20:.1f} MiB, "
              f"read syscalls per rank {[round(x / 2**20, 2) for x in r['syscall_bytes']]} MiB, "
              f"peak RSS growth per rank {mib} MiB")
        if r["loader"] == "hf":
            # transformers' path (build and load in one call): the whole state dict is held at once. The same
            # measurement sees it, so the bound below would catch such a buffer in ours. (0.85: pages the allocator
            # kept from the earlier loads may serve part of it; measured 0.93-1.3x the weights.)
            assert max(r["rss_growth"]) > 0.85 * r["weight_bytes"], r
            continue
        total = sum(r["bytes_read"])
        if r["dtype"] == "fp32":
            # The two ranks' reads add up to the weights (the file minus headers; the tied lm_head is stored once)
            # and split evenly: nobody read the model.
            assert 0.95 * r["file_bytes"] < total <= r["file_bytes"], r
        for b, big in zip(r["bytes_read"], r["largest_read"], strict=True):
            assert abs(b - total / 2) <= 0.02 * total, r
            assert big < 0.5 * total, r
        if r["safetensors"]:
            # What the kernel saw each rank read (headers and the index on top of the tensors' bytes): the
            # loader's counters are right, and no rank read the other's half.
            for b, sys_b in zip(r["bytes_read"], r["syscall_bytes"], strict=True):
                assert b <= sys_b <= b + 0.02 * r["file_bytes"] + 256 * 1024, r
        if r["dir"] == str(larger):
            # While the loader filled the partitions, no rank's peak grew by anything near the model: at most its
            # half (the partition's pages, touched for the first time) plus a little.
            for g in r["rss_growth"]:
                assert g < 0.75 * r["weight_bytes"], r


def test_rotary_tables_zero_init_rounds_are_rebuilt_in_fp32(family_models: dict) -> None:
    """zero.Init casts every float buffer a constructor makes to the ZeRO dtype: each ``*inv_freq`` table (Gemma 3
    keeps one per attention kind) is rebuilt in fp32, as from_pretrained keeps it."""
    from transformers import AutoConfig, AutoModelForCausalLM, Gemma3TextConfig

    from ia3_dist.models.zero3_load import _fp32_rotary

    gemma = Gemma3TextConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    for cfg in (gemma, AutoConfig.from_pretrained(str(family_models["llama"]))):
        ref = AutoModelForCausalLM.from_config(cfg)
        m = AutoModelForCausalLM.from_config(cfg)
        tables = [n for n, _ in m.named_buffers() if n.endswith("inv_freq")]
        assert tables, cfg.model_type
        for name in tables:  # what zero.Init leaves
            mod, _, attr = name.rpartition(".")
            setattr(m.get_submodule(mod), attr, getattr(m.get_submodule(mod), attr).to(torch.bfloat16))
        _fp32_rotary(m)
        want = dict(ref.named_buffers())
        for name in tables:
            got = m.get_buffer(name)
            assert got.dtype == torch.float32 and torch.equal(got, want[name]), (cfg.model_type, name)


def test_the_weights_file_config_json_names_is_the_one_read(tmp_path: Path, family_models: dict) -> None:
    """config.json's ``transformers_weights`` names the file from_pretrained loads before model.safetensors: the
    ZeRO-3 loader, the checks and the base fingerprint read that one too; a name outside the dir is refused."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from ia3_dist.errors import UsageError
    from ia3_dist.models.files import checkpoint_files, weights_fingerprint

    d = tmp_path / "named"
    shutil.copytree(family_models["llama"], d)
    sd = load_file(str(d / "model.safetensors"))
    save_file({k: v * 2 for k, v in sd.items()}, str(d / "alt.safetensors"), metadata={"format": "pt"})
    plain = weights_fingerprint(d)
    conf = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**conf, "transformers_weights": "alt.safetensors"}))
    assert checkpoint_files(d) == [d / "alt.safetensors"] and weights_fingerprint(d) != plain
    loaded = AutoModelForCausalLM.from_pretrained(str(d)).state_dict()
    key = next(k for k in sd if k in loaded and sd[k].dtype.is_floating_point and sd[k].abs().sum() > 0)
    assert torch.equal(loaded[key], sd[key] * 2)  # what from_pretrained read
    for bad in ("../x.safetensors", "/etc/passwd"):
        (d / "config.json").write_text(json.dumps({**conf, "transformers_weights": bad}))
        with pytest.raises(UsageError, match="'transformers_weights' must name a weights file inside the model dir"):
            checkpoint_files(d)
    (d / "config.json").write_text(json.dumps({**conf, "transformers_weights": "weights.bin"}))
    with pytest.raises(UsageError, match="transformers loads only a .safetensors file or a .safetensors.index.json"):
        checkpoint_files(d)
    (d / "config.json").write_text(json.dumps({**conf, "transformers_weights": "gone.safetensors"}))
    with pytest.raises(UsageError, match="names the weights gone.safetensors"):
        checkpoint_files(d)
    # The model dir check follows the named file too: an index it names, in a subdir, with a shard missing.
    from ia3_dist.models.files import check_model_dir

    sub = d / "w"
    sub.mkdir()
    (d / "alt.safetensors").rename(sub / "a.safetensors")
    (sub / "i.safetensors.index.json").write_text(json.dumps({"weight_map": {k: "w/a.safetensors" for k in sd} |
                                                              {"extra": "w/b.safetensors"}}))
    (d / "model.safetensors").unlink()
    (d / "config.json").write_text(json.dumps({**conf, "transformers_weights": "w/i.safetensors.index.json"}))
    with pytest.raises(UsageError, match="weight shards missing: w/b.safetensors"):
        check_model_dir(str(d))
