"""Security round 2, part B: checkpoints, resume state and DeepSpeed values are untrusted (copied between clusters).

Each class of hostile input, reproduced with the input itself, through the real preflight where it matters:

1. checkpoint files: a zip bomb or any zip torch.save never writes (compressed, lying or overlapping entries, a
   huge pickle) and anything but a regular file (FIFO, dir, socket, device, symlink out of the checkpoint) are
   refused from the zip directory / file type alone: bounded time and memory, no hang;
2. resume: ``train.resume=auto`` with ``latest`` missing (or naming an incomplete dir) beside complete checkpoints
   is refused instead of training from step 1 over them; meta.json of the wrong type, field types or nesting, and
   ``latest`` that is not a small regular file, are refused before anything is written; a damaged metrics.jsonl
   (torn last line, junk lines) is trimmed on resume, never a crash;
3. DeepSpeed values that pass DeepSpeed's config models but fail when the engine is built or steps
   (gradient_predivide_factor / prescale_gradients with ZeRO-2/3 reduce_scatter, absurd bucket sizes, modulo-zero
   intervals, values DeepSpeed's own parser rejects) exit 2 in the preflight naming the key.

Every refusal: exit 2, one line on stderr, no traceback, the run dir byte-identical, no payload marker.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import re
import shutil
import socket
import stat
import struct
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from _util import deadline, launch, measured_cli

from ia3_dist.cli import main
from ia3_dist.config import load_config
from ia3_dist.errors import UsageError
from ia3_dist.runtime import checkpoint as ckpt
from ia3_dist.runtime import ds_config as dsc
from ia3_dist.runtime import manifest
from ia3_dist.runtime.dist import DistEnv
from ia3_dist.runtime.safe_load import MAX_PICKLE, check_checkpoint_dir
from ia3_dist.train import loop
from ia3_dist.train.metrics import trim_metrics
from ia3_dist.train.prepare import prepare

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny-cpu.yaml")
ONE = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1)
MODEL_PT = "mp_rank_00_model_states.pt"
OPTIM_PT = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
MAX_MESSAGE = 1000


# -- helpers ----------------------------------------------------------------------------------------------------



def snapshot(root: Path) -> dict[str, tuple[str, bytes | str | None, int]]:
    """Every entry under ``root`` by kind, content (files; never opening anything else, FIFOs included) and mtime."""
    out: dict[str, tuple[str, bytes | str | None, int]] = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        if stat.S_ISLNK(st.st_mode):
            out[str(p.relative_to(root))] = ("link", os.readlink(p), st.st_mtime_ns)
        elif stat.S_ISREG(st.st_mode):
            out[str(p.relative_to(root))] = ("file", p.read_bytes(), st.st_mtime_ns)
        else:
            out[str(p.relative_to(root))] = (oct(stat.S_IFMT(st.st_mode)), None, st.st_mtime_ns)
    return out


def one_line_error(rc: int, err: str) -> str:
    assert rc == 2, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1 and len(lines[0]) <= MAX_MESSAGE, err
    return lines[0]


def run_args(tiny_model: Path, out: Path, *extra: str) -> list[str]:
    # output.overwrite stays true (the tiny config's): a refusal must hold even where starting over is allowed.
    return ["--config", TINY, f"model.path={tiny_model}", f"output.dir={out}", "train.max_steps=2", *extra]


def states() -> dict[str, dict[str, Any]]:
    """What DeepSpeed writes for a 1-rank ZeRO-2 checkpoint, in miniature (the types the allow-list names)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return {MODEL_PT: {"module": {"ia3_l": torch.ones(4)}, "step": 1, "rng": ckpt.rng_state(), "ds_version": "0.19"},
            OPTIM_PT: {"optimizer_state_dict": {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients,
                                                "single_partition_of_fp32_groups": [torch.zeros(4)]}}}


def write_checkpoint(root: Path, tag: str, meta: dict[str, Any] | None) -> Path:
    d = root / tag
    d.mkdir(parents=True, exist_ok=True)
    for name, state in states().items():
        torch.save(state, d / name)
    if meta is not None:
        (d / "meta.json").write_text(json.dumps(meta))
    return d


def write_run(out: Path, meta: dict[str, Any], steps: tuple[int, ...] = (1,)) -> Path:
    """A run dir of ours holding complete checkpoints at ``steps``, ``latest`` naming the last."""
    out.mkdir(parents=True, exist_ok=True)
    manifest.write_manifest(out)
    (out / "run.yaml").write_text("model: {}\n")
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    root = out / "checkpoints"
    for s in steps:
        write_checkpoint(root, f"step{s}", {**meta, "step": s})
    (root / "latest").write_text(f"step{steps[-1]}")
    return root / f"step{steps[-1]}"


def torch_entries(obj: Any) -> list[tuple[str, bytes]]:
    buf = io.BytesIO()
    torch.save(obj, buf)
    with zipfile.ZipFile(buf) as zf:
        return [(i.filename, zf.read(i)) for i in zf.infolist()]


def raw_zip(entries: list[dict[str, Any]]) -> bytes:
    """A zip written field by field, so an entry may declare what it likes: ``data`` (the bytes stored), and
    optional ``method`` (8 = deflate), ``usize`` (declared inflated size), ``csize`` (declared stored size), ``crc``
    and ``offset`` (where the central directory says its local header is)."""
    out, central = bytearray(), bytearray()
    for e in entries:
        name, data = e["name"].encode(), e["data"]
        method, csize = e.get("method", 0), e.get("csize", len(data))
        usize, crc = e.get("usize", len(data)), e.get("crc", zlib.crc32(data))
        at = len(out)
        out += struct.pack("<4s2B4HL2L2H", b"PK\x03\x04", 20, 0, 0, method, 0, 0x21, crc, csize, usize,
                           len(name), 0) + name + data
        central += struct.pack("<4s4B4HL2L5H2L", b"PK\x01\x02", 20, 0, 20, 0, 0, method, 0, 0x21, crc, csize,
                               usize, len(name), 0, 0, 0, 0, 0, e.get("offset", at)) + name
    cd_at = len(out)
    out += central + struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(entries), len(entries), len(central), cd_at, 0)
    return bytes(out)


def deflate_zeros(n_mib: int) -> tuple[bytes, int]:
    """A raw deflate stream of ``n_mib`` MiB of zeros (about 1 KB per MiB) and its CRC, made in milliseconds: after
    a full flush the compressor restarts, so one flushed block repeats verbatim."""
    zeros = b"\0" * (1 << 20)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    c.compress(zeros)
    c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(n_mib):
        crc = zlib.crc32(zeros, crc)
    return block * n_mib + c.flush(), crc


