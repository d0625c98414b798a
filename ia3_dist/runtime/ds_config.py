"""Resolve a DeepSpeed JSON config against the run config: fill every "auto", refuse contradictions.

The run config is the one source of truth for batch sizes, precision, optimizer and schedule; the DeepSpeed file
owns ZeRO placement. A value present in both must agree (or be "auto").
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..errors import UsageError

AUTO = "auto"
SHIPPED = ("zero0", "zero1", "zero2", "zero3", "zero3_offload")


def shipped_dir() -> Path:
    """``ds_configs/`` beside the package in a checkout, or the installed ``ia3_dist.ds_configs`` package data."""
    pkg = Path(__file__).resolve().parents[1]
    for cand in (pkg.parent / "ds_configs", pkg / "ds_configs"):
        if cand.is_dir():
            return cand
    raise FileNotFoundError("ds_configs directory not found next to ia3_dist")


def locate(name: str) -> Path:
    p = Path(name).expanduser()
    if p.is_file():
        return p
    stem = name[:-5] if name.endswith(".json") else name
    if stem in SHIPPED or (name.startswith("ds_configs/") and not p.exists()):
        q = shipped_dir() / f"{Path(stem).name}.json"
        if q.is_file():
            return q
    raise UsageError(f"deepspeed.config {name}: no such file; use a path or one of {', '.join(SHIPPED)}")


def read(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not UTF-8 ({e.reason})") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: top level must be a JSON object")
    return raw


def _fill(ds: dict[str, Any], key: str, value: Any, run_key: str, src: Path) -> None:
    """Set ``ds[key]`` (dotted) to ``value`` unless it is already set to something else."""
    parts = key.split(".")
    node = ds
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    cur = node.get(parts[-1], AUTO)
    if cur != AUTO and cur != value and not (isinstance(cur, (int, float)) and isinstance(value, (int, float))
                                             and float(cur) == float(value)):
        raise UsageError(f"{src}: '{key}' is {cur!r} but the run config gives {value!r} ({run_key}); set it to "
                         f"\"auto\" or remove it from the DeepSpeed file, or change {run_key}")
    node[parts[-1]] = value


def _leftover_autos(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [k for key, v in node.items() for k in _leftover_autos(v, f"{prefix}.{key}" if prefix else key)]
    return [prefix] if node == AUTO else []


def stage_of(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def offloads(ds: dict[str, Any]) -> bool:
    """Any ZeRO offload (optimizer or parameters) configured."""
    z = ds.get("zero_optimization", {})
    return any(isinstance(z.get(k), dict) and z[k].get("device", "none") not in ("none", None)
               for k in ("offload_optimizer", "offload_param"))


def offloads_optimizer(ds: dict[str, Any]) -> bool:
    dev = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return dev not in (None, "none")


def live_params(hidden: int) -> int:
    """``"auto"`` for ``stage3_max_live_parameters`` and ``stage3_max_reuse_distance``: two transformer layers
    (12 h^2 each), capped at DeepSpeed's 1e9. A fixed 1e9 exceeds a whole small model, so ZeRO-3 would keep every
    gathered layer and end up holding the full model."""
    return min(10**9, 2 * 12 * hidden * hidden)


def resolve(cfg: RunConfig, world_size: int, hidden_size: int | None) -> dict[str, Any]:
    src = locate(cfg.deepspeed.config)
    ds = copy.deepcopy(read(src))
    t = cfg.train
    zero = ds.setdefault("zero_optimization", {"stage": 0})
    if not isinstance(zero, dict):
        raise UsageError(f"{src}: 'zero_optimization' must be an object")
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise UsageError(f"{src}: zero_optimization.stage is {stage!r}; use 0, 1, 2 or 3")
    for kind in ("offload_optimizer", "offload_param"):
        dev = zero.get(kind, {}).get("device", "none") if isinstance(zero.get(kind), dict) else "none"
        if dev not in ("none", None, "cpu", "nvme"):
            raise UsageError(f"{src}: zero_optimization.{kind}.device is {dev!r}; use none, cpu or nvme")
        if kind == "offload_param" and dev == "nvme":
            raise UsageError(f"{src}: zero_optimization.offload_param.device nvme is not supported (the ZeRO-3 "
                             f"loader writes each rank's partitions in memory); use cpu")
        if dev not in ("none", None) and ((kind == "offload_param" and stage != 3)
                                          or (kind == "offload_optimizer" and stage < 1)):
            raise UsageError(f"{src}: zero_optimization.{kind} needs stage {'3' if kind == 'offload_param' else '1+'}"
                             f" (stage is {stage})")

    _fill(ds, "train_micro_batch_size_per_gpu", t.micro_batch_size, "train.micro_batch_size", src)
    _fill(ds, "gradient_accumulation_steps", t.grad_accum, "train.grad_accum", src)
    _fill(ds, "train_batch_size", t.micro_batch_size * t.grad_accum * world_size,
          "train.micro_batch_size x train.grad_accum x world size", src)
    _fill(ds, "gradient_clipping", t.grad_clip, "train.grad_clip", src)
    for prec in ("bf16", "fp16"):
        _fill(ds, f"{prec}.enabled", t.precision == prec, "train.precision", src)

    if ds.get("optimizer", AUTO) == AUTO:
        ds["optimizer"] = {}
    opt = ds["optimizer"]
    if not isinstance(opt, dict):
        raise UsageError(f"{src}: 'optimizer' must be an object or \"auto\"")
    if opt.get("type", AUTO) not in (AUTO, "AdamW"):
        raise UsageError(f"{src}: optimizer.type is {opt.get('type')!r}; the launcher trains with AdamW "
                         f"(remove the optimizer block or set its type to \"AdamW\")")
    opt["type"] = "AdamW"
    params = {"lr": t.lr, "betas": list(t.betas), "eps": t.eps, "weight_decay": t.weight_decay}
    for k, v in params.items():
        _fill(ds, f"optimizer.params.{k}", v, f"train.{k}", src)
    # torch.optim.AdamW is what the reference recipe steps; DeepSpeed's CPU Adam is required with offload.
    opt["params"].setdefault("torch_adam", not offloads_optimizer(ds))

    # The launcher owns the LR schedule (see schedule.py): DeepSpeed's Warmup* schedulers clamp warmup to >= 2
    # steps (lr 0 on step 0 with no warmup) and torch schedulers named in the JSON cannot wrap a ZeRO optimizer.
    if ds.get("scheduler", AUTO) != AUTO:
        raise UsageError(f"{src}: 'scheduler' is set in the DeepSpeed file; the launcher builds the schedule from "
                         f"train.scheduler, train.warmup_steps and train.lr. Remove the block or set it to \"auto\"")
    ds.pop("scheduler", None)

    if hidden_size:
        h = hidden_size
        live = live_params(h)
        for key, val in (("reduce_bucket_size", h * h), ("stage3_prefetch_bucket_size", int(0.9 * h * h)),
                         ("stage3_param_persistence_threshold", 10 * h), ("stage3_max_live_parameters", live),
                         ("stage3_max_reuse_distance", live)):
            if zero.get(key) == AUTO:
                zero[key] = val
    ds.setdefault("steps_per_print", 10 ** 9)  # the launcher logs; silence DeepSpeed's own step prints
    left = _leftover_autos(ds)
    if left:
        raise UsageError(f"{src}: cannot resolve \"auto\" for {', '.join(left)}; give explicit values")
    return ds
