"""Small, atomic, exactly-resumable checkpoints.

A checkpoint is a DeepSpeed checkpoint of the trainable parameters, optimizer and scheduler
(``exclude_frozen_parameters``: the frozen base never goes in), plus RNG states and the sampler position in the
client state, plus ``meta.json`` (what it takes to resume: step, world size, batch layout, data fingerprint).

Atomicity: ``<root>/latest`` names the newest *complete* checkpoint. It is replaced (write + rename) by rank 0 only
after a barrier that every rank reaches when its own files are written, so a kill during a save leaves the previous
checkpoint as ``latest``. The data order is a pure function of (seed, epoch, step), so resuming at step k needs no
replay of consumed batches.
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from safetensors import SafetensorError

from ..config.schema import brief, show
from ..errors import CheckpointWriteError, UsageError
from . import dist, faults, manifest, portable, safe_io, safe_load

LATEST = "latest"
BEST = "best"
"""Names the checkpoint of the best evaluation (checkpoint.keep_best): kept outside the rotation."""
META = "meta.json"
BEST_VECTORS = "early_stopping_best.safetensors"
"""train.early_stopping.final=best: the best evaluation's trainable vectors so far, in every checkpoint written
after it (a few MB at most: IA3 vectors), so a resumed run that then stops early still writes them as its adapter,
whether or not the best step's own checkpoint was kept."""
MAX_BEST_VECTORS = 1 << 30
POINTER_TEMP = ".tmp"
"""A pointer is replaced by writing ``<pointer>.tmp`` and renaming it over the pointer."""
LAYOUT = ("world_size", "micro_batch_size", "grad_accum", "zero_stage")
"""How the global batch is cut over ranks and micro-steps, and the ZeRO stage. They may change between a save and
its resume as long as the global batch stays: every step then trains the same examples (the sampler's order is a
function of the global batch, not of its cut) and :mod:`.portable` carries the trainable state across."""
MUST_MATCH = ("global_batch", "seed", "shuffle", "total_steps", "data_key", "n_examples", "group_by_length",
              "order_version", "precision", "model_key", "base_weights", "ia3", "schedule", "objective",
              "reference_start", "optimizer")
"""Keys of meta.json that must match the resuming run for the continuation to be exact. Checkpoints of earlier
versions lack some (they are checked where present; ``global_batch`` is computed from the layout)."""
RECORDED_SINCE_2 = ("precision", "model_key", "ia3", "schedule", "zero_stage", "offload_optimizer")
"""Keys meta.json has held since layout-independent checkpoints (meta ``version`` 2); older ones resume unchecked
on them, as before."""
RECORDED_LATER = ("reference_start", "optimizer", "base_weights")
"""Keys checked only where the checkpoint records them (written by later versions)."""
VERSIONED = ("base_weights",)
"""Keys whose values are ``v<N>-<digest>``: another ia3-dist may compute them otherwise, and a value of another
version says nothing about a change (:func:`comparable`)."""


def comparable(saved: Any, now: Any) -> bool:
    """Two :data:`VERSIONED` values of the same version (both strings ``vN-...``), which may then be compared."""
    if not (isinstance(saved, str) and isinstance(now, str)):
        return False
    return saved.split("-", 1)[0] == now.split("-", 1)[0]


FIX = {
    "base_weights": "the base model's weights are not the ones the checkpoint's vectors were trained on: model.path "
                    "holds other weights of the same architecture now (replaced, retrained, a hub branch that "
                    "moved). Point model.path (or model.revision) back at those weights; to train on these, continue "
                    "in a new output.dir from the checkpoint's vectors with ia3.init_from; where only their files "
                    "changed, not the values the run loads (re-saved in another dtype), "
                    "checkpoint.check_base_weights=false resumes",
    "group_by_length": "set data.group_by_length explicitly to the saved value (its default follows the "
                       "micro-batch)",
    "reference_start": "the adapter at ia3.init_from changed since the run started (retrained or replaced), so "
                       "the DPO reference (the starting model) would change halfway; put the adapter the run started "
                       "from back, or start a new run in a new output.dir",
    "data_key": "the tokens differ: other data, tokenizer or data.* settings; a checkpoint of an earlier "
                "ia3-dist whose tokenizer.json carries truncation or padding settings is keyed otherwise too, as are "
                "preference data (pairs encoded whole under a chat template since), Parquet/Arrow and CSV sources "
                "(tool nulls, CSV history read since), and data under a chat template that reads an answer's "
                "reasoning (reasoning_content, passed on since). "
                "Restore what differs, or continue in a new output.dir from the checkpoint's vectors with "
                "ia3.init_from",
    "precision": "set train.precision to the saved value",
    "optimizer": "the DeepSpeed config's optimizer type or its update rule (optimizer.params amsgrad, maximize, "
                 "bias_correction, adam_w_mode) changed; keep the saved ones",
    "total_steps": "train.max_steps, train.epochs or the data changed the run's length; keep them, or continue in "
                   "a new output.dir from the checkpoint's vectors with ia3.init_from",
    "n_examples": "the training examples changed in number (data.limit, data.eval_ratio, the data itself); keep "
                  "them as saved",
    "seed": "set train.seed to the saved value",
    "schedule": "set train.lr, train.scheduler, train.warmup_steps, train.weight_decay, train.betas, train.eps and "
                "train.grad_clip to the saved values (the one that differs is in both values above); to train on "
                "with another schedule, continue in a new output.dir from the checkpoint's vectors with "
                "ia3.init_from",
    "ia3": "set the ia3.* settings to the saved values (its target modules, variant and init); the checkpoint's "
           "vectors belong to those",
    "objective": "set train.objective (and its settings) to the saved values, or start the new objective in a new "
                 "output.dir from the checkpoint's vectors with ia3.init_from (as SFT then DPO does)",
    "shuffle": "set data.shuffle to the saved value",
    "order_version": "an earlier ia3-dist dealt the examples in another order; resume with that version, or "
                     "continue in a new output.dir from the checkpoint's vectors with ia3.init_from",
    "model_key": "model.path holds another architecture than the checkpoint was trained on; point it back at that "
                 "model",
}


