"""``ia3-dist sweep``: a grid of config values as one Slurm job array (or, with ``--local``, one run after another).

Each task trains the same config with its own values and its own output dir, ``<sweep dir>/<key>=<value>,...``,
and behaves like a job from ``ia3-dist slurm`` (checkpoint on USR1, requeue, resume): the array's tasks are jobs
of their own, so ``scontrol requeue $SLURM_JOB_ID`` requeues only the task that was preempted. ``sweep.json`` in
the sweep dir records the grid, the tasks, their ranks and the job id; ``ia3-dist summary <sweep dir>`` reads it.

Everything is checked before anything is written or submitted (exit 2): the grid's keys and values (each task's
whole config is built), its size (:data:`MAX_TASKS` without ``--max-tasks``), and that no two tasks share an
output dir or a config.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import re
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import __version__
from ..config import RunConfig, load_config
from ..config.load import apply_overrides, build_config, read_yaml
from ..config.schema import ConfigKeyError, brief, show
from ..errors import UsageError
from ..runtime.safe_io import write_file
from . import slurm
from .summary import ARRAY_LOG, FORMAT, LOGS, SWEEP_FILE, read_sweep, run_status, slurm_states
from .summary import main as summary_main

MAX_TASKS = 1000
"""Tasks a grid may have without ``--max-tasks``: Slurm's default MaxArraySize (1001) allows indices 0-1000."""
MAX_TASKS_LIMIT = 10_000
"""The most ``--max-tasks`` may allow: every task's config is built before anything is written, and ``ia3-dist
summary`` reads sweep.json up to :data:`.summary.MAX_SWEEP_BYTES`."""
SCRIPT = "sweep.sbatch"
# Task dir names: the characters of a Slurm name plus '=' and ',' (key=value,key=value); anything else in a value
# becomes '-'. A name longer than this is refused rather than cut, since cutting is what makes two names equal.
_DIR_CHARS = re.compile(r"[^A-Za-z0-9._+-]+")
NAME_MAX = 200
# The sweep dir lands in `#SBATCH --output=...`: no spaces, quotes or '%' (Slurm's file name patterns).
_SAFE_PATH = re.compile(r"[A-Za-z0-9._+=,/-]+")


@dataclass
class Task:
    index: int
    name: str
    values: dict[str, str]
    """Grid key -> the value as given on the command line."""
    overrides: list[str]
    """The grid's overrides and the task's output.dir, after the sweep's own overrides."""
    dir: str


