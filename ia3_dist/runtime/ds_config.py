"""Resolve a DeepSpeed JSON config against the run config: fill every "auto", refuse contradictions.

The run config is the one source of truth for batch sizes, precision, optimizer and schedule; the DeepSpeed file
owns ZeRO placement. A value present in both must agree (or be "auto").
"""

from __future__ import annotations

import copy
import difflib
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
MAX_BUCKET = 2**31
"""Bound on ZeRO bucket sizes, in elements. DeepSpeed allocates a reduce bucket of that many gradient elements (two
with overlap_comm, on the device) when it builds the ZeRO optimizer: ``1e13`` passes its config model (an int > 0)
and fails there, on every rank, after the process group started. DeepSpeed's defaults are 5e7 to 5e8; 2**31
elements is already 8 GiB of fp32 per buffer."""
# (section, key, least, most, what the value is): numbers DeepSpeed's models accept (any int, or int >= 0) but its
# engine then divides by, allocates or raises 2 to; aliases (DeepSpeed's models take both names) listed apiece.
BOUNDS: tuple[tuple[str, str, int, int, str], ...] = (
    ("", "steps_per_print", 1, 2**63 - 1, "a step interval (the engine takes the step count modulo it)"),
    ("zero_optimization", "reduce_bucket_size", 1, MAX_BUCKET, "elements of a buffer DeepSpeed allocates"),
    ("zero_optimization", "allgather_bucket_size", 2, MAX_BUCKET, "elements per all-gather"),
    ("zero_optimization", "stage3_prefetch_bucket_size", 0, MAX_BUCKET, "elements prefetched ahead"),
    ("zero_optimization", "prefetch_bucket_size", 0, MAX_BUCKET, "elements prefetched ahead"),
    ("fp16", "initial_scale_power", 0, 64, "the loss scale's power of 2 (fp16 overflows past 2**16)"),
    ("fp16", "loss_scale_window", 1, 2**31, "steps between loss-scale increases (the scaler takes a modulo)"),
    ("fp16", "hysteresis", 1, 2**31, "overflows tolerated before the scale drops"),
)


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
    raise UsageError(f"deepspeed.config {brief(name)}: no such file; use a path, one of {', '.join(SHIPPED)}, or "
                     f"auto (the lowest ZeRO stage that fits)")


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


def offloads_params(ds: dict[str, Any]) -> bool:
    """ZeRO-3's parameter offload configured (the frozen weights leave the GPU; an optimizer offload alone keeps
    them there)."""
    return _offload_device(ds, "offload_param") not in ("none", None)


OPTIMIZER_MATH_OFF = ("amsgrad", "maximize")
OPTIMIZER_MATH_ON = ("bias_correction", "adam_w_mode")
"""``optimizer.params`` that change the update's maths, off and on by default (lr, betas, eps and weight decay come
from the run config and are in its schedule; fused, foreach and the like change only how it is computed). Recorded
where they differ from their defaults."""


def optimizer_key(ds: dict[str, Any]) -> str:
    """The optimizer's type and the ``optimizer.params`` of :data:`OPTIMIZER_MATH_OFF` and ``_ON`` the DeepSpeed
    config sets otherwise than their defaults: what a resume must keep (the moments mean another thing under another
    update rule)."""
    opt = ds.get("optimizer") if isinstance(ds.get("optimizer"), dict) else {}
    params = opt.get("params") if isinstance(opt.get("params"), dict) else {}
    # Truth values, a default written out or left out alike (amsgrad 1 is amsgrad true; false is the default).
    # torch_adam follows the offload, which the checkpoint's offload_optimizer records (and refuses apart).
    flags = {k: True for k in OPTIMIZER_MATH_OFF if params.get(k)}
    flags.update({k: False for k in OPTIMIZER_MATH_ON if k in params and not params[k]})
    return json.dumps({"type": opt.get("type"), **flags}, sort_keys=True, default=str)


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