# What tag_for writes; ASCII digits only, so int() of the rest never fails.
TAG = re.compile(r"step[0-9]+")
NEW, OLD = ".new", ".old"
"""A save writes ``stepN.new`` and renames it to ``stepN`` once complete; a save of a step that is there already
(written again after a put-off evaluation, or for the best vectors) first renames that one to ``stepN.old``, which
goes once the new one is in place. A checkpoint is never torn in place, so a save cut off anywhere leaves the
previous state of that step (or, between the two renames, both) for the resume."""
STAGED = re.compile(r"(step[0-9]+)(\.new|\.old)")
MAX_META = 1 << 20
"""meta.json is a few hundred bytes; ``latest`` a tag name. Larger files are not ours and are not read whole."""
MAX_LATEST = 4096
MAX_INT = 2**63 - 1
"""What an int64 holds: the bound of every count in meta.json (steps, sizes, the seed)."""
META_TYPES: dict[str, str] = {
    "step": "int", "world_size": "int", "micro_batch_size": "int", "grad_accum": "int", "seed": "int",
    "total_steps": "int", "n_examples": "int", "order_version": "int", "shuffle": "bool", "group_by_length": "bool",
    "data_key": "str", "eval_ratio": "ratio", "global_batch": "int", "zero_stage": "int", "precision": "str",
    "model_key": "str", "ia3": "str", "schedule": "str", "examples_consumed": "int",
    "offload_optimizer": "bool", "objective": "str", "eval_pending": "bool", "eval_key": "str", "bench_key": "str",
    "reference_start": "str", "optimizer": "str", "base_weights": "str", "held_copies": "int",
    "auto_budget_mib": "int",
}
"""The fields of meta.json a resume reads, by kind; each is checked in :func:`read_meta` before anything uses it
(``True == 1`` and ``2.0 == 2`` in Python, so a bool or a float would otherwise pass for an int)."""


def root_of(out: Path) -> Path:
    return out / "checkpoints"


def tag_for(step: int) -> str:
    return f"step{step}"


def step_of(d: Path) -> int:
    """The step of a ``stepN`` dir (or of its ``stepN.new``/``stepN.old``, read for it: :func:`latest`)."""
    return int(d.name.split(".", 1)[0][4:])


def complete_checkpoints(root: Path) -> list[Path]:
    """Tag dirs with a meta.json (written last), oldest first. Symlinks are never checkpoints of ours."""
    if not root.is_dir():
        return []
    tags = [d for d in root.iterdir()
            if TAG.fullmatch(d.name) and not d.is_symlink() and d.is_dir() and (d / META).is_file()]
    return sorted(tags, key=lambda d: int(d.name[4:]))


def latest(root: Path, pointer: str = LATEST) -> Path | None:
    """The checkpoint ``<root>/latest`` (or ``pointer``: :data:`BEST`) names, if it is complete; or the later one
    a save put in place and was cut off before moving the pointer to (:func:`in_flight`). The pointer may only name
    a ``stepN`` dir of ``root`` itself: a damaged or edited one is refused rather than followed anywhere else."""
    named = _latest_named(root, pointer)
    return in_flight(root, pointer, named) or named


def in_flight(root: Path, pointer: str, named: Path | None) -> Path | None:
    """The complete ``stepN`` that ``<pointer>.tmp`` names, later than ``named`` (what the pointer names; None:
    nothing complete): a save wrote the temp, put its checkpoint in place and was cut off before the rename that
    moves the pointer. Every save removes the temps before it writes, so a temp is the last save's. Else None."""
    try:
        raw = safe_io.read_bounded(_pointer_temp(root, pointer), MAX_LATEST, missing_ok=True)
        name = raw.decode("utf-8").strip() if raw is not None else ""
    except (UsageError, UnicodeDecodeError):
        return None  # not a temp we wrote: the next save removes it
    d = root / name
    if not TAG.fullmatch(name) or d.is_symlink() or not d.is_dir() or not (d / META).is_file():
        return None
    if os.path.lexists(root / (name + NEW)):
        return None  # not put in place: ``stepN`` is still that step's earlier save (a step saved again)
    return d if named is None or step_of(d) > step_of(named) else None


def _latest_named(root: Path, pointer: str) -> Path | None:
    f = root / pointer
    if not os.path.lexists(f):
        return None
    fix = (f"delete {f} and resume from a checkpoint with train.resume={root}/stepN, or start over with "
           f"train.resume=none output.overwrite=true")
    try:
        name = safe_io.read_bounded(f, MAX_LATEST, fix).decode("utf-8").strip()
    except UnicodeDecodeError:
        raise UsageError(f"{f}: not UTF-8 text (it should hold the name of a stepN dir); {fix}") from None
    d = root / name
    if not TAG.fullmatch(name) or d.is_symlink():
        raise UsageError(f"{f} names {name[:60]!r}, not a stepN dir inside {root}; {fix}")
    if not os.path.lexists(d):
        return cut_between_renames(d)
    # A meta.json that is there but not a file (a FIFO, a link) is refused by read_meta, not taken for "incomplete".
    return d if os.path.lexists(d / META) else None


def cut_between_renames(d: Path) -> Path | None:
    """For a ``stepN`` dir that is not there but a pointer names: the complete ``stepN.new`` (or else
    ``stepN.old``) of a save of that step again that was cut off between its two renames, else None. (A
    ``stepN.new`` of a step no pointer names is a save cut off before its pointer moved: not a checkpoint.) Only
    read here, as ranks may be reading it: the next save (rank 0) puts it in place (:func:`_settle`)."""
    if os.path.lexists(d) or d not in (_named(d.parent, LATEST), _named(d.parent, BEST)):
        return None
    for suffix in (NEW, OLD):
        c = d.with_name(d.name + suffix)
        if c.is_dir() and not c.is_symlink() and (c / META).is_file():
            return c
    return None


