"""The IA3 adapter (PEFT) on a base model, its ``paper`` variant, and its trainable-parameter line."""

from __future__ import annotations

import contextlib
import io
from typing import Any

import torch
from torch import nn

from ..config import IA3Section
from ..config.archs import BLOCKS
from ..errors import UsageError
from .load import base_on_meta

FIXED = "ia3_query_fixed"
"""Buffer (not saved) on a fused q,k,v IA3 layer under ``ia3.variant: paper``: True at the query entries."""


def paper_targets(model_type: str | None) -> tuple[list[str], list[str]] | None:
    """``(target_modules, feedforward_modules)`` of ``ia3.variant: paper``; None where PEFT's default targets
    stay (the fused families, whose query entries are fixed instead). Unknown families are refused."""
    facts = BLOCKS.get(model_type or "")
    if facts is None or (facts.fused_qkv is None and facts.paper_targets is None):
        known = ", ".join(k for k, f in BLOCKS.items() if f.fused_qkv or f.paper_targets)
        raise UsageError(f"ia3.variant: paper is defined for model types {known}; this model is "
                         f"{model_type!r}: use ia3.variant=default (and ia3.target_modules to choose modules)")
    if facts.paper_targets is None:
        return None
    return list(facts.paper_targets[0]), list(facts.paper_targets[1])


def ia3_config(section: IA3Section, model_type: str | None = None) -> Any:
    from peft import IA3Config, TaskType
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD

    kw: dict[str, Any] = {"task_type": TaskType.CAUSAL_LM}
    if section.target_modules is not None:
        kw["target_modules"] = list(section.target_modules)
        if section.feedforward_modules is not None:
            kw["feedforward_modules"] = list(section.feedforward_modules)
        elif model_type not in FEEDFORWARD:
            # PEFT refuses None where it has no default for the model type; with the targets named, none of them
            # is taken as feed-forward (as ia3.feedforward_modules documents).
            kw["feedforward_modules"] = []
        # Otherwise None: PEFT fills in its default for the model type when it builds the model, as ia3.*
        # documents (a default module that is not a target is not scaled at all).
    elif section.variant == "paper":
        targets = paper_targets(model_type)
        if targets is not None:
            kw["target_modules"], kw["feedforward_modules"] = targets
    return IA3Config(**kw)


def _matches(name: str, entry: str) -> bool:
    """PEFT's matching of a ``target_modules`` list entry: the module's whole name, or its dotted ending."""
    return name == entry or name.endswith("." + entry)


def _wrappable(m: nn.Module) -> bool:
    """A layer PEFT's IA3 can wrap: linear (transformers' GPT-2 style ``Conv1D`` too) or convolution."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(m, (nn.Linear, Conv1D, nn.Conv2d, nn.Conv3d))


def _within_block(name: str) -> str:
    """A module's name after its block index (``transformer.h.3.mlp.dense_4h_to_h`` -> ``mlp.dense_4h_to_h``), as
    a target entry names it for every block; the whole name outside the blocks (``lm_head``)."""
    parts = name.split(".")
    last = max((i for i, p in enumerate(parts) if p.isdigit()), default=-1)
    return ".".join(parts[last + 1:]) if 0 <= last < len(parts) - 1 else name


def check_module_names(model: nn.Module, section: IA3Section) -> None:
    """Every ``ia3.target_modules`` entry names a module of the model: PEFT drops an
    entry that matches nothing as long as another one matches (``mlp.dense_4h_to_hh`` trains the rest without a
    word, and the adapter config records the typo). UsageError naming the entry and the model's linear layers."""
    if section.target_modules is None:
        return
    names = [n for n, _ in model.named_modules() if n]
    # (ia3.feedforward_modules is a subset of these: the config refuses any other entry.)
    for entry in section.target_modules:
        if not any(_matches(n, entry) for n in names):
            layers = sorted({_within_block(n) for n, m in model.named_modules() if _wrappable(m)})
            raise UsageError(f"config key 'ia3.target_modules': {entry!r} names no module of the model; the layers "
                             f"IA3 can scale are {', '.join(layers[:20])}{' ...' if len(layers) > 20 else ''} (an "
                             f"entry matches a module's whole name or its dotted ending)")