def _check_bounds(ds: dict[str, Any], src: Path) -> None:
    for section, key, lo, hi, what in BOUNDS:
        node = ds.get(section) if section else ds
        if not isinstance(node, dict) or key not in node:
            continue
        v, where = node[key], f"{section}.{key}" if section else key
        # type(): True is an int; 5e8 (a JSON float) is how DeepSpeed's own examples write bucket sizes.
        if type(v) not in (int, float) or v != v // 1:
            raise UsageError(f"{src}: '{where}' must be a whole number ({what}), got {show(v)}")
        if not lo <= v <= hi:
            raise UsageError(f"{src}: '{where}' is {show(v)}, outside {lo}..{hi} ({what}); DeepSpeed would fail "
                             f"with it after the process group started. Set it within that range or remove it "
                             f"(DeepSpeed's default)")


def _check_reduction(ds: dict[str, Any], src: Path, stage: int) -> None:
    """What DeepSpeed's ZeRO optimizers assert when they are built (inside deepspeed.initialize, on every rank):
    refused here with the fix instead."""
    zero = _zero(ds)
    f = ds.get("gradient_predivide_factor", 1.0)
    if not 0 < f <= 2**31:  # type checked by _check_top_level; NaN/inf never parse
        raise UsageError(f"{src}: 'gradient_predivide_factor' is {show(f)}; it divides the gradients before they "
                         f"are reduced, so it must be > 0 (normally 1.0, DeepSpeed's default). Remove it")
    mean = str(ds.get("gradient_allreduce_op", "mean")).lower() == "mean"
    # ZeRO-2 asserts this when it averages gradients (gradient_allreduce_op mean, the default); ZeRO-3 always.
    if stage in (2, 3) and zero.get("reduce_scatter", True) and (stage == 3 or mean):
        for key, bad, fix in (("gradient_predivide_factor", f != 1, "remove it or set it to 1.0"),
                              ("prescale_gradients", ds.get("prescale_gradients") is True, "set it to false")):
            if bad:
                raise UsageError(f"{src}: '{key}' is {show(ds[key])}, which DeepSpeed's ZeRO-{stage} with "
                                 f"reduce_scatter does not support (it fails when the optimizer is built, after the "
                                 f"process group started); {fix}, or set zero_optimization.reduce_scatter to false")
    ag = zero.get("allgather_bucket_size")
    if stage in (1, 2) and type(ag) in (int, float) and ag % 2:
        raise UsageError(f"{src}: 'zero_optimization.allgather_bucket_size' is {show(ag)}; ZeRO-{stage} needs a "
                         f"multiple of 2 (its all-gather alignment); use an even number such as 500000000")


def _check_with_deepspeed_config(ds: dict[str, Any], src: Path) -> None:
    """The whole config through DeepSpeed's own parser (``DeepSpeedConfig``, what deepspeed.initialize builds
    first): its ValueErrors (communication_data_type "fp8", gradient_allreduce_op "max", ...) are then exit 2 here.
    ``train_batch_size`` is left out: outside a process group the parser assumes one rank, and the launcher has
    set the three batch keys consistently itself."""
    try:
        from deepspeed.runtime.config import DeepSpeedConfig
    except ImportError:
        return
    probe = _Reads({k: copy.deepcopy(v) for k, v in ds.items() if k != "train_batch_size"})
    try:
        DeepSpeedConfig(probe)
    except Exception as e:  # DeepSpeed raises ValueError, AssertionError, KeyError, TypeError, pydantic errors
        errors = getattr(e, "errors", None)
        if callable(errors) and type(e).__name__ == "ValidationError":
            # pydantic's first line says only which model failed: the field and the reason are in its errors.
            errs = errors()
            first = errs[0] if errs else {"loc": (), "msg": str(e)}
            model = str(getattr(e, "title", "") or "")
            where = ".".join([model, *(str(x) for x in first.get("loc", ()))]) if model else \
                ".".join(str(x) for x in first.get("loc", ()))
            more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
            raise UsageError(f"{src}: DeepSpeed refuses this config: {brief(where)}: "
                             f"{brief(str(first.get('msg', '')))}{more}") from None
        lines = str(e).strip().splitlines()
        raise UsageError(f"{src}: DeepSpeed refuses this config: {brief(lines[0] if lines else type(e).__name__)}"
                         ) from None
    # A top-level key DeepSpeed never reads is ignored without a word: "zero_optimisation" ran on ZeRO-0. Keys
    # other parts of DeepSpeed read are not known here, so only a near miss of a key it reads is refused.
    known = sorted(probe.read | _READ_ELSEWHERE)
    for key in ds:
        if key in known or key == "train_batch_size":
            continue
        near = difflib.get_close_matches(key, known, n=1, cutoff=0.8)
        if near:
            raise UsageError(f"{src}: '{brief(key)}' is not a key DeepSpeed reads; did you mean '{near[0]}'? "
                             f"DeepSpeed would ignore it and run without it")