def _no_constants(text: str) -> Any:
    raise ValueError(f"{text} is not a JSON number")


def _field_problem(kind: str, v: Any) -> str | None:
    if kind == "int":
        if type(v) is not int:
            return "an integer"
        return None if 0 <= v <= MAX_INT else f"an integer from 0 to {MAX_INT}"
    if kind == "bool":
        return None if type(v) is bool else "true or false"
    if kind == "str":
        return None if type(v) is str and 0 < len(v) <= 1000 else "a short string"
    ok = type(v) in (int, float) and math.isfinite(v) and 0 <= v < 1
    return None if ok else "a number from 0 to below 1"


def read_meta(ckpt: Path) -> dict[str, Any]:
    """A checkpoint's meta.json: a regular file (not a link) of at most :data:`MAX_META` bytes holding an object
    whose :data:`META_TYPES` fields have their types, with ``step`` from 1 to ``total_steps``. Anything else is a
    UsageError naming the file and the field, raised before a resume uses any of it."""
    f = ckpt / META
    fix = "pick another checkpoint with train.resume=<path to a stepN dir>"
    if ckpt.parent.name == "checkpoints" and TAG.fullmatch(ckpt.name):
        # An earlier step of the same run is refused while this one stays beside it (refuse_later).
        fix = (f"move {ckpt} out of the run's directory, then resume another with train.resume=<path to a stepN "
               f"dir> (or point {ckpt.parent / LATEST} at it and resume with train.resume=auto)")
    raw = safe_io.read_bounded(f, MAX_META, fix)
    try:
        meta = json.loads(raw.decode("utf-8"), parse_constant=_no_constants)
    except RecursionError:
        raise UsageError(f"{f}: unreadable {META} (nested too deeply); {fix}") from None
    except ValueError as e:  # not UTF-8, not JSON, NaN/Infinity, an int of more than 4300 digits
        raise UsageError(f"{f}: unreadable {META} ({str(e)[:200]}); {fix}") from None
    if not isinstance(meta, dict):
        raise UsageError(f"{f}: a JSON {type(meta).__name__} where a checkpoint's {META} holds an object; {fix}")
    if "step" not in meta:
        raise UsageError(f"{f}: no 'step' (the step the checkpoint was saved at); {fix}")
    for key, kind in META_TYPES.items():
        if key in meta:
            want = _field_problem(kind, meta[key])
            if want:
                raise UsageError(f"{f}: '{key}' is {show(meta[key])}, where a checkpoint's {META} holds {want}; "
                                 f"{fix}")
    total = meta.get("total_steps", MAX_INT)
    if not 1 <= meta["step"] <= total:
        raise UsageError(f"{f}: 'step' is {meta['step']}, outside 1..{total} (1 to the run's total_steps); {fix}")
    return meta


def resolve_resume(resume: str, out: Path) -> Path | None:
    """``none`` -> None; ``auto`` -> newest complete checkpoint under ``<out>/checkpoints`` (None if there is
    none yet, so a requeued job that never saved starts fresh); anything else is a checkpoint dir."""
    if resume == "none":
        return None
    if resume == "auto":
        root = root_of(out)
        found = latest(root)
        done = complete_checkpoints(root) if found is None else []
        named = _named(root, LATEST)
        if found is None and named is not None and named.is_dir() and not done:
            # A save never leaves it so (a checkpoint goes into place complete): its files were changed since.
            # Starting at step 1 would train over the run without a word.
            raise UsageError(f"train.resume=auto: {root / LATEST} names {named.name}, which has no {META} (it was "
                             f"complete when saved: its files have changed since), and no other checkpoint is "
                             f"complete; start over with train.resume=none output.overwrite=true")
        if done:
            # Starting at step 1 here would prune these checkpoints at its first save: never silently.
            newest = done[-1]
            why = (f"{root / LATEST} is missing" if not os.path.lexists(root / LATEST) else
                   f"{root / LATEST} names a checkpoint without {META}")
            raise UsageError(f"train.resume=auto: {why}, but {root} holds complete checkpoints (the newest is "
                             f"{newest}); resume from it with train.resume={newest}, or start over with "
                             f"train.resume=none output.overwrite=true")
        return found
    p = Path(resume).expanduser()
    if os.path.lexists(p / LATEST):
        p = latest(p) or p
    elif TAG.fullmatch(p.name) and not os.path.lexists(p):
        p = cut_between_renames(p) or p
    if not os.path.lexists(p / META):
        raise UsageError(f"train.resume {resume}: not a complete checkpoint (no {META}); use auto, none or a "
                         f"checkpoints/stepN dir")
    return p


def _same(a: Any, b: Any) -> bool:
    # type() too: 1 == True == 1.0 in Python, and a checkpoint of another kind must not pass for this run's.
    return type(a) is type(b) and a == b


def layout_of(meta: dict[str, Any]) -> str:
    ranks = meta.get("world_size")
    return (f"{ranks} rank{'s' if ranks != 1 else ''} x micro-batch {meta.get('micro_batch_size')} x "
            f"{meta.get('grad_accum')} accumulation"
            + (f", ZeRO-{meta['zero_stage']}" if "zero_stage" in meta else ""))


def global_batch_of(meta: dict[str, Any]) -> Any:
    if "global_batch" in meta:
        return meta["global_batch"]
    try:  # written before checkpoints recorded it
        return meta["world_size"] * meta["micro_batch_size"] * meta["grad_accum"]
    except (KeyError, TypeError):
        return None


def _amsgrad(key: Any) -> bool:
    """Whether a checkpoint's recorded optimizer (:func:`..runtime.ds_config.optimizer_key`) keeps amsgrad's maximum."""
    try:
        return bool(isinstance(key, str) and json.loads(key).get("amsgrad"))
    except (ValueError, AttributeError):
        return False