def bomb(path: Path, n_mib: int) -> Path:
    """A torch.save file whose data.pkl is a deflated ``n_mib`` MiB (torch's reader inflates it)."""
    entries = [{"name": n, "data": d} for n, d in torch_entries({"module": {}})]
    stream, crc = deflate_zeros(n_mib)
    entries[0] = {"name": entries[0]["name"], "data": stream, "method": 8, "usize": n_mib << 20, "crc": crc}
    assert entries[0]["name"].endswith("data.pkl")
    path.write_bytes(raw_zip(entries))
    return path


class Payload:
    """Unpickling this creates ``marker``: an attacker's ``__reduce__``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (pathlib.Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def base_meta(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> dict[str, Any]:
    """meta.json as the real preflight computes it for :func:`run_args` on 1 rank (so a checkpoint carrying it is
    compatible, and each refusal below is the hostile input's)."""
    out = tmp_path_factory.mktemp("fresh") / "out"
    return {**prepare(load_config(TINY, run_args(tiny_model, out)[2:]), ONE).meta, "step": 1}


# -- 1. checkpoint files: zip directory and file type ---------------------------------------------------------

def _lie(path: Path, suffix: str, **fields: Any) -> None:
    """Rewrite the torch file at ``path`` with its entry named ``*suffix`` declaring ``fields``."""
    entries = [{"name": n, "data": d} for n, d in torch_entries(states()[MODEL_PT])]
    next(e for e in entries if e["name"].endswith(suffix)).update(fields)
    path.write_bytes(raw_zip(entries))


def _overlap(path: Path) -> None:
    entries = [{"name": n, "data": d} for n, d in torch_entries(states()[MODEL_PT])]
    size = len(raw_zip(entries))
    # One entry claims most of the file from its start: inside the file, but stored bytes counted twice.
    entries[-1].update(offset=0, csize=size - 200, usize=size - 200)
    path.write_bytes(raw_zip(entries))


def _deflated(path: Path) -> None:
    with zipfile.ZipFile(path) as src:
        items = [(i.filename, src.read(i)) for i in src.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
        for name, data in items:
            dst.writestr(name, data)


def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _symlink_out(path: Path) -> None:
    # A good file outside the checkpoint: links are never ours, wherever they lead.
    target = path.parent.parent.parent.parent / "elsewhere.pt"
    path.rename(target)
    path.symlink_to(target)


def _socket(path: Path) -> None:
    path.unlink()
    cwd = os.getcwd()
    os.chdir(path.parent)  # contextlib.chdir is Python 3.11's
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(path.name)  # relative: AF_UNIX paths are limited to 108 bytes
    finally:
        os.chdir(cwd)


def _chardev(path: Path) -> None:
    path.unlink()
    try:
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 5))  # /dev/zero: a read never ends
    except OSError:
        pytest.skip("cannot create a device node here")


FILE_CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    # case: (what is done to the model states file, text in the refusal)
    "deflated": (_deflated, "is compressed (method 8), which torch.save never writes"),
    "declared-inflation": (lambda p: _lie(p, "data.pkl", usize=1 << 30), "declares 1073741824 bytes stored in"),
    "pickle-over-bound": (lambda p: _lie(p, "data.pkl", usize=MAX_PICKLE + 1, csize=MAX_PICKLE + 1),
                          "a pickle entry"),
    "past-the-end": (lambda p: _lie(p, "data/0", usize=1 << 30, csize=1 << 30), "past the end"),
    "overlapping": (_overlap, "entries overlap"),
    "fifo": (_fifo, "a named pipe (FIFO), not a regular file"),
    "directory": (_directory, "a directory, not a regular file"),
    "symlink-out": (_symlink_out, "a symlink, not a regular file"),
    "socket": (_socket, "a socket, not a regular file"),
    "chardev": (_chardev, "a character device, not a regular file"),
}


@pytest.mark.parametrize("case", list(FILE_CASES))
def test_hostile_checkpoint_file_is_refused_from_its_directory_alone(case: str, tmp_path: Path) -> None:
    make, needle = FILE_CASES[case]
    d = write_checkpoint(tmp_path / "run" / "checkpoints", "step1", None)
    make(d / MODEL_PT)
    before = snapshot(tmp_path)
    with deadline(20), pytest.raises(UsageError) as e:
        check_checkpoint_dir(d)
    msg = str(e.value)
    assert f"checkpoint file {d / MODEL_PT}: " in msg and needle in msg, msg
    assert "train.resume=<dir>" in msg and "\n" not in msg and len(msg) <= MAX_MESSAGE, msg
    assert snapshot(tmp_path) == before


def test_genuine_checkpoint_files_pass_the_scan(tmp_path: Path) -> None:
    """The checks fit what torch.save writes: DeepSpeed-like states, and a multi-entry file of 5 MB of tensors."""
    d = write_checkpoint(tmp_path, "step1", None)
    torch.save({"w": [torch.zeros(1 << 18) for _ in range(5)]}, d / "big_optim_states.pt")
    check_checkpoint_dir(d)


@pytest.mark.parametrize("case", ["bin-bomb", "bin-deflated", "safetensors-fifo", "bin-fifo", "hub-symlink"])
def test_model_weight_files_get_the_same_checks(case: str, tmp_path: Path, tiny_model: Path) -> None:
    """Weight files are read by the preflight too (models/files.py): the zip checks for a ``.bin``, the file type
    for any weight file; a symlink to a regular file (the hub cache's layout) is still followed."""
    import shutil

    from ia3_dist.models.files import check_model_dir

    d = tmp_path / "model"
    shutil.copytree(tiny_model, d)
    st = d / "model.safetensors"
    if case.startswith("bin"):
        st.unlink()
        b = d / "pytorch_model.bin"
        torch.save({"w": torch.ones(2)}, b)
        {"bin-bomb": lambda: bomb(b, 256), "bin-deflated": lambda: _deflated(b), "bin-fifo": lambda: _fifo(b)}[case]()
    elif case == "safetensors-fifo":
        _fifo(st)
    else:
        st.rename(tmp_path / "blob")
        st.symlink_to(tmp_path / "blob")
        check_model_dir(str(d))
        return
    with deadline(20), pytest.raises(UsageError) as e:
        check_model_dir(str(d))
    needle = {"bin-bomb": "is compressed", "bin-deflated": "is compressed",
              "safetensors-fifo": "a named pipe (FIFO), not a regular file",
              "bin-fifo": "no weights"}[case]  # a FIFO alone is no weights file at all: refused before any read
    assert needle in str(e.value), str(e.value)


