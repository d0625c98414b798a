"""Model-family facts keyed by ``model_type`` (as PEFT keys its IA3 defaults): named shapes for planning without
weights, and the exact speed-ups each family supports. Generic code asks this registry, never a class name."""

from __future__ import annotations

from typing import Any

from torch import nn

from ...config import IA3Section, ModelSection
from ...config.archs import ARCHS
from ...errors import UsageError
from ..ia3 import paper_targets
from ..load import decoder_blocks
from ..loss import RowSelector
from . import bloom, gpt_neox, llama
from .base import BatchInputs, Family

FAMILIES: dict[str, Family] = {f.model_type: f for f in (bloom.FAMILY, llama.LLAMA, llama.QWEN2, llama.MISTRAL,
                                                         gpt_neox.FAMILY)}


def family_of(model_config: Any) -> Family | None:
    return FAMILIES.get(getattr(model_config, "model_type", None))


def arch_config(name: str) -> Any:
    """The HF config of a named architecture (``model.arch``), built from :data:`ARCHS` without the network."""
    from transformers import AutoConfig

    if name not in ARCHS:
        raise UsageError(f"model.arch {name!r}: unknown; known: {', '.join(ARCHS)}")
    model_type, fields = ARCHS[name]
    return AutoConfig.for_model(model_type, **fields)


def apply_speedups(model: nn.Module, section: ModelSection, gradient_checkpointing: bool) -> RowSelector | None:
    """The family's exact speed-ups that ``model.*`` enables; returns the last-block row selector, if any
    (off under gradient checkpointing, whose recomputation sees every row)."""
    fam = family_of(model.config)
    if fam is None:
        return None
    if section.fused_gelu and fam.fuse_activations is not None:
        fam.fuse_activations(model)
    if fam.attention is not None:
        # auto is eager everywhere: measured on an H200 (bloom-1b4-zh shape, bf16, micro-batch 8 x 256 tokens)
        # eager ran 1.33x faster than SDPA, whose float ALiBi mask rules out the flash kernel; on CPU they tie.
        fam.attention(model, "eager" if section.attention == "auto" else section.attention)
    if section.last_mlp_at_labels and not gradient_checkpointing and fam.last_rows is not None:
        return fam.last_rows(model)
    return None


def batch_inputs(model: nn.Module, packing: bool = False) -> BatchInputs:
    """How ``model``'s batches become its base model's keyword arguments: the family's masks (:mod:`.masks`) and,
    with ``packing``, its packed rows (which may set the model up for them: call it once, before training).
    Raises ValueError for ``packing`` on a family with no exact packing (the preflight refuses it first)."""
    fam = family_of(model.config)
    packed = None
    if packing:
        if fam is None or fam.packed_inputs is None:
            raise ValueError(f"data.packing: no exact packing for model_type {model.config.model_type!r}")
        packed = fam.packed_inputs(model)
    padded = fam.padded_inputs(model) if fam is not None and fam.padded_inputs is not None else None
    return BatchInputs(padded, packed)


GENERIC_DROPOUT_PROBS = ("attention_dropout", "hidden_dropout", "dropout", "attn_dropout", "dropout_p")
"""For a model of no family here (PEFT's defaults, explicit targets): the attribute names transformers' models keep
functionally applied dropout probabilities under (a float; an ``nn.Dropout`` under such a name is zeroed as a
module)."""


def disable_dropout(model: nn.Module) -> int:
    """Every dropout of ``model`` set to probability 0, as TRL's preference trainers do by default
    (``disable_dropout=True``: ``disable_dropout_in_model``): the policy's log-probs must be comparable with the
    reference's, and ORPO/SimPO's margins with each other. TRL's helper zeroes ``nn.Dropout`` modules only; the
    probabilities a family applies functionally (:attr:`Family.dropout_probs`, e.g. Bloom's hidden dropout) are
    zeroed too, or they would stay on there. Returns how many were nonzero."""
    fam = family_of(getattr(model, "config", None))
    attrs = fam.dropout_probs if fam is not None else GENERIC_DROPOUT_PROBS
    n = 0
    for mod in model.modules():
        if isinstance(mod, nn.Dropout):
            n += mod.p > 0
            mod.p = 0.0
        for a in attrs:
            v = getattr(mod, a, None)
            if isinstance(v, float | int) and not isinstance(v, bool):
                n += v > 0
                setattr(mod, a, 0.0)
    return n


