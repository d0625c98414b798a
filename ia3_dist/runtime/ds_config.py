"""Resolve a DeepSpeed JSON config against the run config: fill every "auto", refuse contradictions.

The run config is the one source of truth for batch sizes, precision, optimizer and schedule; the DeepSpeed file
owns ZeRO placement. A value present in both must agree (or be "auto").
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..config.schema import brief, show
from ..errors import UsageError

AUTO = "auto"
SHIPPED = ("zero0", "zero1", "zero2", "zero3", "zero3_offload")
MAX_BYTES = 1 << 20
"""A DeepSpeed config is a few KiB; a larger file is not one."""
MAX_DEPTH = 16
"""Nesting a DeepSpeed config may have (it needs 3): deeper JSON would reach RecursionError in deepcopy, in this
module's walks or in DeepSpeed."""
TOP_LEVEL_TYPES: dict[str, tuple[type, ...]] = {
    "steps_per_print": (int,), "wall_clock_breakdown": (bool,), "prescale_gradients": (bool,),
    "gradient_predivide_factor": (int, float), "sparse_gradients": (bool,), "memory_breakdown": (bool,),
    "dump_state": (bool,), "communication_data_type": (str, type(None)), "seq_parallel_communication_data_type":
    (str,), "zero_allow_untested_optimizer": (bool,), "zero_force_ds_cpu_optimizer": (bool,),
}
"""Top-level scalars DeepSpeed reads without type checks (a wrong type fails inside deepspeed.initialize, after
the process group started). The sections it validates itself are checked with its own models in :func:`resolve`."""


def shipped_dir() -> Path:
    """``ds_configs/`` beside the package in a checkout, or the installed ``ia3_dist.ds_configs`` package data."""
    pkg = Path(__file__).resolve().parents[1]
    for cand in (pkg.parent / "ds_configs", pkg / "ds_configs"):
        if cand.is_dir():
            return cand
    raise FileNotFoundError("ds_configs directory not found next to ia3_dist")


def _is_file(p: Path) -> bool:
    try:
        return p.is_file()
    except OSError:  # e.g. a name longer than the filesystem allows
        return False


def _exists(p: Path) -> bool:
    try:
        return p.exists()
    except OSError:
        return False


def locate(name: str) -> Path:
    try:
        p = Path(name).expanduser()
    except RuntimeError:  # ~user for a user that does not exist: then it is no such file
        p = Path(name)
    if _is_file(p):
        return p
    stem = name[:-5] if name.endswith(".json") else name
    if stem in SHIPPED or (name.startswith("ds_configs/") and not _exists(p)):
        q = shipped_dir() / f"{Path(stem).name}.json"
        if _is_file(q):
            return q
    raise UsageError(f"deepspeed.config {brief(name)}: no such file; use a path or one of {', '.join(SHIPPED)}")


def _no_duplicates(path: Path) -> Any:
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in pairs:
            if k in out:
                raise UsageError(f"{path}: duplicate key {show(k)} in one object (JSON keeps only the last); keep "
                                 f"one")
            out[k] = v
        return out
    return hook


def _finite_float(path: Path) -> Any:
    def parse(text: str) -> float:
        v = float(text)
        if not math.isfinite(v):
            raise UsageError(f"{path}: number {show(text)} is out of range")
        return v
    return parse


def _non_finite(path: Path) -> Any:
    def parse(text: str) -> float:
        raise UsageError(f"{path}: {text} is not a JSON number; DeepSpeed settings must be finite")
    return parse


def _check_depth(raw: Any, path: Path) -> None:
    stack = [(raw, "", 0)]
    while stack:
        node, where, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise UsageError(f"{path}: '{brief(where)}' is nested more than {MAX_DEPTH} levels deep; a DeepSpeed "
                             f"config is sections of settings")
        if isinstance(node, dict):
            stack.extend((v, f"{where}.{k}" if where else k, depth + 1) for k, v in node.items())
        elif isinstance(node, list):
            stack.extend((v, f"{where}[{i}]", depth + 1) for i, v in enumerate(node))


def read(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``. Bad input of any kind (unreadable, not UTF-8, invalid or duplicate-keyed JSON,
    NaN/Infinity, huge numbers, deep nesting) is a :class:`UsageError` naming the file."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise UsageError(f"{path}: cannot read it ({e.strerror or e})") from None
    if len(data) > MAX_BYTES:
        raise UsageError(f"{path}: larger than {MAX_BYTES} bytes; is it a DeepSpeed config?")
    try:
        raw = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates(path),
                         parse_float=_finite_float(path), parse_constant=_non_finite(path))
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not UTF-8 ({e.reason})") from None
    except RecursionError:
        raise UsageError(f"{path}: nested too deeply; a DeepSpeed config is sections of settings") from None
    except ValueError:  # int() refuses more than 4300 digits
        raise UsageError(f"{path}: a number too large to read; DeepSpeed settings are ordinary numbers") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: top level must be a JSON object")
    _check_depth(raw, path)
    return raw