# Top-level keys DeepSpeed reads outside DeepSpeedConfig's parser (the optimizer through keys(), the others in
# their own components).
_READ_ELSEWHERE = frozenset({"optimizer", "scheduler", "autotuning", "flops_profiler", "aio"})


class _Reads(dict):
    """A config dict that records the top-level keys DeepSpeed's parser asks for (present or not)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.read: set[str] = set()

    def get(self, key: Any, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key: Any) -> Any:
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self.read.add(key)  # type: ignore[arg-type]
        return super().__contains__(key)


def _check_top_level(ds: dict[str, Any], src: Path) -> None:
    for key, types in TOP_LEVEL_TYPES.items():
        if key in ds:
            v = ds[key]
            if (isinstance(v, bool) and bool not in types) or not isinstance(v, types):
                names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
                raise UsageError(f"{src}: '{key}' must be {names}, got {show(v)}")


def no_stalls(ds: dict[str, Any], precision: str) -> None:
    """Turn off DeepSpeed's per-step host syncs that cost the launcher nothing to drop, unless the file sets them:
    - ``timers.throughput.enabled``: DeepSpeed's throughput timer synchronizes the device at every ``forward`` and
      ``step`` by default (``synchronized: true``); the launcher times its own steps and logs them.
    - ``bf16.check_grad_overflow`` (bf16 runs): bf16 has fp32's range and needs no loss scaling; the check reads a
      device value back every step. Without it DeepSpeed applies a step whose gradients are not finite instead of
      skipping it; the run still stops before anything is saved (the loop checks every step's loss and applied
      gradient norm, on the device, before each log line, eval and checkpoint)."""
    timers = ds.setdefault("timers", {})
    if isinstance(timers, dict):
        throughput = timers.setdefault("throughput", {})
        if isinstance(throughput, dict):
            throughput.setdefault("enabled", False)
    bf16 = ds.get("bf16")
    if precision == "bf16" and isinstance(bf16, dict):
        bf16.setdefault("check_grad_overflow", False)


def live_params(hidden: int) -> int:
    """``"auto"`` for ``stage3_max_live_parameters`` and ``stage3_max_reuse_distance``: two transformer layers
    (12 h^2 each), capped at DeepSpeed's 1e9. A fixed 1e9 exceeds a whole small model, so ZeRO-3 would keep every
    gathered layer and end up holding the full model."""
    return min(10**9, 2 * 12 * hidden * hidden)


# DeepSpeed keys that take a path around the launcher's own handling of the same thing, each with what to use.
_BYPASS_TOP = {
    # DeepSpeed reads `bf16` before this old alias: a file setting it would be silently ignored, where a value set
    # in both configs must agree.
    "bfloat16": "use 'bf16' (its current name), or train.precision",
}
_BYPASS_ZERO = {
    # Old spellings DeepSpeed still maps onto the offload sections: the launcher's offload checks (and the optimizer
    # offload needs, DeepSpeed's CPU Adam) read the new ones only.
    "cpu_offload": "use zero_optimization.offload_optimizer: {\"device\": \"cpu\"}",
    "cpu_offload_param": "use zero_optimization.offload_param: {\"device\": \"cpu\"}",
    "cpu_offload_use_pin_memory": "use pin_memory inside zero_optimization.offload_optimizer / offload_param",
}
# The `checkpoint` section's loaders: load_universal reads the optimizer's files with torch.load(weights_only=False)
# outside the loader the launcher hardens (a checkpoint dir could run code), node-local storage has every node's
# local rank 0 write (the launcher's files are rank 0's alone). tag_validation only checks that ranks agree.
_CHECKPOINT_KEYS_OK = {"tag_validation"}


# The keyword arguments of the optimizer classes DeepSpeed 0.19 builds for "AdamW" (engine._configure_basic_optimizer),
# and the keys it takes out of optimizer.params first.
_TORCH_ADAMW_PARAMS = frozenset({"lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach", "capturable",
                                 "differentiable", "fused"})
_DS_CPU_ADAM_PARAMS = frozenset({"lr", "bias_correction", "betas", "eps", "weight_decay", "amsgrad"})
_DS_FUSED_ADAM_PARAMS = _DS_CPU_ADAM_PARAMS | {"set_grad_none"}
_DS_ADAM_KEYS = frozenset({"torch_adam", "adam_w_mode", "fp32_optimizer_states"})


def _refuse_bypasses(ds: dict[str, Any], zero: dict[str, Any], src: Path) -> None:
    for key, fix in _BYPASS_TOP.items():
        if key in ds:
            raise UsageError(f"{src}: '{key}' is an old DeepSpeed key the launcher does not check; {fix}")
    for key, fix in _BYPASS_ZERO.items():
        if key in zero:
            raise UsageError(f"{src}: 'zero_optimization.{key}' is an old DeepSpeed key the launcher does not "
                             f"check; {fix}")
    autocast = ds.get("torch_autocast")
    if autocast not in (None, {}) and (not isinstance(autocast, dict) or autocast.get("enabled", False) is not False):
        # The forward would run in another dtype than train.precision says, which the report, plan, masks and the
        # loss's exactness are all reckoned in.
        raise UsageError(f"{src}: 'torch_autocast' runs the forward pass in a precision train.precision does not "
                         f"name; remove it and set train.precision (bf16, fp16 or fp32)")
    section = ds.get("checkpoint")
    if section is None:
        return
    if not isinstance(section, dict):
        raise UsageError(f"{src}: 'checkpoint' must be an object, got {show(section)}")
    other = sorted(set(section) - _CHECKPOINT_KEYS_OK)
    if other:
        raise UsageError(f"{src}: checkpoint.{other[0]} is not supported: the launcher saves and resumes "
                         f"checkpoints itself (checkpoint.* and train.resume in the run config, which also resume "
                         f"on another world size); remove it from the DeepSpeed file")


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
    _refuse_bypasses(ds, zero, src)
    if ds.get("activation_checkpointing"):
        # DeepSpeed's own checkpointing API is called by models written for it; transformers' models are
        # checkpointed by torch (train.gradient_checkpointing), so these settings would be read by nothing.
        raise UsageError(f"{src}: 'activation_checkpointing' configures DeepSpeed's checkpointing API, which the "
                         f"models here do not call: its settings (partition_activations, cpu_checkpointing) would "
                         f"do nothing. Remove it; train.gradient_checkpointing=true checkpoints the layers")
    managed = ds.get("managed_gradient_accumulation", True)
    if managed is not True:
        # Unmanaged, every engine.step() is an accumulation boundary: grad_accum optimizer steps per step.
        raise UsageError(f"{src}: 'managed_gradient_accumulation' is {show(managed)}; the launcher steps the engine "
                         f"after every micro-batch and DeepSpeed's managed accumulation makes every "
                         f"train.grad_accum-th one the optimizer step. Remove it (or set it to true)")
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
        if kind == "offload_optimizer" and dev == "nvme" and stage in (1, 2):
            # ZeRO-1/2 offload only to cpu, yet build DeepSpeed's CPU Adam for it, which refuses GPU parameters at
            # the first step.
            raise UsageError(f"{src}: zero_optimization.offload_optimizer.device nvme needs stage 3 (ZeRO-{stage} "
                             f"offloads to cpu only, and fails at the first step otherwise); use cpu")
        if dev == "nvme" and not (isinstance(off.get("nvme_path"), str) and off["nvme_path"].strip()):
            # DeepSpeed joins a None path inside deepspeed.initialize: a TypeError on every rank, process group up.
            raise UsageError(f"{src}: zero_optimization.{kind}.device nvme needs nvme_path (a dir on a local NVMe "
                             f"disk, e.g. \"nvme_path\": \"/local_nvme\"); give it, or use cpu")
    # Both cut the data-parallel world DeepSpeed sees, which the launcher's batch sizes, sampler and loss
    # normalisation are reckoned over (every rank a data-parallel rank); DeepSpeed then fails when it is built.
    sp = ds.get("sequence_parallel_size", 1)
    tp = ds.get("tensor_parallel", {}).get("autotp_size", 0) if isinstance(ds.get("tensor_parallel"), dict) else 0
    for key, v, ok in (("sequence_parallel_size", sp, 1), ("tensor_parallel.autotp_size", tp, 0)):
        if v not in (ok, None) and not (key.startswith("tensor") and v == 1):
            raise UsageError(f"{src}: '{key}' is {show(v)}; the launcher trains every rank as a data-parallel rank "
                             f"(IA3's few vectors need no model parallelism): remove it")

    _fill(ds, "train_micro_batch_size_per_gpu", t.micro_batch_size, "train.micro_batch_size", src)
    # With train.global_batch_size the accumulation follows from it (and the ranks): that is the key to change.
    _fill(ds, "gradient_accumulation_steps", t.grad_accum,
          "train.global_batch_size" if t.global_batch_size else "train.grad_accum", src)
    _fill(ds, "train_batch_size", t.micro_batch_size * t.grad_accum * world_size,
          "train.global_batch_size" if t.global_batch_size else
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
    prm = opt["params"]
    prm.setdefault("torch_adam", not offloads_optimizer(ds))
    if prm["torch_adam"]:
        # AdamW's fused form: one kernel over all tensors per step (on GPU and CPU), where the per-tensor form
        # launches several per tensor and reads each tensor's step count from host memory; HF Trainer's default
        # (adamw_torch_fused) too. torch takes fused or foreach, not both: a file that sets foreach keeps it.
        if prm.get("fused") is True and prm.get("foreach") is True:
            raise UsageError(f"{src}: optimizer.params sets both fused and foreach; torch's AdamW takes one "
                             f"(remove foreach: the fused form is the default)")
        if prm.get("foreach") is not True:
            prm.setdefault("fused", True)
    elif "fused" in prm or "foreach" in prm:
        raise UsageError(f"{src}: optimizer.params.{'fused' if 'fused' in prm else 'foreach'} is an option of "
                         f"torch's AdamW (torch_adam: true); DeepSpeed's own Adam (torch_adam: false) has no such "
                         f"parameter: remove it")
    # What the class DeepSpeed builds takes (a name it does not, a typo or max_grad_norm, fails in
    # deepspeed.initialize, after the process group started).
    if prm["torch_adam"]:
        takes, which = _TORCH_ADAMW_PARAMS, "torch's AdamW (torch_adam: true)"
    elif offloads_optimizer(ds):
        takes, which = _DS_CPU_ADAM_PARAMS, "DeepSpeed's CPU Adam (optimizer offload)"
    else:
        takes, which = _DS_FUSED_ADAM_PARAMS, "DeepSpeed's FusedAdam (torch_adam: false)"
    unknown = sorted(set(prm) - takes - _DS_ADAM_KEYS)
    if unknown:
        hint = ("; the clipping norm is train.grad_clip" if "max_grad_norm" in unknown else
                f"; it takes {', '.join(sorted(takes | _DS_ADAM_KEYS))}")
        raise UsageError(f"{src}: optimizer.params.{unknown[0]} is no parameter of {which}{hint}")

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
    no_stalls(ds, t.precision)
    left = _leftover_autos(ds)
    if left:
        raise UsageError(f"{src}: cannot resolve \"auto\" for {brief(', '.join(left))}; give explicit values")
    _check_top_level(ds, src)
    _check_with_deepspeed(ds, src)
    _check_bounds(ds, src)
    _check_reduction(ds, src, stage)
    _check_with_deepspeed_config(ds, src)
    return ds