def split_values(key: str, text: str) -> list[str]:
    """``3e-3,1e-2`` -> ['3e-3', '1e-2']; commas inside [...] or {...} belong to the value (a list value)."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    parts = [p.strip() for p in parts]
    if not text.strip() or any(not p for p in parts):
        raise UsageError(f"--grid {brief(f'{key}={text}')}: empty value; give one or more comma-separated values, e.g. "
                         f"--grid train.lr=3e-3,1e-2")
    return parts


def parse_grid(specs: list[str]) -> dict[str, list[str]]:
    """``--grid key=v1,v2`` options -> {key: [v1, v2]}, in the order given."""
    grid: dict[str, list[str]] = {}
    for spec in specs:
        slurm._no_control("--grid", spec)
        key, eq, text = spec.partition("=")
        key = key.strip()
        if not eq or not key:
            raise UsageError(f"--grid {show(spec)}: expected key.sub=value1,value2,... (e.g. --grid "
                             f"train.lr=3e-3,1e-2)")
        if key == "output.dir":
            raise UsageError("--grid output.dir: the sweep gives each task its own output.dir under --dir; sweep "
                             "other keys")
        if key in grid:
            raise UsageError(f"--grid {brief(key)}: given twice; put all its values in one --grid "
                             f"{brief(key)}=v1,v2,...")
        values = split_values(key, text)
        dup = next((v for i, v in enumerate(values) if v in values[:i]), None)
        if dup is not None:
            raise UsageError(f"--grid {brief(key)}: value {brief(dup)} is listed twice; two tasks would share an "
                             f"output dir")
        grid[key] = values
    if not grid:
        raise UsageError("give at least one --grid key.sub=value1,value2,...")
    return grid


def task_name(values: dict[str, str]) -> str:
    """``lr=3e-3,max_length=256``: the last part of each key (the whole key where two grid keys share it)."""
    lasts = [k.rsplit(".", 1)[-1] for k in values]
    parts = []
    for key, value in values.items():
        short = key.rsplit(".", 1)[-1]
        label = short if lasts.count(short) == 1 else key
        parts.append(f"{label}={_DIR_CHARS.sub('-', value).strip('-') or '-'}")
    return ",".join(parts)


def _dir_override(d: Path) -> str:
    """``output.dir=<d>``, quoted where YAML would read the path otherwise (" #" in a dir name starts a comment:
    every task's output.dir was the same cut-off path)."""
    from ..config.load import parse_override

    text = f"output.dir={d}"
    return text if parse_override(text)[1] == str(d) else f"output.dir={json.dumps(str(d))}"


def plan_tasks(config: str, base: list[str], grid: dict[str, list[str]], sweep_dir: Path,
               max_tasks: int, check: Callable[[RunConfig], None] | None = None) -> list[Task]:
    """The tasks of the grid, every one's config built and checked (``check``: what the job adds, e.g. its global
    batch over the job's ranks); UsageError on anything that would fail in the queue or make two tasks collide."""
    count = math.prod(len(v) for v in grid.values())
    sizes = brief(" x ".join(str(len(v)) for v in grid.values()))
    if count > MAX_TASKS_LIMIT:
        # show(): str() of a product of thousands of --grid keys can be an int too long to print.
        raise UsageError(f"--grid: {sizes} = {show(count)} tasks, more than a sweep may have ({MAX_TASKS_LIMIT}); "
                         f"narrow the grid")
    if count > max_tasks:
        raise UsageError(f"--grid: {sizes} = {count} tasks, more than {max_tasks}; narrow the grid or raise the "
                         f"limit with --max-tasks {count} (the cluster's MaxArraySize must allow it too)")
    raw = read_yaml(config)  # once: a grid of hundreds of tasks builds hundreds of configs

    def build(overrides: list[str], grid_key: str | None = None) -> RunConfig:
        try:
            return build_config(apply_overrides(copy.deepcopy(raw), [*base, *overrides]))
        except ConfigKeyError as e:
            if grid_key is not None and (e.key == grid_key or e.key.startswith(grid_key + ".")):
                raise  # the grid's own value: named by its --grid text, not as the file's
            raise UsageError(f"{brief(config)}: {e}") from None
        except UsageError as e:
            raise UsageError(f"{brief(config)}: {e}") from None

    build([])  # the sweep's own config and overrides first
    # One value at a time next, so a bad key or value is named as the user wrote it.
    for key, values in grid.items():
        for v in values:
            try:
                build([f"{key}={v}"], key)
            except UsageError as e:
                raise UsageError(f"--grid {brief(f'{key}={v}')}: {e}") from None
    tasks: list[Task] = []
    seen_names: dict[str, Task] = {}
    seen_cfgs: dict[str, Task] = {}
    keys = list(grid)
    for i, combo in enumerate(itertools.product(*grid.values())):
        values = dict(zip(keys, combo, strict=True))
        name = task_name(values)
        if len(name) > NAME_MAX:
            raise UsageError(f"--grid: the task dir name {name[:60]}... is longer than {NAME_MAX} characters; use "
                             f"shorter values")
        task = Task(i, name, values, [f"{k}={v}" for k, v in values.items()] + [_dir_override(sweep_dir / name)],
                    str(sweep_dir / name))
        other = seen_names.get(name.casefold())  # casefold: two names one case-insensitive file system merges
        if other is not None:
            raise UsageError(f"--grid: {_show(other.values)} and {_show(values)} give the same output dir "
                             f"{brief(name)}; "
                             f"make the values differ in letters or digits")
        try:
            cfg = build(task.overrides)
            if check is not None:
                check(cfg)
        except UsageError as e:
            raise UsageError(f"--grid task {i} ({_show(values)}): {e}") from None
        if Path(cfg.output.dir) != Path(task.dir):
            raise UsageError(f"--grid task {i} ({_show(values)}): its output.dir reads as {brief(cfg.output.dir)}, "
                             f"not {brief(task.dir)}; use a sweep dir whose name YAML reads as it is")
        d = cfg.to_dict()
        d["output"].pop("dir")
        fingerprint = json.dumps(d, sort_keys=True, default=str)
        other = seen_cfgs.get(fingerprint)
        if other is not None:
            raise UsageError(f"--grid: {_show(other.values)} and {_show(values)} are the same config; drop one")
        seen_names[name.casefold()] = seen_cfgs[fingerprint] = task
        tasks.append(task)
    return tasks


def _show(values: dict[str, str]) -> str:
    return brief(" ".join(f"{k}={v}" for k, v in values.items()))


def default_dir(config: str, base: list[str]) -> Path:
    out = Path(load_config(config, base).output.dir)
    return out.parent / f"{out.name or 'runs'}-sweep"


def check_sweep_dir(d: Path, force: bool, local: bool = False) -> None:
    name = brief(str(d))
    if not local and not _SAFE_PATH.fullmatch(str(d)):
        raise UsageError(f"--dir {name}: the sweep dir goes into #SBATCH --output, so its path may hold only "
                         f"letters, digits and . _ + = , / -; give another --dir")
    try:
        _check_entries(d, name, force)
    except OSError as e:  # a name too long, a dir without search permission, ...
        raise UsageError(f"--dir {name}: cannot use it ({e.strerror or e}); give another --dir") from None


def _refuse_live_array(d: Path, name: str) -> None:
    """--force over a sweep whose job array still runs: each task dir would get a second run beside the live one."""
    # Tolerant: a damaged record is what --force is for; it names no job to ask about (a note says so).
    rec = read_sweep(d, fix="--force writes this sweep over it; check that no job array of the earlier sweep still "
                            "runs (squeue --me)", tolerant=True)
    job = rec.get("job") if rec is not None else None
    live = slurm_states(job) if job is not None else None
    if job is not None and live is None and shutil.which("squeue"):
        # Slurm could not be asked: that is no sign the array has ended.
        raise UsageError(f"--dir {name}: cannot ask Slurm whether its job array {job} still runs (squeue failed); "
                         f"check squeue --me, cancel the array (scancel {job}) if it runs, then run this again")
    if live:
        raise UsageError(f"--dir {name}: its job array {job} still has {len(live)} task(s) queued or running; "
                         f"cancel it first (scancel {job}) or wait for it, then run this again")


def _check_entries(d: Path, name: str, force: bool) -> None:
    if d.exists() and not d.is_dir():
        raise UsageError(f"--dir {name}: not a directory")
    earlier = d.is_dir() and any(d.iterdir())
    if earlier and not (d / SWEEP_FILE).is_file():
        raise UsageError(f"--dir {name}: not empty and not a sweep dir (no {SWEEP_FILE}); give a new or empty --dir")
    for entry, want_dir in ((SCRIPT, False), (SWEEP_FILE, False), (LOGS, True)):
        # Checked before anything is written: these are written (or, logs/, written into) by the sweep and its tasks,
        # and through a link (a sweep dir from elsewhere, given with --force) they would be anywhere.
        p = d / entry
        if p.is_symlink() or (p.exists() and (p.is_dir() != want_dir or not (want_dir or p.is_file()))):
            kind = "a symlink" if p.is_symlink() else ("not a directory" if want_dir else "not a regular file")
            raise UsageError(f"--dir {name}: {entry} is {kind}, which the sweep does not write through; remove it "
                             f"or give another --dir")
    if not earlier:
        return
    if not force:
        # Read first: "summary shows it" would be wrong of a damaged record, and the error names the file.
        read_sweep(d, fix="add --force to write this sweep over it, or give another --dir")
        raise UsageError(f"--dir {name}: holds a sweep already (ia3-dist summary {name} shows it); add --force to "
                         f"write and start it again (task dirs are kept: their runs resume), or give another --dir")
    _refuse_live_array(d, name)


def array_spec(indices: list[int]) -> str:
    """Slurm's ``--array`` list of sorted task indices, runs of consecutive ones as ranges: ``0-2,5,7-8``."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def render_array(config: str, base: list[str], tasks: list[Task], sweep_dir: Path, job: slurm.Job,
                 max_concurrent: int | None, done: frozenset[int] = frozenset()) -> str:
    """One job array: task i trains ``tasks[i]``; preemption, requeue and resume as in ``ia3-dist slurm``. Tasks in
    ``done`` (their runs finished: a sweep written again with --force) stay out of the array, so no allocation
    is spent on them and ``output.overwrite: true`` does not train them again (to train one again, remove its dir);
    their case stays in the file for an explicit ``sbatch --array=i``."""
    queued = [t.index for t in tasks if t.index not in done]
    # More than the tasks would mean nothing to Slurm: write what it means.
    array = array_spec(queued) + (f"%{min(max_concurrent, len(queued))}" if max_concurrent else "")
    cases = [f"  {t.index}) TASK=({' '.join(shlex.quote(o) for o in t.overrides)}) ;;" for t in tasks]
    head = " ".join(shlex.quote(a) for a in [config, *base])
    logs = sweep_dir / LOGS
    defaults = "\n".join([
        f"export LOG_DIR=${{LOG_DIR:-{shlex.quote(str(logs))}}}",
        "# The task's values and output.dir; arguments after the file name are added to every task's overrides.",
        'case "${SLURM_ARRAY_TASK_ID:-}" in',
        *cases,
        f'  *) echo "ia3-dist sweep: no task \'${{SLURM_ARRAY_TASK_ID:-}}\' here: submit this file with sbatch '
        f'(--array={array})" >&2; exit 2 ;;',
        "esac",
        f'set -- {head} "${{TASK[@]}}" "$@"',
    ])
    grid = "; ".join(f"{k} in {{{','.join(vs)}}}" for k, vs in _grid_of(tasks).items())
    header = [f"Written by `ia3-dist sweep` (ia3-dist {__version__}): a job array of {len(queued)} task(s), each "
              f"{job.describe()}" + (f" ({len(tasks) - len(queued)} more done already, left out)." if done else "."),
              f"Grid: {grid}",
              f"Config: {shlex.quote(config)}; task i trains into {sweep_dir}/<its values>.",
              f"Submit from the folder relative paths in the config refer to:  sbatch {sweep_dir / SCRIPT}",
              f"Status of the tasks:  ia3-dist summary {sweep_dir}",
              "Each task is preemption-safe on its own: USR1 -> checkpoint -> requeue of that task -> resume."]
    name = job.job_name or slurm.safe_name(sweep_dir.name)
    return slurm.assemble(job, name, header, defaults,
                          {"array": array, "output": str(logs / ARRAY_LOG)})


def _grid_of(tasks: list[Task]) -> dict[str, list[str]]:
    grid: dict[str, list[str]] = {}
    for t in tasks:
        for k, v in t.values.items():
            if v not in grid.setdefault(k, []):
                grid[k].append(v)
    return grid


def write_sweep(sweep_dir: Path, record: dict) -> None:
    """Atomically, and never through a symlink (a sweep dir given with --force may come from elsewhere)."""
    data = (json.dumps(record, indent=1) + "\n").encode("utf-8")
    write_file(sweep_dir / SWEEP_FILE, lambda fh: fh.write(data), fix="give another --dir")


def _open_log(log: Path) -> int:
    """``log`` for appending, never through a symlink (O_NOFOLLOW) and never a FIFO or device."""
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError("not a regular file")
    return fd


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_devices(nproc: int, environ: dict[str, str] | None = None) -> list[str]:
    """The deepspeed launcher's device arguments for ``nproc`` local ranks: the GPUs CUDA_VISIBLE_DEVICES names
    (``--include``; given --num_accelerators the launcher drops the variable and runs on devices 0..N-1, another
    user's on a shared box or an allocation without device constraints), else ``--num_accelerators``."""
    cvd = (os.environ if environ is None else environ).get("CUDA_VISIBLE_DEVICES", "")
    if re.fullmatch(r"[0-9]+(,[0-9]+)*", cvd):
        visible = cvd.split(",")
        if len(visible) < nproc:
            raise UsageError(f"--nproc {nproc}: CUDA_VISIBLE_DEVICES={cvd} names {len(visible)} GPU(s); run fewer "
                             f"ranks or make more GPUs visible")
        return ["--include", f"localhost:{','.join(visible[:nproc])}"]
    if cvd:
        raise UsageError(f"--nproc {nproc}: CUDA_VISIBLE_DEVICES={cvd} names GPUs by UUID or MIG instance, which the "
                         f"deepspeed launcher cannot keep; give their indices, or run the tasks with --nproc 1")
    return ["--num_accelerators", str(nproc)]


def finished(config: str, base: list[str], tasks: list[Task]) -> frozenset[int]:
    """The tasks whose run is done already (a ``--force`` over an earlier sweep, a local sweep run again). One that
    finished with other settings than this sweep gives it (``train.epochs=1``, now 5: the dirs are named by the grid
    values alone) is refused: counted as done, the new settings would never be trained."""
    from .summary import config_view, trained_otherwise

    done = []
    for t in tasks:
        if run_status(Path(t.dir)) != "done":
            continue
        differ = trained_otherwise(Path(t.dir), config_view(load_config(config, [*base, *t.overrides]).to_dict()))
        if differ:
            raise UsageError(f"task {t.name}: its run in {brief(t.dir)} finished with other settings than this sweep "
                             f"gives it ({', '.join(differ[:5])}{', ...' if len(differ) > 5 else ''}); remove its "
                             f"dir to train it with these, or give another --dir")
        done.append(t.index)
    return frozenset(done)


def run_local(config: str, base: list[str], tasks: list[Task], sweep_dir: Path, nproc: int,
              done: frozenset[int] = frozenset()) -> list[int]:
    """Each task in turn, in this process's environment; output to ``logs/<name>.log``. Tasks whose run is done
    already (``done``: :func:`finished`) are skipped. Returns the indices of the tasks that failed."""
    failed = []
    for t in tasks:
        label = f"[{t.index + 1}/{len(tasks)}] {t.name}"
        if t.index in done:
            print(f"{label}: done already, skipped", flush=True)
            continue
        args = ["--config", config, *base, *t.overrides, "train.resume=auto"]
        if nproc == 1:
            cmd = [sys.executable, "-m", "ia3_dist", *args]
        else:
            cmd = [sys.executable, "-m", "deepspeed.launcher.runner", *local_devices(nproc),
                   "--master_port", str(_free_port()), "--module", "ia3_dist", *args]
        log = sweep_dir / LOGS / f"{t.name}.log"
        t0 = time.time()
        try:
            fd = _open_log(log)
        except OSError as e:
            print(f"{label}: failed: cannot open its log {log} ({e.strerror or e}; a log is never written through "
                  f"a symlink or into anything but a regular file)", flush=True)
            failed.append(t.index)
            continue
        print(f"{label}: training, log {log}", flush=True)
        with os.fdopen(fd, "ab") as fh:
            rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
        print(f"{label}: {'done' if rc == 0 else f'failed (exit {rc}; see {log})'} in {time.time() - t0:.0f} s",
              flush=True)
        if rc != 0:
            failed.append(t.index)
    return failed


SBATCH_TIMEOUT_S = 120  # slurmctld answers in well under a second; a loaded one may take tens


def _submit(script: Path) -> str:
    try:
        proc = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True,
                              timeout=SBATCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        # slurmctld may have queued the array all the same: the record names no job, so a --force would not
        # see it running.
        raise UsageError(f"sbatch {brief(str(script))} did not answer within {SBATCH_TIMEOUT_S} s; the job array "
                         f"may have been queued all the same: check squeue --me (and scancel it) before submitting "
                         f"the sweep again") from None
    except OSError as e:
        raise UsageError(f"sbatch {brief(str(script))}: cannot run it ({e.strerror or e})") from None
    if proc.returncode != 0:
        msg = " ".join((proc.stderr or proc.stdout).split())
        raise UsageError(f"sbatch refused {brief(str(script))}: {brief(msg)}")
    return proc.stdout.strip().split(";")[0]


def main(argv: list[str], prog: str) -> int:
    ap = argparse.ArgumentParser(prog=prog, description="Train a grid of config values: one Slurm job array (each "
                                 "task its own output dir), or one run after another with --local.")
    ap.add_argument("--config", required=True)
    ap.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                    help="a config key and its values (repeat for more keys: the sweep is every combination)")
    ap.add_argument("--dir", help="sweep dir: sweep.json, sweep.sbatch, logs/ and one output dir per task "
                    "(default: <output.dir>-sweep)")
    ap.add_argument("--max-concurrent", type=slurm.int_option("--max-concurrent", 1, MAX_TASKS_LIMIT),
                    help="at most this many tasks run at once (--array=...%%N)")
    ap.add_argument("--max-tasks", type=slurm.int_option("--max-tasks", 1, MAX_TASKS_LIMIT), default=MAX_TASKS,
                    help=f"refuse a grid of more tasks than this (default {MAX_TASKS}, at most {MAX_TASKS_LIMIT})")
    ap.add_argument("--local", action="store_true", help="no Slurm: run the tasks here, one after another")
    ap.add_argument("--nproc", type=slurm.int_option("--nproc", 1, slurm.MAX_CPUS_PER_NODE), default=1,
                    help="with --local: ranks per task (deepspeed launcher)")
    ap.add_argument("--no-submit", action="store_true", help="write the sweep dir and its sbatch file only")
    ap.add_argument("--force", action="store_true", help="write over an earlier sweep in --dir (its task dirs "
                    "stay: their runs resume)")
    slurm.add_job_args(ap, node_range=False)
    ap.add_argument("overrides", nargs="*", metavar="key.sub=value", help="overrides for every task")
    a = ap.parse_intermixed_args(argv)
    grid = parse_grid(a.grid)
    taken = None if a.local else slurm.layout_from_config(a)
    job = None if a.local else slurm.job_from_args(a)
    if taken:
        print(taken)
    if job is not None and job.min_nodes:
        # Each task may override the batch keys; a fixed count keeps every task's layout what its grid says.
        raise UsageError(f"--nodes {job.nodes_directive}: a sweep's tasks run on a fixed number of nodes; give one "
                         f"count (node ranges are for ia3-dist slurm)")
    slurm.check_run_args(a.config, a.overrides)
    config = os.path.abspath(a.config)
    if a.dir is not None:
        slurm._no_control("--dir", a.dir)
    sweep_dir = Path(os.path.abspath(a.dir if a.dir is not None else default_dir(config, a.overrides)))
    if job is not None:
        shaped = [k for k in grid if k.split(".", 1)[0] == "hardware"]
        if shaped:
            # The job's shape is the sweep's (one sbatch array): each task's hardware.* would be read by nothing.
            raise UsageError(f"--grid {brief(shaped[0])}: every task of a sweep runs in the same job shape "
                             f"(--nodes / --gpus-per-node, default the config's hardware section); sweep "
                             f"hardware.* as separate sweeps")
    tasks = plan_tasks(config, a.overrides, grid, sweep_dir, a.max_tasks,
                       None if job is None else lambda cfg: slurm.check_job_config(job, cfg))
    check_sweep_dir(sweep_dir, a.force, a.local)
    if a.local and a.nproc > 1:
        local_devices(a.nproc)  # a device list the launcher cannot keep: refused before any task runs
    submit = not a.local and not a.no_submit
    if submit and not shutil.which("sbatch"):
        raise UsageError("sbatch not found: run this on a Slurm login node, or use --local (run the grid here) or "
                         "--no-submit (write the files only)")
    # Only a --force over an earlier sweep finds finished task dirs (a new sweep dir is refused otherwise).
    done = finished(config, a.overrides, tasks)
    if done and job is not None:
        print(f"{len(done)} of {len(tasks)} task(s) done already, left out of the job array: "
              f"{', '.join(t.name for t in tasks if t.index in done)} (to train one again, remove its dir)",
              flush=True)
    idle = len(done) == len(tasks)  # nothing left to queue: no array (an empty --array is no job)
    text = None if job is None or idle else render_array(config, a.overrides, tasks, sweep_dir, job,
                                                          a.max_concurrent, done)
    try:
        (sweep_dir / LOGS).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--dir {brief(str(sweep_dir))}: cannot create it ({e.strerror or e}); give another --dir") \
            from None
    # world_size: what summary derives a pending task's grad_accum from (train.global_batch_size over the ranks).
    record = {"format": FORMAT, "ia3_dist": __version__, "config": config, "overrides": a.overrides, "grid": grid,
              "mode": "local" if a.local else "slurm", "job": None, "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "world_size": a.nproc if job is None else job.nodes * job.per_node,
              "tasks": [asdict(t) for t in tasks]}
    if text is not None:
        slurm.write_out(sweep_dir / SCRIPT, text, force=True, what="", fix="give another --dir")
    elif idle:
        # The earlier sweep's array file would queue its tasks again: only this sweep's files stay.
        try:
            (sweep_dir / SCRIPT).unlink(missing_ok=True)
        except OSError as e:
            raise UsageError(f"{sweep_dir / SCRIPT}: cannot remove the earlier sweep's array file "
                             f"({e.strerror or e}); give another --dir") from None
    write_sweep(sweep_dir, record)
    print(f"sweep of {len(tasks)} task(s) in {sweep_dir}", flush=True)
    if a.local:
        failed = run_local(config, a.overrides, tasks, sweep_dir, a.nproc, done)
        summary_main([str(sweep_dir)], "ia3-dist summary")
        if failed:
            print(f"{prog}: {len(failed)} task(s) failed: {', '.join(tasks[i].name for i in failed)}",
                  file=sys.stderr)
            return 1
        return 0
    script = sweep_dir / SCRIPT
    if job is not None and not idle:
        slurm.cpus_note(job)
    if idle:
        print(f"every task is done: nothing to submit\nstatus:  ia3-dist summary {shlex.quote(str(sweep_dir))}")
        return 0
    if not submit:
        print(f"wrote {script}\nsubmit from the folder relative paths in the config refer to:  sbatch "
              f"{shlex.quote(str(script))}")
        return 0
    record["job"] = _submit(script)
    write_sweep(sweep_dir, record)
    print(f"submitted job array {record['job']} ({script})\nstatus:  ia3-dist summary {shlex.quote(str(sweep_dir))}"
          f"\nlogs:  {sweep_dir / LOGS}/")
    return 0
