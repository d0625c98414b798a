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

import json
import os
import random
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UsageError
from . import dist

LATEST = "latest"
META = "meta.json"
# Keys of meta.json that must match the resuming run for the continuation to be exact.
MUST_MATCH = ("world_size", "micro_batch_size", "grad_accum", "seed", "shuffle", "total_steps", "data_key",
              "n_examples", "group_by_length", "order_version")


def root_of(out: Path) -> Path:
    return out / "checkpoints"


def tag_for(step: int) -> str:
    return f"step{step}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Tag dirs with a meta.json (written last), oldest first."""
    if not root.is_dir():
        return []
    tags = [d for d in root.iterdir() if d.is_dir() and d.name.startswith("step") and d.name[4:].isdigit()
            and (d / META).is_file()]
    return sorted(tags, key=lambda d: int(d.name[4:]))


def latest(root: Path) -> Path | None:
    f = root / LATEST
    if not f.is_file():
        return None
    d = root / f.read_text().strip()
    return d if (d / META).is_file() else None


def read_meta(ckpt: Path) -> dict[str, Any]:
    try:
        return json.loads((ckpt / META).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"checkpoint {ckpt}: unreadable {META} ({e}); pick another with train.resume=<path>") \
            from None


def resolve_resume(resume: str, out: Path) -> Path | None:
    """``none`` -> None; ``auto`` -> newest complete checkpoint under ``<out>/checkpoints`` (None if there is
    none yet, so a requeued job that never saved starts fresh); anything else is a checkpoint dir."""
    if resume == "none":
        return None
    if resume == "auto":
        return latest(root_of(out))
    p = Path(resume).expanduser()
    if (p / LATEST).is_file():
        p = latest(p) or p
    if not (p / META).is_file():
        raise UsageError(f"train.resume {resume}: not a complete checkpoint (no {META}); use auto, none or a "
                         f"checkpoints/stepN dir")
    return p


def check_compatible(ckpt: Path, expected: dict[str, Any]) -> dict[str, Any]:
    meta = read_meta(ckpt)
    for k in MUST_MATCH:
        if meta.get(k) != expected.get(k):
            hint = ""
            if k == "world_size":
                hint = (" Resuming with a different world size is refused: ZeRO partitions and the per-rank data "
                        "split both depend on it. Resume with the same number of ranks, or start a new run")
            raise UsageError(f"checkpoint {ckpt}: saved with {k}={meta.get(k)!r}, this run has {expected.get(k)!r}; "
                             f"the continuation would not be exact.{hint}")
    return meta


def guard_output_dir(out: Path, resume: str, overwrite: bool) -> None:
    """Refuse to start over another run's checkpoints unless resuming or told to overwrite."""
    ckpts = complete_checkpoints(root_of(out))
    if ckpts and resume == "none" and not overwrite:
        raise UsageError(f"output.dir {out} holds another run's checkpoints ({ckpts[-1].name}); resume it with "
                         f"train.resume=auto, or set output.overwrite=true to start over, or pick a new output.dir")


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(s: dict[str, Any]) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])


def _fault(point: str, step: int, rank: int) -> None:
    """Fault injection for the tests: IA3_DIST_FAULT=<point>:<step>:<rank> kills that rank there with SIGKILL."""
    spec = os.environ.get("IA3_DIST_FAULT", "")
    if spec == f"{point}:{step}:{rank}":
        os.kill(os.getpid(), signal.SIGKILL)


def save(engine: Any, out: Path, step: int, meta: dict[str, Any], keep: int, env: dist.DistEnv) -> Path:
    """Every rank writes its part; the pointer moves only after all of them have finished."""
    root = root_of(out)
    tag = tag_for(step)
    engine.save_checkpoint(str(root), tag=tag, client_state={"step": step, "rng": rng_state()},
                           save_latest=False, exclude_frozen_parameters=True)
    _fault("save", step, env.rank)
    dist.barrier()  # every rank's files are on disk
    if env.is_main:
        # meta.json last in the tag dir, then the pointer: a dir without meta.json is an unfinished save.
        for name, text in ((tag + "/" + META, json.dumps({**meta, "step": step}, indent=1)), (LATEST, tag)):
            tmp = root / f"{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, root / name)
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return root / tag


def load(engine: Any, ckpt: Path) -> int:
    """Restore trainable params, optimizer, scheduler and RNG; return the number of completed steps."""
    path, client = engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name, load_module_strict=False,
                                          load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt}")
    set_rng_state(client["rng"])
    return int(client["step"])


def dir_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
