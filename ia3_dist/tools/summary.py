"""``ia3-dist summary DIR...``: one table of runs (run dirs, sweep dirs, or folders of run dirs) and an overlay plot
of their loss curves.

A row: the config values that differ between the runs, the status, the last step, the final train loss, the last
eval loss and perplexity (preference runs: the held-out pair accuracy), the median tokens/s and the peak memory
(``peak_mem_gb``: GPU max allocated, or peak
RSS on CPU). Status:

- done: the adapter is written and the run has ended;
- stopped: a chunk of it is done (``train.stop_after_steps``: its adapter written), or a sweep task stopped at a
  checkpoint that the queue no longer holds (cancelled after its requeue, a requeue Slurm refused);
  ``train.resume=auto`` continues it;
- running: Slurm lists the task as running, or (no Slurm record) rank 0's pid file is there and names a live
  ia3-dist process of this host, or it names another host (or none) and the run wrote within :data:`RECENT_S`;
- preempted: stopped at a checkpoint after a signal (or by the hang watchdog); it resumes when requeued (also
  while Slurm still lists the task as running, its batch shell requeueing it);
- failed: it started and ended without an adapter (or its job is gone while the pid file says it runs, or an
  attempt after a chunk's adapter logged later steps and ended without one);
- pending: a sweep task that has not started.

A sweep task's status is that of its latest attempt. Slurm speaks for the attempts of the sweep's job array only: an
attempt the task dir records after the array last showed a sign of that task (its batch log, the sweep record) was
started outside it (the task's command run again by hand), and the dir's record wins: done once its adapter is
written, whatever the array's task did or waits to do; running while its rank 0 is alive here, or (the array done
with the task) while it writes on another node, not failed for the array's ended task.

Run dirs and sweep dirs may come from elsewhere and are read as untrusted: every file through the bounded readers
of :mod:`..train.plots` (regular files only, never through a symlink, size-bounded), ``run.yaml`` with the strict
loader (no aliases: an 825-byte alias bomb would expand to gigabytes), config values shown only for the keys a run
config has, metric records slimmed to the numbers shown and capped in number over all runs. A damaged file of one
run is a one-line note on stderr and that run's row shows less; a damaged ``sweep.json`` is exit 2 naming it.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import re
import shutil
import stat
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal, overload

import yaml

from ..config.load import MAX_CONFIG_BYTES, RunConfigLoader
from ..config.schema import brief, show
from ..errors import UsageError
from ..runtime.manifest import ALIVE_FILE, EVAL_DIR, PID_FILE, adapter_record, pid_file_alive
from ..runtime.safe_io import read_bounded
from ..train.plots import MAX_RECORDS, last_step, note, overlay_figure, save_figure, scan_metrics

RECENT_S = 900
"""A pid file of another host (or of a version that wrote no host) counts as running when the run wrote within this
many seconds (rank 0 touches its rank0.alive every minute: :class:`..runtime.manifest.PidHeartbeat`)."""
IGNORED_KEYS = ("output.dir", "train.resume")
SWEEP_FILE = "sweep.json"
"""What ``ia3-dist sweep`` writes into a sweep dir (see :mod:`.sweep`): the grid, the tasks, the job id."""
FORMAT = 1
LOGS = "logs"
"""The sweep dir's folder of logs: the array's batch logs (:data:`ARRAY_LOG`), ``--local`` tasks' logs."""
ARRAY_LOG = "%x-%A_%a.out"
"""An array task's batch log in :data:`LOGS` (Slurm's ``--output`` pattern: job name, array job id, task index):
lib.sh writes it as the task starts and once its run has ended, Slurm when it ends the task."""
_ARRAY_LOG = re.compile(r".+-([0-9]{1,20})_([0-9]{1,9})\.out")
MAX_LOG_ENTRIES = 1 << 20
"""Entries of ``logs/`` looked at for batch logs (a folder from elsewhere may hold any number)."""
MAX_WORLD = 1 << 30
"""A recorded ``world_size`` above this is no sweep's (``sweep`` allows 100,000 nodes x 4096 ranks)."""
_RUN_MARKERS = (".ia3-dist-run.json", "run.yaml", "metrics.jsonl")
MAX_SWEEP_BYTES = 16 << 20
"""sweep.json is a few hundred bytes per task: this is some 40k tasks (``ia3-dist sweep --max-tasks`` allows
10k)."""
METRIC_KEYS = ("step", "loss", "eval_loss", "eval_ppl", "eval_rewards/accuracies", "tokens_per_s", "peak_mem_gb")
"""What the table and the overlay use of a metric record; nothing else is kept."""
# What `ia3-dist sweep` names a task dir (see sweep.task_name): one plain path component.
_TASK_NAME = re.compile(r"[A-Za-z0-9._+=,-]{1,255}")
_JOB_ID = re.compile(r"[0-9]{1,20}")
_NOT_SHOWN = "its config values are not shown"