def last_block(model: nn.Module) -> nn.Module | None:
    blocks = blocks_of(model)
    return blocks[-1] if blocks else None


def peft_ia3_defaults(model_type: str | None) -> tuple[list[str], list[str]] | None:
    """PEFT's default IA3 ``(target_modules, feedforward_modules)`` for a ``model_type``, or None if it has none."""
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING,
        TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
    )

    targets = TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING.get(model_type)  # type: ignore[arg-type]
    if targets is None:
        return None
    return list(targets), list(TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(model_type, []))  # type: ignore[arg-type]


TESTED = "tested"
PEFT_DEFAULTS = "peft-defaults"
EXPLICIT = "explicit-targets"


def support_case(model_config: Any, section: IA3Section, where: str = "model.path") -> tuple[str, str]:
    """Which case a model is in, and the preflight line that says so: a ``tested`` family (the parity, ZeRO-3
    loading and export tests run on it), an untested ``model_type`` PEFT has IA3 defaults for
    (``peft-defaults``), or an untested one with ``ia3.target_modules`` given (``explicit-targets``). A model with
    neither is refused (UsageError): PEFT would only fail once every rank had loaded it."""
    model_type = getattr(model_config, "model_type", None)
    fam = FAMILIES.get(model_type)  # type: ignore[arg-type]
    defaults = peft_ia3_defaults(model_type)
    if section.target_modules is not None:
        if section.feedforward_modules is not None:
            ff = ", ".join(section.feedforward_modules) or "none"
        elif defaults is not None and defaults[1]:
            # null: PEFT's default, among the targets (a default module that is not a target is not scaled).
            ff = f"PEFT's default for {model_type}, {', '.join(defaults[1])}, where a target"
        else:
            ff = "none"
        modules = f"IA3 on {', '.join(section.target_modules)} (ia3.target_modules; feedforward: {ff})"
    elif section.variant == "paper" and (paper := paper_targets(model_type)) is not None:
        modules = f"IA3 on {', '.join(paper[0])} (ia3.variant=paper: the paper's keys, values and feed-forward; " \
                  f"feedforward: {', '.join(paper[1])})"
    elif section.variant == "paper" and fam is not None:
        modules = f"IA3 on {', '.join(fam.target_modules)} (ia3.variant=paper: PEFT's modules, the fused " \
                  f"projection's query entries held at 1.0; feedforward: {', '.join(fam.feedforward_modules)})"
    elif fam is not None:
        modules = f"IA3 on {', '.join(fam.target_modules)} (PEFT's defaults; feedforward: " \
                  f"{', '.join(fam.feedforward_modules)})"
    elif defaults is not None:
        modules = f"IA3 on {', '.join(defaults[0])} (PEFT's defaults; feedforward: {', '.join(defaults[1]) or 'none'})"
    else:
        raise UsageError(f"{where}: model_type {model_type!r} is not a tested family ({', '.join(FAMILIES)}) and "
                         f"PEFT has no IA3 defaults for it; set ia3.target_modules (and ia3.feedforward_modules) "
                         f"to the names of its attention and MLP projections, e.g. "
                         f"ia3.target_modules=[k_proj,v_proj,down_proj] ia3.feedforward_modules=[down_proj]")
    if fam is not None:
        return TESTED, f"{model_type} ({fam.name} family, tested); {modules}"
    if section.target_modules is not None:
        return EXPLICIT, f"{model_type} (untested family; ia3.target_modules given); {modules}"
    return PEFT_DEFAULTS, f"{model_type} (untested family; PEFT has IA3 defaults for it); {modules}"


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks: by the family's path when it is known, else by the classes the model declares."""
    fam = family_of(model.config)
    return list(fam.block_list(model)) if fam is not None and fam.blocks else decoder_blocks(model)


def checkpoint_names(model: nn.Module) -> tuple[str, tuple[tuple[str, str], ...]]:
    """How checkpoints name this model's weights: the key prefix they may carry or omit (see
    :attr:`Family.checkpoint_prefix`) and the family's renames (:attr:`Family.checkpoint_renames`)."""
    fam = family_of(getattr(model, "config", None))
    if fam is not None:
        return fam.checkpoint_prefix, fam.checkpoint_renames
    return getattr(model, "base_model_prefix", ""), ()
