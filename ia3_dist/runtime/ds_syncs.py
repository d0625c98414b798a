"""DeepSpeed's optimizer steps without host reads.

After the config has turned off what DeepSpeed lets a config turn off (``runtime/ds_config.no_stalls``), a ZeRO-1/2
optimizer step still makes the host wait for the device twice, both on the clipping norm:
- ``get_grad_norm_direct`` replaces a non-finite norm by -1 with ``masked_fill_(mask, <0-dim tensor>)``, which
  reads the fill value back (``aten::item``);
- ``unscale_and_clip_grads`` asks ``bool(~isfinite(norm) | (norm < 0))`` to clip by an infinite norm instead.
Both decisions can stay on the device (``torch.where``), with the same values: the clip factor is a tensor already.
What stays a host decision is DeepSpeed's own skip of a step whose norm is not finite, which it makes in fp32 and
fp16 (and in bf16 only with ``bf16.check_grad_overflow``): skipping is a choice the host has to know about.

ZeRO-0 in bf16 runs DeepSpeed's ``FP16_UnfusedOptimizer``, which ignores ``bf16.check_grad_overflow``: it checks
every gradient tensor on the host, reads the norm back and compares the clip factor on the host. With the check
off (the launcher's default), no loss scaling (bf16 has none) and no model or expert parallelism, its step runs
here instead: the same norm, clip and fp32-master update, decided on the device, as ZeRO-1/2 do in bf16. As there,
a step whose norm is not finite is applied, not skipped (its gradients' non-finite elements reach the fp32 masters);
the loop reads each applied step's norm with its loss and stops the run at that step, before anything is saved.

:func:`install` swaps these in, once per process, only where DeepSpeed's modules are the ones they were written
against (a fingerprint of each module's whole source, so that the helpers the replaced functions call and the
state they share are covered too); another DeepSpeed keeps its own and the launcher says so.
``tests/test_host_syncs.py`` checks them against DeepSpeed's originals and counts the syncs of real steps.
"""

from __future__ import annotations

import hashlib
import inspect
import sys
import threading
from typing import Any

import torch

# sha256 of inspect.getsource of the DeepSpeed modules these replacements were checked against (0.19.8).
_FINGERPRINTS = {
    "deepspeed.runtime.utils": "f50261801c3407d385e7e29b795b10866f527f29b45b5cabb063ef00bd3cda25",
    "deepspeed.runtime.zero.stage_1_and_2": "752235af95d0de6f5fe6322b13409c736abe9d0c77be24f85d87489cc41489cb",
    "deepspeed.runtime.zero.stage3": "4ff3fdb4cbabaddfeaa866e43785b49a69cdfe35db4e0ceda6f1b432b6fbf9d7",
    "deepspeed.runtime.fp16.unfused_optimizer": "6081dd055585c1788f03a9031d737c3c08f42e9668ecdef0a5a826e8d4e2d2ae",
}

_state: dict[str, Any] = {}
# One swap per process even if two threads ask at once: a second swap would record the replacements as DeepSpeed's
# originals, and the non-covered cases would then call ours instead of DeepSpeed's step.
_lock = threading.Lock()


def mask_invalid_norm(input: torch.Tensor, device: Any = None, val: float = -1.0) -> None:  # noqa: A002
    """DeepSpeed's ``mask_nan_or_inf_with_val_inplace``: a NaN or infinite norm becomes -1 (its sentinel; like the
    original, ``val`` is ignored), without reading a fill value back from the device."""
    input.copy_(torch.where(torch.isfinite(input), input, torch.full_like(input, -1.0)))


def clip_scale(total_norm: Any, clip_grad: float, loss_scale: float, device: Any) -> Any:
    """What the gradients are divided by when clipping (``clip_grad > 0``): the loss scale, times
    ``(norm / loss_scale + 1e-6) / clip_grad`` where that exceeds 1, in DeepSpeed's arithmetic; a NaN, infinite or
    negative (DeepSpeed's -1 sentinel) norm clips by an infinite one, decided on the device."""
    clip_norm = total_norm
    if torch.is_tensor(clip_norm):
        bad = (~torch.isfinite(clip_norm)) | (clip_norm < 0)
        clip_norm = torch.where(bad, torch.full_like(clip_norm, float("inf")), clip_norm)
    elif not (float(clip_norm) >= 0 and float(clip_norm) != float("inf")):
        clip_norm = torch.tensor(float("inf"), dtype=torch.float, device=device)
    clip = ((clip_norm / loss_scale) + 1e-6) / clip_grad
    return torch.clamp(clip, min=1.0) * loss_scale