@dataclass
class Run:
    dir: Path
    label: str
    config: dict[str, Any] = field(default_factory=dict)
    slurm: str | None = None
    """The task's Slurm state when its sweep's job is known (None: not in the queue, or no Slurm record)."""
    job_known: bool = False
    array_seen: float | None = None
    """With ``job_known``: when the array last showed a sign of this task (see :func:`_array_signs`)."""
    planned: bool = False
    """``config`` is the task's as its sweep plans it (it has not written run.yaml yet)."""
    status: str = ""
    records: list[dict] = field(default_factory=list)

    def row(self, keys: list[str]) -> dict[str, Any]:
        train = [r for r in self.records if r.get("loss") is not None]
        evals = [r for r in self.records if r.get("eval_loss") is not None]
        tps = [r["tokens_per_s"] for r in train if isinstance(r.get("tokens_per_s"), (int, float))]
        # The first window includes the warm-up; the median of the rest is what the run sustains.
        tps = tps[1:] if len(tps) > 1 else tps
        mem = [r["peak_mem_gb"] for r in self.records if isinstance(r.get("peak_mem_gb"), (int, float))]
        steps = [r["step"] for r in self.records if isinstance(r.get("step"), int)]
        return {"run": self.label, "dir": str(self.dir), **{k: self.config.get(k) for k in keys},
                "status": self.status, "step": max(steps) if steps else None,
                "train_loss": train[-1]["loss"] if train else None,
                "eval_loss": evals[-1]["eval_loss"] if evals else None,
                "eval_ppl": evals[-1].get("eval_ppl") if evals else None,
                "pair_acc": evals[-1].get("eval_rewards/accuracies") if evals else None,
                "tokens_per_s": statistics.median(tps) if tps else None,
                "peak_mem_gb": max(mem) if mem else None}


def read_records(path: Path, keep: int = MAX_RECORDS) -> list[dict]:
    """The numbers of :data:`METRIC_KEYS` from metrics.jsonl, at most the last ``keep`` records. Lines that are not
    records are skipped and counted (a live run's half-written last line is not counted); what was skipped, or why
    the file could not be read at all, is one note on stderr."""
    try:
        got = scan_metrics(path, METRIC_KEYS, keep)
    except UsageError as e:
        note(f"{e}; its metrics are not shown")
        return []
    if got is None:
        return []
    msg = got.describe(path)
    if msg:
        note(msg)
    return got.records


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


@cache
def _schema() -> tuple[frozenset[str], frozenset[str]]:
    """The flat keys of a run config and the sections that hold them."""
    from ..config import RunConfig

    keys = frozenset(flatten(RunConfig().to_dict()))
    return keys, frozenset(k.rsplit(".", i)[0] for k in keys for i in range(1, k.count(".") + 1))


def config_view(raw: Any) -> dict[str, Any]:
    """``raw`` (a run config mapping, or already flat ``key.sub`` keys) as flat keys, only the keys a run config of
    this ia3-dist has: a file from elsewhere cannot add thousands of columns to the table (a dict value such as
    ``data.columns`` stays one value)."""
    keys, sections = _schema()
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if not isinstance(node, dict):
            return
        for k, v in node.items():
            if not isinstance(k, str):
                continue
            key = f"{prefix}.{k}" if prefix else k
            if key in keys:
                out[key] = _str_keys(v)
            elif key in sections:
                walk(v, key)

    walk(raw, "")
    return out


