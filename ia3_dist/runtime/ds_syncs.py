"""DeepSpeed's ZeRO-1/2 gradient-norm path without host reads.

After the config has turned off what DeepSpeed lets a config turn off (``runtime/ds_config.no_stalls``), a ZeRO-1/2
optimizer step still makes the host wait for the device twice, both on the clipping norm:
- ``get_grad_norm_direct`` replaces a non-finite norm by -1 with ``masked_fill_(mask, <0-dim tensor>)``, which
  reads the fill value back (``aten::item``);
- ``unscale_and_clip_grads`` asks ``bool(~isfinite(norm) | (norm < 0))`` to clip by an infinite norm instead.
Both decisions can stay on the device (``torch.where``), with the same values: the clip factor is a tensor already.
What stays a host decision is DeepSpeed's own skip of a step whose norm is not finite, which it makes in fp32 and
fp16 (and in bf16 only with ``bf16.check_grad_overflow``): skipping is a choice the host has to know about.

:func:`install` swaps these two functions in, once per process, only where DeepSpeed's code is the code they were
written against (a fingerprint of its source); another DeepSpeed keeps its own and the launcher says so.
``tests/test_host_syncs.py`` checks both against DeepSpeed's originals and counts the syncs of real steps.
"""

from __future__ import annotations

import hashlib
import inspect
from typing import Any

import torch

# sha256 of inspect.getsource of DeepSpeed's originals these replacements were checked against (0.19.8).
_FINGERPRINTS = {
    "mask_nan_or_inf_with_val_inplace": "9728853d4df6cd692cc5bc0aa2bfa4b54d85b0b06f30129a424cbdf93cd4ce3c",
    "unscale_and_clip_grads": "6bf2ce6f97eafcc24c08a0355e7c180992c8e86da5b7f02026eef6fbd68efa74",
}

_state: dict[str, Any] = {}


def mask_invalid_norm(input: torch.Tensor, device: Any = None, val: float = -1.0) -> None:  # noqa: A002
    """DeepSpeed's ``mask_nan_or_inf_with_val_inplace``: a NaN or infinite norm becomes -1 (its sentinel; like the
    original, ``val`` is ignored), without reading a fill value back from the device."""
    input.copy_(torch.where(torch.isfinite(input), input, torch.full_like(input, -1.0)))


def unscale_and_clip_grads(self: Any, grad_groups_flat: list, total_norm: Any) -> None:
    """``DeepSpeedZeroOptimizer.unscale_and_clip_grads`` with the invalid-norm test on the device: a NaN, infinite
    or negative (DeepSpeed's -1 sentinel) norm clips by an infinite norm, as the original does after its host read."""
    if self.clip_grad == 0.0 and self.loss_scale == 1.0:
        return
    combined_scale = self.loss_scale
    if self.clip_grad > 0.:
        clip_norm = total_norm
        if torch.is_tensor(clip_norm):
            bad = (~torch.isfinite(clip_norm)) | (clip_norm < 0)
            clip_norm = torch.where(bad, torch.full_like(clip_norm, float("inf")), clip_norm)
        elif not (float(clip_norm) >= 0 and float(clip_norm) != float("inf")):
            clip_norm = torch.tensor(float("inf"), dtype=torch.float, device=self.device)
        clip = ((clip_norm / self.loss_scale) + 1e-6) / self.clip_grad
        clip = torch.clamp(clip, min=1.0)
        combined_scale = clip * self.loss_scale
    for grad in grad_groups_flat:
        for g in grad if isinstance(grad, list) else [grad]:
            g.data.mul_(1. / combined_scale)


def fingerprint(fn: Any) -> str:
    return hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()


def install() -> bool:
    """Swap the replacements into DeepSpeed (idempotent). False, with nothing changed, where DeepSpeed's originals
    are not the ones they were checked against."""
    if "installed" in _state:
        return _state["installed"]
    from deepspeed.runtime import utils as ds_utils
    from deepspeed.runtime.zero import stage3, stage_1_and_2

    zero = stage_1_and_2.DeepSpeedZeroOptimizer
    originals = {"mask_nan_or_inf_with_val_inplace": ds_utils.mask_nan_or_inf_with_val_inplace,
                 "unscale_and_clip_grads": zero.unscale_and_clip_grads}
    ok = all(fingerprint(fn) == _FINGERPRINTS[name] for name, fn in originals.items())
    if ok:
        _state["originals"] = originals
        for mod in (ds_utils, stage_1_and_2, stage3):
            if getattr(mod, "mask_nan_or_inf_with_val_inplace", None) is originals["mask_nan_or_inf_with_val_inplace"]:
                mod.mask_nan_or_inf_with_val_inplace = mask_invalid_norm
        zero.unscale_and_clip_grads = unscale_and_clip_grads
    _state["installed"] = ok
    return ok


def originals() -> dict[str, Any]:
    """DeepSpeed's own functions (for the tests that compare against them); installs first."""
    install()
    from deepspeed.runtime import utils as ds_utils
    from deepspeed.runtime.zero import stage_1_and_2

    return _state.get("originals") or {
        "mask_nan_or_inf_with_val_inplace": ds_utils.mask_nan_or_inf_with_val_inplace,
        "unscale_and_clip_grads": stage_1_and_2.DeepSpeedZeroOptimizer.unscale_and_clip_grads}
