"""Loading checkpoints without running code from them.

DeepSpeed loads its checkpoint files with ``torch.load(weights_only=False)``: a full unpickler, so a ``.pt`` file
whose pickle has a malicious ``__reduce__`` runs that code the moment a run resumes from it. Checkpoints get copied
between clusters and shared, so they are untrusted input. Two defences, both on an explicit allow-list of the few
non-tensor types DeepSpeed's states hold (everything else in them is tensors, numbers, strings and containers):

- before the process group starts, every ``.pt`` file of the checkpoint is scanned (pickle opcodes only, nothing
  is executed) and one with any other global is refused with exit 2 naming the file;
- the engine's checkpoint loader is replaced by ``torch.load(weights_only=True)`` under the same allow-list, so a
  file swapped in after the scan still cannot construct anything else.

The scan itself reads nothing it cannot bound: a file must be a regular file inside the checkpoint dir (not a
symlink, FIFO, device, socket or dir, whose read could hang or lead anywhere), and its zip directory must look like
what ``torch.save`` writes (stored entries, a pickle of at most :data:`MAX_PICKLE` bytes, sizes within the file)
before torch inflates or copies any entry of it.
"""

from __future__ import annotations

import importlib
import os
import re
import zipfile
from functools import cache
from pathlib import Path
from typing import IO, Any

import torch

from ..errors import UsageError
from .safe_io import open_regular

# Non-tensor types found in DeepSpeed 0.19 checkpoints of ZeRO 0-3 (fp32/bf16/fp16, with and without offload):
# plain data holders, none of which runs code when rebuilt.
ALLOWED_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


@cache
def allowed_objects() -> list[Any]:
    out = []
    for name in ALLOWED_GLOBALS:
        module, _, attr = name.rpartition(".")
        out.append(getattr(importlib.import_module(module), attr))
    return out


MAX_PICKLE = 64 << 20
"""Bound on a ``.pkl`` entry of a torch zip. Tensors are entries of their own, so the pickle holds only names, shapes
and small objects: a few MiB for a model with thousands of tensors. torch reads the entry whole (and copies it)
before unpickling, so its declared size is what the scan would cost."""
MAX_CENTRAL_DIR = 64 << 20
"""Bound on the zip directory, which zipfile and torch's reader each load whole: tens of bytes per tensor."""
RESUME_FIX = "resume from another checkpoint (train.resume=<dir>) or start over"

def check_torch_zip(fh: IO[bytes], path: Path, fix: str, label: str = "") -> None:
    """Refuse a zip whose directory is not what ``torch.save`` writes, from the directory alone (no entry is read).

    torch stores every entry uncompressed, but its reader inflates compressed ones: a 1 MB file whose ``data.pkl``
    inflates to 1 GB would cost gigabytes per rank before the pickle could be refused. So: only stored entries, a
    pickle of at most :data:`MAX_PICKLE` bytes, and entries that fit in the file without overlapping (overlapping
    entries would make one stored block count many times)."""
    def bad(why: str) -> UsageError:
        return UsageError(f"{label}{path}: {why}, which torch.save never writes; {fix}")

    size = os.fstat(fh.fileno()).st_size
    try:
        fh.seek(0)
        end = zipfile._EndRecData(fh)  # type: ignore[attr-defined]  # the stdlib's own EOCD (and zip64) reader
        if end is None:
            raise UsageError(f"{label}{path}: unreadable (not a zip archive, the format torch.save writes); {fix}")
        if end[zipfile._ECD_SIZE] > min(MAX_CENTRAL_DIR, size):  # type: ignore[attr-defined]
            raise bad(f"a zip directory of {end[zipfile._ECD_SIZE]} bytes")  # type: ignore[attr-defined]
        fh.seek(0)
        infos = zipfile.ZipFile(fh).infolist()
    except UsageError:
        raise
    except Exception as e:  # BadZipFile, struct.error, EOFError, OSError, ...: a damaged directory
        raise UsageError(f"{label}{path}: unreadable (a damaged zip directory: {type(e).__name__}: "
                         f"{str(e)[:200]}); {fix}") from None
    total = 0
    for i in infos:
        name = i.filename[:100]
        if i.compress_type != zipfile.ZIP_STORED:
            raise bad(f"entry {name!r} is compressed (method {i.compress_type})")
        if i.compress_size != i.file_size:
            raise bad(f"entry {name!r} declares {i.file_size} bytes stored in {i.compress_size}")
        if i.filename.endswith(".pkl") and i.file_size > MAX_PICKLE:
            raise bad(f"a pickle entry {name!r} of {i.file_size} bytes (more than {MAX_PICKLE >> 20} MiB)")
        if i.header_offset + i.compress_size > size:
            raise bad(f"entry {name!r} declares {i.file_size} bytes past the end of the {size}-byte file")
        total += i.file_size
    if total > size:
        raise bad(f"entries declaring {total} bytes in all in a {size}-byte file (entries overlap)")
    fh.seek(0)