def apply_ia3(model: nn.Module, section: IA3Section) -> Any:
    from peft import get_peft_model

    model_type = getattr(model.config, "model_type", None)
    check_module_names(model, section)
    try:
        peft_model = get_peft_model(model, ia3_config(section, model_type))
    except ValueError as e:  # e.g. target modules not found in the model
        raise UsageError(f"ia3: {e}") from None
    if section.variant == "paper":
        fix_query_scales(peft_model, model_type)
    return peft_model


def query_entries(out_features: int, heads: int) -> torch.Tensor:
    """True at the query entries of a fused q,k,v output laid out per head as [q, k, v] (Bloom's ``_reshape``
    views it as (heads, 3, head_dim); GPT-NeoX as (heads, 3 * head_dim) and chunks it in three): not the
    first third."""
    if out_features % (3 * heads):
        raise UsageError(f"ia3.variant: paper: a fused q,k,v of {out_features} outputs is not 3 x {heads} heads")
    mask = torch.zeros(heads, 3, out_features // (3 * heads), dtype=torch.bool)
    mask[:, 0] = True
    return mask.flatten()


def _paper_forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """PEFT's IA3 ``Linear.forward`` (output scaling) with the query entries of the vector replaced by exactly
    1.0: they never scale anything and get a zero gradient, whatever the optimizer (weight decay included) does
    to the stored values, which :func:`fixed_state` resets on saving."""
    if self.disable_adapters or self.merged or self.is_feedforward:
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x, *args, **kwargs)
    scale: Any = 1
    for name in self.active_adapters:
        if name in self.ia3_l.keys():
            scale = scale * self.ia3_l[name].flatten().masked_fill(getattr(self, FIXED), 1.0)
    return (result * scale).to(result.dtype)


def fix_query_scales(peft_model: Any, model_type: str | None) -> int:
    """``ia3.variant: paper`` on a fused q,k,v: every IA3 layer on it scales keys and values only. Returns how
    many layers were set."""
    from peft.tuners.ia3.layer import Linear as IA3Linear

    facts = BLOCKS.get(model_type or "")
    if facts is None or facts.fused_qkv is None:
        return 0
    heads = peft_model.get_base_model().config.num_attention_heads
    n = 0
    for name, mod in peft_model.named_modules():
        if isinstance(mod, IA3Linear) and name.rsplit(".", 1)[-1] == facts.fused_qkv:
            if mod.is_feedforward:
                raise UsageError(f"ia3.variant: paper: {name} is a fused q,k,v; it cannot be a feed-forward module")
            dev = next(iter(mod.ia3_l.values())).device
            mask = query_entries(mod.out_features, heads)
            # On the meta device (plan) the mask stays countable on the CPU; it never meets a forward pass there.
            mod.register_buffer(FIXED, mask if dev.type == "meta" else mask.to(dev), persistent=False)
            mod.forward = _paper_forward.__get__(mod)
            n += 1
    return n


def fixed_entries(peft_model: Any) -> dict[str, torch.Tensor]:
    """Parameter name -> mask of its entries fixed at 1.0 (``ia3.variant: paper`` on a fused q,k,v)."""
    out: dict[str, torch.Tensor] = {}
    for name, mod in peft_model.named_modules():
        mask = getattr(mod, FIXED, None)
        if mask is not None:
            for pname, _ in mod.ia3_l.named_parameters():
                out[f"{name}.ia3_l.{pname}"] = mask
    return out


def trainable_text(trainable: int, total: int, fixed: int = 0) -> str:
    """PEFT's ``print_trainable_parameters`` line; with entries fixed at 1.0, the trained count and a note."""
    t = trainable - fixed
    line = f"trainable params: {t:,d} || all params: {total:,d} || trainable%: {100 * t / total:.4f}"
    if fixed:
        line += f" (ia3.variant paper: {fixed:,d} query scales of the fused q,k,v fixed at 1.0, not trained)"
    return line


def trainable_line(peft_model: Any) -> str:
    """PEFT's own ``print_trainable_parameters`` line, captured (it also counts ZeRO-3 partitioned params); under
    ``ia3.variant: paper`` the trained count excludes the query entries fixed at 1.0."""
    fixed = sum(int(m.sum()) for m in fixed_entries(peft_model).values())
    if fixed:
        t, n = peft_model.get_nb_trainable_parameters()
        return trainable_text(t, n, fixed)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        peft_model.print_trainable_parameters()
    return buf.getvalue().strip()


