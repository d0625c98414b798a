"""Output dirs are never destroyed by surprise: each defect of the security review, reproduced with its input.

1. ``output.overwrite=true`` removes only what a run writes (the manifest's names), never other files, also not
   under ``checkpoints/``;
2. without it, another run's files or a user's unrelated files in ``output.dir`` are refused, not overwritten;
3. ``export --out`` refuses a dir holding another model, with or without ``--force``;
4. an ``output.dir`` that is a file or cannot be written is refused in preflight;
5. a damaged ``checkpoints/latest`` or ``meta.json`` exits 2 naming the file, and ``latest`` never leads outside
   the checkpoints dir.

Every refusal exits 2 before any process group starts and leaves each pre-existing file byte-identical.
"""

from __future__ import annotations

import ast
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch.distributed

from ia3_dist.cli import main
from ia3_dist.errors import UsageError
from ia3_dist.runtime import checkpoint as ckpt
from ia3_dist.runtime import manifest
from ia3_dist.train.prepare import PID_FILE, PREEMPTED_FILE, start_run_dir

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny-cpu.yaml")
META = {"world_size": 1, "micro_batch_size": 4, "grad_accum": 2, "seed": 42, "shuffle": True, "total_steps": 2,
        "data_key": "x", "n_examples": 8, "group_by_length": False, "order_version": 1, "step": 2}


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every entry under ``root``: file bytes, None for a dir (symlinks by their target)."""
    out: dict[str, bytes | None] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = ("->" + os.readlink(p)).encode() if p.is_symlink() else (p.read_bytes() if p.is_file() else None)
    return out


def w(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def previous_run(out: Path, with_manifest: bool = True, checkpoint: bool = True) -> None:
    """What a finished run of ours leaves behind (checkpoint.at_end)."""
    out.mkdir(parents=True, exist_ok=True)
    if with_manifest:
        manifest.write_manifest(out)
    w(out / "run.yaml", "model: {}\n")
    w(out / "ds_config.json", "{}\n")
    w(out / "metrics.jsonl", '{"step": 1, "loss": 2.0}\n')
    w(out / "metrics.png", b"\x89PNG fake")
    w(out / "adapter" / "adapter_model.safetensors", b"weights")
    w(out / "adapter" / "adapter_config.json", "{}")
    w(out / "tensorboard" / "events.out.tfevents.1", b"tb")
    if checkpoint:
        w(out / "checkpoints" / "step2" / "meta.json", json.dumps(META))
        w(out / "checkpoints" / "step2" / "mp_rank_00_model_states.pt", b"state")
        w(out / "checkpoints" / "latest", "step2")
        w(out / "checkpoints" / "zero_to_fp32.py", "# DeepSpeed's recovery script")


def run_cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    rc = main(args)
    captured = capsys.readouterr()
    return rc, captured.err + captured.out


def train_args(tiny_model: Path, out: Path | str, *extra: str) -> list[str]:
    return ["--config", TINY, f"model.path={tiny_model}", f"output.dir={out}", "train.max_steps=2", *extra]


# -- 1. overwrite removes only what a run writes -------------------------------------------------------------


def test_overwrite_removes_only_run_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    previous_run(out)
    w(out / "notes.txt", "my notes")
    w(out / "checkpoints" / "mine.txt", "keep me")
    w(out / "data" / "train.json", "[]")
    user = {k: v for k, v in snapshot(out).items() if k.startswith(("notes", "checkpoints/mine", "data"))}
    before = snapshot(out)
    gone = start_run_dir(out, start_over=True)
    assert {"run.yaml", "metrics.jsonl", "adapter", "tensorboard", "checkpoints/step2", "checkpoints/latest"} <= \
        set(gone)
    # Set aside until the new run has started (a start that fails, exit 2 on a tracker setting, puts it back).
    left = {k: v for k, v in snapshot(out).items() if not k.startswith(manifest.REPLACED)}
    assert sorted(left) == sorted([*user, manifest.MANIFEST, "checkpoints"])
    assert all(left[k] == v for k, v in user.items())
    w(out / "run.yaml", "the failed start's")
    assert sorted(manifest.restore_aside(out)) == sorted(gone)
    assert snapshot(out) == before
    start_run_dir(out, start_over=True)
    manifest.discard_aside(out)
    assert sorted(snapshot(out)) == sorted([*user, manifest.MANIFEST, "checkpoints"])
    # With nothing of the user's in it, checkpoints/ goes too.
    (out / "checkpoints" / "mine.txt").unlink()
    previous_run(out)
    start_run_dir(out, start_over=True)
    assert not (out / "checkpoints").exists()


def test_overwrite_sets_aside_the_runs_eval_results_but_never_a_users_eval_folder(tmp_path: Path) -> None:
    """eval/ holding only what `ia3-dist eval` writes (results.json, PNGs) is the run's: a start over sets it aside
    with the rest (its scores are the earlier run's). An eval/ with anything else in it is the user's: kept."""
    out = tmp_path / "out"
    previous_run(out)
    w(out / "eval" / "results.json", '{"rows": []}')
    w(out / "eval" / "tiny_mc-acc_none.png", b"\x89PNG fake")
    assert "eval" in start_run_dir(out, start_over=True)
    assert not (out / "eval").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    w(mine / "eval" / "my_eval_script.py", "print('mine')")
    w(mine / "eval" / "results.json", "{}")
    w(mine / "notes.txt", "my notes")
    st = manifest.inspect(mine)
    assert "eval" in st.foreign and "eval" not in st.owned
    start_run_dir(mine, start_over=True)
    manifest.discard_aside(mine)
    assert (mine / "eval" / "my_eval_script.py").read_text() == "print('mine')"
    assert (mine / "eval" / "results.json").is_file()


def test_a_start_over_killed_before_it_started_loses_nothing(tmp_path: Path) -> None:
    """Killed (SIGKILL) between setting the earlier run aside and starting, a start over leaves that run in the
    aside dir. A later start without output.overwrite, which would discard it once started, is refused naming it
    and how to put it back; a second start over replaces the dead start's files, keeps the run aside, and puts it
    back when it fails too."""
    out = tmp_path / "out"
    previous_run(out)
    before = snapshot(out)
    gone = start_run_dir(out, start_over=True)
    w(out / "run.yaml", "the dead start's")  # its setup files; then SIGKILL
    w(out / "ds_config.json", "{}")
    for resume in ("auto", "none"):
        with pytest.raises(UsageError, match=rf"{manifest.REPLACED} holds the files of a run that a start with "
                                             rf"output.overwrite=true set aside; .* delete what that start wrote "
                                             rf"\(ds_config.json, run.yaml\), then move everything in"):
            ckpt.guard_output_dir(out, resume, False)
    ckpt.guard_output_dir(out, "none", True)
    assert sorted(start_run_dir(out, start_over=True)) == sorted(gone)
    assert not (out / "run.yaml").exists() and not (out / "ds_config.json").exists()
    w(out / "run.yaml", "the second start's")  # which fails (exit 2 on a tracker setting)
    assert sorted(manifest.restore_aside(out)) == sorted(gone)
    assert snapshot(out) == before


def test_an_aside_cut_off_midway_or_left_beside_a_trained_run(tmp_path: Path) -> None:
    """A start over killed while it moved the earlier run aside: the next start over finishes the move (the
    earlier run's files still in the dir are moved, not deleted) and a failure puts the whole run back. An aside a
    started run could not remove, beside that run's results, is no dead start's: a resume is not refused, and a
    start over replaces it with the run now there."""
    out = tmp_path / "out"
    previous_run(out)
    before = snapshot(out)
    aside = out / manifest.REPLACED
    for rel in ("adapter", "checkpoints/step2", "checkpoints/latest"):  # moved before the kill; the rest was not
        (aside / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(out / rel, aside / rel)
    with pytest.raises(UsageError, match=r"killed before it trained.* or keep that run: move everything in") as e:
        ckpt.guard_output_dir(out, "auto", False)  # half of it moved: nothing to delete, only to move back
    assert "delete what" not in str(e.value)
    moved = start_run_dir(out, start_over=True)
    assert {"adapter", "checkpoints/step2", "metrics.jsonl", "run.yaml"} <= set(moved)
    assert sorted(manifest.restore_aside(out)) == sorted(moved)
    assert snapshot(out) == before

    w(aside / "metrics.jsonl", "a remnant its start could not remove\n")
    ckpt.guard_output_dir(out, "auto", False)  # the trained run resumes
    start_run_dir(out, start_over=True)
    assert (aside / "metrics.jsonl").read_bytes() == before["metrics.jsonl"]
    assert manifest.discard_aside(out) == "" and not aside.exists()
    assert manifest.discard_aside(out) == ""  # nothing set aside: nothing to say


@pytest.mark.parametrize("plant", ["checkpoints-link", "step-link", "foreign-name", "link-top", "file-as-dir"])
def test_an_aside_holding_what_no_start_over_sets_aside_is_refused(tmp_path: Path, plant: str) -> None:
    """A run dir from elsewhere whose aside holds a link (the earlier run's checkpoints would move through it, out
    of the dir) or a name no run writes (put back over the user's own file of that name should the start fail) is
    refused, with or without output.overwrite, before anything moves."""
    out = tmp_path / "out"
    previous_run(out)
    w(out / "notes.txt", "the user's notes")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    aside = out / manifest.REPLACED
    aside.mkdir()
    if plant == "checkpoints-link":
        (aside / "checkpoints").symlink_to(elsewhere, target_is_directory=True)
    elif plant == "step-link":
        (aside / "checkpoints").mkdir()
        (aside / "checkpoints" / "step9").symlink_to(elsewhere, target_is_directory=True)
    elif plant == "foreign-name":
        w(aside / "notes.txt", "planted")
    elif plant == "link-top":
        (aside / "run.yaml").symlink_to(w(elsewhere / "x.yaml", "x"))
    else:
        w(aside / "adapter", "a file where a run sets a directory aside")
    before = snapshot(tmp_path)
    for overwrite in (True, False):
        with pytest.raises(UsageError, match=rf"{manifest.REPLACED} \(holds .*which ia3-dist never sets aside\); "
                                             rf"move it away"):
            ckpt.guard_output_dir(out, "none", overwrite)
    assert snapshot(tmp_path) == before
    # What a start over puts there itself is sound: set aside and put back.
    shutil.rmtree(aside)
    gone = start_run_dir(out, start_over=True)
    assert manifest.inspect(out).clashes == [] and gone
    assert sorted(manifest.restore_aside(out)) == sorted(gone)


def test_overwrite_never_follows_or_deletes_symlinks(tmp_path: Path) -> None:
    precious = w(tmp_path / "elsewhere" / "model.safetensors", b"precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / "adapter").symlink_to(precious.parent, target_is_directory=True)
    before = snapshot(tmp_path)
    with pytest.raises(UsageError, match="adapter"):
        ckpt.guard_output_dir(out, "none", True)
    start_run_dir(out, start_over=True)  # even if the guard were skipped
    assert precious.read_bytes() == b"precious" and (out / "adapter").is_symlink()
    assert {k: v for k, v in snapshot(tmp_path).items() if manifest.MANIFEST not in k} == before


def test_overwrite_check_reports_what_stays(tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    previous_run(out)
    w(out / "notes.txt", "my notes")
    before = snapshot(out)
    rc, text = run_cli(["check", *train_args(tiny_model, out, "output.overwrite=true")], capsys)
    assert rc == 0, text
    assert "kept: notes.txt" in text and "removes the earlier run's files" in text
    assert snapshot(out) == before


# -- 2. without overwrite, nothing of another run or of the user is overwritten -------------------------------

def _foreign_run(out: Path) -> None:
    previous_run(out, with_manifest=False, checkpoint=False)


def _our_finished_run(out: Path) -> None:
    previous_run(out, checkpoint=False)


def _user_files(out: Path) -> None:
    w(out / "notes.txt", "my notes")
    w(out / "results" / "table.csv", "a,b\n")


def _our_checkpoints_and_user_file(out: Path) -> None:
    previous_run(out)
    w(out / "notes.txt", "my notes")


def _user_run_yaml(out: Path) -> None:
    w(out / "run.yaml", "my own run.yaml\n")


REFUSED = {
    # case: (build, extra overrides, text in the message)
    "another-run-no-manifest": (_foreign_run, [], "holds another run's files"),
    "our-finished-run": (_our_finished_run, [], "holds another run's files (adapter"),
    "user-files": (_user_files, [], "not an ia3-dist run dir"),
    "user-run-yaml": (_user_run_yaml, [], "holds another run's files (run.yaml)"),
    "checkpoints-and-user-file": (_our_checkpoints_and_user_file, [], "holds another run's checkpoints (step2)"),
    "resume-into-user-files": (_user_files, ["train.resume=auto"], "not an ia3-dist run dir"),
    # The trackers' records are results once a step was logged (they hold its curves).
    "logged-run-trackers": (lambda out: (start_run_dir(out, False), w(out / "metrics.jsonl", '{"step": 1}\n'),
                                         w(out / "tensorboard" / "events.out.tfevents.1", "x")), [],
                            "holds another run's files (metrics.jsonl, tensorboard)"),
}


@pytest.mark.parametrize("command", ["check", "train"])
@pytest.mark.parametrize("case", list(REFUSED))
def test_occupied_output_dir_is_refused(case: str, command: str, tmp_path: Path, tiny_model: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    build, extra, needle = REFUSED[case]
    out = tmp_path / "out"
    out.mkdir()
    build(out)
    before = snapshot(out)
    args = train_args(tiny_model, out, "output.overwrite=false", *extra)
    rc, text = run_cli([command, *args], capsys)
    assert rc == 2, text
    assert needle in text and str(out) in text, text
    assert "Traceback" not in text
    assert not torch.distributed.is_initialized()
    assert snapshot(out) == before


def test_refusal_names_the_first_few_entries(tmp_path: Path) -> None:
    out = tmp_path / "out"
    for i in range(9):
        w(out / f"f{i}.txt", "x")
    with pytest.raises(UsageError, match=r"f0.txt, f1.txt, f2.txt, f3.txt, f4.txt and 4 more"):
        ckpt.guard_output_dir(out, "none", False)


ACCEPTED = {
    # The dir may be used as is: nothing there is lost.
    "new": (lambda out: None, "none", False),
    "empty": (lambda out: out.mkdir(), "none", False),
    # What the other ranks see when rank 0 is a step ahead of them (write_run_files before dist.init).
    "setup-files-of-ours": (lambda out: (start_run_dir(out, False), w(out / "run.yaml", "x"),
                                         w(out / PID_FILE, "1")), "none", False),
    # ... and once rank 0 has started its trackers too (TensorBoard makes its dir at once), before any step.
    "trackers-started-of-ours": (lambda out: (start_run_dir(out, False), w(out / "run.yaml", "x"),
                                              w(out / "tensorboard" / "events.out.tfevents.1", "x"),
                                              w(out / "trackers.json", "{}"), w(out / "wandb" / "run" / "x", "x")),
                                 "none", False),
    "manifest-being-written": (lambda out: w(out / (manifest.MANIFEST + ".tmp"), "{"), "none", False),
    "resume-ours-with-user-file": (lambda out: (_our_checkpoints_and_user_file(out)), "auto", False),
    "resume-ours-without-manifest": (lambda out: previous_run(out, with_manifest=False), "auto", False),
    "overwrite-beside-user-files": (_user_files, "none", True),
}


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_guard_accepts(case: str, tmp_path: Path) -> None:
    build, resume, overwrite = ACCEPTED[case]
    out = tmp_path / "out"
    build(out)
    ckpt.guard_output_dir(out, resume, overwrite)


def test_a_resume_from_another_dir_or_of_a_finished_run_without_checkpoints(tmp_path: Path) -> None:
    """train.resume=<another run dir's checkpoint> is no licence to take over this dir: its run is not the one
    resumed (refused as without a resume; overwrite sets it aside). train.resume=auto over a finished run that kept
    no checkpoint (checkpoint.at_end=false) would start over, replacing its adapter: refused too. A run killed
    before its first checkpoint (no adapter) restarts under auto, as a requeue needs."""
    out, other = tmp_path / "out", tmp_path / "other"
    previous_run(out)
    previous_run(other)
    theirs = other / "checkpoints" / "step2"
    with pytest.raises(UsageError, match="holds another run's checkpoints"):
        ckpt.guard_output_dir(out, str(theirs), False)
    ckpt.guard_output_dir(out, str(out / "checkpoints" / "step2"), False)  # its own: a roll-back
    ckpt.guard_output_dir(out, str(theirs), True)
    assert ckpt.resumes_own(str(out / "checkpoints" / "step2"), out) and not ckpt.resumes_own(str(theirs), out)
    finished = tmp_path / "finished"
    previous_run(finished, checkpoint=False)
    with pytest.raises(UsageError, match=r"holds a finished run \(adapter/\) and no checkpoint to resume"):
        ckpt.guard_output_dir(finished, "auto", False)
    ckpt.guard_output_dir(finished, "auto", True)
    # Killed between the two renames of a step saved again (keep=1: no other checkpoint): stepN.old and stepN.new
    # and no stepN. auto resumes stepN.new; the guard counted only stepN dirs and called the run finished, telling
    # the user to overwrite it.
    caught = tmp_path / "caught"
    previous_run(caught)
    (caught / "checkpoints" / "step2").rename(caught / "checkpoints" / "step2.old")
    w(caught / "checkpoints" / "step2.new" / "meta.json", json.dumps(META))
    ckpt.guard_output_dir(caught, "auto", False)
    assert ckpt.resolve_resume("auto", caught).name == "step2.new"
    crashed = tmp_path / "crashed"
    start_run_dir(crashed, False)
    w(crashed / "metrics.jsonl", '{"step": 1, "loss": 2.0}\n')
    ckpt.guard_output_dir(crashed, "auto", False)


def test_output_dir_guard_semantics_of_test_resume(tmp_path: Path) -> None:
    """tests/test_resume.py test_output_dir_guard on a finished run: refused as another run's checkpoints without
    resume or overwrite (the checkpoints stay), accepted with train.resume=auto."""
    out = tmp_path / "out"
    previous_run(out)
    before = snapshot(out)
    with pytest.raises(UsageError, match="holds another run's checkpoints"):
        ckpt.guard_output_dir(out, "none", False)
    ckpt.guard_output_dir(out, "auto", False)
    assert ckpt.resolve_resume("auto", out) == out / "checkpoints" / "step2"
    assert snapshot(out) == before


# -- 3. export never overwrites another model -----------------------------------------------------------------

@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    """A small IA3 adapter of the tiny model, made without training."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ia3_dist.config.schema import IA3Section
    from ia3_dist.models.ia3 import apply_ia3

    d = tmp_path_factory.mktemp("adapter")
    model = apply_ia3(AutoModelForCausalLM.from_pretrained(str(tiny_model)), IA3Section())
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(1.5)
    model.save_pretrained(str(d))
    AutoTokenizer.from_pretrained(str(tiny_model)).save_pretrained(str(d))
    return d


def _other_model(d: Path) -> None:
    w(d / "config.json", '{"model_type": "llama"}')
    w(d / "model-00001-of-00002.safetensors", os.urandom(64))
    w(d / "model-00002-of-00002.safetensors", os.urandom(64))
    w(d / "model.safetensors.index.json", '{"weight_map": {}}')
    w(d / "tokenizer.json", "{}")


@pytest.mark.parametrize("force", [False, True])
def test_export_refuses_a_dir_with_another_model(adapter: Path, tmp_path: Path, force: bool,
                                                 capsys: pytest.CaptureFixture) -> None:
    d = tmp_path / "other"
    _other_model(d)
    before = snapshot(d)
    rc, text = run_cli(["export", "--adapter", str(adapter), "--out", str(d), *(["--force"] if force else [])],
                       capsys)
    assert rc == 2, text
    assert str(d) in text and ("did not write" in text or "not empty" in text), text
    assert snapshot(d) == before


def test_export_force_replaces_only_its_own_earlier_export(adapter: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    from ia3_dist.tools.inference import EXPORT_MARKER as MARKER

    d = tmp_path / "merged"
    assert run_cli(["export", "--adapter", str(adapter), "--out", str(d)], capsys)[0] == 0
    recorded = json.loads((d / MARKER).read_text())["files"]
    assert "model.safetensors" in recorded and "config.json" in recorded
    assert not [p for p in d.iterdir() if p.name.startswith(".ia3-dist-export-staging")]
    # Again without --force: refused, nothing changes.
    before = snapshot(d)
    rc, text = run_cli(["export", "--adapter", str(adapter), "--out", str(d)], capsys)
    assert rc == 2 and "--force" in text and snapshot(d) == before
    # An earlier (sharded) export of ours left a shard this one does not write; the user added notes.
    w(d / "model-00002-of-00002.safetensors", b"stale shard")
    marker = json.loads((d / MARKER).read_text())
    marker["files"] += ["model-00002-of-00002.safetensors", "../outside.txt"]
    (d / MARKER).write_text(json.dumps(marker))
    outside = w(tmp_path / "outside.txt", "not in the export dir")
    w(d / "notes.txt", "my notes")
    rc, text = run_cli(["export", "--adapter", str(adapter), "--out", str(d), "--force"], capsys)
    assert rc == 0, text
    assert not (d / "model-00002-of-00002.safetensors").exists()
    assert (d / "notes.txt").read_text() == "my notes" and outside.read_text() == "not in the export dir"
    assert (d / "model.safetensors").is_file()
    # A file at a name the export writes, that the earlier export did not write: refused, nothing changes.
    marker = json.loads((d / MARKER).read_text())
    marker["files"].remove("config.json")
    (d / MARKER).write_text(json.dumps(marker))
    before = snapshot(d)
    rc, text = run_cli(["export", "--adapter", str(adapter), "--out", str(d), "--force"], capsys)
    assert rc == 2 and "config.json would be overwritten" in text, text
    assert snapshot(d) == before


def test_export_out_is_a_file(adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    f = w(tmp_path / "model.bin", b"weights")
    rc, text = run_cli(["export", "--adapter", str(adapter), "--out", str(f), "--force"], capsys)
    assert rc == 2 and "is a file" in text and f.read_bytes() == b"weights"


# -- 4. an output.dir that cannot be a writable directory fails preflight -------------------------------------

def _sys_unwritable() -> Path | None:
    d = Path("/sys/kernel")
    if not d.is_dir():
        return None
    try:
        fd, name = tempfile.mkstemp(dir=d)
    except OSError:
        return d
    os.close(fd)
    os.unlink(name)
    return None


@pytest.mark.parametrize("command", ["check", "train"])
@pytest.mark.parametrize("case", ["regular-file", "under-a-file", "read-only-mount", "chmod-555", "sysfs"])
def test_unusable_output_dir_fails_preflight(case: str, command: str, tmp_path: Path, tiny_model: Path,
                                             capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    w(tmp_path / "notes.txt", "my notes")
    if case == "regular-file":
        out, needle = w(tmp_path / "out", "a file"), "is a file"
    elif case == "under-a-file":
        out, needle = w(tmp_path / "out", "a file") / "run", "is not a directory"
    elif case == "read-only-mount":
        # What a read-only mount reports; as root, os.access alone would say it is writable.
        monkeypatch.setattr(os, "statvfs", lambda path: SimpleNamespace(f_flag=os.ST_RDONLY))
        out, needle = tmp_path / "out", "read-only filesystem"
    elif case == "chmod-555":
        if os.geteuid() == 0:
            pytest.skip("root writes into a 0555 dir (the read-only-mount and sysfs cases cover root)")
        (tmp_path / "ro").mkdir(mode=0o555)
        out, needle = tmp_path / "ro" / "out", "not writable"
    else:
        base = _sys_unwritable()
        if base is None:
            pytest.skip("no unwritable /sys/kernel here")
        out, needle = base / "ia3-dist-test-out", "not writable"
    before = snapshot(tmp_path)
    rc, text = run_cli([command, *train_args(tiny_model, out)], capsys)
    monkeypatch.undo()
    assert rc == 2, text
    assert needle in text and str(out) in text and "Traceback" not in text, text
    assert not torch.distributed.is_initialized()
    assert snapshot(tmp_path) == before


def test_writability_probe_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    mtime = out.stat().st_mtime_ns
    manifest.check_writable_dir(out, "output.dir")
    manifest.check_writable_dir(out / "a" / "b", "output.dir")
    assert list(out.iterdir()) == []
    if getattr(os, "O_TMPFILE", 0):
        assert out.stat().st_mtime_ns == mtime  # an unnamed temp file never touches the dir
    # Where the filesystem has no O_TMPFILE the probe is a named file for an instant: another rank listing the
    # dir then (or a probe a kill left) is no foreign entry that stops a fresh run.
    (out / f"{manifest.PROBE_PREFIX}abc123").write_bytes(b"")
    ckpt.guard_output_dir(out, "none", False)


# -- 5. damaged checkpoint pointers and metadata --------------------------------------------------------------

def _run_with_checkpoint(out: Path) -> Path:
    previous_run(out)
    return out / "checkpoints"


CORRUPT = {
    # case: (file to write under out, its bytes, train.resume, text in the message)
    "latest-not-utf8": ("checkpoints/latest", b"\xff\xfe\x00step2", "auto", "not UTF-8"),
    "latest-escapes": ("checkpoints/latest", b"../../evil", "auto", "not a stepN dir"),
    "latest-absolute": ("checkpoints/latest", b"/etc", "auto", "not a stepN dir"),
    "latest-dotdot-inside": ("checkpoints/latest", b"step2/../../../evil", "auto", "not a stepN dir"),
    "latest-empty": ("checkpoints/latest", b"", "auto", "not a stepN dir"),
    "latest-explicit-root": ("checkpoints/latest", b"../../evil", "{out}/checkpoints", "not a stepN dir"),
    "meta-list": ("checkpoints/step2/meta.json", b"[1, 2]", "auto", "a JSON list"),
    "meta-not-utf8": ("checkpoints/step2/meta.json", b"\xff\xfe{}", "auto", "unreadable"),
    "meta-syntax": ("checkpoints/step2/meta.json", b'{"step": ', "auto", "unreadable"),
    "meta-string-explicit": ("checkpoints/step2/meta.json", b'"step2"', "{out}/checkpoints/step2", "a JSON str"),
    "root-meta-list": ("checkpoints/meta.json", b"[]", "{out}/checkpoints", "a JSON list"),
}


@pytest.mark.parametrize("case", list(CORRUPT))
def test_damaged_checkpoint_files_exit_2_naming_them(case: str, tmp_path: Path, tiny_model: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    rel, data, resume, needle = CORRUPT[case]
    out = tmp_path / "out"
    _run_with_checkpoint(out)
    if case == "root-meta-list":
        (out / "checkpoints" / "latest").unlink()
    w(out / rel, data)
    # A complete checkpoint outside the checkpoints dir, for a pointer to lead to.
    w(tmp_path / "evil" / "meta.json", json.dumps(META))
    before = snapshot(tmp_path)
    args = train_args(tiny_model, out, "output.overwrite=false", f"train.resume={resume.format(out=out)}")
    rc, text = run_cli(["check", *args], capsys)
    assert rc == 2, text
    assert needle in text and str(out / rel) in text and "Traceback" not in text, text
    assert snapshot(tmp_path) == before


def test_latest_never_leads_outside(tmp_path: Path) -> None:
    root = _run_with_checkpoint(tmp_path / "out")
    assert ckpt.latest(root) == root / "step2"
    w(tmp_path / "evil" / "meta.json", json.dumps(META))
    (root / "step9").symlink_to(tmp_path / "evil", target_is_directory=True)
    (root / "latest").write_text("step9")
    with pytest.raises(UsageError, match="not a stepN dir"):
        ckpt.latest(root)


# -- the manifest's names are the ones the code writes --------------------------------------------------------

def test_manifest_names_match_the_writers() -> None:
    assert ckpt.TAG.fullmatch(ckpt.tag_for(12)) and manifest.CKPT_DIR.fullmatch(ckpt.tag_for(12))
    assert all(manifest.CKPT_DIR.fullmatch(ckpt.tag_for(12) + s) and ckpt.STAGED.fullmatch(ckpt.tag_for(12) + s)
               for s in (ckpt.NEW, ckpt.OLD))
    assert ckpt.LATEST in manifest.CKPT_FILES and ckpt.LATEST + ".tmp" in manifest.CKPT_FILES
    assert ckpt.root_of(Path("o")).name == manifest.CHECKPOINTS
    from ia3_dist.runtime import adapter

    assert {"adapter", "adapter" + adapter.NEW} <= manifest.RUN_DIRS
    assert manifest.ADAPTER_ASIDE.fullmatch("adapter" + adapter.OLD + secrets.token_hex(6))
    assert {PID_FILE, PREEMPTED_FILE} <= manifest.SETUP_FILES
    # Every `<out> / "name"` a run writes into the output dir is one the manifest owns.
    written: set[str] = set()
    # demo.py writes its assets into the cache, not into an output dir.
    sources = [f for d in ("train", "runtime") for f in (ROOT / "ia3_dist" / d).glob("*.py") if f.name != "demo.py"]
    for f in sources:
        for node in ast.walk(ast.parse(f.read_text())):
            if (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Constant)
                    and isinstance(node.right.value, str)
                    and re.search(r"\b(p\.out|out|path\.parent)\b", ast.unparse(node.left))):
                written.add(node.right.value)
    names = {n for n in written if "/" not in n and n not in (manifest.MANIFEST,)}
    assert names, "the scan found no writes"
    unknown = names - manifest.RUN_FILES - manifest.RUN_DIRS - {"checkpoints"}
    assert not unknown, f"written into output.dir but not owned by the manifest: {unknown}"


# -- a real run, twice, over the user's files -----------------------------------------------------------------

def ckpt_entries(out: Path) -> list[str]:
    """checkpoints/ without DeepSpeed's recovery scripts (ZeRO saves copy them there)."""
    return sorted(c.name for c in (out / "checkpoints").iterdir() if not c.name.startswith("zero_to_"))


@pytest.mark.slow
def test_rerun_with_overwrite_keeps_user_files(tmp_path: Path, tiny_model: Path) -> None:
    """The demo's rerun (output.overwrite=true) starts over and leaves files it did not write alone, also in
    checkpoints/."""
    from _util import check, launch, metrics

    out = tmp_path / "run"
    notes = w(out / "notes.txt", "my notes\n")
    mine = w(out / "checkpoints" / "mine.txt", "keep me too\n")
    args = ["--config", TINY, f"model.path={tiny_model}", f"output.dir={out}", "output.overwrite=true",
            "train.log_every=1", "checkpoint.keep=5"]
    check(launch([*args, "train.max_steps=2", "checkpoint.every=1"]))
    assert ckpt_entries(out) == ["latest", "mine.txt", "step1", "step2"]
    assert manifest.read_manifest(out) is not None
    first_adapter = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    proc = check(launch([*args, "train.max_steps=1", "train.lr=1e-3"]))
    assert "kept: checkpoints/mine.txt, notes.txt" in proc.stdout, proc.stdout[-3000:]
    # Started over: step 1 of 1 from scratch; the first run's step2 checkpoint and metrics are gone.
    assert [r["step"] for r in metrics(out) if "loss" in r] == [1]
    assert ckpt_entries(out) == ["latest", "mine.txt", "step1"]
    assert ckpt.read_meta(out / "checkpoints" / "step1")["total_steps"] == 1
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() != first_adapter
    assert notes.read_text() == "my notes\n" and mine.read_text() == "keep me too\n"


@pytest.mark.slow
def test_a_signal_while_the_ranks_meet_puts_the_replaced_run_back(tmp_path: Path, tiny_model: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 1 stops at its own checks (exit 2) while rank 0, which set the earlier run aside (output.overwrite),
    waits for it in the process group's rendezvous; the job script then forwards USR1. Rank 0 puts the earlier
    run back and exits 75 at once: the signal only set a flag, the run stayed set aside, and rank 0 waited for the
    launcher's SIGKILL (deepspeed's 30 s later) or, under a plain srun, the rendezvous timeout (30 min). Not at
    once: a meeting that ends within 10 s of the signal leaves it to the first step boundary, where every rank
    stops together. (The ranks look like a plain srun's: preempted.json tells the job script to requeue; on a
    launcher's SIGTERM it is not written, or a rank failing at every start would be requeued for ever.)"""
    import signal

    from _util import spawn_slurm_style

    from ia3_dist.errors import EXIT_PREEMPTED

    out = tmp_path / "out"
    previous_run(out, checkpoint=False)
    before = snapshot(out)
    # The ranks' job and step, as srun sets them: under Slurm, preempted.json tells the job script to requeue.
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
    procs = spawn_slurm_style(train_args(tiny_model, out, "output.overwrite=true"),
                              per_rank=[[], ["data.path=/no/such.json"]])
    try:
        assert procs[1].wait(timeout=300) == 2
        deadline = time.monotonic() + 300
        while not (out / manifest.REPLACED).is_dir():  # set aside: rank 0 goes on to meet rank 1
            assert procs[0].poll() is None and time.monotonic() < deadline, procs[0].communicate()[0][-3000:]
            time.sleep(0.1)
        time.sleep(2.0)
        t0 = time.monotonic()
        procs[0].send_signal(signal.SIGUSR1)  # slurm/lib.sh's forwarded warning
        log = procs[0].communicate(timeout=60)[0]
        took = time.monotonic() - t0
    finally:
        for p in procs:
            p.kill()
    assert procs[0].returncode == EXIT_PREEMPTED and 9 < took < 20, (took, log[-3000:])
    assert "stopped by SIGUSR1 while the ranks met, before the first step" in log, log[-3000:]
    assert "the earlier run's files are back" in log, log[-3000:]
    assert json.loads((out / PREEMPTED_FILE).read_text())["step"] == 0
    (out / PREEMPTED_FILE).unlink()
    assert snapshot(out) == before


def test_a_run_training_in_the_dir_is_refused_a_stale_pid_file_is_not(tmp_path: Path) -> None:
    """A second run in an output dir where one trains now (a job submitted twice, sweep --force over a live sweep)
    would write the same checkpoints: rank 0's preflight refuses it, naming the pid. A pid file naming a process
    that is not an ia3-dist run (a killed run's pid, reused), this process, or junk refuses nothing."""
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "-m", "ia3_dist"])
    other = subprocess.Popen(["sleep", "60"])
    try:
        # Until a child has exec'd, its cmdline is this process's (forked): wait for their own.
        deadline = time.monotonic() + 30
        while (b"ia3_dist" not in Path(f"/proc/{live.pid}/cmdline").read_bytes()
               or not Path(f"/proc/{other.pid}/cmdline").read_bytes().startswith(b"sleep")):
            assert time.monotonic() < deadline, "the children never exec'd"
            time.sleep(0.01)
        for body, refused in ((str(live.pid), True), (str(other.pid), False), (str(os.getpid()), False),
                              ("not a pid", False), ("", False), ("-1", False), ("9" * 40, False)):
            (tmp_path / PID_FILE).write_text(body)
            if refused:
                with pytest.raises(UsageError, match=f"is in use: a run is training there now .rank 0 is pid {body}"):
                    manifest.refuse_live_run(tmp_path)
            else:
                manifest.refuse_live_run(tmp_path)
        # With the host and the process's start stamp, as rank 0 writes it: refused; the same pid with another
        # stamp names a process that has gone, whose pid an ia3-dist process took since (a job's container hands
        # pids out in the same order every run): refuses nothing.
        host = socket.gethostname()
        stamp = manifest.start_stamp(live.pid)
        assert stamp is not None
        (tmp_path / PID_FILE).write_text(f"{live.pid}\n{host}\n{stamp}\n")
        with pytest.raises(UsageError, match="is in use"):
            manifest.refuse_live_run(tmp_path)
        boot, ticks = stamp.split()
        (tmp_path / PID_FILE).write_text(f"{live.pid}\n{host}\n{boot} {int(ticks) - 1}\n")
        manifest.refuse_live_run(tmp_path)
        assert manifest.pid_file_alive(tmp_path) is False
        # slurm/lib.sh's trap reads the same file the same way before it signals the pid.
        lib = ROOT / "slurm" / "lib.sh"
        for body, want in ((f"{live.pid}\n{host}\n{stamp}\n", str(live.pid)),
                           (f"{live.pid}\n{host}\n{boot} {int(ticks) - 1}\n", ""),
                           (f"{live.pid}\n{host}\n", str(live.pid))):
            (tmp_path / PID_FILE).write_text(body)
            got = subprocess.run(["bash", "-c", f'. "{lib}"; OUTPUT_DIR="{tmp_path}" ia3_rank0_pid'],
                                 capture_output=True, text=True, timeout=30)
            assert got.stdout.strip() == want, (body, got.stdout, got.stderr)
        live.kill()
        live.wait()
        (tmp_path / PID_FILE).write_text(str(live.pid))
        manifest.refuse_live_run(tmp_path)  # it ended: the file is stale
    finally:
        live.kill()
        other.kill()


def test_flushing_never_follows_a_link(tmp_path: Path) -> None:
    """What a save flushes is what it wrote: a link (here to a FIFO with no writer, whose open would block, or to
    a file elsewhere) is neither opened nor flushed, and flushing one by name is an error."""
    from ia3_dist.runtime import safe_io

    d = tmp_path / "ckpt"
    w(d / "sub" / "a.pt", b"x")
    os.mkfifo(tmp_path / "fifo")
    (d / "fifo").symlink_to(tmp_path / "fifo")
    (d / "elsewhere").symlink_to(tmp_path / "ckpt" / "sub", target_is_directory=True)
    seen: list[str] = []
    real = os.fsync
    os.fsync = lambda fd: (seen.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd))[1]
    try:
        safe_io.fsync_tree(d)
        with pytest.raises(OSError):
            safe_io.fsync(d / "fifo")
    finally:
        os.fsync = real
    assert seen == [str(d / "sub" / "a.pt"), str(d / "sub"), str(d)]


def test_adapter_put_in_place_through_a_linked_output_dir(tmp_path: Path, tiny_model: Path) -> None:
    """``output.dir`` named through a link (runs/x -> /scratch/..., common on clusters): the adapter is written and
    its dir flushed where the link leads. Leftovers of killed writes (a partial ``adapter.new``, adapters set
    aside and not removed) go; the adapter there before is replaced whole and leaves nothing behind."""
    from transformers import AutoModelForCausalLM

    from ia3_dist.config import IA3Section
    from ia3_dist.models.ia3 import apply_ia3
    from ia3_dist.runtime import adapter
    from ia3_dist.runtime.adapter import save_adapter

    real = tmp_path / "scratch" / "run"
    real.mkdir(parents=True)
    (tmp_path / "run").symlink_to(real, target_is_directory=True)
    out = tmp_path / "run"
    model = apply_ia3(AutoModelForCausalLM.from_pretrained(str(tiny_model)), IA3Section())
    w(out / "adapter" / "adapter_model.safetensors", b"the earlier adapter")
    w(out / "adapter.new" / "adapter_config.json", b"{")  # a killed write's
    w(out / ("adapter" + adapter.OLD + "0123456789ab") / "x", b"kept by NFS once")
    save_adapter(model, out / "adapter", True, extra=lambda d: (d / "template.json").write_text("{}"))
    assert sorted(p.name for p in real.iterdir()) == ["adapter"]
    assert {"adapter_model.safetensors", "adapter_config.json", "template.json"} <= set(os.listdir(real / "adapter"))
    from _util import adapter_tensors

    assert adapter_tensors(real / "adapter")