def check_compatible(ckpt: Path, expected: dict[str, Any],
                     unchecked: tuple[str, ...] = ()) -> tuple[dict[str, Any], bool]:
    """``(meta, portable)``: the checkpoint continues this run exactly, on its own layout (``portable`` False:
    DeepSpeed's files load) or on another one with the same global batch (True: :mod:`.portable`'s state loads).
    Anything else is a UsageError naming the key and both values, raised before any process group starts.
    ``unchecked``: keys of :data:`MUST_MATCH` the user has said may differ (``checkpoint.check_base_weights``)."""
    meta = read_meta(ckpt)
    saved_g = global_batch_of(meta)
    if not _same(saved_g, expected["global_batch"]):
        raise UsageError(f"checkpoint {ckpt}: saved with a global batch of {show(saved_g)} examples per step "
                         f"({layout_of(meta)}), this run has {expected['global_batch']} ({layout_of(expected)}); "
                         f"the continuation would not be exact. Keep the global batch: set "
                         f"train.global_batch_size={show(saved_g)} (train.grad_accum then follows the number of "
                         f"ranks), or resume with the saved layout")
    if "offload_optimizer" in meta and not _same(meta["offload_optimizer"], expected.get("offload_optimizer")):
        # The optimizer itself changes (DeepSpeed's CPU Adam and torch's AdamW keep their states apart).
        raise UsageError(f"checkpoint {ckpt}: saved with offload_optimizer={show(meta['offload_optimizer'])}, this "
                         f"run has {show(expected.get('offload_optimizer'))}; with ZeRO optimizer offload the "
                         f"optimizer is DeepSpeed's CPU Adam, without it torch's AdamW, and one does not continue "
                         f"the other's state: resume with the saved deepspeed.config")
    for k in MUST_MATCH:
        if k == "global_batch" or k in unchecked or (k in RECORDED_SINCE_2 + RECORDED_LATER and k not in meta):
            continue
        if k in VERSIONED and not comparable(meta.get(k), expected.get(k)):
            continue
        # Checkpoints from before train.objective are SFT runs.
        default = "sft" if k == "objective" else None
        saved, now = meta.get(k, default), expected.get(k, default)
        if not _same(saved, now):
            hint = f" ({FIX[k]})" if k in FIX else ""
            copies = expected.get("held_copies") or 0
            if k in ("total_steps", "n_examples") and "held_copies" not in meta and copies:
                # Nothing the user set changed: the checkpoint's ia3-dist trained on these copies.
                hint = (f" (this ia3-dist leaves the {copies} example(s) whose tokens equal a held-out one out of "
                        f"training, so the eval never scores what the run trained on; the checkpoint's earlier "
                        f"ia3-dist trained on them. Continue in a new output.dir from the checkpoint's vectors with "
                        f"ia3.init_from)")
            raise UsageError(f"checkpoint {ckpt}: saved with {k}={show(saved)}, this run has {show(now)}; the "
                             f"continuation would not be exact{hint}")
    changed = [k for k in LAYOUT if k in meta and not _same(meta[k], expected.get(k))]
    if not changed:
        return meta, False
    what = ", ".join(f"{k}={show(meta[k])} (now {show(expected.get(k))})" for k in changed)
    refusal = layout_change_refusal(ckpt, meta, expected, changed)
    if refusal:
        raise UsageError(f"checkpoint {ckpt}: saved with {what}; {refusal}")
    return meta, True


def layout_change_refusal(ckpt: Path, meta: dict[str, Any], expected: dict[str, Any], changed: list[str]) -> str:
    """Why the checkpoint cannot resume on another layout (the ``changed`` keys of :data:`LAYOUT`), and what to do
    instead; empty when it can (from its layout-independent state). ``expected``: the resuming run's meta, or the
    part of it known (precision, offload_optimizer)."""
    # Before the portable-state check: fp16 checkpoints carry none (save skips it), and not for want of a newer
    # ia3-dist.
    if "fp16" in (meta.get("precision"), expected.get("precision")):
        return (f"in fp16 the dynamic loss scale lives in DeepSpeed's optimizer state, which the layout-independent "
                f"checkpoint does not carry (restarted at 2^16, the run would skip other steps than the saved run). "
                f"Resume on the saved layout ({layout_of(meta)}); a new run in bf16 has no loss scale to lose")
    objective = meta.get("objective", "sft")
    if "micro_batch_size" in changed and objective != "sft":
        return (f"a preference step's loss is the mean of its micro-batches' losses (each as TRL computes it, a "
                f"token mean for the NLL terms), so another micro-batch would train another objective "
                f"({objective.split()[0]}). Resume with train.micro_batch_size={show(meta['micro_batch_size'])} "
                f"(train.global_batch_size keeps the global batch on another number of ranks)")
    # Offload before the state check: an offload run's checkpoint has no layout-independent state (save skips
    # it), and not for want of a newer ia3-dist.
    if expected.get("offload_optimizer") or meta.get("offload_optimizer"):
        return (f"with ZeRO optimizer offload the optimizer is DeepSpeed's CPU Adam, whose state the "
                f"layout-independent checkpoint does not fill. Resume on the saved layout ({layout_of(meta)})"
                + ("" if "offload_optimizer" in meta else " or without offload_optimizer"))
    if _amsgrad(meta.get("optimizer")):
        # The layout-independent state carries AdamW's two moments; amsgrad keeps a third.
        return (f"with optimizer.params amsgrad the optimizer keeps a running maximum the layout-independent "
                f"checkpoint does not carry. Resume on the saved layout ({layout_of(meta)})")
    if not portable.has_state(ckpt):
        return (f"it has no layout-independent state (written by an earlier ia3-dist), so it resumes only on its "
                f"own layout: {layout_of(meta)}")
    return ""