def _str_keys(v: Any) -> Any:
    """``v`` with every mapping's keys as strings: YAML keys may be numbers or dates (``{1: a, b: c}``), which the
    comparisons (JSON with sorted keys) cannot order or write."""
    if isinstance(v, dict):
        return {str(k): _str_keys(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_str_keys(x) for x in v]
    return v


def _finite(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


_SLURM_RUNNING = frozenset({"RUNNING", "CONFIGURING", "COMPLETING", "STAGE_OUT", "SIGNALING", "RESIZING",
                            "SUSPENDED"})
# Ended for good: squeue lists these only when asked to (SQUEUE_STATES=all in the environment, -t all), and then
# the task's latest attempt may be one run by hand since; the dir says how that went.
_SLURM_ENDED = frozenset({"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL",
                          "OUT_OF_MEMORY", "PREEMPTED", "REVOKED", "TIMEOUT"})
ADAPTER_FILE = "adapter/adapter_model.safetensors"


def _mtime(p: Path) -> float | None:
    try:
        return p.stat().st_mtime
    except OSError:
        return None


def _finished_after(d: Path, since: float) -> bool:
    """The run's adapter was written after ``since`` and nothing of a later attempt is there: no pid file, no
    preemption or hang marker as new."""
    written = _mtime(d / ADAPTER_FILE)
    if written is None or written <= since or (d / PID_FILE).exists() or _adapter_status(d) != "done":
        return False
    return all((t := _mtime(d / m)) is None or t <= written for m in ("preempted.json", "hung.json"))


def _adapter_status(d: Path) -> str:
    """done, or a chunk's adapter (the step file says the run has not ended): stopped, unless a later attempt
    logged steps past it and ended without an adapter of its own (failed)."""
    rec = adapter_record(d / "adapter")
    if rec is None or rec.get("final") is not False:
        return "done"  # the run's end (or an adapter of an earlier version, without the record)
    step = rec.get("step")
    try:
        last = last_step(d / "metrics.jsonl")
    except UsageError:  # a link or an unreadable file: its metrics are not shown (said where they are read)
        last = None
    return "failed" if type(step) is int and last is not None and last > step else "stopped"


def run_status(d: Path, slurm_state: str | None = None, job_known: bool = False,
               array_seen: float | None = None) -> str:
    """See the module docstring. For a sweep task: ``slurm_state``, its array task's state (None: not queued);
    ``job_known``, whether Slurm was asked about the array; ``array_seen``, when the array last showed a sign of the
    task (:func:`_array_signs`)."""
    state = (slurm_state or "").upper()
    requeued = (d / "preempted.json").exists() or (d / "hung.json").exists()
    if state in _SLURM_RUNNING:
        # The attempt ended at a checkpoint (its pid file gone, the marker written) while Slurm still lists the
        # task as running: the batch shell is requeueing it, or the next attempt starts and has not yet written
        # its pid file (which removes the marker).
        return "preempted" if requeued and not (d / PID_FILE).exists() else "running"
    started = _mtime(d / PID_FILE)
    # Rank 0 writes the pid file as its attempt starts: one newer than the array's last sign of the task belongs to
    # an attempt started outside the array, whose end or life the queue knows nothing of. Whether its process lives
    # only the host that wrote it can tell (None from any other).
    alive = pid_file_alive(d) if started is not None else False
    by_hand = array_seen is not None and started is not None and started > array_seen
    if state:  # PENDING, REQUEUED, REQUEUE_HOLD, ...: the array's task waits to (re)start
        if by_hand and alive:  # seen running here; one elsewhere cannot be told from the queued task's wait
            return "running"
        if array_seen is not None and _finished_after(d, array_seen):
            return "done"  # done by hand meanwhile: the queued task would resume a finished run
        return "preempted" if requeued else "pending"
    if started is not None:
        if alive:
            return "running"
        if job_known and not by_hand:
            return "failed"  # the array's attempt wrote it, and the array no longer runs the task
        if alive is False:
            return "failed"  # this host wrote it, and its process is gone
        # rank0.alive: refreshed every minute while rank 0 lives, however long its load or its log window.
        newest = max(started, _mtime(d / ALIVE_FILE) or 0.0, _mtime(d / "metrics.jsonl") or 0.0)
        return "running" if time.time() - newest < RECENT_S else "failed"
    if (d / "preempted.json").exists():
        # Slurm was asked and no longer lists the task: nothing requeues it (cancelled once requeued, a refused
        # requeue, the stall guard's end). It stopped at a checkpoint; train.resume=auto continues it.
        return "stopped" if job_known else "preempted"
    if (d / "hung.json").exists():
        return "failed"
    if (d / ADAPTER_FILE).is_file():
        return _adapter_status(d)
    if any((d / m).exists() for m in _RUN_MARKERS):
        return "failed"
    return "pending"


def slurm_states(job: str | None) -> dict[int, str] | None:
    """{array task index: state} of the job's tasks still in the queue; None when Slurm cannot be asked."""
    if not job or not shutil.which("squeue"):
        return None
    try:
        proc = subprocess.run(["squeue", "-h", "-r", "-j", str(job), "-o", "%K|%T"], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        # Slurm forgets finished jobs after MinJobAge: then none of its tasks is queued.
        return {} if "invalid job id" in proc.stderr.lower() else None
    out = {}
    for line in proc.stdout.splitlines():
        idx, _, state = line.strip().partition("|")
        if idx.isdigit() and state.upper() not in _SLURM_ENDED:
            out[int(idx)] = state
    return out


def _array_signs(d: Path, job: str) -> tuple[float, dict[int, float]]:
    """When the sweep's job array last showed a sign of its tasks: the sweep record's time (written as the array
    was submitted) and, per task index, its batch logs' (:data:`ARRAY_LOG` of ``job``). Names and times only, of
    regular files, never through a symlink: the sweep dir may come from elsewhere."""
    written = _mtime(d / SWEEP_FILE) or 0.0
    seen: dict[int, float] = {}
    logs = d / LOGS
    try:
        if not stat.S_ISDIR(os.lstat(logs).st_mode):
            return written, seen
        with os.scandir(logs) as entries:
            for e in itertools.islice(entries, MAX_LOG_ENTRIES):
                m = _ARRAY_LOG.fullmatch(e.name)
                if m is None or m.group(1) != job or not e.is_file(follow_symlinks=False):
                    continue
                i = int(m.group(2))
                seen[i] = max(seen.get(i, 0.0), e.stat(follow_symlinks=False).st_mtime)
    except OSError:
        pass  # no logs to go by: the sweep record's time alone
    return written, seen


READ_FIX = "give a sweep dir that `ia3-dist sweep` wrote"


@overload
def read_sweep(sweep_dir: Path, fix: str = ..., tolerant: Literal[False] = ...) -> dict: ...
@overload
def read_sweep(sweep_dir: Path, fix: str = ..., tolerant: bool = ...) -> dict | None: ...
def read_sweep(sweep_dir: Path, fix: str = READ_FIX, tolerant: bool = False) -> dict | None:
    """The record in ``sweep.json`` (the one reader of it: ``summary`` and ``sweep --force``), every field checked.
    A missing, unreadable or malformed record is a UsageError naming the file and ending in ``fix``; with
    ``tolerant`` (``sweep --force``, whose record replaces it) that message is a note on stderr and the answer
    None."""
    try:
        return _read_sweep(sweep_dir / SWEEP_FILE, fix)
    except UsageError as e:
        if not tolerant:
            raise
        note(str(e))
        return None


def _read_sweep(path: Path, fix: str) -> dict:
    name = brief(str(path))
    try:
        data = read_bounded(path, MAX_SWEEP_BYTES, missing_ok=True)
    except UsageError as e:
        raise UsageError(f"{e}; {fix}") from None
    if data is None:
        raise UsageError(f"{name}: missing; {fix}")
    try:
        rec = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UsageError(f"{name}: not a readable sweep record (not UTF-8 at byte {e.start}); {fix}") from None
    except (ValueError, RecursionError) as e:  # bad JSON, an int of over 4300 digits, deep nesting
        why = "nested too deeply" if isinstance(e, RecursionError) else brief(str(e))
        raise UsageError(f"{name}: not a readable sweep record ({why}); {fix}") from None
    problem = _sweep_problem(rec)
    if problem:
        raise UsageError(f"{name}: not a sweep record of this ia3-dist (format {FORMAT}): {problem}; {fix}")
    return rec


def _str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _sweep_problem(rec: Any) -> str | None:
    if not isinstance(rec, dict):
        return "not a JSON object"
    if type(rec.get("format")) is not int or rec["format"] != FORMAT:
        return f"format {show(rec.get('format'))}"
    if not isinstance(rec.get("config"), str):
        return "no config path"
    if not _str_list(rec.get("overrides", [])):
        return "overrides is not a list of strings"
    job = rec.get("job")
    if job is not None and not (isinstance(job, str) and _JOB_ID.fullmatch(job)):
        return f"job {show(job)} is not a Slurm job id"
    world = rec.get("world_size")
    if world is not None and not (type(world) is int and 0 < world <= MAX_WORLD):
        return f"world_size {show(world)} is not a number of ranks"
    tasks = rec.get("tasks")
    if not isinstance(tasks, list):
        return "no list of tasks"
    for i, t in enumerate(tasks):
        if not isinstance(t, dict):
            return f"task {i} is not a JSON object"
        name = t.get("name")
        if not (isinstance(name, str) and _TASK_NAME.fullmatch(name) and name not in (".", "..")):
            return f"task {i} has the name {show(name)}, not a task dir name"
        if type(t.get("index")) is not int or not 0 <= t["index"] < len(tasks):
            return f"task {i} has the index {show(t.get('index'))}"
        if not _str_list(t.get("overrides")):
            return f"task {i} has no list of overrides"
        values = t.get("values", {})
        if not (isinstance(values, dict) and all(isinstance(v, str) for v in values.values())):
            return f"task {i}: values is not a mapping of strings"
    return None


def _is_run(d: Path) -> bool:
    return any((d / m).exists() for m in _RUN_MARKERS)


def collect(paths: list[str]) -> tuple[list[Run], Path | None]:
    """The runs to show, in order; and the sweep dir when exactly one was given."""
    runs: list[Run] = []
    sweeps: list[Path] = []
    for raw in paths:
        try:
            _collect_one(raw, len(paths), runs, sweeps)
        except OSError as e:  # a name too long, a dir without read permission, ...
            raise UsageError(f"{brief(raw)}: cannot read it ({e.strerror or e})") from None
    keep = MAX_RECORDS // max(1, len(runs))  # a bound on memory over all runs, not per run
    for run in runs:
        if not run.planned:
            run.config = _run_config(run.dir)
        run.records = read_records(run.dir / "metrics.jsonl", keep)
        run.status = run_status(run.dir, run.slurm, run.job_known, run.array_seen)
    return runs, (sweeps[0] if len(paths) == 1 and sweeps else None)


def _collect_one(raw: str, n_paths: int, runs: list[Run], sweeps: list[Path]) -> None:
    d = Path(raw)
    if not d.is_dir():
        raise UsageError(f"{brief(raw)}: no such directory; give run dirs (output.dir) or sweep dirs")
    if os.path.lexists(d / SWEEP_FILE):
        rec = read_sweep(d)
        sweeps.append(d)
        states = slurm_states(rec.get("job"))
        signs = _array_signs(d, rec["job"]) if states is not None else None
        base = _sweep_config(rec)
        pending: list[Run] = []
        started: tuple[Run, dict] | None = None
        for t in rec["tasks"]:
            # The task dir from its name, not the path recorded: a sweep dir copied from elsewhere records paths of
            # that machine, and a hostile record could name any dir.
            run = Run(Path(os.path.abspath(d)) / t["name"], f"{d.name}/{t['name']}" if n_paths > 1 else t["name"])
            if states is not None and signs is not None:
                run.job_known, run.slurm = True, states.get(t["index"])
                run.array_seen = max(signs[0], signs[1].get(t["index"], 0.0))
            if not os.path.lexists(run.dir / "run.yaml"):
                run.config, run.planned = _task_config(rec, t, base), True
                pending.append(run)
            elif started is None:
                started = run, t
            runs.append(run)
        if pending:
            _settle_pending(rec, base, pending, started)
    elif _is_run(d):
        runs.append(Run(d, raw))
    else:
        subs = sorted(s for s in d.iterdir() if s.is_dir() and _is_run(s))
        if not subs:
            raise UsageError(f"{brief(raw)}: not a run dir (no {', '.join(_RUN_MARKERS)}), not a sweep dir (no "
                             f"{SWEEP_FILE}) and holds no run dirs")
        runs += [Run(s, str(s)) for s in subs]


def _run_config(d: Path) -> dict[str, Any]:
    """The run's config values from run.yaml, or {} with a note saying why not."""
    path = d / "run.yaml"
    try:
        data = read_bounded(path, MAX_CONFIG_BYTES, missing_ok=True)
    except UsageError as e:
        note(f"{e}; {_NOT_SHOWN}")
        return {}
    if data is None:
        return {}
    try:
        raw = yaml.load(data.decode("utf-8"), Loader=RunConfigLoader)  # a SafeLoader: no aliases, bounded depth
    except UnicodeDecodeError as e:
        why = f"not UTF-8 text (at byte {e.start})"
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        why = f"{where}{brief(str(getattr(e, 'problem', None) or e))}"
    except RecursionError:
        why = "nested too deeply"
    else:
        return config_view(raw)
    note(f"{brief(str(path))}: {why}; {_NOT_SHOWN}")
    return {}


def _sweep_config(rec: dict) -> dict[str, Any] | None:
    """The sweep's config file as a mapping (read once for all its tasks), or None if it is unusable."""
    from ..config import read_yaml

    try:
        return read_yaml(rec["config"])
    except (UsageError, OSError):
        return None


def _task_config(rec: dict, task: dict, base: dict[str, Any] | None) -> dict[str, Any]:
    """A task that has not written run.yaml yet: its config as the sweep builds it (the grid values alone if the
    config file is gone)."""
    from ..config import apply_overrides, build_config

    if base is not None:
        try:
            raw = apply_overrides(copy.deepcopy(base), [*rec.get("overrides", []), *task["overrides"]])
            return config_view(build_config(raw).to_dict())
        except (UsageError, OSError):
            pass
    return config_view(dict(task.get("values", {})))


SETTLED_AT_START = ("train.grad_accum", "train.micro_batch_size", "deepspeed.config")
"""What a run's start settles when its config leaves it open (train/prepare.py), written so into its run.yaml: the
accumulation that makes train.global_batch_size on its ranks, micro_batch_size: auto (and the accumulation that
keeps the batch), deepspeed.config: auto (the lowest stage that fits)."""
_SETTLES_NOTHING = ("train.lr", "train.seed", "train.epochs", "train.max_steps", "train.weight_decay", "train.betas",
                    "train.eps", "train.grad_clip", "train.scheduler", "train.warmup_steps", "train.log_every",
                    "train.eval_every", "train.peak_tflops", "train.resume", "train.stop_after_steps",
                    "train.early_stopping.", "train.hang_timeout_s", "train.beta", "train.label_smoothing",
                    "train.simpo_gamma", "train.cpo_alpha", "deepspeed.timeout_minutes", "checkpoint.", "output.",
                    "eval.")
"""Keys that cannot change what a start settles (the optimizer's numbers, the schedule's length, logging,
checkpoints, output; the choices depend on the model, the data and the batch): two tasks that differ in these only
settle alike."""
_MAY_SETTLE = ("model.", "data.", "ia3.", "hardware.", "deepspeed.config", "train.micro_batch_size",
               "train.grad_accum", "train.global_batch_size", "train.precision", "train.threads",
               "train.gradient_checkpointing", "train.bind_cores", "train.lean_host_memory", "train.compile",
               "train.loss_chunk_mib", "train.objective", "train.loss_type")
"""The other keys: what the start's choices may depend on (the model, its data, the batch, the memory a step
takes, the ranks and cores), so a pending task that differs from a started one in any of them waits for its own
start. Every config key is in exactly one of the two lists (tests/test_sweep.py), so a new key is put in one."""


def _is_open(cfg: dict[str, Any], key: str) -> bool:
    """Whether the config leaves ``key`` for the start to settle (``auto``: the string a config writes)."""
    micro_auto = cfg.get("train.micro_batch_size") == "auto"
    if key == "train.grad_accum":
        g = cfg.get("train.global_batch_size")
        return micro_auto or (type(g) is int and g > 0)
    if key == "train.micro_batch_size":
        return micro_auto
    return cfg.get(key) == "auto"


_RUN_ONLY = ("output.", "checkpoint.", "eval.", "train.resume", "train.stop_after_steps", "train.hang_timeout_s",
             "train.log_every", "train.peak_tflops", "train.threads", "train.bind_cores", "train.compile",
             "deepspeed.timeout_minutes", "data.cache_dir", "data.require_prepared", "hardware.")
"""Keys that change how a run goes (logging, checkpoints, benchmarks, caches, threads, compilation, the job's
shape), not what it trains: a finished run with other values of these is the same run."""


def trained_otherwise(d: Path, planned: dict[str, Any]) -> list[str]:
    """The keys whose value in the finished run ``d``'s run.yaml differs from ``planned`` (:func:`config_view` of
    the config it would be started with now): the start's own choices (:data:`SETTLED_AT_START` where the plan
    leaves them open, a value the plan leaves to the start, None) and :data:`_RUN_ONLY` keys aside (``eval.*`` counts
    where early stopping follows a benchmark score); a key the run.yaml lacks (an ia3-dist before it)
    is compared as its default. None where run.yaml cannot be read (a note says why): nothing to compare."""
    done = _run_config(d)
    if not done:
        return []
    from ..config.schema import EVAL_METRICS, RunConfig

    # A key the run.yaml lacks was written by an ia3-dist before it: the run had its default.
    defaults = config_view(RunConfig().to_dict())
    # Benchmarks decide when a run stops (and, final: best, which vectors it writes) where early stopping follows
    # one of their scores rather than a held-out metric: then eval.* changes what is trained.
    metric = planned.get("train.early_stopping.metric")
    held_out = EVAL_METRICS.get(str(planned.get("train.objective")), ())
    follows = bool(metric) and metric not in held_out and not str(metric).startswith("eval_loss/")
    run_only = tuple(x for x in _RUN_ONLY if not (follows and x == "eval."))
    differ = []
    for k in sorted(set(planned)):
        if k.startswith(run_only) or (k in SETTLED_AT_START and _is_open(planned, k)) or planned.get(k) is None:
            continue
        was = done[k] if k in done else defaults.get(k)
        same = json.dumps(_finite(was), sort_keys=True, default=str) == \
            json.dumps(_finite(planned.get(k)), sort_keys=True, default=str)
        if not same:
            differ.append(k)
    return differ


def _accum_for(cfg: dict[str, Any], world: int | None) -> int | None:
    """The accumulation a start derives from train.global_batch_size on ``world`` ranks at a fixed micro-batch
    (prepare.with_global_batch); None where it cannot be told (micro_batch_size: auto) or would not divide."""
    g, micro = cfg.get("train.global_batch_size"), cfg.get("train.micro_batch_size")
    if not world or type(g) is not int or g <= 0 or type(micro) is not int or micro <= 0:
        return None
    per = micro * world
    return g // per if g % per == 0 else None


def _world_of(rec: dict, resolved: dict[str, Any]) -> int | None:
    """The ranks of a sweep's task: as the sweep recorded them, else what a started task's settled batch implies."""
    if rec.get("world_size"):
        return rec["world_size"]
    g, micro, accum = (resolved.get(k) for k in ("train.global_batch_size", "train.micro_batch_size",
                                                  "train.grad_accum"))
    if all(type(v) is int and v > 0 for v in (g, micro, accum)) and g % (micro * accum) == 0:
        return g // (micro * accum)
    return None


def _settle_pending(rec: dict, base: dict[str, Any] | None, pending: list[Run],
                    started: tuple[Run, dict] | None) -> None:
    """Pending tasks' rows show what each task will run with. Their configs are as planned, so the values a start
    settles (:data:`SETTLED_AT_START`) would show as written (``auto``, a grad_accum the global batch replaces) and
    differ from a started task's settled ones: each is derived where the task's own values fix it (grad_accum from
    its global batch and micro-batch), else taken from the started task's run.yaml where nothing that settles it
    differs between the two tasks, else left open (``auto``, no grad_accum). Nothing else comes from the started
    task: its run.yaml may hold another grid value's derivations, or an earlier sweep's config (``sweep --force``
    keeps task dirs)."""
    resolved: dict[str, Any] = {}
    planned: dict[str, Any] | None = None
    if started is not None:
        resolved = _run_config(started[0].dir)
        planned = _task_config(rec, started[1], base)
    world = _world_of(rec, resolved)
    for run in pending:
        cfg = run.config
        alike = planned is not None and all(
            k.startswith(_SETTLES_NOTHING) for k in set(cfg) | set(planned) if cfg.get(k) != planned.get(k))
        for key in SETTLED_AT_START:
            if not _is_open(cfg, key):
                continue  # as written is what the task runs with
            derived = _accum_for(cfg, world) if key == "train.grad_accum" else None
            if derived is not None:
                cfg[key] = derived
            elif alike and planned is not None and _is_open(planned, key) and key in resolved:
                cfg[key] = resolved[key]
            elif key == "train.grad_accum":
                cfg[key] = None  # not known before the start (the config's own value is replaced there)


def differing(runs: list[Run]) -> list[str]:
    keys: list[str] = []
    for run in runs:
        keys += [k for k in run.config if k not in keys]
    return [k for k in keys if k not in IGNORED_KEYS
            and len({json.dumps(r.config.get(k), sort_keys=True, default=str) for r in runs}) > 1]


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.0f}" if 1e5 <= abs(v) < 1e15 else f"{v:.4g}"  # 1e308 is not 309 digits wide
    if isinstance(v, (str, bool)) or (isinstance(v, int) and v.bit_length() <= 256):
        # Values from files of elsewhere: escape sequences and megabyte strings must not reach the terminal.
        return brief(str(v))
    return show(v)


HEADINGS = {"status": "status", "step": "step", "train_loss": "train loss", "eval_loss": "eval loss",
            "eval_ppl": "eval ppl", "pair_acc": "eval pair acc", "tokens_per_s": "tokens/s",
            "peak_mem_gb": "peak mem GiB"}
OPTIONAL = ("pair_acc",)
"""Columns shown only when some run has a value: preference runs' held-out pair accuracy."""


def table(rows: list[dict[str, Any]], keys: list[str]) -> str:
    shown = {c: h for c, h in HEADINGS.items() if c not in OPTIONAL or any(r.get(c) is not None for r in rows)}
    cols = ["run", *keys, *shown]
    heads = ["run", *keys, *shown.values()]
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(heads)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(heads, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths, strict=True)).rstrip() for cell in cells]
    return "\n".join(lines)