def _fill(ds: dict[str, Any], key: str, value: Any, run_key: str, src: Path) -> None:
    """Set ``ds[key]`` (dotted) to ``value`` unless it is already set to something else."""
    parts = key.split(".")
    node = ds
    for i, p in enumerate(parts[:-1]):
        if node.get(p, AUTO) == AUTO:
            node[p] = {}
        node = node[p]
        if not isinstance(node, dict):
            where = ".".join(parts[:i + 1])
            raise UsageError(f"{src}: '{where}' must be a JSON object (the launcher fills '{key}' in it), got "
                             f"{show(node)}; make it an object such as {{\"{parts[i + 1]}\": \"auto\"}} or "
                             f"remove it")
    cur = node.get(parts[-1], AUTO)
    # Python compares int and float exactly (1 == 1.0), with no float() that could overflow on a huge int.
    if cur != AUTO and cur != value:
        raise UsageError(f"{src}: '{key}' is {show(cur)} but the run config gives {show(value)} ({run_key}); set "
                         f"it to \"auto\" or remove it from the DeepSpeed file, or change {run_key}")
    node[parts[-1]] = value


def _leftover_autos(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [k for key, v in node.items() for k in _leftover_autos(v, f"{prefix}.{key}" if prefix else key)]
    if isinstance(node, list):
        return [k for i, v in enumerate(node) for k in _leftover_autos(v, f"{prefix}[{i}]")]
    return [prefix] if node == AUTO else []


def _zero(ds: dict[str, Any]) -> dict[str, Any]:
    z = ds.get("zero_optimization")
    return z if isinstance(z, dict) else {}


def _offload_device(ds: dict[str, Any], kind: str) -> Any:
    off = _zero(ds).get(kind)
    return off.get("device", "none") if isinstance(off, dict) else "none"


def stage_of(ds: dict[str, Any]) -> int:
    """The ZeRO stage of a config :func:`resolve` accepted; anything else is refused rather than guessed."""
    stage = _zero(ds).get("stage", 0)
    if type(stage) is not int or stage not in (0, 1, 2, 3):
        raise UsageError(f"DeepSpeed config: zero_optimization.stage is {show(stage)}; use 0, 1, 2 or 3")
    return stage


def offloads(ds: dict[str, Any]) -> bool:
    """Any ZeRO offload (optimizer or parameters) configured."""
    return any(_offload_device(ds, k) not in ("none", None) for k in ("offload_optimizer", "offload_param"))


def offloads_optimizer(ds: dict[str, Any]) -> bool:
    return _offload_device(ds, "offload_optimizer") not in (None, "none")


def _check_with_deepspeed(ds: dict[str, Any], src: Path) -> None:
    """Validate the sections DeepSpeed models with pydantic (ZeRO, bf16, fp16) now, with DeepSpeed's own models:
    otherwise a wrong type there fails inside deepspeed.initialize, on every rank, after the process group
    started."""
    try:
        from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
        from pydantic import ValidationError
    except ImportError:  # without DeepSpeed no run starts; the launcher reports that itself
        return
    for section, model in (("zero_optimization", DeepSpeedZeroConfig), ("bf16", DeepSpeedBF16Config),
                           ("fp16", DeepSpeedFP16Config)):
        if section not in ds:
            continue
        try:
            model(**ds[section])
        except ValidationError as e:
            errs = e.errors()
            first = errs[0] if errs else {"loc": (), "msg": str(e)}
            where = ".".join([section, *(str(x) for x in first.get("loc", ()))])
            more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
            raise UsageError(f"{src}: '{brief(where)}': {brief(str(first.get('msg', '')))}{more}") from None
        except (TypeError, ValueError) as e:
            raise UsageError(f"{src}: '{section}': {brief(str(e))}") from None


def _check_top_level(ds: dict[str, Any], src: Path) -> None:
    for key, types in TOP_LEVEL_TYPES.items():
        if key in ds:
            v = ds[key]
            if (isinstance(v, bool) and bool not in types) or not isinstance(v, types):
                names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
                raise UsageError(f"{src}: '{key}' must be {names}, got {show(v)}")


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
        raise UsageError(f"{src}: 'zero_optimization' must be an object, got {show(zero)}")
    stage = zero.get("stage", 0)
    # type() and not ==: true == 1 and 3.0 == 3 would pass a bool or a float on to DeepSpeed.
    if type(stage) is not int or stage not in (0, 1, 2, 3):
        raise UsageError(f"{src}: zero_optimization.stage is {show(stage)}; use 0, 1, 2 or 3 (a JSON integer)")
    for kind in ("offload_optimizer", "offload_param"):
        off = zero.get(kind)
        if off is not None and not isinstance(off, dict):
            raise UsageError(f"{src}: zero_optimization.{kind} must be an object such as {{\"device\": \"cpu\"}}, "
                             f"got {show(off)}")
        dev = (off or {}).get("device", "none")
        if dev not in ("none", None, "cpu", "nvme"):
            raise UsageError(f"{src}: zero_optimization.{kind}.device is {show(dev)}; use none, cpu or nvme")
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
        raise UsageError(f"{src}: 'optimizer' must be an object or \"auto\", got {show(opt)}")
    if opt.get("type", AUTO) not in (AUTO, "AdamW"):
        raise UsageError(f"{src}: optimizer.type is {show(opt.get('type'))}; the launcher trains with AdamW "
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
        raise UsageError(f"{src}: cannot resolve \"auto\" for {brief(', '.join(left))}; give explicit values")
    _check_top_level(ds, src)
    _check_with_deepspeed(ds, src)
    return ds