def refuse_later(ckpt: Path, out: Path) -> None:
    """``train.resume=<a stepN dir>``: a UsageError where the run's own checkpoints go past step N (a roll-back,
    or another run's). The resumed run would write over their tags with other states, its rotation would count them
    as newer than its own saves and delete these first, and ``train.resume=auto`` after a preemption would pick the
    abandoned ones. (``auto`` resumes from the newest complete checkpoint ``latest`` names.)"""
    step = read_meta(ckpt)["step"]
    root = root_of(out)
    # What the pointers read too: a step saved again and cut off between its renames is only a stepN.new/.old.
    later = sorted({d for d in (*complete_checkpoints(root), _pointed(root, LATEST), _pointed(root, BEST))
                    if d is not None and step_of(d) > step}, key=step_of)
    if later:
        names = ", ".join(d.name for d in later)
        raise UsageError(f"train.resume={ckpt}: resumes at step {step}, but {root} holds checkpoints past it "
                         f"({names}); the resumed run would save over them and its rotation would delete its own "
                         f"new ones first. Move them out of the run's directory (mv {root}/step<N> <somewhere "
                         f"else>) and point {root}/{LATEST} at {ckpt.name} (echo {ckpt.name} > {root}/{LATEST}; "
                         f"{BEST} too where it names a moved one: a requeue before the first save reads them), or "
                         f"resume from the newest with train.resume=auto")


def read_best_vectors(ckpt: Path) -> dict[str, torch.Tensor] | None:
    """A checkpoint's :data:`BEST_VECTORS` (None where it has none): bounded, safetensors only (no code runs), float
    tensors; a UsageError naming the file otherwise."""
    from safetensors.torch import load as load_tensors

    f = ckpt / BEST_VECTORS
    fix = "delete it (the resumed run then writes its last vectors if it stops early) or resume from another checkpoint"
    raw = safe_io.read_bounded(f, MAX_BEST_VECTORS, fix, missing_ok=True)
    if raw is None:
        return None
    try:
        tensors = load_tensors(raw)
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise UsageError(f"{f}: unreadable ({str(e)[:200]}); {fix}") from None
    if not tensors or not all(t.is_floating_point() for t in tensors.values()):
        raise UsageError(f"{f}: not the trainable vectors ia3-dist writes (empty, or a tensor that is not floating "
                         f"point); {fix}")
    return tensors


def resume_line(ckpt: Path, meta: dict[str, Any], expected: dict[str, Any], changed: bool) -> str:
    """What the rank log says about the resume."""
    w, now = meta.get("world_size"), expected["world_size"]
    line = f"resuming step {meta['step']} saved on {w} ranks, now on {now} ranks"
    if changed:
        line += (f" (saved as {layout_of(meta)}, now {layout_of(expected)}: the same {expected['global_batch']} "
                 f"examples per step; layout-independent state from {ckpt})")
    return line


def guard_output_dir(out: Path, resume: str, overwrite: bool) -> None:
    """Preflight for ``output.dir``: it must be (or be creatable as) a writable directory, and a run may start in
    it only if that destroys nothing: it is new or empty, or holds only the setup files of a run of ours that never
    trained, or the run resumes ours, or ``overwrite`` is set (which removes only what a run writes; see
    :mod:`.manifest`). Names it cannot write without destroying something (a symlinked ``run.yaml``, a file named
    ``adapter``) are refused even then."""
    manifest.check_writable_dir(out, "output.dir")
    st = manifest.inspect(out)
    if st.clashes:
        raise UsageError(f"output.dir {out}: {manifest.few(st.clashes, 3)}; move it away or pick another "
                         f"output.dir")
    if not st.entries or overwrite:
        return
    aside = out / manifest.REPLACED
    if manifest.dead_start(out, st) and manifest.live_run_pid(out) is None:
        # Every later start discards the aside once it has started: without overwrite, that run would go unasked.
        # (A start over still starting, alive, is refused as a live run by rank 0's check.)
        # What the dead start wrote over names the aside holds (any other entry may be the earlier run's own, not
        # moved yet when the start was killed).
        setup = [e for e in st.owned if e not in (manifest.MANIFEST, manifest.REPLACED)
                 and os.path.lexists(aside / e)]
        rm = f"delete what that start wrote ({manifest.few(setup)}), then " if setup else ""
        raise UsageError(f"output.dir {out}: {aside} holds the files of a run that a start with "
                         f"output.overwrite=true set aside; that start was killed before it trained, so they were "
                         f"neither removed nor put back. Start over with output.overwrite=true (they go once the new "
                         f"run has started), or keep that run: {rm}move everything in {aside} back into {out} and "
                         f"remove the empty {manifest.REPLACED}")
    kept = f"; {manifest.few(st.foreign)} would stay" if st.foreign else ""
    if resume == "auto" and not complete_tags(out, st) and latest(root_of(out)) is None and "adapter" in st.results:
        # (latest() also finds a step caught between the two renames of a save: stepN.new, stepN.old.)
        # A finished run without checkpoints (checkpoint.at_end=false): auto finds nothing to resume and would
        # start over, replacing its adapter and metrics (a finished job's sbatch file submitted again does this).
        raise UsageError(f"output.dir {out} holds a finished run (adapter/) and no checkpoint to resume; set "
                         f"output.overwrite=true to train it again (only ia3-dist's own files are removed{kept}), "
                         f"or pick a new output.dir")
    if resume == "none" or not resumes_own(resume, out):
        # A checkpoint of another dir: what this dir holds is not the run it continues.
        ckpts = complete_tags(out, st)
        if ckpts:
            raise UsageError(f"output.dir {out} holds another run's checkpoints ({ckpts[-1]}); resume it with "
                             f"train.resume=auto, or set output.overwrite=true to start over (only ia3-dist's own "
                             f"files are removed{kept}), or pick a new output.dir")
        theirs = st.results or st.unclaimed
        if theirs:
            raise UsageError(f"output.dir {out} holds another run's files ({manifest.few(theirs)}); "
                             f"set output.overwrite=true to start over (only ia3-dist's own files are removed"
                             f"{kept}), or pick a new output.dir")
    if st.foreign and (not resumes_own(resume, out) or st.manifest is None):
        what = f"not an ia3-dist run dir (no {manifest.MANIFEST})" if st.manifest is None else "not empty"
        raise UsageError(f"output.dir {out} is {what}: it holds {manifest.few(st.foreign)}, which ia3-dist did not "
                         f"write; pick a new or empty output.dir, or set "
                         f"output.overwrite=true to run beside those files (they are kept; only ia3-dist's own "
                         f"files are replaced)")