def plot_losses(runs: list[Run], keys: list[str], out: Path) -> Path | None:
    """``ia3-dist plot``'s overlay (train loss, eval loss, real tokens/s) of the runs, each labelled by the values
    that differ and its status. None when no run has logged a loss yet."""
    drawn = [r for r in runs if any(x.get("loss") is not None or x.get("eval_loss") is not None for x in r.records)]
    if not drawn:
        return None
    labels = [(", ".join(f"{k.rsplit('.', 1)[-1]}={_fmt(r.config.get(k))}" for k in keys) or r.label)
              + f" ({r.status})" for r in drawn]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--plot {brief(str(out))}: cannot write it ({e.strerror or e}); give another --plot") \
            from None
    fig = overlay_figure([(lab, r.records) for lab, r in zip(labels, drawn, strict=True)])
    return save_figure(fig, out, "--plot ", fix="give another --plot", dpi=100, bbox_inches="tight")


RESULTS = "results.json"
"""What ``ia3-dist eval`` writes into ``<run>/eval`` (:mod:`.benchmark`)."""
MAX_RESULTS_BYTES = 64 << 20
"""``eval/results.json`` holds a row per task, metric and checkpoint: tens of KB in practice."""


def eval_value(d: Path, metric: str) -> float | None:
    """The run's value of ``metric`` (``TASK/METRIC`` as in ``<run>/eval/results.json``, e.g. ``tiny_mc/acc,none``
    or ``heldout/loss``): its final adapter's row, else its latest checkpoint's; None without one. Read as
    untrusted: bounded, a regular file, anything malformed is a note and no value."""
    f = d / EVAL_DIR / RESULTS
    if not os.path.lexists(f):
        return None
    task, _, name = metric.partition("/")
    try:
        rows = json.loads(read_bounded(f, MAX_RESULTS_BYTES, "run ia3-dist eval again").decode("utf-8"),
                          parse_constant=float)["rows"]  # NaN: a diverged point, ranked last (not skipped)
        hits = [r for r in rows if r["task"] == task and r["metric"] == name and type(r["step"]) is int
                and type(r["value"]) in (int, float)]
        for r in hits:
            r["value"] = float(r["value"])  # an integer past float's range: OverflowError, a malformed file
    except (UsageError, OSError, ValueError, KeyError, TypeError, OverflowError) as e:
        note(f"{brief(str(f))}: not readable as eval results ({brief(str(e))}); the run shows no {brief(metric)}")
        return None
    # The final adapter's value even where it is not finite: falling back to an earlier checkpoint's ranked a run
    # that diverged by a value it no longer has.
    # The latest final adapter's (a run written in chunks, train.stop_after_steps, has one per chunk evaluated).
    final = sorted((r for r in hits if r.get("checkpoint") == "final"), key=lambda r: r["step"])[-1:]
    best = final or sorted(hits, key=lambda r: r["step"])[-1:]
    return float(best[0]["value"]) if best else None