def check_file(path: Path) -> None:
    """Refuse ``path`` if it is not a regular file holding a torch zip of bounded size, or if its pickle names any
    global outside torch's safe set and :data:`ALLOWED_GLOBALS`."""
    label = "checkpoint file "
    with open_regular(path, RESUME_FIX, label) as fh:
        check_torch_zip(fh, path, RESUME_FIX, label)
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(fh)
        except Exception as e:  # not a torch zip, truncated, unreadable: torch raises several types
            raise UsageError(f"{label}{path}: unreadable ({type(e).__name__}: {str(e)[:200]}); "
                             f"{RESUME_FIX}") from None
    unexpected = sorted(set(names) - set(ALLOWED_GLOBALS))
    if unexpected:
        raise UsageError(f"checkpoint file {path}: holds objects of types {', '.join(unexpected[:5])}, which a "
                         f"checkpoint of ours never contains; refusing to load it (loading could run code from it). "
                         f"Use a checkpoint you trust")


_RANK_FILE = re.compile(r"(.*)zero_pp_rank_([0-9]+)_mp_rank_([0-9]+)_(model|optim)_states\.pt")
"""DeepSpeed's per-rank checkpoint files (``[bf16_]zero_pp_rank_<r>_mp_rank_00_{model,optim}_states.pt``)."""
MODEL_FILE = "mp_rank_00_model_states.pt"
"""DeepSpeed's model states below ZeRO-3 (one file; ZeRO-3 writes one per rank)."""


def missing_files(names: set[str], world: int, stage: int) -> list[str]:
    """The files of a checkpoint saved on ``world`` ranks at ZeRO ``stage`` that DeepSpeed will open on its own
    layout and ``names`` lacks (a copy cut short, an rsync of some files): each per-rank kind present for some rank
    is there for every rank, the model states are there, and from ZeRO-1 an optimizer's. Without this DeepSpeed
    fails after the model loaded, under ZeRO-3 on the rank whose file is missing alone."""
    groups: dict[tuple[str, str, str], set[int]] = {}
    for n in names:
        m = _RANK_FILE.fullmatch(n)
        if m:
            groups.setdefault((m[1], m[3], m[4]), set()).add(int(m[2]))
    missing = [f"{prefix}zero_pp_rank_{r}_mp_rank_{mp}_{kind}_states.pt"
               for (prefix, mp, kind), ranks in sorted(groups.items()) for r in range(world) if r not in ranks]
    kinds = {kind for _, _, kind in groups}
    if stage < 3 and MODEL_FILE not in names:
        missing.append(MODEL_FILE)
    if stage == 3 and "model" not in kinds:
        missing.append("zero_pp_rank_0_mp_rank_00_model_states.pt")
    if stage >= 1 and "optim" not in kinds:
        missing.append("zero_pp_rank_0_mp_rank_00_optim_states.pt")
    return missing


def check_checkpoint_dir(ckpt: Path, world: int | None = None, stage: int | None = None) -> None:
    """Scan every ``.pt`` file of a checkpoint dir (all ranks' files: each rank checks the whole checkpoint); with
    the ``world`` size and ZeRO ``stage`` it was saved on, refuse it when a file DeepSpeed opens is missing
    (:func:`missing_files`)."""
    try:
        files = sorted(f for f in ckpt.iterdir() if f.name.endswith(".pt"))
    except OSError as e:
        raise UsageError(f"checkpoint {ckpt}: cannot list it ({e.strerror or e}); {RESUME_FIX}") from None
    if not files:
        raise UsageError(f"checkpoint {ckpt}: no .pt files; resume from another checkpoint")
    if world is not None and stage is not None:
        missing = missing_files({f.name for f in files}, world, stage)
        if missing:
            raise UsageError(f"checkpoint {ckpt}: saved on {world} rank(s) at ZeRO-{stage}, it lacks "
                             f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} (a copy cut short?); "
                             f"copy the checkpoint whole, or {RESUME_FIX}")
    for f in files:
        check_file(f)


def safe_torch_load(path: str, map_location: Any = None) -> Any:
    """``torch.load`` as DeepSpeed's checkpoint engine calls it, but with the restricted unpickler."""
    with torch.serialization.safe_globals(allowed_objects()):
        return torch.load(path, map_location=map_location, weights_only=True)


def harden(engine: Any) -> None:
    """Make ``engine.load_checkpoint`` read files through :func:`safe_torch_load`."""
    ce = getattr(engine, "checkpoint_engine", None)
    if ce is None or not hasattr(ce, "load"):
        raise RuntimeError("DeepSpeed engine has no checkpoint_engine.load to harden; refusing to resume")
    ce.load = safe_torch_load
