"""The layout-independent part of a checkpoint: what a resume on another allocation needs.

DeepSpeed's own checkpoint files hold each rank's partition of the optimizer (ZeRO-1/2/3) and load only into the
same data-parallel size and stage. IA3 trains a few hundred thousand parameters, so beside them every save also
writes, from rank 0, the whole trainable state in a form that no layout shapes:

- ``ia3_state.safetensors``: per trainable parameter (named as in the model, compile wrappers left out) its fp32
  master copy and AdamW's two moments, gathered from the ranks' partitions; and rank 0's torch RNG state;
- ``ia3_state.json``: AdamW's step count, the LR scheduler's state and the current LR, the engine's step and
  sample counters and rank 0's Python and NumPy RNG states.

No pickle anywhere: safetensors and JSON load without running code. A resume on the same layout and ZeRO stage
keeps using DeepSpeed's files; any other layout with the same global batch (:mod:`.checkpoint` decides) builds a
fresh engine and fills it from these two files on every rank (:func:`apply`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from ..errors import UsageError
from . import dist, safe_io

STATE = "ia3_state.safetensors"
INFO = "ia3_state.json"
FORMAT = 1
MOMENTS = ("exp_avg", "exp_avg_sq")
MAX_STATE = 4 << 30
"""IA3 on a 176B model is ~10M parameters (three fp32 copies: 120 MB); a larger file is not ours."""
MAX_INFO = 1 << 20
_PREFIX = ("param/", "exp_avg/", "exp_avg_sq/")


def _key(name: str) -> str:
    # torch.compile wraps a block as ``<block>._orig_mod``: a compiled run and an eager one name a parameter alike.
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


def trainable(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(_key(n), p) for n, p in module.named_parameters() if p.requires_grad]


def base_optimizer(engine: Any) -> Any:
    """The torch optimizer under DeepSpeed's wrappers (ZeRO-1/2/3 and bf16 keep it as ``.optimizer``)."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def full_shape(p: torch.nn.Parameter) -> tuple[int, ...]:
    """A parameter's real shape (ZeRO-3 keeps an empty placeholder in ``p`` and the shape in ``ds_shape``)."""
    return tuple(getattr(p, "ds_shape", p.shape))


def _state_keys(engine: Any) -> tuple[list[torch.Tensor], bool]:
    """The tensors AdamW keys its state by, and whether they are DeepSpeed's: the flat fp32 partitions of its
    ZeRO-3, ZeRO-1/2 and bf16 optimizers (True), or the parameters themselves (ZeRO-0 in fp32, False)."""
    opt = engine.optimizer
    for name in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
        flats = getattr(opt, name, None)
        if flats:
            return list(flats), True
    return [t for g in base_optimizer(engine).param_groups for t in g["params"]], False


def _flat_slots(engine: Any) -> dict[int, tuple[torch.Tensor, int, int]]:
    """ZeRO-0 with bf16/fp16 (DeepSpeed's FP16_Optimizer and FP16_UnfusedOptimizer): each trainable parameter's
    ``(master, offset, numel)``: its slice of the group's flat fp32 master (flattened in the group's parameter
    order), or its own fp32 copy; AdamW keys its state by the master tensor."""
    opt = engine.optimizer
    groups, flats = getattr(opt, "fp16_groups", None), getattr(opt, "fp32_groups_flat", None)
    out: dict[int, tuple[torch.Tensor, int, int]] = {}
    if groups and getattr(opt, "fp32_groups", None):  # the unfused variant: an fp32 copy per parameter
        for params, copies in zip(groups, opt.fp32_groups, strict=True):
            for p, c in zip(params, copies, strict=True):
                out[id(p)] = (c, 0, p.numel())
        return out
    if not groups or not flats:
        return {}
    for params, flat in zip(groups, flats, strict=True):
        off = 0
        for p in params:
            out[id(p)] = (flat, off, p.numel())
            off += p.numel()
    return out