CLI_FILE_CASES: dict[str, tuple[Callable[[Path, Path], None], str]] = {
    # Through the real preflight (`ia3-dist check`, train.resume=auto): the scan runs where a resume would.
    "fifo-model-states": (lambda d, m: _fifo(d / MODEL_PT), "a named pipe (FIFO)"),
    "fifo-meta": (lambda d, m: _fifo(d / "meta.json"), "a named pipe (FIFO)"),
    "symlinked-meta": (lambda d, m: ((d / "meta.json").rename(d.parent / "m.json"),
                                     (d / "meta.json").symlink_to(d.parent / "m.json")), "a symlink"),
    # The payload sits in a deflated pickle: refused from the directory, before torch inflates or unpickles it.
    "deflated-payload": (lambda d, m: (torch.save({"x": Payload(m)}, d / OPTIM_PT), _deflated(d / OPTIM_PT)),
                         "is compressed"),
    "small-bomb": (lambda d, m: bomb(d / MODEL_PT, 64), "is compressed"),
}


@pytest.mark.parametrize("case", list(CLI_FILE_CASES))
def test_hostile_checkpoint_exits_2_through_the_preflight(case: str, tmp_path: Path, tiny_model: Path,
                                                          base_meta: dict[str, Any],
                                                          capsys: pytest.CaptureFixture) -> None:
    make, needle = CLI_FILE_CASES[case]
    out, marker = tmp_path / "out", tmp_path / "PWNED"
    d = write_run(out, base_meta)
    make(d, marker)
    before = snapshot(tmp_path)
    with deadline(60):
        rc = main(["check", *run_args(tiny_model, out, "train.resume=auto")])
    line = one_line_error(rc, capsys.readouterr().err)
    assert needle in line and str(d) in line, line
    assert snapshot(tmp_path) == before
    assert not marker.exists()


def test_crafted_checkpoint_is_accepted_by_the_same_preflight(tmp_path: Path, tiny_model: Path,
                                                              base_meta: dict[str, Any],
                                                              capsys: pytest.CaptureFixture) -> None:
    """The crafted run dir of the tests above, untouched, passes: each refusal is its hostile input's."""
    out = tmp_path / "out"
    d = write_run(out, base_meta)
    before = snapshot(tmp_path)
    rc = main(["check", *run_args(tiny_model, out, "train.resume=auto")])
    text = capsys.readouterr().out
    assert rc == 0 and f"resuming from {d}" in text and "preflight: OK" in text, text
    assert snapshot(tmp_path) == before


