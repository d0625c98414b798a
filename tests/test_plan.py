"""``ia3-dist plan`` arithmetic on known cases, every shipped Bloom config fits the hardware it names, and
gradient checkpointing gives the same training as without it."""

from __future__ import annotations

from pathlib import Path

import pytest
from _util import check, launch, metrics

from ia3_dist.cli import main
from ia3_dist.config import build_config, load_config
from ia3_dist.tools.plan import GIB, model_shape, plan, rank_memory

ROOT = Path(__file__).resolve().parents[1]


def test_bloom_1b4_zh_counts(capsys) -> None:
    assert main(["plan", "--config", str(ROOT / "configs" / "bloom-1b4-zh.yaml")]) == 0
    out = capsys.readouterr().out
    assert "trainable params: 344,064 || all params: 1,303,455,744" in out and "recommended:" in out


def test_bloom_176b_ia3_is_7hL() -> None:
    s = model_shape(build_config({"model": {"arch": "bloom"}}))
    assert s.trainable == 7 * 14336 * 70 == 7_024_640
    assert s.n_params == 176_247_271_424 + s.trainable


def test_memory_arithmetic() -> None:
    s = model_shape(build_config({"model": {"arch": "bloom-7b1"}}))
    z2 = rank_memory(s, "zero2", 2, False, 8, 256, 1, 2, False)
    z3 = rank_memory(s, "zero3", 3, False, 8, 256, 1, 2, False)
    off = rank_memory(s, "zero3_offload", 3, True, 8, 256, 1, 2, False)
    assert z2.weights == s.n_params * 2 and z3.weights == pytest.approx(s.n_params * 2 / 8)
    assert off.weights == 0 and off.cpu == pytest.approx(z3.weights + z3.optimizer)
    assert z2.optimizer == pytest.approx(s.trainable * 12 / 8)          # bf16: m, v and fp32 master, partitioned
    ck = rank_memory(s, "zero3", 3, False, 8, 256, 4, 2, True)
    full = rank_memory(s, "zero3", 3, False, 8, 256, 4, 2, False)
    assert ck.activations < full.activations / 2  # the fp32 logits (2 GiB here) are not checkpointed
    assert rank_memory(s, "zero3", 3, False, 8, 256, 2, 2, False).activations == pytest.approx(
        2 * z3.activations)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("bloom*.yaml")), ids=lambda p: p.name)
def test_shipped_bloom_configs_fit_their_hardware(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.model.arch, f"{path.name} must name model.arch so plan works offline"
    hw = cfg.hardware
    text, info = plan(cfg, hw.nodes, hw.gpus_per_node, hw.gpu_mem_gib)
    chosen = info["chosen"]
    assert chosen is not None and chosen["fits"], text
    assert chosen["gpu_gib"] * GIB <= hw.gpu_mem_gib * GIB
    assert chosen["max_micro"] >= cfg.train.micro_batch_size or (
        cfg.train.gradient_checkpointing and chosen["max_micro_ckpt"] >= cfg.train.micro_batch_size)


def test_plan_reports_what_does_not_fit(capsys) -> None:
    assert main(["plan", "--config", str(ROOT / "configs" / "bloom-176b.yaml"), "--nodes", "1",
                 "--gpus-per-node", "1", "--gpu-mem", "16GiB", "train.gradient_checkpointing=false",
                 "train.micro_batch_size=64"]) == 0
    assert "does not fit" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("world, ds", [(1, "zero0"), (2, "zero3")])
def test_gradient_checkpointing_same_loss(tmp_path: Path, demo_model: Path, world: int, ds: str) -> None:
    runs = {}
    for ck in (False, True):
        out = tmp_path / f"ck{int(ck)}"
        check(launch(["--config", "configs/tiny-cpu.yaml", f"deepspeed.config={ds}", f"output.dir={out}",
                      "train.max_steps=8", "train.log_every=1", f"train.gradient_checkpointing={str(ck).lower()}"],
                     nproc=world))
        runs[ck] = [r["loss"] for r in metrics(out)]
    assert runs[True] == pytest.approx(runs[False], rel=1e-5)


def test_zero3_counts_the_gathered_working_set() -> None:
    """ZeRO-3 gathers whole parameters: the embedding matrix plus two layers of live parameters."""
    s = model_shape(build_config({"model": {"arch": "bloom-7b1"}}))
    z3 = rank_memory(s, "zero3", 3, False, 8, 256, 1, 2, False)
    assert z3.gathered == (s.vocab * s.hidden + 2 * 12 * s.hidden**2) * 2
    assert rank_memory(s, "zero2", 2, False, 8, 256, 1, 2, False).gathered == 0


def test_cpu_plan_is_host_memory(capsys, tiny_model: Path) -> None:
    """On CPU ranks the offloaded part is the same host memory, and the fixed part is the framework's RSS."""
    cfg = build_config({"model": {"arch": "bloom-560m"}, "deepspeed": {"config": "zero3_offload"}})
    _, gpu = plan(cfg, 1, 2, 64)
    _, cpu = plan(cfg, 1, 2, 64, cpu=True)
    assert 0.1 < cpu["overhead_gib"] < 4
    z3, off = cpu["rows"]["zero3"], cpu["rows"]["zero3_offload"]
    assert off["total_gib"] == pytest.approx(z3["total_gib"])  # offloading to the CPU you are on saves nothing
    assert gpu["rows"]["zero3_offload"]["total_gib"] < gpu["rows"]["zero3"]["total_gib"]
    assert main(["plan", "--config", str(ROOT / "configs" / "tiny-cpu.yaml"), "--cpu", "--gpus-per-node", "2",
                 "--gpu-mem", "8GiB", f"model.path={tiny_model}"]) == 0
    assert "CPU rank(s)" in capsys.readouterr().out