def gather(engine: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every rank calls this (under ZeRO the full values are all-gathered from the partitions); only rank 0's
    result is written. Returns the tensors and the JSON part (without the RNG, which :func:`write` adds)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    base = base_optimizer(engine)
    # A save straight after a resume (an evaluation a signal put off, then its checkpoint) comes before any step.
    _link_optimizer_state(engine, base)
    slots = _flat_slots(engine)
    out: dict[str, torch.Tensor] = {}
    for key, p in trainable(engine.module):
        master = safe_get_full_fp32_param(p)
        if master is None and id(p) in slots:
            flat, off, n = slots[id(p)]
            st = base.state.get(flat, {})
            master = flat.view(-1)[off:off + n]
            moments = [st[m].view(-1)[off:off + n] if m in st else None for m in MOMENTS]
        elif master is None:
            # ZeRO-0 without mixed precision: the parameter is its own master and the optimizer keys state by it.
            st = base.state.get(p, {})
            master, moments = p.detach(), [st.get(m) for m in MOMENTS]
        else:
            moments = [safe_get_full_optimizer_state(p, m) for m in MOMENTS]
        shape = full_shape(p)
        for prefix, t in zip(_PREFIX, [master, *moments], strict=True):
            if t is None:
                raise RuntimeError(f"no {prefix[:-1]} for {key}: the optimizer has not stepped yet")
            out[prefix + key] = t.detach().float().reshape(shape).cpu().contiguous()
    steps = {int(float(st["step"])) for st in base.state.values() if "step" in st}
    if len(steps) != 1:
        raise RuntimeError(f"AdamW step counts {sorted(steps)}: expected one shared count")
    sched = engine.lr_scheduler
    info = {"format": FORMAT, "optimizer_step": steps.pop(), "lr": [g["lr"] for g in base.param_groups],
            "scheduler": _json_state(sched.state_dict()) if sched is not None else None,
            "global_steps": int(engine.global_steps), "global_samples": int(engine.global_samples)}
    return out, info


def _link_optimizer_state(engine: Any, base: Any) -> None:
    """ZeRO-1/2 and bf16 map each parameter's fragment of the flat optimizer state once that state exists, which
    DeepSpeed itself does only at the first step after the engine is built or loaded."""
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None and base.state:
        link()


def _json_state(sd: dict[str, Any]) -> dict[str, Any]:
    # LambdaLR keeps its lambdas as None in the state dict: the schedule itself is rebuilt from the run config.
    return {k: v for k, v in sd.items() if v is None or isinstance(v, (bool, int, float, str, list))}


def write(ckpt: Path, tensors: dict[str, torch.Tensor], info: dict[str, Any], rng: dict[str, Any],
          ranks: list[dict[str, Any]] | None = None) -> None:
    """Rank 0: the two files into the checkpoint's tag dir (before its meta.json, which marks it complete).
    ``rng``: rank 0's RNG states; ``ranks``: every rank's, of which the torch (and device) generators are kept
    (``rng/torch/<r>``): dropout draws from them, and a resume on the same world continues each rank's stream."""
    from safetensors.torch import save_file

    devices = {"rng/cuda": rng["cuda"]} if "cuda" in rng else {}
    for r, state in enumerate(ranks or []):
        devices[f"rng/torch/{r}"] = state["torch"]
        if "cuda" in state:
            devices[f"rng/cuda/{r}"] = state["cuda"]
    save_file({**tensors, "rng/torch": rng["torch"], **devices}, str(ckpt / STATE), metadata={"format": str(FORMAT)})
    (ckpt / INFO).write_text(json.dumps({**info, "rng": {"python": rng["python"], "numpy": rng["numpy"]}}))


def has_state(ckpt: Path) -> bool:
    return (ckpt / STATE).is_file() and (ckpt / INFO).is_file()


def read(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Both files, bounded and checked for their shape; a UsageError naming the file otherwise."""
    from safetensors.torch import load as load_tensors

    fix = "resume on the layout it was saved with, or from another checkpoint"
    raw = safe_io.read_bounded(ckpt / STATE, MAX_STATE, fix)
    try:
        tensors = load_tensors(raw)
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise UsageError(f"{ckpt / STATE}: unreadable ({str(e)[:200]}); {fix}") from None
    try:
        info = json.loads(safe_io.read_bounded(ckpt / INFO, MAX_INFO, fix).decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise UsageError(f"{ckpt / INFO}: unreadable ({str(e)[:200]}); {fix}") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise UsageError(f"{ckpt / INFO}: not format {FORMAT} of ia3-dist's layout-independent state; {fix}")
    for k in ("optimizer_step", "global_steps", "global_samples"):
        if type(info.get(k)) is not int or info[k] < 0:
            raise UsageError(f"{ckpt / INFO}: '{k}' is not a count; {fix}")
    lrs = info.get("lr")
    if not isinstance(lrs, list) or not all(type(x) in (int, float) and math.isfinite(x) for x in lrs):
        raise UsageError(f"{ckpt / INFO}: 'lr' is not a list of numbers; {fix}")
    if "rng/torch" not in tensors or not isinstance(info.get("rng"), dict):
        raise UsageError(f"{ckpt}: no RNG state in {STATE} / {INFO}; {fix}")
    return tensors, info


def _zero3_share(p: Any, full: torch.Tensor) -> torch.Tensor:
    """ZeRO-3: this rank's partition of ``full`` (a parameter's whole value), as DeepSpeed lays it out: the flat
    value padded with zeros to ``world x share`` elements, rank r holding elements ``r*share .. (r+1)*share``."""
    import torch.distributed as td

    share = p.ds_tensor.numel()
    rank = td.get_rank(group=getattr(p, "ds_process_group", None))
    padded = torch.zeros(share * td.get_world_size(group=getattr(p, "ds_process_group", None)), dtype=full.dtype)
    padded[:full.numel()] = full.flatten()
    return padded[rank * share:(rank + 1) * share]


def set_masters(engine: Any, values: dict[int, torch.Tensor]) -> int:
    """Every rank, before the first step: the fp32 masters of the trainable parameters in ``values`` (full fp32
    tensors by ``id`` of the parameter) set to them. DeepSpeed builds its masters from the module's parameters,
    which bf16/fp16 holds rounded (half a bf16 step: 2**-9 near 1.0). No optimizer state exists yet, none is set.
    Returns how many were set (none in fp32 ZeRO-0, whose parameters are their own masters)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_local_fp32_param

    _, partitioned = _state_keys(engine)
    slots = _flat_slots(engine)
    done = 0
    for _, p in trainable(engine.module):
        v = values.get(id(p))
        if v is None:
            continue
        if hasattr(p, "ds_id"):
            safe_set_local_fp32_param(p, _zero3_share(p, v).to(engine.device))
        elif partitioned:  # each rank sets its own fragment (none where the parameter is in another's partition)
            safe_set_full_fp32_param(p, v.to(engine.device))
        elif id(p) in slots:
            flat, off, n = slots[id(p)]
            with torch.no_grad():
                flat.view(-1)[off:off + n].copy_(v.flatten())
        else:
            continue
        done += 1
    return done


def apply(engine: Any, ckpt: Path) -> dict[str, Any]:
    """Every rank: fill a fresh engine (any world size, micro-batch, accumulation or ZeRO stage) with the saved
    trainable state: masters, model weights, AdamW moments and step count, scheduler, LR and counters. Returns
    the RNG states for :func:`.checkpoint.set_rng_state` (:func:`_rng_of_this_rank`)."""
    import deepspeed
    from deepspeed.utils import (
        safe_set_full_fp32_param,
        safe_set_full_optimizer_state,
        safe_set_local_fp32_param,
        safe_set_local_optimizer_state,
    )

    tensors, info = read(ckpt)
    params = trainable(engine.module)
    fix = f"{ckpt} was saved by a run of another model or IA3 setting; resume it with that model"
    want = {key for key, _ in params}
    have = {k.split("/", 1)[1] for k in tensors if k.startswith("param/")}
    if want != have:
        miss, extra = sorted(want - have), sorted(have - want)
        raise UsageError(f"{ckpt / STATE}: trainable parameters differ (missing {miss[:3]}, not in this model "
                         f"{extra[:3]}); {fix}")
    for key, p in params:
        for prefix in _PREFIX:
            t = tensors.get(prefix + key)
            if t is None or tuple(t.shape) != full_shape(p):
                raise UsageError(f"{ckpt / STATE}: {prefix + key} has shape "
                                 f"{None if t is None else tuple(t.shape)}, the model's is {full_shape(p)}; {fix}")
    base = base_optimizer(engine)
    # A fresh engine's AdamW has no state until its first step: create what that step would, at the saved count.
    # The fused AdamW (and the capturable one) keep the count on the parameter's device, the others on the host.
    # DeepSpeed's own Adams (FusedAdam: optimizer.params.torch_adam false; CPU Adam) keep it as a Python int, which
    # their kernels take as the step argument.
    on_device = any(g.get("fused") or g.get("capturable") for g in base.param_groups)
    torch_adamw = isinstance(base, torch.optim.AdamW)
    keys, partitioned = _state_keys(engine)
    for t in keys:
        step: Any = torch.tensor(float(info["optimizer_step"]), dtype=torch.float32,
                                 device=t.device if on_device else "cpu") if torch_adamw \
            else int(info["optimizer_step"])
        base.state[t] = {"step": step, **{m: torch.zeros_like(t) for m in MOMENTS}}
    _link_optimizer_state(engine, base)
    zero3 = any(hasattr(p, "ds_id") for _, p in params)
    slots = _flat_slots(engine)
    for key, p in params:
        master = tensors["param/" + key]
        if zero3:
            # This rank's share of the padded value: DeepSpeed's set-full API cuts shares of ceil(n / world) from
            # the unpadded value and runs past its end on the last ranks where the world does not divide n.
            safe_set_local_fp32_param(p, _zero3_share(p, master).to(engine.device))
            for m in MOMENTS:
                safe_set_local_optimizer_state(p, _zero3_share(p, tensors[f"{m}/{key}"]).to(engine.device), m)
        elif partitioned:  # each rank sets its own fragment (none where the parameter lies in another's partition)
            safe_set_full_fp32_param(p, master.to(engine.device))
            for m in MOMENTS:
                safe_set_full_optimizer_state(p, tensors[f"{m}/{key}"].to(engine.device), m)
        elif id(p) in slots:
            flat, off, n = slots[id(p)]
            with torch.no_grad():
                flat.view(-1)[off:off + n].copy_(master.flatten())
            for m in MOMENTS:
                base.state[flat][m].view(-1)[off:off + n].copy_(tensors[f"{m}/{key}"].flatten())
        else:
            st = base.state[p]
            for m in MOMENTS:
                st[m].copy_(tensors[f"{m}/{key}"])
        if not zero3:
            with torch.no_grad():
                p.copy_(master.to(p.dtype))
    if zero3:
        # The model's own (partitioned) copies: gathered, set to the master values on every rank, re-partitioned.
        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=0):
            with torch.no_grad():
                for key, p in params:
                    p.copy_(tensors["param/" + key].to(p.dtype))
    if len(info["lr"]) != len(base.param_groups):
        raise UsageError(f"{ckpt / INFO}: {len(info['lr'])} parameter groups, this run has "
                         f"{len(base.param_groups)}; {fix}")
    for g, lr in zip(base.param_groups, info["lr"], strict=True):
        g["lr"] = lr
    if engine.lr_scheduler is not None and info.get("scheduler") is not None:
        sd = engine.lr_scheduler.state_dict()
        sd.update({k: v for k, v in info["scheduler"].items() if k in sd})
        engine.lr_scheduler.load_state_dict(sd)
    engine.global_steps = info["global_steps"]
    engine.global_samples = info["global_samples"]
    return _rng_of_this_rank(tensors, info)


def _rng_of_this_rank(tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> dict[str, Any]:
    """Rank 0's RNG states, with this rank's own torch (and device) generators where the checkpoint holds every
    rank's and was saved on this world size (a resume on another ZeRO stage or micro-batch cut): its dropout draws
    continue as the native resume's do. On another world no rank's stream continues anyway."""
    rank, world = dist.rank_and_world()
    suffix = ""
    if world > 1 and f"rng/torch/{world - 1}" in tensors and f"rng/torch/{world}" not in tensors:
        suffix = f"/{rank}"
    devices = {"cuda": tensors[f"rng/cuda{suffix}"]} if f"rng/cuda{suffix}" in tensors else {}
    return {**info["rng"], "torch": tensors[f"rng/torch{suffix}"], **devices}