def resumes_own(resume: str, out: Path) -> bool:
    """Whether ``train.resume`` continues the run of ``out`` itself: ``auto``, its checkpoints/ (the checkpoint
    its pointer names) or a checkpoint in it (not ``none``, nor a checkpoint of another run dir)."""
    if resume == "auto":
        return True
    if resume == "none":
        return False
    try:
        p, root = Path(resume).expanduser().resolve(), (out / manifest.CHECKPOINTS).resolve()
    except (OSError, RuntimeError):  # a link loop: not ours to follow
        return False
    return root in (p, p.parent)


def complete_tags(out: Path, st: manifest.DirState) -> list[str]:
    """Complete checkpoint tags among the entries ``inspect`` owns, oldest first."""
    tags = [e.split("/", 1)[1] for e in st.owned if e.startswith(manifest.CHECKPOINTS + "/")]
    return sorted((t for t in tags if TAG.fullmatch(t) and (out / manifest.CHECKPOINTS / t / META).is_file()),
                  key=lambda t: int(t[4:]))


def rng_state() -> dict[str, Any]:
    """RNG states as tensors, numbers and lists only: a checkpoint must load with torch's restricted unpickler
    (see safe_load.py), which has no numpy types."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    out = {"python": random.getstate(), "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
           "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # The device's generator (dropout on a GPU draws from it), which the engine's start re-seeds otherwise.
        out["cuda"] = torch.cuda.get_rng_state()
    return out


RNG_RANKS = "rng_ranks"
"""In a checkpoint's client state: every rank's RNG states, in rank order (``rng``: the writer's own)."""


def own_rng(client: Any) -> Any:
    """The RNG states this rank saved, where the checkpoint has every rank's and the world is the one that saved
    them; else those of the rank that wrote the file (a checkpoint of an earlier version, or another world: no
    rank's stream of draws continues there anyway)."""
    rngs = client.get(RNG_RANKS) if isinstance(client, dict) else None
    rank, world = dist.rank_and_world()
    if isinstance(rngs, list) and len(rngs) == world and len(rngs) > 1:
        return rngs[rank]
    return client.get("rng") if isinstance(client, dict) else None


def set_rng_state(s: dict[str, Any]) -> None:
    version, internal, gauss = s["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


def _why(error: Exception | None, root: Path) -> str:
    if error is None:
        return "this rank's part was written"
    what = (error.strerror if isinstance(error, OSError) else None) or str(error).splitlines()[0][:200]
    if isinstance(error, OSError) and error.strerror and error.filename:
        what += f": {brief(str(error.filename))}"  # "Is a directory" alone would not say which
    try:
        free = shutil.disk_usage(manifest.nearest_existing(root)).free  # root itself may be what could not be made
    except OSError:
        return f"this rank: {what}"
    full = "the filesystem is full: " if free < 1 << 20 else ""
    return f"this rank: {what}; {full}{free} bytes free there"


def _space(error: Exception | None) -> bool:
    """Whether ``error`` may be a full disk or quota (torch and safetensors report a failed write without errno)."""
    return not isinstance(error, OSError) or error.errno in (None, errno.ENOSPC, errno.EDQUOT)


def _agree_failed(error: Exception | None, device: torch.device) -> tuple[int, int]:
    """Every rank joins: how many ranks failed, and how many of them for a cause other than space (on the
    engine's device: NCCL reduces only GPU tensors)."""
    mine = [float(error is not None), float(error is not None and not _space(error))]
    failed, other = dist.all_reduce_sum(torch.tensor(mine, dtype=torch.float64, device=device)).tolist()
    return int(failed), int(other)


def _pointer_temp(root: Path, pointer: str) -> Path:
    """Where a pointer's new contents are written before the rename that moves it."""
    return root / f"{pointer}{POINTER_TEMP}"


def _remove_pointer_temps(root: Path) -> None:
    """Unlink the pointer temps a killed or failed save left in ``root``: the next save then writes its temps
    fresh, never through a link left under their names. An OSError goes to the caller."""
    for pointer in (LATEST, BEST):  # ours only: another *.tmp there is the user's, and stays
        _pointer_temp(root, pointer).unlink(missing_ok=True)


def _settle(root: Path) -> None:
    """Rank 0, before a save and after a failed one: finish what a save cut off left (see :data:`NEW`). A
    ``stepN`` that a pointer names but is not there gets what :func:`cut_between_renames` reads; then the pointers
    a cut-off save did not get to move (:func:`in_flight`) move; then every other ``.new``/``.old`` goes (an
    unfinished save, one cut off before it was put in place, or a step's previous state once the new one is), and
    the temps. Symlinks and files under those names are unlinked, never followed. An OSError goes to the caller;
    a dir that will not go entirely (a file another process holds open on NFS) is left for a later save, as no
    pointer depends on it."""
    bases = sorted({m[1] for c in root.iterdir() if (m := STAGED.fullmatch(c.name))})
    for base in bases:
        found = cut_between_renames(root / base)
        if found is not None:
            os.rename(found, root / base)
    for pointer in (LATEST, BEST):
        if in_flight(root, pointer, _pointed(root, pointer, in_flight_too=False)) is not None:
            os.replace(_pointer_temp(root, pointer), root / pointer)
    for base in bases:
        for c in (root / (base + NEW), root / (base + OLD)):
            if safe_io.not_a_dir(c):
                c.unlink()
            elif c.is_dir():
                shutil.rmtree(c, ignore_errors=True)
    _remove_pointer_temps(root)


def _fresh_tag_dir(root: Path, tag: str) -> OSError | None:
    """Rank 0, before a save: ``root/stepN.new`` empty and new, for every rank's writes, so nothing in it is
    followed (a symlink planted in a dir left there would send DeepSpeed's files, meta.json and the portable state
    to any file the user can write). What a cut-off save left is settled first. Returns the error of a failed
    write."""
    try:
        if not root.is_dir():
            root.mkdir(parents=True, exist_ok=True)
            safe_io.fsync(root.parent, directory=True)  # else a crash can lose the whole checkpoints/ name
        _settle(root)
        (root / (tag + NEW)).mkdir()
    except OSError as e:
        return e
    return None


def _discard(d: Path) -> None:
    """Rank 0: a checkpoint the rotation drops. Renamed first (as ``stepN.old``, which the next save removes), so
    a removal cut off midway leaves no ``stepN`` with its meta.json and some of its files gone."""
    gone = d.with_name(d.name + OLD)
    try:
        os.rename(d, gone)
    except OSError:
        gone = d
    shutil.rmtree(gone, ignore_errors=True)


def _put_in_place(root: Path, tag: str, step: int) -> None:
    """Rank 0: the complete ``stepN.new`` becomes ``stepN``; a ``stepN`` there already (this step written again)
    becomes ``stepN.old`` first and goes after. Cut off between the renames, :func:`latest` reads the new one and
    the next save puts it in place."""
    d, old = root / tag, root / (tag + OLD)
    if safe_io.not_a_dir(d):
        d.unlink()  # not ours: never followed
    elif d.is_dir():
        os.rename(d, old)
    faults.hit("save-in-place", step, 0)
    os.rename(root / (tag + NEW), d)
    shutil.rmtree(old, ignore_errors=True)  # left over, the next save removes it


def _failed_save(root: Path, tag: str, env: dist.DistEnv, error: Exception | None, failed: tuple[int, int]
                 ) -> NoReturn:
    """Every rank: leave a save that failed on ``failed`` ranks together, its partial files gone (rank 0)."""
    # Rank 0 wrote the pointer, so rank 0 says where it points (other ranks may not see that filesystem).
    where = ""
    if env.is_main:
        # Frees the space the partial save took (its stepN.new; a step cut off between its renames gets the new
        # one in place); `latest` still names the previous complete checkpoint (the pointer is the last thing
        # written, so a failed save never moved it).
        try:
            _settle(root)
        except OSError:
            pass  # best effort: the failing filesystem may refuse it too, and every other rank waits in the
            # barrier below (the next save settles them first, or fails naming them)
        try:
            prev = latest(root)
        except (UsageError, OSError):  # a damaged pointer, an NFS ESTALE: still leave together, below
            prev = None
        where = f"; {prev} stays the latest checkpoint" if prev is not None else "; no earlier checkpoint exists"
    dist.barrier()
    # Every rank gives the same advice: space only where some rank's failure may have been space.
    fix = "Fix what the failing rank names" if failed[1] == failed[0] else \
        "Free space there (lower checkpoint.keep, or move output.dir to a bigger filesystem)"
    raise CheckpointWriteError(
        f"checkpoint {tag} could not be written to {root} ({failed[0]} rank(s) failed; {_why(error, root)})"
        f"{where}. {fix}, then resume with train.resume=auto")


def save(engine: Any, out: Path, step: int, meta: dict[str, Any], keep: int, env: dist.DistEnv,
         best: bool = False, tensors: dict[str, dict[str, torch.Tensor]] | None = None,
         log_error: OSError | None = None) -> Path:
    """Every rank writes its part; the pointer moves only after all of them have finished. ``tensors``: further
    safetensors files rank 0 writes into the tag dir (file name -> tensors; empty ones are left out), before its
    meta.json. ``log_error``: rank 0 could not write a log this checkpoint covers (metrics.jsonl, examples.jsonl);
    the save fails on every rank as a write of its own would, and the resume logs those steps again.

    A write that fails on any rank (disk full, quota, I/O error) fails the save on every rank together: the
    partial tag dir is removed, ``latest`` keeps naming the previous checkpoint, and every rank raises
    :class:`CheckpointWriteError` (exit 74) instead of one rank dying and leaving the others in a barrier."""
    root = root_of(out)
    tag = tag_for(step)
    faults.hit("save-begin", step, env.rank)
    error: Exception | None = None
    if env.is_main:
        error = log_error if log_error is not None else _fresh_tag_dir(root, tag)
    # Rank 0 made the dirs DeepSpeed would make before its own collectives (a failure there, a full disk or a
    # quota, would leave rank 0 in a barrier the others passed, and the collectives after it mismatched): every
    # rank learns of it here and leaves together.
    failed = _agree_failed(error, engine.device)
    if failed[0]:
        _failed_save(root, tag, env, error, failed)
    # Before any write (every rank joins its gathers): a failed write below must not leave ranks in different
    # collectives. Not with optimizer offload or fp16, where a layout change is refused anyway (check_compatible).
    state = None if meta.get("offload_optimizer") or meta.get("precision") == "fp16" else portable.gather(engine)
    # Every rank's RNG states, in rank 0's file: below ZeRO-3 only rank 0 writes the file that carries them, and
    # the ranks' streams part (dropout draws as many numbers as a micro-batch has elements, and the ranks' batches
    # differ in length). Under ZeRO-3 each rank also reads its own state from its own file.
    rngs = dist.all_gather_objects(rng_state())
    client = {"step": step, "rng": rngs[env.rank], **({RNG_RANKS: rngs} if env.is_main else {})}
    try:
        engine.save_checkpoint(str(root), tag=tag + NEW, client_state=client,
                               save_latest=False, exclude_frozen_parameters=True)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError ("iostream error")
        if isinstance(e, (torch.OutOfMemoryError, torch.distributed.DistError)):
            raise  # not a write: a lost peer or memory, which no barrier below could pair up
        error = e
        # DeepSpeed's save ends with a barrier, which ranks whose writes succeeded are waiting in: join it, so the
        # next collective (the agreement below) pairs up on every rank.
        dist.barrier()
    if error is None and env.local_rank == 0 and (root / (tag + NEW)).is_dir():
        # DeepSpeed's save ended with a barrier: every rank's files are written. One rank per node flushes them
        # (each node its own writes; on a shared filesystem the others' files are already clean: one round trip
        # each). A node with a disk of its own where none of its ranks wrote has no such dir: nothing to flush.
        try:
            safe_io.fsync_tree(root / (tag + NEW))
        except OSError as e:
            error = e
    faults.hit("save", step, env.rank)
    if not _agree_failed(error, engine.device)[0] and env.is_main:
        # meta.json last in the tag dir, then the dir into place, then the pointer: a dir without meta.json is an
        # unfinished save.
        staged = root / (tag + NEW)
        try:
            flushed = set(os.listdir(staged))  # DeepSpeed's files, flushed above
            if state is not None:
                portable.write(staged, *state, rng_state(), rngs)
            from safetensors.torch import save_file

            for name, extra in (tensors or {}).items():
                if extra:
                    save_file({k: v.contiguous() for k, v in extra.items()}, str(staged / name))
            tmp = staged / f"{META}.tmp"
            tmp.write_text(json.dumps({**meta, "step": step}, indent=1))
            # Rank 0's files (and meta.json's temp) flushed before meta.json marks the dir complete, and that name
            # flushed before the dir is renamed into place: after a crash a complete-looking checkpoint is one.
            for name in sorted(set(os.listdir(staged)) - flushed):
                safe_io.fsync(staged / name)
            os.replace(tmp, staged / META)
            safe_io.fsync(staged, directory=True)
            # Both pointers' files before either moves: a full disk fails the save with neither moved (after one
            # had, the save would report a failure while `latest` named the new checkpoint).
            pointers = (LATEST, BEST) if best else (LATEST,)
            for name in pointers:
                safe_io.write_durable(_pointer_temp(root, name), tag)
            _put_in_place(root, tag, step)
            for name in pointers:
                os.replace(_pointer_temp(root, name), root / name)
            safe_io.fsync(root, directory=True)  # the renames: stepN and the pointers
        except (OSError, SafetensorError) as e:  # safetensors reports a failed write as its own error
            error = e
    failed = _agree_failed(error, engine.device)
    if failed[0]:
        _failed_save(root, tag, env, error, failed)
    if env.is_main:
        # The highest steps stay; never the one just written (a checkpoint past it is refused at the resume that
        # would leave one: refuse_later). Best effort: the save is complete and published, and rank 0 must reach
        # the barrier below whatever the listing does (an NFS ESTALE would leave the other ranks waiting in it).
        try:
            kept = _pointed(root, BEST)
            for old in complete_checkpoints(root)[:-keep]:
                if old not in (kept, root / tag):
                    _discard(old)
        except OSError as e:
            dist.print0(env, f"ia3-dist: note: {root}: the older checkpoints were not rotated out ({e.strerror or e}); "
                             f"the next save tries again")
    dist.barrier()
    return root / tag


def _pointed(root: Path, pointer: str, in_flight_too: bool = True) -> Path | None:
    """What :func:`latest` reads (``in_flight_too`` False: what the pointer itself names, no temp considered);
    None for a damaged pointer."""
    try:
        return latest(root, pointer) if in_flight_too else _latest_named(root, pointer)
    except UsageError:  # a damaged pointer protects nothing; the next save rewrites it
        return None


def _named(root: Path, pointer: str) -> Path | None:
    """The ``stepN`` dir ``pointer`` names, complete or not; None for no pointer or a damaged one."""
    try:
        raw = safe_io.read_bounded(root / pointer, MAX_LATEST, missing_ok=True)
        name = raw.decode("utf-8").strip() if raw is not None else ""
    except (UsageError, UnicodeDecodeError):
        return None
    return root / name if TAG.fullmatch(name) else None


def load(engine: Any, ckpt: Path, portable_state: bool = False) -> int:
    """Restore trainable params, optimizer, scheduler and RNG; return the number of completed steps. DeepSpeed's
    files are read with the restricted unpickler (prepare() has scanned them before the process group started);
    ``portable_state``: from the layout-independent files instead (another world size, cut or ZeRO stage)."""
    saved = read_meta(ckpt)["step"]
    fix = f"the files of {ckpt} do not belong together; resume from another checkpoint or start over"
    if portable_state:
        rng = portable.apply(engine, ckpt)
        if engine.global_steps != saved:
            raise UsageError(f"checkpoint {ckpt}: its {portable.INFO} records step {engine.global_steps}, its "
                             f"{META} step {saved}; {fix}")
        step = saved
    else:
        safe_load.harden(engine)
        path, client = engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name, load_module_strict=False,
                                              load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt}")
        # The preflight checked meta.json, not the client state inside the .pt files: both come from the same save.
        step = client.get("step") if isinstance(client, dict) else None
        if not _same(step, saved):
            raise UsageError(f"checkpoint {ckpt}: its model states record step {show(step)}, its {META} step "
                             f"{saved}; {fix}")
        rng = own_rng(client)
    try:
        set_rng_state(rng)
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
        raise UsageError(f"checkpoint {ckpt}: unusable RNG state ({type(e).__name__}); {fix}") from None
    return step


def dir_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