def unscale_and_clip_grads(self: Any, grad_groups_flat: list, total_norm: Any) -> None:
    """``DeepSpeedZeroOptimizer.unscale_and_clip_grads`` with the invalid-norm test on the device (:func:`clip_scale`),
    where the original reads it back first."""
    if self.clip_grad == 0.0 and self.loss_scale == 1.0:
        return
    combined_scale = (clip_scale(total_norm, self.clip_grad, self.loss_scale, self.device) if self.clip_grad > 0.
                      else self.loss_scale)
    for grad in grad_groups_flat:
        for g in grad if isinstance(grad, list) else [grad]:
            g.data.mul_(1. / combined_scale)


def _unfused_on_device(self: Any) -> bool:
    """The bf16 ZeRO-0 case :func:`unfused_step` covers; anything else takes DeepSpeed's own step."""
    lsc = self.loss_scale_config
    engine = getattr(self.overflow_checker, "deepspeed", None)
    check = getattr(getattr(getattr(engine, "_config", None), "bfloat16_config", None), "check_grad_overflow", True)
    return (self.low_precision_dtype is torch.bfloat16 and not check and not self.fused_lamb_legacy
            and not self.custom_loss_scaler and not lsc.dynamic_loss_scale and lsc.cur_scale == 1.0
            and self.mpu is None and not self.overflow_checker.has_moe_params)


def unfused_step(self: Any, closure: Any = None) -> bool:
    """``FP16_UnfusedOptimizer.step`` for bf16 without the overflow check (see the module doc): the gradient norm
    (a tensor, what ``get_global_grad_norm`` returns) and the clip factor stay on the device."""
    if not _unfused_on_device(self):
        return _state["originals"]["unfused_step"](self, closure)
    squares = []
    for i, group in enumerate(self.fp16_groups):
        squares += [g.float().norm(2) ** 2 for g in (p.grad for p in group) if g is not None]
        for fp32_param, fp16_param in zip(self.fp32_groups[i], group):
            fp32_param.grad = (torch.zeros(fp16_param.size(), dtype=fp32_param.dtype, device=fp32_param.device)
                               if fp16_param.grad is None else fp16_param.grad.to(fp32_param.dtype))
    dev = self.fp32_groups[0][0].device if self.fp32_groups and self.fp32_groups[0] else None
    total = torch.stack(squares).sum().sqrt() if squares else torch.zeros((), device=dev)
    self.overflow = False
    self._global_grad_norm = total
    self._update_scale(False)
    if self.clip_grad > 0.:  # the loss scale is 1 (checked above)
        combined = clip_scale(total, self.clip_grad, 1.0, total.device)
        for group in self.fp32_groups:
            for q in group:
                if q.grad is not None:
                    q.grad.data.mul_(1. / combined)
    self.optimizer.step()
    for fp32_group, fp16_group in zip(self.fp32_groups, self.fp16_groups):
        for fp32_param, fp16_param in zip(fp32_group, fp16_group):
            fp32_param.grad = None
            fp16_param.data.copy_(fp32_param.data)
    return self.overflow


def fingerprint(obj: Any) -> str | None:
    """sha256 of a module's (or function's) source; None where the source cannot be read (an install without
    ``.py`` files), which counts as not matching."""
    try:
        return hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()
    except (OSError, TypeError):
        return None


def install() -> bool:
    """Swap the replacements into DeepSpeed (idempotent). False, with nothing changed, where DeepSpeed's originals
    are not the ones they were checked against."""
    with _lock:
        return _install()


def _install() -> bool:
    if "installed" in _state:
        return _state["installed"]
    ds_utils, stage_1_and_2, stage3, unfused = _modules()
    originals = _deepspeeds()
    ok = all(fingerprint(sys.modules[name]) == digest for name, digest in _FINGERPRINTS.items())
    if ok:
        _state["originals"] = originals
        for mod in (ds_utils, stage_1_and_2, stage3):
            if getattr(mod, "mask_nan_or_inf_with_val_inplace", None) is originals["mask_nan_or_inf_with_val_inplace"]:
                mod.mask_nan_or_inf_with_val_inplace = mask_invalid_norm
        stage_1_and_2.DeepSpeedZeroOptimizer.unscale_and_clip_grads = unscale_and_clip_grads
        unfused.step = unfused_step
    _state["installed"] = ok
    return ok


def _modules() -> tuple[Any, Any, Any, Any]:
    from deepspeed.runtime import utils as ds_utils
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.zero import stage3, stage_1_and_2

    return ds_utils, stage_1_and_2, stage3, FP16_UnfusedOptimizer


def _deepspeeds() -> dict[str, Any]:
    ds_utils, stage_1_and_2, _, unfused = _modules()
    return {"mask_nan_or_inf_with_val_inplace": ds_utils.mask_nan_or_inf_with_val_inplace,
            "unscale_and_clip_grads": stage_1_and_2.DeepSpeedZeroOptimizer.unscale_and_clip_grads,
            "unfused_step": unfused.step}


def originals() -> dict[str, Any]:
    """DeepSpeed's own functions (for the tests that compare against them), whether or not installed."""
    return _state.get("originals") or _deepspeeds()