def _say_metric_names(runs: list[Any], metric: str) -> None:
    """No run has ``metric``: a note naming what the runs' results do hold for its task (lm-eval names a score
    ``acc,none``, metric and filter; ``tiny_mc/acc`` matched nothing, and every run showed "-" without a word)."""
    task, _, name = metric.partition("/")
    have: set[str] = set()
    for run in runs:
        f = run.dir / EVAL_DIR / RESULTS
        if not os.path.lexists(f):
            continue
        try:
            rows = json.loads(read_bounded(f, MAX_RESULTS_BYTES).decode("utf-8"), parse_constant=float)["rows"]
            have |= {r["metric"] for r in rows if r["task"] == task and isinstance(r["metric"], str)}
        except (UsageError, OSError, ValueError, KeyError, TypeError):
            continue  # eval_value said so already
    if have:
        near = sorted(m for m in have if m.split(",", 1)[0] == name) or sorted(have)
        note(f"--metric {brief(metric)}: no run has it; their eval/results.json hold {brief(task)}/"
             f"{', '.join(brief(m) for m in near[:5])} (lm-eval names a score <metric>,<filter>)")


def rank_by(rows: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Rows ordered best first by ``metric`` (losses and perplexities ascending, anything else descending), runs
    without a value last; each gets its ``rank``."""
    from ..config.schema import lower_is_better

    lower = lower_is_better(metric)
    scored = sorted((r for r in rows if r.get(metric) is not None and math.isfinite(r[metric])),
                    key=lambda r: r[metric] if lower else -r[metric])
    rest = [r for r in rows if r not in scored]
    for i, r in enumerate(scored, 1):
        r["rank"] = i
    return scored + rest


def main(argv: list[str], prog: str) -> int:
    ap = argparse.ArgumentParser(prog=prog, description="One table of runs: the values that differ, status, "
                                 "final train loss, eval loss/perplexity, tokens/s, peak memory; and an overlay "
                                 "plot of their loss curves.")
    ap.add_argument("dirs", nargs="+", metavar="DIR", help="run dirs (output.dir), sweep dirs, or folders of run "
                    "dirs")
    ap.add_argument("--plot", help="PNG of the loss curves (default: <sweep dir>/summary.png for one sweep dir, "
                    "else summary.png in the current directory)")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    ap.add_argument("--metric", help="TASK/METRIC of `ia3-dist eval`'s results (e.g. tiny_mc/acc,none or "
                    "heldout/loss): a column with each run's value, the runs ranked by it (losses lower first)")
    a = ap.parse_args(argv)
    if a.metric is not None and not re.fullmatch(r"[^/\s]{1,200}/[^/\s]{1,200}", a.metric):
        raise UsageError(f"--metric {brief(a.metric)}: expected TASK/METRIC as in eval/results.json, e.g. "
                         f"tiny_mc/acc,none or heldout/loss")
    runs, sweep_dir = collect(a.dirs)
    keys = differing(runs)
    rows = [r.row(keys) for r in runs]
    if a.metric:
        for run, row in zip(runs, rows, strict=True):
            row[a.metric] = eval_value(run.dir, a.metric)
        if all(row[a.metric] is None for row in rows):
            _say_metric_names(runs, a.metric)
        rows = rank_by(rows, a.metric)
    columns = ["rank", *keys, a.metric] if a.metric else keys
    # default=str: a YAML date or set in a run.yaml is not JSON; a non-finite value (a run whose loss went NaN) is
    # null, as strict JSON readers (jq, JavaScript) accept no NaN or Infinity.
    print(json.dumps({"keys": columns, "rows": _finite(rows)}, indent=1, default=str, allow_nan=False) if a.json
          else table(rows, columns), flush=True)
    if not a.no_plot:
        out = Path(a.plot) if a.plot else (sweep_dir / "summary.png" if sweep_dir else Path("summary.png"))
        written = plot_losses(runs, keys, out)  # labelled by the config values that differ, not the ranking
        if not a.json:
            print(f"loss curves: {written}" if written else "loss curves: no run has logged a loss yet")
    return 0
