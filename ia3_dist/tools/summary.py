"""``ia3-dist summary DIR...``: one table of runs (run dirs, sweep dirs, or folders of run dirs) and an overlay plot
of their loss curves.

A row: the config values that differ between the runs, the status, the last step, the final train loss, the last
eval loss and perplexity, the median tokens/s and the peak memory (``peak_mem_gb``: GPU max allocated, or peak
RSS on CPU). Status:

- done: the adapter is written and the run has ended;
- running: Slurm lists the task as running, or (no Slurm record) rank 0's pid file is there and that process is
  alive on this host, or the run wrote metrics within :data:`RECENT_S` (it may run on another node);
- preempted: stopped at a checkpoint after a signal (or by the hang watchdog); it resumes when requeued;
- failed: it started and ended without an adapter (or its job is gone while the pid file says it runs);
- pending: a sweep task that has not started.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import UsageError

RECENT_S = 900
"""A pid file without a live local process counts as running when the run wrote within this many seconds."""
IGNORED_KEYS = ("output.dir", "train.resume")
SWEEP_FILE = "sweep.json"
"""What ``ia3-dist sweep`` writes into a sweep dir (see :mod:`.sweep`): the grid, the tasks, the job id."""
FORMAT = 1
_RUN_MARKERS = (".ia3-dist-run.json", "run.yaml", "metrics.jsonl")


@dataclass
class Run:
    dir: Path
    label: str
    config: dict[str, Any] = field(default_factory=dict)
    slurm: str | None = None
    """The task's Slurm state when its sweep's job is known (None: not in the queue, or no Slurm record)."""
    job_known: bool = False
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
                "tokens_per_s": statistics.median(tps) if tps else None,
                "peak_mem_gb": max(mem) if mem else None}


def read_records(path: Path) -> list[dict]:
    """metrics.jsonl, skipping lines that do not parse (the last one of a live run may be half written)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _pid_alive(pid_file: Path) -> bool:
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    try:  # a zombie (ended, not yet reaped) is not running
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def run_status(d: Path, slurm_state: str | None = None, job_known: bool = False) -> str:
    """See the module docstring."""
    state = (slurm_state or "").upper()
    if state in ("RUNNING", "CONFIGURING", "COMPLETING", "STAGE_OUT", "SIGNALING", "RESIZING", "SUSPENDED"):
        return "running"
    requeued = (d / "preempted.json").exists() or (d / "hung.json").exists()
    if state:  # PENDING, REQUEUED, REQUEUE_HOLD, ...: waiting to (re)start
        return "preempted" if requeued else "pending"
    pid = d / "rank0.pid"
    if pid.exists():
        if _pid_alive(pid):
            return "running"
        if job_known:
            return "failed"
        newest = max((p.stat().st_mtime for p in (pid, d / "metrics.jsonl") if p.exists()), default=0.0)
        return "running" if time.time() - newest < RECENT_S else "failed"
    if (d / "preempted.json").exists():
        return "preempted"
    if (d / "hung.json").exists():
        return "failed"
    if (d / "adapter" / "adapter_model.safetensors").is_file():
        return "done"
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
        if idx.isdigit():
            out[int(idx)] = state
    return out


def read_sweep(sweep_dir: Path) -> dict:
    path = sweep_dir / SWEEP_FILE
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{path}: not a readable sweep record ({e})") from None
    if not isinstance(rec, dict) or rec.get("format") != FORMAT or not isinstance(rec.get("tasks"), list):
        raise UsageError(f"{path}: not a sweep record of this ia3-dist (format {FORMAT})")
    return rec


def _is_run(d: Path) -> bool:
    return any((d / m).exists() for m in _RUN_MARKERS)


def collect(paths: list[str]) -> tuple[list[Run], Path | None]:
    """The runs to show, in order; and the sweep dir when exactly one was given."""
    runs: list[Run] = []
    sweeps = []
    for raw in paths:
        d = Path(raw)
        if not d.is_dir():
            raise UsageError(f"{raw}: no such directory; give run dirs (output.dir) or sweep dirs")
        if (d / SWEEP_FILE).is_file():
            rec = read_sweep(d)
            sweeps.append(d)
            states = slurm_states(rec.get("job"))
            for t in rec["tasks"]:
                run = Run(Path(t["dir"]), f"{d.name}/{t['name']}" if len(paths) > 1 else t["name"])
                if states is not None:
                    run.job_known, run.slurm = True, states.get(int(t["index"]))
                if not (run.dir / "run.yaml").is_file():
                    run.config = {"from_sweep": True, **_task_config(rec, t)}
                runs.append(run)
        elif _is_run(d):
            runs.append(Run(d, str(raw)))
        else:
            subs = sorted(s for s in d.iterdir() if s.is_dir() and _is_run(s))
            if not subs:
                raise UsageError(f"{raw}: not a run dir (no {', '.join(_RUN_MARKERS)}), not a sweep dir (no "
                                 f"{SWEEP_FILE}) and holds no run dirs")
            runs += [Run(s, str(s)) for s in subs]
    for run in runs:
        if not run.config.pop("from_sweep", False):
            run.config = _run_config(run.dir)
        run.records = read_records(run.dir / "metrics.jsonl")
        run.status = run_status(run.dir, run.slurm, run.job_known)
    return runs, (sweeps[0] if len(paths) == 1 and sweeps else None)


def _run_config(d: Path) -> dict[str, Any]:
    try:
        return flatten(yaml.safe_load((d / "run.yaml").read_text(encoding="utf-8")) or {})
    except (OSError, yaml.YAMLError):
        return {}


def _task_config(rec: dict, task: dict) -> dict[str, Any]:
    """A task that has not written run.yaml yet: its config as the sweep builds it (the grid values alone if the
    config file is gone)."""
    from ..config import load_config

    try:
        return flatten(load_config(rec["config"], [*rec.get("overrides", []), *task["overrides"]]).to_dict())
    except (UsageError, OSError):
        return dict(task.get("values", {}))


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
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.0f}"
    return str(v)


HEADINGS = {"status": "status", "step": "step", "train_loss": "train loss", "eval_loss": "eval loss",
            "eval_ppl": "eval ppl", "tokens_per_s": "tokens/s", "peak_mem_gb": "peak mem GiB"}


def table(rows: list[dict[str, Any]], keys: list[str]) -> str:
    cols = ["run", *keys, *HEADINGS]
    heads = ["run", *keys, *HEADINGS.values()]
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
    import matplotlib.pyplot as plt

    from ..train.plots import overlay_figure

    labels = [(", ".join(f"{k.rsplit('.', 1)[-1]}={_fmt(r.config.get(k))}" for k in keys) or r.label)
              + f" ({r.status})" for r in drawn]
    fig = overlay_figure([(lab, [x for x in r.records if "step" in x]) for lab, r in zip(labels, drawn, strict=True)])
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return out


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
    a = ap.parse_args(argv)
    runs, sweep_dir = collect(a.dirs)
    keys = differing(runs)
    rows = [r.row(keys) for r in runs]
    print(json.dumps({"keys": keys, "rows": rows}, indent=1) if a.json else table(rows, keys), flush=True)
    if not a.no_plot:
        out = Path(a.plot) if a.plot else (sweep_dir / "summary.png" if sweep_dir else Path("summary.png"))
        try:
            written = plot_losses(runs, keys, out)
        except OSError as e:
            raise UsageError(f"--plot {out}: cannot write ({e.strerror or e}); give another --plot") from None
        if not a.json:
            print(f"loss curves: {written}" if written else "loss curves: no run has logged a loss yet")
    return 0
