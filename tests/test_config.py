"""Config loading, overrides and errors; every shipped YAML and DeepSpeed JSON parses and resolves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ia3_dist.config import RunConfig, build_config, load_config
from ia3_dist.errors import UsageError
from ia3_dist.runtime import ds_config as dsc
from ia3_dist.train.demo import DEMO_RUN

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_the_reference_recipe() -> None:
    c = RunConfig()
    assert (c.train.micro_batch_size, c.train.grad_accum, c.train.lr, c.train.epochs) == (1, 8, 3e-3, 1)
    assert c.data.max_length == 256 and c.train.log_every == 10
    assert c.model.trust_remote_code is False


def test_overrides_apply_with_types(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 1.0e-3\n")
    c = load_config(f, ["train.lr=3e-3", "train.grad_accum=4", "data.shuffle=false", "output.dir=/x",
                        "ia3.target_modules=[query_key_value]", "ia3.feedforward_modules=[]", "data.limit=null"])
    assert c.train.lr == 3e-3 and c.train.grad_accum == 4 and c.data.shuffle is False
    assert c.output.dir == "/x" and c.ia3.target_modules == ["query_key_value"] and c.data.limit is None


@pytest.mark.parametrize("raw, key", [
    ({"train": {"lr_rate": 1}}, "train.lr_rate"),
    ({"trian": {}}, "trian"),
    ({"train": {"micro_batch_size": "two"}}, "train.micro_batch_size"),
    ({"train": {"micro_batch_size": 0}}, "train.micro_batch_size"),
    ({"train": {"grad_accum": 1.5}}, "train.grad_accum"),
    ({"train": {"precision": "fp8"}}, "train.precision"),
    ({"train": {"lr": -1}}, "train.lr"),
    ({"train": {"lr": "fast"}}, "train.lr"),
    ({"train": {"max_steps": -2}}, "train.max_steps"),
    ({"train": {"betas": [0.9]}}, "train.betas"),
    ({"train": {"scheduler": "step"}}, "train.scheduler"),
    ({"train": {"compile_mode": "cudagraphs"}}, "train.compile_mode"),
    ({"train": {"compile_backend": "tvm"}}, "train.compile_backend"),
    ({"train": {"compile_backend": "eager", "compile_mode": "reduce-overhead"}}, "train.compile_mode"),
    ({"data": {"pack_length": 0}}, "data.pack_length"),
    ({"data": {"packing": "yes"}}, "data.packing"),
    ({"model": {"attention": "flash"}}, "model.attention"),
    ({"data": {"max_length": 1}}, "data.max_length"),
    ({"data": {"shuffle": "yes"}}, "data.shuffle"),
    ({"data": {"prompt_template": "{question}"}}, "data.prompt_template"),
    ({"model": {"trust_remote_code": 1}}, "model.trust_remote_code"),
    ({"ia3": {"feedforward_modules": ["x"]}}, "ia3.feedforward_modules"),
    ({"checkpoint": {"keep": 0}}, "checkpoint.keep"),
    ({"output": "runs"}, "output"),
])
def test_bad_config_names_the_key(raw: dict, key: str) -> None:
    with pytest.raises(UsageError, match=f"'{key}'"):
        build_config(raw)


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  lr: [1, 2\n")
    with pytest.raises(UsageError, match=r"bad.yaml:\d+:\d+: invalid YAML"):
        load_config(f)


def test_override_syntax() -> None:
    with pytest.raises(UsageError, match="key.sub=value"):
        load_config(None, ["train.lr"], base={})
    with pytest.raises(UsageError, match="not a section"):
        load_config(None, ["train.lr=1", "train.lr.x=2"], base={})


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_yaml_parses_and_starts_with_its_command(path: Path) -> None:
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# ") and any(w in first for w in ("launch.py", "sbatch", "ia3-dist")), first
    cfg = load_config(path)
    ds = dsc.resolve(cfg, world_size=2, hidden_size=64)
    assert ds["train_batch_size"] == cfg.train.micro_batch_size * cfg.train.grad_accum * 2


def test_reference_recipe_config_keeps_the_reference_batches() -> None:
    c = load_config(ROOT / "configs" / "bloom-1b4-zh.yaml")
    assert (c.data.template, c.data.truncation, c.data.unlabeled) == ("human_assistant", "right", "keep")
    assert (c.train.micro_batch_size, c.train.grad_accum, c.train.lr, c.data.max_length) == (1, 8, 3e-3, 256)


def test_tiny_cpu_yaml_is_the_embedded_default() -> None:
    assert load_config(ROOT / "configs" / "tiny-cpu.yaml") == load_config(None, base=DEMO_RUN)


@pytest.mark.parametrize("path", sorted((ROOT / "ds_configs").glob("*.json")), ids=lambda p: p.name)
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_shipped_ds_configs_resolve_with_no_auto_left(path: Path, precision: str) -> None:
    cfg = build_config({"deepspeed": {"config": str(path)}, "train": {"precision": precision, "grad_accum": 4}})
    ds = dsc.resolve(cfg, world_size=4, hidden_size=2048)
    assert "auto" not in json.dumps(ds)
    assert ds["train_batch_size"] == 1 * 4 * 4
    assert ds["train_micro_batch_size_per_gpu"] == 1 and ds["gradient_accumulation_steps"] == 4
    assert ds["bf16"]["enabled"] is (precision == "bf16") and ds["fp16"]["enabled"] is (precision == "fp16")
    assert ds["optimizer"] == {"type": "AdamW", "params": {
        "lr": 3e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0,
        "torch_adam": not dsc.offloads_optimizer(ds), **({"fused": True} if not dsc.offloads_optimizer(ds) else {})}}
    assert ds["gradient_clipping"] == 1.0 and "scheduler" not in ds
    # No per-step device syncs DeepSpeed can skip: its throughput timer, and bf16's overflow check.
    assert ds["timers"]["throughput"]["enabled"] is False
    assert ds["bf16"]["check_grad_overflow"] is False
    stage = ds["zero_optimization"]["stage"]
    assert stage == int(path.stem[4])
    # ZeRO-1/2 with overlap_comm synchronize the device after every backward pass (their gradient partition
    # epilogue) to overlap a reduction IA3's few hundred K gradients do not need overlapped.
    assert ds["zero_optimization"].get("overlap_comm", False) is False or stage == 3
    if stage == 3:
        assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 20480


def _ds(tmp_path: Path, body: dict) -> str:
    f = tmp_path / "ds.json"
    f.write_text(json.dumps(body))
    return str(f)


@pytest.mark.parametrize("body, needle", [
    ({"train_micro_batch_size_per_gpu": 4}, "train_micro_batch_size_per_gpu"),
    ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps"),
    ({"train_batch_size": 64}, "train_batch_size"),
    ({"bf16": {"enabled": True}}, "bf16.enabled"),
    ({"optimizer": {"type": "Lamb"}}, "optimizer.type"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}, "optimizer.params.lr"),
    ({"scheduler": {"type": "WarmupLR"}}, "'scheduler'"),
    ({"zero_optimization": {"stage": 4}}, "stage"),
    ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}, "offload_param needs stage 3"),
    ({"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}, "foo": "auto"}, "foo"),
    ({"optimizer": {"params": {"fused": True, "foreach": True}}}, "sets both fused and foreach"),
    ({"optimizer": {"params": {"torch_adam": False, "fused": True}}}, "optimizer.params.fused is an option"),
    ({"optimizer": {"params": {"torch_adam": False, "foreach": False}}}, "optimizer.params.foreach is an option"),
])
def test_ds_config_conflicts_are_refused(tmp_path: Path, body: dict, needle: str) -> None:
    cfg = build_config({"deepspeed": {"config": _ds(tmp_path, body)}})
    with pytest.raises(UsageError, match=needle.replace(".", r"\.")):
        dsc.resolve(cfg, world_size=1, hidden_size=None)


def test_ds_config_agreeing_values_are_kept(tmp_path: Path) -> None:
    body = {"train_micro_batch_size_per_gpu": 1, "train_batch_size": 16, "gradient_clipping": 1,
            "zero_optimization": {"stage": 1}}
    cfg = build_config({"deepspeed": {"config": _ds(tmp_path, body)}})
    assert dsc.resolve(cfg, world_size=2, hidden_size=None)["train_batch_size"] == 16


def test_ds_config_foreach_adamw_is_kept_without_fused(tmp_path: Path) -> None:
    cfg = build_config({"deepspeed": {"config": _ds(tmp_path, {"optimizer": {"params": {"foreach": True}}})}})
    params = dsc.resolve(cfg, world_size=1, hidden_size=None)["optimizer"]["params"]
    assert params["foreach"] is True and "fused" not in params


def test_ds_config_stalls_off_unless_the_file_asks(tmp_path: Path) -> None:
    cfg = build_config({"deepspeed": {"config": _ds(tmp_path, {"zero_optimization": {"stage": 1}})},
                        "train": {"precision": "bf16"}})
    ds = dsc.resolve(cfg, world_size=1, hidden_size=None)
    assert ds["timers"] == {"throughput": {"enabled": False}} and ds["bf16"]["check_grad_overflow"] is False
    body = {"timers": {"throughput": {"enabled": True}}, "bf16": {"enabled": "auto", "check_grad_overflow": True}}
    cfg = build_config({"deepspeed": {"config": _ds(tmp_path, body)}, "train": {"precision": "bf16"}})
    ds = dsc.resolve(cfg, world_size=1, hidden_size=None)
    assert ds["timers"]["throughput"]["enabled"] is True and ds["bf16"]["check_grad_overflow"] is True


def test_ds_config_missing_and_invalid(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no such file"):
        dsc.resolve(build_config({"deepspeed": {"config": "zero9"}}), 1, None)
    f = tmp_path / "x.json"
    f.write_text('{"a": 1,,}')
    with pytest.raises(UsageError, match=r"x.json:1:\d+: invalid JSON"):
        dsc.resolve(build_config({"deepspeed": {"config": str(f)}}), 1, None)


def test_global_batch_size_sets_the_accumulation_per_allocation() -> None:
    """train.global_batch_size: grad_accum = global / (micro x ranks) on each allocation (with micro auto: the
    examples per rank per step); a global batch that does not divide is exit 2 naming the key."""
    from ia3_dist.train.prepare import with_global_batch

    cfg = load_config(None, ["train.global_batch_size=16", "train.micro_batch_size=2"])
    assert [with_global_batch(cfg, w).train.grad_accum for w in (1, 2, 4, 8)] == [8, 4, 2, 1]
    auto = load_config(None, ["train.global_batch_size=16", "train.micro_batch_size=auto"])
    assert with_global_batch(auto, 4).train.grad_accum == 4
    with pytest.raises(UsageError, match=r"'train.global_batch_size': 16 is not a multiple of micro_batch_size 2 x 3 "
                                         r"rank\(s\) = 6"):
        with_global_batch(cfg, 3)
    with pytest.raises(UsageError, match="train.global_batch_size"):
        load_config(None, ["train.global_batch_size=-1"])