def test_a_damaged_tracker_state_is_refused_by_the_preflight(tmp_path: Path, tiny_model: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    """train.early_stopping's state in meta.json was read only by the trainer: after the model loaded, and after
    output.overwrite had set the output dir's run aside (a resume from another dir's checkpoint). Now the
    preflight reads it as the trainer will: exit 2 naming the file, the output dir as it was."""
    held = ("data.eval_ratio=0.1", "train.eval_every=1", "train.early_stopping.metric=eval_loss")
    src, out = tmp_path / "src", tmp_path / "out"
    meta = prepare(load_config(TINY, run_args(tiny_model, src, *held)[2:]), ONE).meta
    state = {"metric": "eval_loss", "best": "0.9", "best_step": 1, "bad": 0}
    d = write_run(src, {**meta, "selection": {"early_stopping": state}})
    write_run(out, meta)  # the run output.overwrite would set aside
    before = snapshot(tmp_path)
    rc = main(["train", *run_args(tiny_model, out, *held, f"train.resume={d}")])
    line = one_line_error(rc, capsys.readouterr().err)
    assert f"{d / 'meta.json'}: 'selection' holds" in line, line
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("drop", [OPTIM_PT, MODEL_PT])
def test_a_checkpoint_copied_in_part_is_refused_by_the_preflight(drop: str, tmp_path: Path, tiny_model: Path,
                                                                 base_meta: dict[str, Any],
                                                                 capsys: pytest.CaptureFixture) -> None:
    """A file DeepSpeed opens on the saved layout is missing (an rsync cut short): refused naming it, before the
    model loads, not by an IndexError or FileNotFoundError inside DeepSpeed after it (on one rank alone under
    ZeRO-3, whose model states are per rank)."""
    out = tmp_path / "out"
    d = write_run(out, base_meta)
    (d / drop).unlink()
    rc = main(["check", *run_args(tiny_model, out, "train.resume=auto")])
    line = one_line_error(rc, capsys.readouterr().err)
    assert f"checkpoint {d}: saved on 1 rank(s) at ZeRO-2, it lacks {drop} (a copy cut short?)" in line, line


def test_the_files_deepspeed_opens_follow_the_layout() -> None:
    from ia3_dist.runtime.safe_load import missing_files

    z3 = {f"zero_pp_rank_{r}_mp_rank_00_{k}_states.pt" for r in range(4) for k in ("model", "optim")}
    assert missing_files(z3, 4, 3) == []
    assert missing_files(z3 - {"zero_pp_rank_2_mp_rank_00_model_states.pt"}, 4, 3) == \
        ["zero_pp_rank_2_mp_rank_00_model_states.pt"]
    assert missing_files(z3, 8, 3)[:1] == ["zero_pp_rank_4_mp_rank_00_model_states.pt"]
    bf16 = {MODEL_PT, *(f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(2))}
    assert missing_files(bf16, 2, 1) == [] and missing_files({MODEL_PT}, 2, 0) == []
    assert missing_files({MODEL_PT}, 2, 2) == ["zero_pp_rank_0_mp_rank_00_optim_states.pt"]


# -- 2. resume: latest, meta.json, metrics.jsonl -----------------------------------------------------------------

def test_auto_without_latest_is_refused_not_trained_over(tmp_path: Path, tiny_model: Path,
                                                         base_meta: dict[str, Any],
                                                         capsys: pytest.CaptureFixture) -> None:
    """`train` itself (output.overwrite=true from the config): refused before the run files are rewritten; the
    fix it names (train.resume=<newest>) is then accepted by the preflight."""
    out = tmp_path / "out"
    newest = write_run(out, base_meta, steps=(1, 2))
    (out / "checkpoints" / "latest").unlink()
    before = snapshot(tmp_path)
    rc = main(["train", *run_args(tiny_model, out, "train.resume=auto")])
    line = one_line_error(rc, capsys.readouterr().err)
    assert "latest is missing" in line and f"the newest is {newest}" in line, line
    assert f"train.resume={newest}" in line and "output.overwrite=true" in line, line
    assert snapshot(tmp_path) == before
    p = prepare(load_config(TINY, run_args(tiny_model, out, f"train.resume={newest}")[2:]), ONE)
    assert p.resume_from == newest


def test_auto_with_latest_naming_an_incomplete_dir_is_refused(tmp_path: Path, base_meta: dict[str, Any]) -> None:
    out = tmp_path / "out"
    write_run(out, base_meta, steps=(1,))
    (out / "checkpoints" / "step2").mkdir()
    (out / "checkpoints" / "latest").write_text("step2")
    with pytest.raises(UsageError, match=r"names a checkpoint without meta.json.*the newest is .*step1"):
        ckpt.resolve_resume("auto", out)


def test_a_step_written_again_and_cut_off_keeps_a_complete_checkpoint(tmp_path: Path,
                                                                      base_meta: dict[str, Any]) -> None:
    """A save of the step `latest` already names (after a put-off evaluation, or for the best vectors) removed its
    meta.json and wrote over its files in place: cut off midway, resume=auto refused the step (or started at step 1
    with nothing else complete) and a failed write left it torn. Now a save writes stepN.new, and a step written
    again goes aside as stepN.old only once the new one is complete: cut off anywhere, a complete step N is read."""
    base_meta = {**base_meta, "total_steps": 10}
    out = tmp_path / "out"
    saved = write_run(out, base_meta, steps=(4,))
    root = out / "checkpoints"
    assert ckpt._fresh_tag_dir(root, "step4") is None  # the save of step4 again begins
    assert (root / "step4" / "meta.json").is_file() and (root / "step4.new").is_dir()
    assert ckpt.resolve_resume("auto", out) == saved  # cut off while writing: the step as it was
    # A failed write keeps the step as it was, and says so.
    with pytest.raises(ckpt.CheckpointWriteError, match=r"step4 stays the latest checkpoint"):
        ckpt._failed_save(root, "step4", DistEnv(0, 0, 1, 1), OSError(28, "No space left on device"), (1, 0))
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step4"]
    # Cut off between the two renames: step4 aside, the new one complete as step4.new. Both resume forms read it.
    assert ckpt._fresh_tag_dir(root, "step4") is None
    write_checkpoint(root, "step4.new", {**base_meta, "step": 4, "eval_pending": False})
    (root / "step4").rename(root / "step4.old")
    assert ckpt.resolve_resume("auto", out) == root / "step4.new"
    assert ckpt.resolve_resume(str(root / "step4"), out) == root / "step4.new"
    assert ckpt.read_meta(root / "step4.new")["eval_pending"] is False
    # Only the step the pointer names: a step4.new beside an earlier `latest` is a save cut off before its pointer
    # moved, not a checkpoint.
    assert ckpt.cut_between_renames(root / "step6") is None
    # The next save (of any step) puts it in place first, and the old state goes.
    (root / "latest.tmp").write_text("step9")  # a pointer temp a killed save left: it goes
    (root / "notes.tmp").write_text("mine")  # a user's files ending in .tmp stay (and do not stop a save)
    (root / "rsync-partial.tmp").mkdir()
    assert ckpt._fresh_tag_dir(root, "step6") is None
    assert sorted(p.name for p in root.iterdir()) == ["latest", "notes.tmp", "rsync-partial.tmp", "step4",
                                                      "step6.new"]
    (root / "notes.tmp").unlink()
    (root / "rsync-partial.tmp").rmdir()
    assert ckpt.read_meta(root / "step4")["eval_pending"] is False
    # A save cut off before its pointer moved leaves a complete step6.new that nothing reads, and it goes.
    write_checkpoint(root, "step6.new", {**base_meta, "step": 6})
    assert ckpt.resolve_resume("auto", out) == root / "step4"
    assert ckpt._fresh_tag_dir(root, "step8") is None
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step4", "step8.new"]
    # Cut off between the renames with the new one gone too (only step4.old left): the step as it was.
    (root / "step4").rename(root / "step4.old")
    assert ckpt.resolve_resume("auto", out) == root / "step4.old"
    # The run dir's guard counts them as the run's own, not as a stranger's files.
    st = manifest.inspect(out)
    assert "checkpoints/step4.old" in st.owned and "checkpoints/step8.new" in st.owned and not st.foreign
    # latest naming a dir without meta.json and nothing else complete: changed since the save, never trained over.
    shutil.rmtree(root / "step4.old")
    shutil.rmtree(root / "step8.new")
    (root / "step4").mkdir()
    with pytest.raises(UsageError, match=r"latest names step4, which has no meta.json \(it was complete when "
                                         r"saved.*start over with train.resume=none"):
        ckpt.resolve_resume("auto", out)
    # With an earlier complete checkpoint beside it, the refusal names that one.
    write_checkpoint(root, "step2", {**base_meta, "step": 2})
    with pytest.raises(UsageError, match=r"the newest is .*step2"):
        ckpt.resolve_resume("auto", out)


def test_a_save_cut_off_before_its_pointer_moved_is_resumed_and_its_pointers_finished(
        tmp_path: Path, base_meta: dict[str, Any]) -> None:
    """A save puts its complete checkpoint in place, then moves `latest` (and `best`) through their temps. Cut off
    in between: the run's first save left no `latest` at all, and resume=auto refused the complete checkpoint
    (exit 2, which ends a requeue chain); with keep_best, `latest` named the new best while `best` still named the
    old one, and the rotation then deleted the new best. The temp names the checkpoint the save completed: it is
    read, and the next save moves the pointers first."""
    base_meta = {**base_meta, "total_steps": 100}
    out = tmp_path / "out"
    write_run(out, base_meta, steps=(50,))
    root = out / "checkpoints"
    (root / "latest").rename(root / "latest.tmp")  # the first save, cut off before its pointer moved
    assert ckpt.resolve_resume("auto", out) == root / "step50"
    assert ckpt._fresh_tag_dir(root, "step52") is None
    assert (root / "latest").read_text() == "step50" and not (root / "latest.tmp").exists()
    # keep_best: `latest` moved to the new best, `best` not yet.
    write_checkpoint(root, "step60", {**base_meta, "step": 60})
    (root / "latest").write_text("step60")
    (root / "best").write_text("step50")
    (root / "best.tmp").write_text("step60")
    assert ckpt.latest(root, ckpt.BEST) == root / "step60"
    assert ckpt._fresh_tag_dir(root, "step70") is None
    assert (root / "best").read_text() == "step60" and not (root / "best.tmp").exists()
    # A temp naming a checkpoint that never went into place, an earlier one, or anything else: not followed, and
    # the next save removes it.
    for name in ("step80", "step50", "../step60", "x" * 5000):
        (root / "latest.tmp").write_text(name)
        assert ckpt.latest(root) == root / "step60"
        assert ckpt._fresh_tag_dir(root, "step70") is None
        assert (root / "latest").read_text() == "step60" and not (root / "latest.tmp").exists()


def test_a_step_saved_again_and_cut_off_counts_for_roll_backs_and_keeps_the_best_pointer(
        tmp_path: Path, base_meta: dict[str, Any]) -> None:
    """Step 4 saved again (after its put-off evaluation, now the best) and cut off: between its renames, only
    step4.new/.old hold it, and a roll-back to step2 was accepted (its first save then put step4 in place and the
    rotation deleted step2); before its first rename, `best.tmp` named step4, which was still the earlier, pending
    save, and `best` moved there (the rotation then dropped the real best)."""
    base_meta = {**base_meta, "total_steps": 10}
    out = tmp_path / "out"
    write_run(out, base_meta, steps=(2, 4))
    root = out / "checkpoints"
    (root / "best").write_text("step2")
    write_checkpoint(root, "step4.new", {**base_meta, "step": 4})
    (root / "best.tmp").write_text("step4")
    (root / "latest.tmp").write_text("step4")
    # Cut off before its first rename: step4 is the earlier save of that step, not the best.
    assert ckpt.latest(root, ckpt.BEST) == root / "step2"
    assert ckpt._fresh_tag_dir(root, "step6") is None
    assert (root / "best").read_text() == "step2"
    assert sorted(p.name for p in root.iterdir()) == ["best", "latest", "step2", "step4", "step6.new"]
    # Cut off between its renames: a roll-back past it is refused, naming it.
    write_checkpoint(root, "step4.new", {**base_meta, "step": 4})
    (root / "step4").rename(root / "step4.old")
    with pytest.raises(UsageError, match=r"resumes at step 2, but .* holds checkpoints past it \(step4.new\)"):
        ckpt.refuse_later(root / "step2", out)


def test_the_rotation_cut_off_midway_leaves_no_partial_checkpoint(tmp_path: Path, base_meta: dict[str, Any],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The rotation removed an old stepN in place: cut off midway (the removal reaching meta.json last or not at
    all), a stepN with its meta.json and some files gone stayed, which train.resume=<it> then failed to load. It is
    renamed stepN.old first, and the next save removes what is left."""
    base_meta = {**base_meta, "total_steps": 10}
    out = tmp_path / "out"
    write_run(out, base_meta, steps=(2, 4))
    root = out / "checkpoints"
    real = shutil.rmtree
    cut = lambda d, ignore_errors=False: next(iter(sorted(Path(d).iterdir()))).unlink()  # noqa: E731 (one file)
    monkeypatch.setattr(ckpt.shutil, "rmtree", cut)
    ckpt._discard(root / "step2")
    monkeypatch.setattr(ckpt.shutil, "rmtree", real)
    assert not (root / "step2").exists() and (root / "step2.old").is_dir()
    assert [d.name for d in ckpt.complete_checkpoints(root)] == ["step4"]
    assert ckpt._fresh_tag_dir(root, "step6") is None
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step4", "step6.new"]


def test_auto_with_no_complete_checkpoint_still_starts_fresh(tmp_path: Path) -> None:
    """A requeued job that never finished a save starts at step 1, as before."""
    out = tmp_path / "out"
    (out / "checkpoints" / "step1").mkdir(parents=True)  # an unfinished save: no meta.json
    assert ckpt.resolve_resume("auto", out) is None


META_CASES: dict[str, tuple[bytes | Callable[[dict[str, Any]], Any], str]] = {
    # case: (meta.json bytes, or a function of the good meta giving its JSON value; text in the refusal)
    "a-list": (b"[1, 2]", "a JSON list"),
    "a-string": (b'"step1"', "a JSON str"),
    "step-string": (lambda m: {**m, "step": "1"}, "'step' is '1'"),
    "step-float": (lambda m: {**m, "step": 1.0}, "'step' is 1.0"),
    "step-bool": (lambda m: {**m, "step": True}, "'step' is True"),
    "step-huge": (lambda m: {**m, "step": 10**30}, "an integer from 0 to"),
    "step-past-total": (lambda m: {**m, "step": 3}, "outside 1..2"),
    "step-zero": (lambda m: {**m, "step": 0}, "outside 1..2"),
    "step-missing": (lambda m: {k: v for k, v in m.items() if k != "step"}, "no 'step'"),
    # True == 1 and 42.0 == 42 in Python: these used to pass the compatibility check.
    "world-size-bool": (lambda m: {**m, "world_size": True}, "'world_size' is True"),
    "seed-float": (lambda m: {**m, "seed": float(m["seed"])}, "'seed' is 42.0"),
    "shuffle-int": (lambda m: {**m, "shuffle": 1}, "'shuffle' is 1"),
    "data-key-huge": (lambda m: {**m, "data_key": "k" * 500_000}, "'data_key' is 'kkk"),
    "eval-ratio-nan": (b'{"step": 1, "eval_ratio": NaN}', "NaN is not a JSON number"),
    "nested-deep": (b'{"step": 1, "x": ' + b"[" * 200_000 + b"]" * 200_000 + b"}", "nested too deeply"),
    "int-digits": (b'{"step": 1' + b"0" * 5000 + b"}", "unreadable meta.json"),
    "too-large": (b'{"step": 1, "pad": "' + b" " * (2 << 20) + b'"}', "larger than 1048576 bytes"),
}


@pytest.mark.parametrize("case", list(META_CASES))
def test_bad_meta_is_refused_before_anything_is_written(case: str, tmp_path: Path, tiny_model: Path,
                                                        base_meta: dict[str, Any],
                                                        capsys: pytest.CaptureFixture) -> None:
    """Through `train` (the traceback of one such case came after run.yaml was rewritten)."""
    body, needle = META_CASES[case]
    out = tmp_path / "out"
    d = write_run(out, base_meta)
    (d / "meta.json").write_bytes(body if isinstance(body, bytes) else json.dumps(body(base_meta)).encode())
    before = snapshot(tmp_path)
    rc = main(["train", *run_args(tiny_model, out, "train.resume=auto")])
    line = one_line_error(rc, capsys.readouterr().err)
    assert needle in line and str(d / "meta.json") in line, line
    # An earlier step of the run would be refused while this one stays beside it: the fix says to move it out.
    assert f"move {d} out of the run's directory" in line, line
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("make, needle", [
    (lambda f: os.mkfifo(f), "a named pipe (FIFO)"),
    (lambda f: f.write_bytes(b"step1" + b" " * (1 << 20)), "larger than 4096 bytes"),
    (lambda f: f.mkdir(), "a directory"),
])
def test_latest_that_is_not_a_small_file_is_refused(tmp_path: Path, base_meta: dict[str, Any],
                                                    make: Callable[[Path], Any], needle: str) -> None:
    """An explicit train.resume=<checkpoints dir> elsewhere: the output-dir guard never sees its ``latest``."""
    root = tmp_path / "copied" / "checkpoints"
    write_checkpoint(root, "step1", base_meta)
    make(root / "latest")
    with deadline(20), pytest.raises(UsageError, match=re.escape(needle)):
        ckpt.resolve_resume(str(root), tmp_path / "out")


@pytest.mark.parametrize("body", [b'{"tool": "ia3-dist", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                                  b'{"tool": "ia3-dist", "pad": "' + b" " * (2 << 20) + b'"}', None])
def test_damaged_manifest_counts_as_none(tmp_path: Path, base_meta: dict[str, Any], body: bytes | None) -> None:
    """Deeply nested (a RecursionError traceback before), huge, or a FIFO: the dir is not taken for ours, and the
    guard refuses it with its usual one line."""
    out = tmp_path / "out"
    write_run(out, base_meta)
    f = out / manifest.MANIFEST
    f.unlink()
    if body is None:
        os.mkfifo(f)
    else:
        f.write_bytes(body)
    with deadline(20):
        assert manifest.read_manifest(out) is None
        with pytest.raises(UsageError, match="holds another run's checkpoints|ia3-dist writes a file there"):
            ckpt.guard_output_dir(out, "none", False)


def test_metrics_damage_is_trimmed_not_fatal(tmp_path: Path) -> None:
    """What a resume does with metrics.jsonl (loop.Trainer calls this one function): a torn last line is dropped
    and said, junk lines skipped and counted, kept lines byte-identical, steps past the checkpoint gone."""
    assert loop.trim_metrics is trim_metrics
    f = tmp_path / "metrics.jsonl"
    good = [f'{{"step": {s}, "loss": {1.0 / s}}}\n'.encode() for s in (1, 2, 3, 4)]
    junk = [b"not json\n", b"[1, 2]\n", b'{"step": "2"}\n', b'{"loss": 1.0}\n', b"\xff\xfe\n",
            b'{"step": 2, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n", b"9" * (2 << 20) + b"\n"]
    f.write_bytes(good[0] + junk[0] + good[1] + b"".join(junk[1:]) + b"\n" + good[2] + good[3]
                  + b'{"step": 5, "lo')
    note = trim_metrics(f, 3)
    assert f.read_bytes() == b"".join(good[:3])
    assert note == f"{f}: dropped its last line (13), cut off mid-write; skipped 7 line(s) that are not metric records"
    assert trim_metrics(f, 3) is None and f.read_bytes() == b"".join(good[:3])
    # Only a torn line: an empty log, and the run goes on.
    f.write_bytes(b'{"st')
    assert "cut off" in trim_metrics(f, 3) and f.read_bytes() == b""
    assert not (tmp_path / "metrics.jsonl.tmp").exists()
    assert "metrics.jsonl.tmp" in manifest.RUN_FILES  # a kill mid-rewrite leaves only a name the run owns


def test_a_put_off_evaluation_is_logged_once_over_resumes(tmp_path: Path) -> None:
    """A checkpoint saved before its step's evaluation (a signal came) resumes by running that evaluation first. An
    attempt that ran it and was killed before its next checkpoint left its line: the next resume from the same
    checkpoint logged it a second time. Its training line at that step stays, as do the other steps' evaluations."""
    f = tmp_path / "metrics.jsonl"
    lines = ['{"step": 2, "eval_loss": 0.9}\n', '{"step": 4, "epoch": 0, "loss": 1.5}\n',
             '{"step": 4, "eval_loss": 0.8}\n', '{"step": 5, "epoch": 0, "loss": 1.4}\n']
    f.write_text("".join(lines))
    assert trim_metrics(f, 4, eval_pending=True) is None
    assert f.read_text() == "".join(lines[:2])
    f.write_text("".join(lines))
    assert trim_metrics(f, 4) is None and f.read_text() == "".join(lines[:3])


def test_metrics_on_a_full_disk_are_cut_in_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rewrite fails (the disk that cut the line is still full): the file is truncated after its last record
    up to the checkpoint (which needs no space), so the next line logged does not join the torn one."""
    import errno

    import ia3_dist.train.metrics as metrics_mod

    def full(*a: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    f = tmp_path / "metrics.jsonl"
    f.write_bytes(b'{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
    monkeypatch.setattr(metrics_mod.os, "replace", full)
    note = trim_metrics(f, 2)
    assert note == f"{f}: could not rewrite it (No space left on device); cut it after its last record up to step 2"
    assert f.read_bytes() == b'{"step": 1}\n{"step": 2}\n'
    assert not (tmp_path / "metrics.jsonl.tmp").exists()
    # The last kept record lost its newline to the kill (complete JSON, cut before "\n"): the cut ends the line,
    # so the next record logged does not join it.
    f.write_bytes(b'{"step": 1}\n{"step": 2}')
    assert "could not rewrite it" in trim_metrics(f, 2)
    assert f.read_bytes() == b'{"step": 1}\n{"step": 2}\n'
    # Resuming a put-off evaluation: its line goes in the cut too (the resume logs it again).
    f.write_bytes(b'{"step": 2, "loss": 1.5}\n{"step": 2, "eval_loss": 0.8}\n{"step": 3, "loss": 1.4}\n')
    assert "could not rewrite it" in trim_metrics(f, 2, eval_pending=True)
    assert f.read_bytes() == b'{"step": 2, "loss": 1.5}\n'


# -- 3. DeepSpeed values that pass DeepSpeed's models and fail in training ------------------------------------

def _ds(tmp_path: Path, stage: int, top: dict[str, Any] | None = None, zero: dict[str, Any] | None = None,
        fp16: dict[str, Any] | None = None) -> str:
    body: dict[str, Any] = {"zero_optimization": {"stage": stage, **(zero or {})}, **(top or {})}
    if fp16 is not None:
        body["fp16"] = fp16
    f = tmp_path / "ds.json"
    f.write_text(json.dumps(body))
    return str(f)


DS_REFUSED: dict[str, tuple[int, dict[str, Any], dict[str, Any], dict[str, Any] | None, str]] = {
    # case: (stage, top-level keys, zero_optimization keys, fp16 section, text in the refusal)
    "predivide-zero2": (2, {"gradient_predivide_factor": 2.0}, {}, None, "'gradient_predivide_factor' is 2.0"),
    "predivide-zero3": (3, {"gradient_predivide_factor": 8}, {}, None, "ZeRO-3 with reduce_scatter"),
    "prescale-zero2": (2, {"prescale_gradients": True}, {}, None, "'prescale_gradients' is True"),
    "predivide-zero": (0, {"gradient_predivide_factor": 0}, {}, None, "must be > 0"),
    "predivide-negative": (1, {"gradient_predivide_factor": -1.5}, {}, None, "must be > 0"),
    "reduce-bucket-1e13": (2, {}, {"reduce_bucket_size": 1e13}, None, "'zero_optimization.reduce_bucket_size' is"),
    "reduce-bucket-zero3": (3, {}, {"reduce_bucket_size": 2**31 + 2}, None, "outside 1..2147483648"),
    "reduce-bucket-fraction": (2, {}, {"reduce_bucket_size": 5e8 + 0.5}, None, "reduce_bucket_size"),
    "prefetch-bucket-1e13": (3, {}, {"stage3_prefetch_bucket_size": 1e13}, None, "stage3_prefetch_bucket_size"),
    "prefetch-alias": (3, {}, {"prefetch_bucket_size": 10**15}, None, "'zero_optimization.prefetch_bucket_size'"),
    "allgather-odd": (2, {}, {"allgather_bucket_size": 500000001}, None, "multiple of 2"),
    "allgather-zero": (1, {}, {"allgather_bucket_size": 0}, None, "outside 2..2147483648"),
    "steps-per-print-zero": (0, {"steps_per_print": 0}, {}, None, "'steps_per_print' is 0"),
    "loss-scale-window-zero": (0, {}, {}, {"enabled": "auto", "loss_scale_window": 0}, "fp16.loss_scale_window"),
    "scale-power-huge": (0, {}, {}, {"enabled": "auto", "initial_scale_power": 4000}, "fp16.initial_scale_power"),
    # Loaders around the launcher's hardened one (load_universal: torch.load(weights_only=False) of the
    # optimizer's files) and old spellings DeepSpeed still honours that the launcher's checks would not see.
    "load-universal": (2, {"checkpoint": {"load_universal": True}}, {}, None, "checkpoint.load_universal is not"),
    "node-local-storage": (1, {"checkpoint": {"tag_validation": "Warn", "use_node_local_storage": True}}, {}, None,
                           "checkpoint.use_node_local_storage"),
    "checkpoint-not-object": (0, {"checkpoint": []}, {}, None, "'checkpoint' must be an object"),
    "bfloat16-alias": (0, {"bfloat16": {"enabled": True}}, {}, None, "'bfloat16' is an old DeepSpeed key"),
    "optimizer-param-typo": (2, {"optimizer": {"type": "AdamW", "params": {"weight_decya": 0.1}}}, {}, None,
                             "optimizer.params.weight_decya is no parameter of torch's AdamW"),
    "optimizer-max-grad-norm": (1, {"optimizer": {"params": {"max_grad_norm": 1.0}}}, {}, None,
                                "max_grad_norm is no parameter of torch's AdamW (torch_adam: true); the clipping "
                                "norm is train.grad_clip"),
    "cpu-adam-fused-param": (2, {"optimizer": {"params": {"capturable": True}}},
                             {"offload_optimizer": {"device": "cpu"}}, None,
                             "capturable is no parameter of DeepSpeed's CPU Adam"),
    # DeepSpeed's pydantic refusal names the field and the reason, not only the model ("1 validation error").
    "deepspeed-pydantic": (0, {"compile": {"enabled": True}}, {}, None,
                           "DeepSpeed refuses this config: CompileConfig.enabled: Extra inputs are not permitted"),
    "torch-autocast": (2, {"torch_autocast": {"enabled": True, "dtype": "torch.bfloat16"}}, {}, None,
                       "'torch_autocast' runs the forward pass in a precision train.precision does not name"),
    "cpu-offload": (2, {}, {"cpu_offload": True}, None, "'zero_optimization.cpu_offload' is an old"),
    "cpu-offload-param": (3, {}, {"cpu_offload_param": True}, None, "offload_param: {"),
    # DeepSpeed's own parser (DeepSpeedConfig) raises these inside deepspeed.initialize.
    "comm-dtype": (2, {"communication_data_type": "fp8"}, {}, None, "Invalid communication_data_type"),
    "allreduce-op": (0, {"gradient_allreduce_op": "max"}, {}, None, "Invalid gradient_allreduce_op"),
    # Every micro-batch an optimizer step: train.grad_accum would silently mean nothing.
    "unmanaged-accumulation": (2, {"managed_gradient_accumulation": False}, {}, None,
                               "'managed_gradient_accumulation' is False"),
    # Each cuts DeepSpeed's data-parallel world (an AssertionError in deepspeed.initialize after the ranks met).
    "sequence-parallel": (2, {"sequence_parallel_size": 2}, {}, None, "'sequence_parallel_size' is 2"),
    "autotp": (2, {"tensor_parallel": {"autotp_size": 2}}, {}, None, "'tensor_parallel.autotp_size' is 2"),
    # ZeRO-1/2 offload to cpu only, yet build CPU Adam for nvme, which fails at the first step on a GPU.
    "nvme-optimizer-zero2": (2, {}, {"offload_optimizer": {"device": "nvme", "nvme_path": "/tmp"}}, None,
                             "offload_optimizer.device nvme needs stage 3"),
    # deepspeed.initialize joins the missing path: a TypeError on every rank after the ranks met.
    "nvme-without-path": (3, {}, {"offload_optimizer": {"device": "nvme"}}, None,
                          "offload_optimizer.device nvme needs nvme_path"),
    # DeepSpeed's checkpointing API is called by models written for it, not by transformers' models.
    "deepspeed-activation-checkpointing": (2, {"activation_checkpointing": {"partition_activations": True,
                                                                            "cpu_checkpointing": True}}, {}, None,
                                           "'activation_checkpointing' configures DeepSpeed's checkpointing API"),
}


@pytest.mark.parametrize("case", list(DS_REFUSED))
def test_deepspeed_value_that_fails_in_training_is_refused(case: str, tmp_path: Path) -> None:
    stage, top, zero, fp16, needle = DS_REFUSED[case]
    f = _ds(tmp_path, stage, top, zero, fp16)
    with pytest.raises(UsageError) as e:
        dsc.resolve(load_config(TINY, [f"deepspeed.config={f}"]), 2, 64)
    msg = str(e.value)
    assert msg.startswith(f"{f}: ") and needle in msg and "\n" not in msg and len(msg) <= MAX_MESSAGE, msg


@pytest.mark.parametrize("stage, top, zero", [
    (0, {"gradient_predivide_factor": 2.0}, {}),  # the engine's own allreduce supports it
    (1, {"gradient_predivide_factor": 2.0}, {}),  # ZeRO-1 does not partition gradients
    (2, {"gradient_predivide_factor": 2.0, "prescale_gradients": True}, {"reduce_scatter": False}),
    (2, {"gradient_predivide_factor": 2.0, "gradient_allreduce_op": "sum"}, {}),
    (2, {}, {"reduce_bucket_size": 5e8, "allgather_bucket_size": 2e8}),  # DeepSpeed's documented values
    (2, {"checkpoint": {"tag_validation": "Fail"}}, {}),  # only checks that the ranks agree on the tag
    (3, {}, {"reduce_bucket_size": 2**31, "stage3_prefetch_bucket_size": 0}),
])
def test_deepspeed_values_that_train_are_kept(tmp_path: Path, stage: int, top: dict[str, Any],
                                              zero: dict[str, Any]) -> None:
    dsc.resolve(load_config(TINY, [f"deepspeed.config={_ds(tmp_path, stage, top, zero)}"]), 2, 64)


def test_deepspeed_value_exits_2_through_the_preflight(tmp_path: Path, tiny_model: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    f = _ds(tmp_path, 2, {"gradient_predivide_factor": 2.0}, {"reduce_bucket_size": 1e13})
    rc = main(["check", *run_args(tiny_model, out, f"deepspeed.config={f}")])
    line = one_line_error(rc, capsys.readouterr().err)
    assert "reduce_bucket_size" in line or "gradient_predivide_factor" in line, line
    assert not out.exists()


# -- real processes: the zip bomb's memory, the FIFO's hang ------------------------------------------------------

def run_check(args: list[str], timeout: float) -> tuple[int, str, float, float]:
    """``python -m ia3_dist check`` as its own process: (exit code, stderr, seconds, peak RSS in MiB of that
    process alone)."""
    m = measured_cli(["check", *args], timeout, address_space=None)
    return m.rc, m.err, m.seconds, m.peak_rss_mib


# The preflight of the tiny model imports torch, transformers and DeepSpeed: about 0.6-0.8 GiB. Unfixed, a 1 GiB
# pickle costs at least that twice over (inflated, then copied) on top.
BOMB_MIB = 1024
MAX_CHECK_RSS_MIB = 1536


@pytest.mark.slow
def test_zip_bomb_and_fifo_in_a_real_process(tmp_path: Path, tiny_model: Path, base_meta: dict[str, Any]) -> None:
    """A 1 MB model-states file inflating to 1 GiB, then a FIFO in its place: each `check` exits 2 at once with
    one line, its peak RSS under MAX_CHECK_RSS_MIB, the run dir untouched."""
    out = tmp_path / "out"
    d = write_run(out, base_meta)
    bomb(d / MODEL_PT, BOMB_MIB)
    assert (d / MODEL_PT).stat().st_size < 2 << 20
    for needle in ("is compressed", "a named pipe (FIFO)"):
        before = snapshot(tmp_path)
        rc, err, secs, rss = run_check(run_args(tiny_model, out, "train.resume=auto"), timeout=120)
        line = one_line_error(rc, err)
        assert needle in line and str(d / MODEL_PT) in line, line
        print(f"check: exit 2 in {secs:.1f} s, peak RSS {rss:.0f} MiB ({needle})")
        assert rss < MAX_CHECK_RSS_MIB, f"peak RSS {rss:.0f} MiB"
        assert snapshot(tmp_path) == before
        _fifo(d / MODEL_PT)


@pytest.mark.slow
def test_real_resume_over_a_torn_metrics_line_and_a_planted_step_dir(tmp_path: Path, tiny_model: Path) -> None:
    """A real 1-rank run stopped after step 1, its metrics.jsonl then cut mid-line (a kill, a full disk): the
    resume (real DeepSpeed checkpoint files through the zip checks and the hardened loader) finishes, saying once
    what it dropped, and the log holds exactly steps 1 and 2.

    The run dir also holds an unfinished step2/ (a save killed before its meta.json, or a dir from whoever had
    the run dir before) with links where the step-2 save writes, DeepSpeed's file and ours: the save writes into
    a fresh dir, and the files the links named keep their bytes."""
    out = tmp_path / "out"
    extra = ("train.log_every=1", "checkpoint.every=1", "output.report_to=[none]")
    args = run_args(tiny_model, out, *extra)
    first = launch([*args, "train.stop_after_steps=1"], timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    log = out / "metrics.jsonl"
    log.write_bytes(log.read_bytes() + b'{"step": 2, "loss": 1.')
    planted = out / "checkpoints" / "step2"
    planted.mkdir()
    victims = {name: tmp_path / f"victim-{i}" for i, name in enumerate((f"{ckpt.META}.tmp", MODEL_PT))}
    for name, victim in victims.items():
        victim.write_text("the user's own file\n")
        os.symlink(victim, planted / name)
    second = launch([*args, "train.resume=auto"], timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    text = second.stdout + second.stderr
    assert text.count("cut off mid-write") == 1, text[-3000:]
    assert [json.loads(ln)["step"] for ln in log.read_text().splitlines() if '"loss"' in ln] == [1, 2]
    assert all(v.read_text() == "the user's own file\n" for v in victims.values())
    assert ckpt.latest(out / "checkpoints") == planted
    assert not any(f.is_symlink() for f in planted.rglob("*")) and (planted / MODEL_PT).stat().st_size > 0