def build_on_meta(config: Any, section: IA3Section | None = None) -> Any:
    """The IA3 model of an architecture from its config alone (meta device)."""
    return apply_ia3(base_on_meta(config), section or IA3Section())


ADAPTER_FILE = "adapter_model.safetensors"
# IA3 vectors are a few hundred K floats even on large models; a file far past that is not an IA3 adapter.
MAX_ADAPTER_BYTES = 1 << 30


def init_adapter_tensors(path: str) -> dict[str, torch.Tensor]:
    """The IA3 vectors of the adapter dir ``path`` (safetensors only: nothing in it can run code), by PEFT's saved
    names; a :class:`UsageError` naming the file when it is not one."""
    from pathlib import Path

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    f = Path(path) / ADAPTER_FILE
    if not f.is_file():
        raise UsageError(f"ia3.init_from: {f} not found; point it at an adapter dir written by ia3-dist or PEFT "
                         f"(with {ADAPTER_FILE})")
    if f.stat().st_size > MAX_ADAPTER_BYTES:
        raise UsageError(f"ia3.init_from: {f} is {f.stat().st_size} bytes, not an IA3 adapter (at most "
                         f"{MAX_ADAPTER_BYTES})")
    try:
        tensors = load_file(str(f))
    except (SafetensorError, OSError, ValueError) as e:
        raise UsageError(f"ia3.init_from: {f}: not a readable safetensors file ({e})") from None
    return tensors


def check_finite(vectors: dict[str, torch.Tensor], where: str, fix: str) -> None:
    """Every IA3 vector finite, else a UsageError naming ``where``, the vector and ``fix``. ia3-dist never saves
    one from a diverged run (a non-finite loss saves nothing), so a NaN is a damaged file or another tool's
    diverged run, and every output of it (generations, an export, a benchmark score) would be meaningless."""
    for name, v in vectors.items():
        if not bool(torch.isfinite(v).all()):
            raise UsageError(f"{where}: {name.replace('.default', '')} holds non-finite values (NaN or inf); "
                             f"{fix}")


def load_init_adapter(peft_model: Any, path: str) -> dict[int, torch.Tensor]:
    """Copy the vectors of ``path`` into the (fresh) IA3 parameters of ``peft_model``; every IA3 parameter must
    come from the file and every tensor of the file must land, with its shape. Returns the file's fp32 values by
    ``id`` of the parameter: in bf16/fp16 the parameters hold them rounded, and the optimizer's fp32 masters,
    built from the parameters, must get them whole (``runtime.portable.set_masters``)."""
    tensors = init_adapter_tensors(path)
    params = {n.replace(".default", ""): q for n, q in peft_model.named_parameters() if q.requires_grad}
    missing = sorted(set(params) - set(tensors))
    extra = sorted(set(tensors) - set(params))
    where = f"ia3.init_from: {path}/{ADAPTER_FILE}"
    if missing or extra:
        what = (f"{len(missing)} IA3 vector(s) of this model are not in it, e.g. {missing[0]}" if missing else
                f"{len(extra)} tensor(s) in it match no IA3 vector of this model, e.g. {extra[0]}")
        raise UsageError(f"{where}: {what}; was it trained on this base model with the same ia3.* settings?")
    # Saved names -> the entries this model (ia3.variant: paper) fixes at 1.0 whatever the file holds.
    fixed = {n.replace(".default", ""): m for n, m in fixed_entries(peft_model).items()}
    values: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for name, q in params.items():
            src = tensors[name]
            shape = tuple(getattr(q, "ds_shape", q.shape))
            if tuple(src.shape) != shape:
                raise UsageError(f"{where}: {name} has shape {tuple(src.shape)}, this model's is {shape}")
            check_finite({name: src}, where, "the adapter is damaged or from a diverged run: start from "
                         "another checkpoint's")
            mask = fixed.get(name)
            if mask is not None and not bool((src.flatten()[mask.cpu()] == 1.0).all()):
                # Silently dropping them would start the run from a different model than the adapter's.
                raise UsageError(f"{where}: {name} scales the queries of the fused q,k,v, which ia3.variant=paper "
                                 f"fixes at 1.0: this adapter was trained with ia3.variant=default; continue it "
                                 f"with ia3.variant=default, or drop ia3.init_from to train a paper-variant adapter")
            q.copy_(src.to(q.dtype))
            values[id(q)] = src.float()
    return values
