"""What a run owns in its output dir, and whether a directory can be written at all.

A run writes a fixed set of names into ``output.dir`` (:data:`RUN_FILES`, :data:`RUN_DIRS`; inside
``checkpoints/`` only ``stepN`` dirs, the ``latest`` and ``best`` pointers and DeepSpeed's recovery scripts,
:data:`CKPT_FILES`).
Rank 0 records that in :data:`MANIFEST` before it writes anything else, so a later start can tell one of our runs
from a directory that merely holds files: the guard (``checkpoint.guard_output_dir``) refuses the latter, and
``output.overwrite`` removes only :func:`inspect`'s ``owned`` entries. ``adapter/``, ``tensorboard/``, ``wandb/`` and
``mlflow/`` count as the run's as a whole; ``checkpoints/`` does not, so a file of the user's there stays. Symlinks
are never ours.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import stat
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import UsageError
from .safe_io import read_bounded

MANIFEST = ".ia3-dist-run.json"
TOOL = "ia3-dist"
FORMAT = 1
CHECKPOINTS = "checkpoints"
PID_FILE = "rank0.pid"
"""Rank 0's pid while it trains, for schedulers' preemption traps (slurm/lib.sh signal it)."""
ALIVE_FILE = "rank0.alive"
"""Touched every minute by rank 0 while it trains (:class:`PidHeartbeat`): ``summary`` on another host tells a live
run by it. Apart from the pid file, whose time says when the attempt started (on the file server's clock, which
``summary`` compares with the batch logs')."""
MAX_PID_FILE = 512  # a pid and a host name
PID_MAX = 1 << 22  # the kernel's largest pid_max
# What a live run's rank 0 runs as (python -m ia3_dist under a launcher, launch.py, the ia3-dist script): a pid
# file naming another program is stale (its run was killed; the pid was reused).
_RUN_CMD = re.compile(rb"ia3_dist|ia3-dist|launch\.py")
REPLACED = ".ia3-dist-replaced"
"""output.overwrite: the earlier run's files, set aside here until the new run has started (see :func:`set_aside`)."""
# Written before the process group starts (or only to signal it): a dir of our own that holds nothing else never
# trained, so a fresh start over it loses nothing. This is also what the other ranks may see when rank 0 is a
# little ahead of them, and they must not refuse their own launch.
SETUP_FILES = frozenset({"run.yaml", "ds_config.json", PID_FILE, ALIVE_FILE, "preempted.json", "hung.json", MANIFEST,
                         MANIFEST + ".tmp"})
# What rank 0's trackers write as they start, also before the process group (train/run.py start_trackers):
# tensorboard/ (SummaryWriter makes it at once), wandb/, mlflow/ and their run ids. Beside no metrics.jsonl (no
# step was ever logged: every logged step writes a line there first) they are a start's, not results.
TRACKER_START = frozenset({"tensorboard", "wandb", "mlflow", "trackers.json"})
# trackers.json, wandb/ and mlflow/: the experiment trackers' run ids and local records (train/trackers.py);
# metrics.jsonl.tmp: a resume rewrites metrics.jsonl through it (train/metrics.py trim_metrics).
RUN_FILES = SETUP_FILES | {"metrics.jsonl", "metrics.jsonl.tmp", "metrics.png", "trackers.json", "examples.jsonl",
                           "examples.jsonl.tmp"}
EVAL_DIR = "eval"
"""``ia3-dist eval``'s results of the run's checkpoints: the run's (output.overwrite sets them aside with it)."""
# adapter.new: the adapter being written (runtime/adapter.py save_adapter).
RUN_DIRS = frozenset({"adapter", "adapter.new", "tensorboard", "wandb", "mlflow", CHECKPOINTS, REPLACED, EVAL_DIR})
ADAPTER_ASIDE = re.compile(r"adapter\.old\.[0-9a-f]{12}")
"""The adapter a new one replaces, set aside under a name of its own until it is removed (save_adapter)."""
PROBE_PREFIX = ".ia3-dist-probe-"
"""A named writability probe (where the filesystem has no O_TMPFILE: NFS, GPFS), removed at once."""
# checkpoint.save's names (tag_for, LATEST and its temp file); tests/test_output_safety.py keeps them in step.
# DeepSpeed's engine.save_checkpoint copies its recovery scripts beside the tag dirs on every ZeRO save.
# stepN.new / stepN.old: a save in progress, and a step's previous state while it is written again.
CKPT_DIR = re.compile(r"step[0-9]+(\.new|\.old)?")
CKPT_FILES = frozenset({"latest", "latest.tmp", "best", "best.tmp", "zero_to_fp32.py", "zero_to_torch.py"})


@dataclass
class DirState:
    """What :func:`inspect` found in an output dir; entries are paths relative to it, sorted."""

    manifest: dict[str, Any] | None = None
    owned: list[str] = field(default_factory=list)
    """Names a run writes, of the kind it writes them (a file, or a real directory)."""
    foreign: list[str] = field(default_factory=list)
    """Names a run never writes: the user's, or another tool's."""
    clashes: list[str] = field(default_factory=list)
    """Names a run writes, but of another kind (a symlink, a file where it makes a dir): writing would destroy them."""

    @property
    def entries(self) -> list[str]:
        return sorted(self.owned + self.foreign + self.clashes)

    @property
    def unclaimed(self) -> list[str]:
        """Owned names that, without a manifest, could as well be someone else's (the manifest's temp file never
        is: it only exists while rank 0 writes the manifest)."""
        return [] if self.manifest is not None else [e for e in self.owned if e != MANIFEST + ".tmp"]

    @property
    def results(self) -> list[str]:
        """Owned entries that a training step produced (everything but the setup files, an empty checkpoints/ and,
        before any logged step, what the trackers wrote as they started: the other ranks may see rank 0's)."""
        started = "metrics.jsonl" not in self.owned
        return [e for e in self.owned if e not in SETUP_FILES and e != CHECKPOINTS
                and not (started and e in TRACKER_START)]


ADAPTER_STEP_FILE = "ia3_dist_step.json"
"""In an adapter dir: ``{"step": N, "final": bool, "base_weights": str}``, the optimizer step whose vectors it holds
(the last step's, or the best evaluation's under ``train.early_stopping.final: best``), for ``ia3-dist eval`` to
place it among the checkpoints, whether the run had ended (false: a ``train.stop_after_steps`` chunk), for
``summary``, and the fingerprint of the base weights it was trained on, for the loaders to check the base."""


def adapter_record(adapter_dir: Path) -> dict[str, Any] | None:
    """:data:`ADAPTER_STEP_FILE` of ``adapter_dir`` as a dict; None when there is none or it is unreadable (the dir
    may come from elsewhere: bounded, never through a link)."""
    try:
        rec = json.loads(read_bounded(adapter_dir / ADAPTER_STEP_FILE, 4096).decode("utf-8"))
    except (UsageError, ValueError, RecursionError):
        return None
    return rec if isinstance(rec, dict) else None


def few(names: list[str], n: int = 5) -> str:
    """``a, b, c`` or ``a, b, c and 4 more``: for messages."""
    head = ", ".join(names[:n])
    return head + (f" and {len(names) - n} more" if len(names) > n else "")


MAX_MANIFEST = 1 << 20
"""Ours is under 1 KB; a larger file is not read whole."""


def read_manifest(out: Path) -> dict[str, Any] | None:
    """The manifest if it is one of ours; a damaged or foreign one counts as none (the dir is then not ours), as
    does anything but a small regular file (a FIFO would block the read; deep nesting would recurse)."""
    f = out / MANIFEST
    try:
        if not stat.S_ISREG(f.lstat().st_mode):
            return None
        with open(f, "rb") as fh:
            raw = fh.read(MAX_MANIFEST + 1)
        if len(raw) > MAX_MANIFEST:
            return None
        m = json.loads(raw.decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return m if isinstance(m, dict) and m.get("tool") == TOOL else None


def _kind_ok(p: Path, want_dir: bool) -> bool:
    # A symlink is never ours: writing through it would land outside the output dir.
    return not p.is_symlink() and (p.is_dir() if want_dir else p.is_file())


def inspect(out: Path) -> DirState:
    """Sort the entries of ``out`` into owned, foreign and clashing; raises UsageError if it cannot be listed."""
    st = DirState()
    if not out.is_dir():
        return st
    try:
        for e in _listing(out):
            name = e.name
            if name.startswith(PROBE_PREFIX):
                continue  # another rank's writability probe, there for an instant (or left by a kill: harmless)
            is_dir = name in RUN_DIRS or bool(ADAPTER_ASIDE.fullmatch(name))
            if name == EVAL_DIR and not _eval_dir_ours(e):
                st.foreign.append(name)  # a folder of the user's under that name: never set aside
            elif name == REPLACED and _kind_ok(e, True) and (odd := _aside_odd(e)):
                # Moved into and put back from: a link in it would carry the run's files elsewhere, a name no run
                # sets aside would be put back over the user's file of that name should the start fail.
                st.clashes.append(f"{name} (holds {odd}, which ia3-dist never sets aside)")
            elif name in RUN_FILES or is_dir:
                if not _kind_ok(e, is_dir):
                    kind = "directory" if is_dir else "file"
                    st.clashes.append(f"{name} (ia3-dist writes a {kind} there, this is not one)")
                elif name == CHECKPOINTS:
                    _inspect_checkpoints(e, st)
                else:
                    st.owned.append(name)
            else:
                st.foreign.append(name)
    except OSError as e:
        raise UsageError(f"output.dir {out}: cannot read it ({e.strerror or e}); fix its permissions or pick "
                         f"another output.dir") from None
    st.manifest = read_manifest(out) if MANIFEST in st.owned else None
    return st


def _aside_odd(aside: Path) -> str | None:
    """The first entry of a :data:`REPLACED` dir that :func:`set_aside` never puts there (a symlink anywhere it
    moves into or out of, a name a run does not write, a kind it does not write under that name); None when
    there is none."""
    for top in _listing(aside):
        name = top.name
        if name == CHECKPOINTS:
            if not _kind_ok(top, True):
                return f"a {name} that is not a directory"
            for c in _listing(top):
                if not (CKPT_DIR.fullmatch(c.name) or c.name in CKPT_FILES) \
                        or not _kind_ok(c, c.name not in CKPT_FILES):
                    return f"{name}/{c.name}"
        elif name == EVAL_DIR:
            if not _eval_dir_ours(top):
                return name
        elif name in RUN_FILES:
            if not _kind_ok(top, False):
                return name
        elif (name in RUN_DIRS and name != REPLACED) or ADAPTER_ASIDE.fullmatch(name):
            if not _kind_ok(top, True):
                return name
        else:
            return name
    return None


EVAL_FILES = re.compile(r"results\.json|[^/]+\.png|\.[^/]+\.tmp")
"""What ``ia3-dist eval`` writes into ``eval/``: results.json, a PNG per metric, and their temp files."""


def _eval_dir_ours(d: Path) -> bool:
    """Whether ``eval/`` is ``ia3-dist eval``'s: a real directory holding only what it writes (regular files)."""
    if d.is_symlink() or not d.is_dir():
        return False
    return all(EVAL_FILES.fullmatch(f.name) and f.is_file() and not f.is_symlink() for f in _listing(d))


def _listing(d: Path) -> list[Path]:
    # Another rank's rank 0 may be removing an earlier run's files while this one looks: gone is empty.
    try:
        return sorted(d.iterdir())
    except FileNotFoundError:
        return []


def _inspect_checkpoints(root: Path, st: DirState) -> None:
    children = _listing(root)
    if not children:
        st.owned.append(CHECKPOINTS)
    for c in children:
        rel = f"{CHECKPOINTS}/{c.name}"
        if CKPT_DIR.fullmatch(c.name) or c.name in CKPT_FILES:
            if _kind_ok(c, c.name not in CKPT_FILES):
                st.owned.append(rel)
            else:
                st.clashes.append(f"{rel} (not what ia3-dist writes under that name)")
        else:
            st.foreign.append(rel)


def write_manifest(out: Path) -> None:
    """Atomically (temp + rename): a reader sees the old manifest or the new one, never half of one."""
    body = {"tool": TOOL, "format": FORMAT, "version": __version__,
            "owns": sorted(RUN_FILES | {d + "/" for d in RUN_DIRS} | {"adapter.old.<hex>/"}),
            "checkpoints": ["step<N>/", "step<N>.new/", "step<N>.old/", *sorted(CKPT_FILES)],
            "note": "ia3-dist writes these names here; output.overwrite=true removes only them"}
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(body, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, out / MANIFEST)


def set_aside(out: Path) -> list[str]:
    """Start over, undoably: move what an earlier run wrote (only the names a run writes: foreign and clashing
    entries stay, so ``checkpoints/`` goes only if nothing else is in it) into
    ``<out>/.ia3-dist-replaced`` (renames, on the same filesystem: no copy, no space). The new run removes it once
    it has started (:func:`discard_aside`), or puts it back if its start fails (:func:`restore_aside`): a bad tracker
    setting or ranks that disagree exit 2 without losing the run that was there. Returns what moved."""
    aside = out / REPLACED
    st = inspect(out)
    if _kind_ok(aside, True) and not dead_start(out, st):
        # Beside a run that trained: what a run's discard could not remove at its start, nothing to keep.
        shutil.rmtree(aside)
        st = inspect(out)
    # An aside beside a dead start's setup files (a start over killed before its run started, or while it moved
    # the files) holds the run this start replaces: it stays, to be put back should this start fail too. An entry
    # it already holds is the dead start's here and goes; any other one is moved in (the move that was cut off).
    for rel in st.owned:
        if rel in (MANIFEST, CHECKPOINTS, REPLACED):
            continue
        dest = aside / rel
        if os.path.lexists(dest):
            _remove(out / rel)
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(out / rel, dest)
    root = out / CHECKPOINTS
    if _kind_ok(root, True) and not any(root.iterdir()):
        root.rmdir()
    return [str(e.relative_to(aside)) for e in _aside_entries(aside)]


def _aside_entries(aside: Path) -> list[Path]:
    """What the aside holds, as set aside and put back: its entries, ``checkpoints/`` by its children."""
    if not _kind_ok(aside, True):
        return []
    return [e for top in _listing(aside)
            for e in (_listing(top) if top.name == CHECKPOINTS and _kind_ok(top, True) else [top])]


def dead_start(out: Path, st: DirState) -> bool:
    """Whether ``out`` (``st``: its :func:`inspect`) holds an aside that is the earlier run a start over set aside
    before it was killed (before its run started, or while it moved the files): nothing a training step wrote in
    the dir has a name the aside holds too (the move gives each name to one side). A run that trained since writes
    such names: beside its results, an aside is what its start could not remove."""
    aside = out / REPLACED
    return REPLACED in st.owned and not any(os.path.lexists(aside / e) for e in st.results if e != REPLACED)


def _remove(p: Path) -> None:
    if _kind_ok(p, True):
        shutil.rmtree(p)
    else:
        p.unlink(missing_ok=True)


def restore_aside(out: Path) -> list[str]:
    """Put back what :func:`set_aside` moved, over whatever the failed start wrote under the same names."""
    aside = out / REPLACED
    if not _kind_ok(aside, True):
        return []
    back = []
    for e in _aside_entries(aside):
        rel = e.relative_to(aside)
        dest = out / rel
        _remove(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(e, dest)
        back.append(str(rel))
    shutil.rmtree(aside)
    return back


def discard_aside(out: Path) -> str:
    """Remove the aside once the new run has started; what could not be removed, as a note ("" when all went)."""
    errors: list[str] = []

    def failed(_f: object, path: str, exc: tuple) -> None:
        # Gone already is removed: a start over a new dir sets nothing aside (and said so in a spurious note).
        if not isinstance(exc[1], FileNotFoundError):
            errors.append(f"{path}: {exc[1]}")

    shutil.rmtree(out / REPLACED, onerror=failed)
    if not errors:
        return ""
    return (f"output.dir {out}: {REPLACED}, the earlier run's files output.overwrite replaced, could not all be "
            f"removed ({errors[0]}{f' and {len(errors) - 1} more' if len(errors) > 1 else ''}); delete it by hand")


def nearest_existing(p: Path) -> Path:
    """``p`` or its closest ancestor that exists (a dangling symlink counts as existing: it blocks mkdir)."""
    for c in (p, *p.parents):
        if c.exists() or c.is_symlink():
            return c
    return Path(p.anchor or ".")


def _write_probe(d: Path) -> str | None:
    """None if a file can be created in ``d``, else why not. os.access alone says yes to root on a read-only
    mount, so this also creates one: unnamed (O_TMPFILE) where the filesystem allows, so nothing appears in
    ``d``, else a named temp file removed at once."""
    if not os.access(d, os.W_OK | os.X_OK):
        return "no write permission"
    try:
        if os.statvfs(d).f_flag & os.ST_RDONLY:
            return "read-only filesystem"
    except (OSError, AttributeError):
        pass
    tmpfile = getattr(os, "O_TMPFILE", 0)
    if tmpfile:
        try:
            os.close(os.open(d, tmpfile | os.O_WRONLY, 0o600))
            return None
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                return e.strerror or str(e)
    try:
        fd, name = tempfile.mkstemp(dir=d, prefix=PROBE_PREFIX)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        return e.strerror or str(e)
    return None


def check_writable_dir(path: Path, what: str) -> None:
    """UsageError unless ``path`` is a directory that can be written, or can be created (its nearest existing
    ancestor is a writable directory). ``what`` names the setting in the message (``output.dir``, ``--out``)."""
    p = Path(path)
    try:
        base = nearest_existing(p.absolute())
        if base == p.absolute() and not p.is_dir():
            kind = "a dangling symlink" if p.is_symlink() and not p.exists() else "a file"
            raise UsageError(f"{what} {path} is {kind}, not a directory; pick a directory path (it is created if "
                             f"missing)")
        if not base.is_dir():
            raise UsageError(f"{what} {path}: {base} is not a directory, so it cannot be created; pick another "
                             f"path")
        why = _write_probe(base)
    except OSError as e:
        raise UsageError(f"{what} {path}: cannot check it ({e.strerror or e}); pick another path") from None
    if why:
        where = "" if base == p.absolute() else f" ({base}, where it would be created)"
        raise UsageError(f"{what} {path} is not writable{where}: {why}; pick a writable location")


def start_stamp(pid: int | str = "self") -> str | None:
    """``<boot id> <start time in clock ticks>`` of a process of this host: which process a pid named, whatever
    took the pid since (a job's container hands pids out in the same order every time: a killed run's rank-0 pid
    is likely its requeue's launcher or another rank). None where /proc does not say."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot} {int(fields[19])}"
    except (OSError, IndexError, ValueError):
        return None


def write_pid_file(out: Path) -> None:
    """Rank 0's :data:`PID_FILE`: its pid on the first line, for schedulers' preemption traps (slurm/lib.sh), then
    the host it runs on (a pid names a process of that host only, and the file is read from others: ``summary``
    on a login node, a requeued job's first node), then its :func:`start_stamp`."""
    (out / PID_FILE).write_text(f"{os.getpid()}\n{socket.gethostname()}\n{start_stamp() or ''}\n")


PID_HEARTBEAT_S = 60.0
"""How often rank 0 refreshes its pid file's time while it runs: a reader on another host (``summary`` on a login
node) counts a pid file that recent as a live run, however long its steps or its load take."""


class PidHeartbeat:
    """:data:`ALIVE_FILE` touched every ``every_s`` while the run lives, and removed when it stops."""

    def __init__(self, out: Path, every_s: float = PID_HEARTBEAT_S) -> None:
        self.path, self.every_s = out / ALIVE_FILE, every_s
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> PidHeartbeat:
        self._touch(create=True)
        self._thread = threading.Thread(target=self._beat, name="ia3-dist-pid-heartbeat", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        with contextlib.suppress(OSError):
            self.path.unlink()

    def _touch(self, create: bool = False) -> None:
        try:
            # Never through a link a run dir from elsewhere plants; made once, at the start: a start that failed
            # (or a signal while the ranks met) removes it, and a beat after that must not bring it back.
            fd = os.open(self.path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_CREAT if create else 0),
                         0o644)
            try:
                os.utime(fd)
            finally:
                os.close(fd)
        except OSError:
            pass  # gone or unwritable: readers fall back on the metrics' time

    def _beat(self) -> None:
        while not self._done.wait(self.every_s):
            self._touch()


def _read_pid_file(out: Path) -> tuple[int, str | None, str | None] | None:
    """``(pid, host, start stamp)`` of the pid file (host and stamp None in a file of a version that wrote less);
    None for no file or an unreadable one."""
    try:
        raw = read_bounded(out / PID_FILE, MAX_PID_FILE, missing_ok=True)  # regular files only: a FIFO never blocks
    except UsageError:
        return None
    if raw is None:
        return None
    lines = raw.decode("utf-8", "replace").split("\n")
    pid = lines[0].strip()
    if not pid.isascii() or not pid.isdigit() or not 0 < int(pid) <= PID_MAX:
        return None
    host = lines[1].strip() if len(lines) > 1 and lines[1].strip() else None
    stamp = lines[2].strip() if len(lines) > 2 and lines[2].strip() else None
    return int(pid), host, stamp


def _is_run_process(pid: int) -> bool:
    """Whether ``pid`` is a live ia3-dist process of this host (not a zombie, not some other program that took
    the pid of a run that was killed)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read(1 << 16)
        with open(f"/proc/{pid}/stat", "rb") as f:
            zombie = f.read(4096).rsplit(b")", 1)[1].split()[0] == b"Z"
    except (OSError, IndexError):
        return False
    return not zombie and _RUN_CMD.search(cmd) is not None


def pid_file_alive(out: Path) -> bool | None:
    """Whether ``<out>/rank0.pid`` names a run that trains now: True or False where this host can tell (the file
    names this host; True also for a file that names no host, written by an earlier version, when its pid is a
    run here), None where it cannot (another host wrote it: its processes cannot be seen from here)."""
    return _alive(_read_pid_file(out))


def _alive(got: tuple[int, str | None, str | None] | None) -> bool | None:
    """:func:`pid_file_alive` of what :func:`_read_pid_file` read."""
    if got is None:
        return False
    pid, host, stamp = got
    if host is not None and host != socket.gethostname():
        return None
    if stamp is not None and start_stamp(pid) != stamp:
        return False  # the pid is some other process now (or none), an ia3-dist one included
    return True if _is_run_process(pid) else (False if host is not None else None)


def live_run_pid(out: Path) -> int | None:
    """The pid in ``<out>/rank0.pid`` when it is a live ia3-dist process on this host other than this one: a run
    training in ``out`` now. None for no file, a stale one, or a run on another host (a pid file on a shared
    filesystem written on another node says nothing about this host's processes)."""
    got = _read_pid_file(out)
    if got is None or got[0] == os.getpid() or _alive(got) is not True:
        return None
    return got[0]


def refuse_live_run(out: Path) -> None:
    """Rank 0's preflight: two runs in one output dir would write the same checkpoints and metrics (a job submitted
    twice, ``sweep --force`` over a live sweep)."""
    pid = live_run_pid(out)
    if pid is not None:
        raise UsageError(f"output.dir {out} is in use: a run is training there now (rank 0 is pid {pid}, in "
                         f"{PID_FILE}); wait for it to end or stop it, or pick another output.dir")
