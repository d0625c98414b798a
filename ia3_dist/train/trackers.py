"""Experiment trackers (``output.report_to``): TensorBoard, Weights & Biases, MLflow.

Rank 0 only. :class:`~.metrics.MetricsLog` hands every line it writes to metrics.jsonl to :meth:`Trackers.log`,
so each tracker gets exactly those lines (their numbers, at the line's optimizer step); metrics.jsonl stays the
record of truth. Every rank checks in the preflight (:func:`check_installed`) that the named packages are there;
rank 0 starts the trackers (:func:`start_trackers`) before the process group starts, so a tracker that cannot
start is exit 2, never a failure mid-run.

A resumed run continues the same tracker runs: their ids are kept in ``<output.dir>/trackers.json``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..config.schema import TRACKERS
from ..errors import UsageError
from ..runtime import dist
from ..runtime.safe_io import read_bounded

IDS_FILE = "trackers.json"
TRACK_EXTRA = "pip install 'ia3-dist[track]'"
# What each tracker imports, and what to install for it.
NEEDS: dict[str, tuple[tuple[str, ...], str]] = {
    "tensorboard": (("tensorboard", "torch.utils.tensorboard"), "tensorboard"),
    "wandb": (("wandb",), "wandb"),
    "mlflow": (("mlflow",), "mlflow-skinny"),
}
# MLflow's database stores (our default is one) need these beside mlflow-skinny.
MLFLOW_DB_NEEDS = ("sqlalchemy", "alembic")
MLFLOW_DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
MLFLOW_PARAM_CHARS = 6000
"""MLflow's limit on one param value."""
MLFLOW_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
               "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
"""MLflow's HTTP client settings where the environment sets none: its defaults (7 retries of 120 s, backoff to
120 s) block rank 0 about 20 minutes per call on a server that accepts and never answers, while the other ranks wait
in the next collective and the hang watchdog (train.hang_timeout_s, 10 minutes) ends a healthy run. With these a
call gives up within about a minute and the tracker is dropped (metrics.jsonl has everything)."""


def names(cfg: RunConfig) -> list[str]:
    """The trackers this run reports to: ``output.report_to``, or tensorboard if it is installed."""
    if cfg.output.report_to is not None:
        return list(cfg.output.report_to)
    return ["tensorboard"] if _importable("tensorboard") else []


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def mlflow_uri(out: Path) -> tuple[str, bool]:
    """``MLFLOW_TRACKING_URI``, else a SQLite store in ``<out>/mlflow`` (MLflow 3 refuses its plain file store
    unless told to allow it, and keeps it in maintenance only); and whether it is that default."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri, False
    store = out / "mlflow"
    return f"sqlite:///{(store / 'mlflow.db').absolute()}", True


def _modules(name: str, out: Path) -> tuple[str, ...]:
    mods = NEEDS[name][0]
    if name == "mlflow" and mlflow_uri(out)[0].split(":", 1)[0].split("+", 1)[0] in MLFLOW_DB_SCHEMES:
        mods += MLFLOW_DB_NEEDS
    return mods


def check_installed(cfg: RunConfig, env: dist.DistEnv) -> list[str]:
    """UsageError unless every named tracker's packages can be imported; returns the tracker names. Rank 0 imports
    them (a broken install shows here, not mid-run); the other ranks, and the default tensorboard (used because it
    is there), only look for them."""
    out = Path(cfg.output.dir)
    named = cfg.output.report_to is not None
    for name in names(cfg):
        for mod in _modules(name, out):
            try:
                if env.is_main and named:
                    importlib.import_module(mod)
                elif importlib.util.find_spec(mod) is None:
                    raise ModuleNotFoundError(f"No module named '{mod}'")
            except Exception as e:  # an install broken in any way is the same answer: fix or drop the tracker
                pip = NEEDS[name][1] if mod in NEEDS[name][0] else " ".join(MLFLOW_DB_NEEDS)
                raise UsageError(
                    f"config key 'output.report_to' names {name}, but {mod} cannot be imported "
                    f"({type(e).__name__}: {e}); install it (pip install {pip}, or {TRACK_EXTRA} for wandb and "
                    f"mlflow) or remove {name} from output.report_to") from None
    return names(cfg)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``."""
    flat: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            flat.update(flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def scalars(rec: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics line, without its step (null values, e.g. an eval-only field, are left out)."""
    return {k: float(v) for k, v in rec.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


@dataclass
class Context:
    """What a tracker needs to start."""

    cfg: RunConfig
    out: Path
    start: int
    """The optimizer step this invocation resumes from (0: a fresh run)."""
    ids: dict[str, Any] = field(default_factory=dict)
    """What the previous invocation of this run recorded per tracker (``trackers.json``; empty on a fresh run)."""
    say: Any = print
    replay: list[dict[str, Any]] | None = None
    """Resuming a checkpoint whose evaluation was put off: the training lines of step ``start`` (None otherwise).
    That evaluation runs again, so what an earlier attempt logged of it goes: a tracker that purges from ``start``
    logs these again."""

    @property
    def run_name(self) -> str:
        return self.cfg.output.run_name or self.out.absolute().name


class Tracker:
    """One tracker: started by its constructor, then :meth:`log` per metrics line, :meth:`artifact` with the
    adapter dir at the end of an invocation, :meth:`close` once."""

    name = ""

    def log(self, step: int, values: dict[str, float]) -> None:
        raise NotImplementedError

    def artifact(self, adapter_dir: Path) -> None:
        """Called with the saved adapter dir at the end of an invocation; only MLflow keeps artifacts."""

    def flush(self) -> None:
        """What was logged so far written out (at a checkpoint: a kill after it loses nothing it covers)."""

    def close(self, status: str) -> None:
        """``status``: finished, failed or killed."""

    def ids(self) -> dict[str, Any]:
        """What a resumed invocation needs to continue this tracker's run (goes to trackers.json)."""
        return {}


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def __init__(self, ctx: Context) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        # purge_step: TensorBoard's reader drops what earlier event files of this dir hold at or past it, i.e. the
        # steps a killed invocation logged after its last checkpoint (metrics.jsonl drops them too).
        # Where the evaluation of step `start` was put off, its lines at `start` too (a killed attempt may have logged
        # it; it runs again): the training line of that step is logged again below.
        # A start from step 0 in a dir a killed attempt logged into before its first checkpoint (a requeue that
        # found none): everything there goes, as metrics.jsonl is started over.
        purge = (ctx.start if ctx.replay is not None else ctx.start + 1) if ctx.start else 0
        self.w = SummaryWriter(log_dir=str(ctx.out / "tensorboard"), purge_step=purge)
        for rec in ctx.replay or []:
            self.log(ctx.start, scalars(rec))
        yaml_text = ctx.cfg.to_yaml()
        # Markdown: indented lines are a code block, so the YAML keeps its layout in the Text tab.
        self.w.add_text("config", "\n".join("    " + ln for ln in yaml_text.splitlines()), global_step=ctx.start)
        if not ctx.start:
            flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                    for k, v in flatten(ctx.cfg.to_dict()).items()}
            # The HParams tab, beside this run's scalars (add_hparams would write a run of its own).
            for s in hparams(flat, {"loss": 0.0, "eval_loss": 0.0}):
                self.w.file_writer.add_summary(s)
        self.w.flush()

    def log(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.w.add_scalar(k, v, step)

    def flush(self) -> None:
        self.w.flush()

    def close(self, status: str) -> None:
        self.w.close()


class WandbTracker(Tracker):
    name = "wandb"

    def __init__(self, ctx: Context) -> None:
        import wandb

        mode = os.environ.get("WANDB_MODE")
        slurm_default = not mode and dist.under_slurm()
        if slurm_default:
            mode = "offline"  # compute nodes rarely reach the internet: record now, `wandb sync` later
        self.run_id = ctx.ids.get(self.name, {}).get("id") or secrets.token_hex(6)
        self.say = ctx.say
        self.run = wandb.init(project=ctx.cfg.output.project, name=ctx.run_name, id=self.run_id, resume="allow",
                              mode=mode, dir=None if os.environ.get("WANDB_DIR") else str(ctx.out),
                              config=ctx.cfg.to_dict(), allow_val_change=True,
                              settings=wandb.Settings(console="off", quiet=True))
        self.offline = bool(self.run.settings._offline)
        if self.offline:
            why = " (WANDB_MODE is not set and this is a Slurm job)" if slurm_default else ""
            self.say(f"wandb: offline{why}: {self.run_dir}; {self.sync_hint}")

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir).parent

    @property
    def sync_hint(self) -> str:
        # Every invocation of a resumed run is a directory of its own with the same id; sync uploads them in order.
        return f"upload it later with `wandb sync {self.run_dir.parent}/offline-run-*-{self.run_id}`"

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self, status: str) -> None:
        # A preempted invocation stopped at a checkpoint and will be resumed: not a failure.
        self.run.finish(exit_code=1 if status == "failed" else 0)
        if self.offline:
            self.say(f"wandb: run {self.run_id} recorded offline; {self.sync_hint}")

    def ids(self) -> dict[str, Any]:
        return {"id": self.run_id}


def bound_mlflow_http() -> None:
    """:data:`MLFLOW_HTTP` where the environment sets none (MLflow's client reads them per request)."""
    for k, v in MLFLOW_HTTP.items():
        os.environ.setdefault(k, v)


class MlflowTracker(Tracker):
    name = "mlflow"

    def __init__(self, ctx: Context) -> None:
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.uri, default = mlflow_uri(ctx.out)
        if default:
            store = ctx.out / "mlflow"
            store.mkdir(exist_ok=True)
            # SQLite opens (and creates) its files through links: a run dir from elsewhere holding
            # mlflow/mlflow.db -> a file of the user's would have it written as a database.
            for f in ("mlflow.db", "mlflow.db-journal", "mlflow.db-wal", "mlflow.db-shm"):
                if (store / f).is_symlink():
                    raise UsageError(f"output.dir {ctx.out}: {store / f} is a symlink; the run's MLflow store is "
                                     f"written there; remove the link (or set MLFLOW_TRACKING_URI)")
        bound_mlflow_http()
        self.client = c = MlflowClient(tracking_uri=self.uri)
        prev = ctx.ids.get(self.name, {})
        run = None
        if prev.get("run_id") and prev.get("tracking_uri") == self.uri:
            try:
                run = c.get_run(prev["run_id"])
            except MlflowException:
                ctx.say(f"mlflow: run {prev['run_id']} of this output dir is not in {self.uri}; starting a new one")
        if run is None:
            project = ctx.cfg.output.project
            exp = c.get_experiment_by_name(project)
            # The default store keeps its artifacts beside it, not in ./mlruns of whatever dir the job started in.
            art = (store / "artifacts").absolute().as_uri() if default else None
            exp_id = exp.experiment_id if exp is not None else c.create_experiment(project, artifact_location=art)
            run = c.create_run(exp_id, run_name=ctx.run_name, tags={"ia3_dist.output_dir": str(ctx.out.absolute())})
        else:
            c.update_run(run.info.run_id, status="RUNNING")
        self.run_id = run.info.run_id
        flat = {k: str(v)[:MLFLOW_PARAM_CHARS] for k, v in flatten(ctx.cfg.to_dict()).items()}
        have = run.data.params
        # MLflow params cannot change: a resumed invocation adds keys it did not have and keeps the first values.
        changed = sorted(k for k in flat if k in have and have[k] != flat[k])
        new = [Param(k, v) for k, v in flat.items() if k not in have]
        for i in range(0, len(new), 100):  # MLflow's batch limit
            c.log_batch(self.run_id, params=new[i:i + 100])
        if changed:
            ctx.say(f"mlflow: params keep their first values; this invocation differs in {', '.join(changed)} "
                    f"(its run.yaml has them)")

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        # MLflow refuses "," in a name; lm-eval's metrics have one (tiny_mc/acc,none -> tiny_mc/acc:none).
        self.client.log_batch(self.run_id, metrics=[Metric(k.replace(",", ":"), v, now, step)
                                                    for k, v in values.items()])

    def artifact(self, adapter_dir: Path) -> None:
        self.client.log_artifacts(self.run_id, str(adapter_dir), artifact_path="adapter")

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status.upper())

    def ids(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "tracking_uri": self.uri}


CLASSES: dict[str, type[Tracker]] = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker,
                                     "mlflow": MlflowTracker}
assert tuple(CLASSES) == TRACKERS


class Trackers:
    """The started trackers of rank 0 (none on the other ranks)."""

    def __init__(self, live: list[Tracker] | None = None, say: Any = print) -> None:
        self.live = list(live or [])
        self.say = say
        self.closed = False
        self.closing: list[threading.Thread] = []
        """The dropped trackers' closes, on the side (:meth:`_drop`); :meth:`close` gives them a while."""

    def log(self, rec: dict[str, Any]) -> None:
        values = scalars(rec)
        for t in list(self.live):
            try:
                t.log(int(rec["step"]), values)
            except Exception as e:  # a tracker that fails mid-run must not end training: metrics.jsonl has it all
                self._drop(t, f"stopped reporting at step {rec['step']}", e)

    def artifact(self, adapter_dir: Path) -> None:
        for t in list(self.live):
            try:
                t.artifact(adapter_dir)
            except Exception as e:  # the adapter is saved in the output dir either way
                self._drop(t, f"could not store {adapter_dir}", e)

    def flush(self) -> None:
        for t in list(self.live):
            try:
                t.flush()
            except Exception as e:  # as in log: metrics.jsonl has it all
                self._drop(t, "could not write its events", e)

    def _drop(self, t: Tracker, what: str, e: Exception) -> None:
        self.say(f"{t.name}: {what} ({type(e).__name__}: {e}); metrics.jsonl and the output dir have everything")
        self.live.remove(t)
        # Closed on the side: a tracker that just failed (a server down) would keep rank 0 waiting as long again,
        # with the other ranks in the next collective.
        th = threading.Thread(target=self._close, args=(t, "failed"), name=f"ia3-dist-close-{t.name}",
                              daemon=True)
        th.start()
        self.closing.append(th)

    def close(self, status: str) -> None:
        if self.closed:
            return
        self.closed = True
        for th in self.closing:  # the run has ended: a dropped tracker's close may finish meanwhile, not hold it
            th.join(timeout=CLOSE_WAIT_S)
        for t in self.live:
            self._close(t, status)

    def _close(self, t: Tracker, status: str) -> None:
        try:
            t.close(status)
        except Exception as e:  # closing one must not keep the others from closing
            self.say(f"{t.name}: could not close its run ({type(e).__name__}: {e})")


CLOSE_WAIT_S = 30.0
"""How long the run's end waits for the close of a tracker dropped mid-run."""
MAX_IDS = 1 << 20
"""Ours is a few hundred bytes."""


def read_ids(out: Path) -> dict[str, Any]:
    """The trackers' run ids of an earlier invocation; damage (a FIFO, a huge or deeply nested file, garbage in a
    run dir from elsewhere) counts as none: the trackers start new runs."""
    try:
        raw = read_bounded(out / IDS_FILE, MAX_IDS, missing_ok=True)
        ids = json.loads(raw.decode("utf-8")) if raw is not None else {}
    except (UsageError, ValueError, RecursionError):
        return {}
    # Each tracker's entry an object of strings (an edited file's other entries are left out: that tracker starts a
    # new run).
    return {k: v for k, v in ids.items() if isinstance(v, dict) and all(isinstance(x, str) for x in v.values())} \
        if isinstance(ids, dict) else {}


def start_hint(name: str, out: Path) -> str:
    """What to check when a tracker cannot start."""
    if name == "wandb":
        return "log in (wandb login or WANDB_API_KEY), or set WANDB_MODE=offline to record locally and wandb sync later"
    if name == "mlflow":
        uri, default = mlflow_uri(out)
        return f"check the tracking store {uri}" + ("" if default else " (MLFLOW_TRACKING_URI)")
    return f"check that {out / 'tensorboard'} can be written"


def start_trackers(cfg: RunConfig, env: dist.DistEnv, out: Path, start: int, resumed: bool,
                   eval_pending: bool = False) -> Trackers:
    """Start the named trackers on rank 0 (the other ranks get none). A tracker that cannot start (not logged in,
    server unreachable) is a UsageError; the ones started before it are closed. ``resumed``: continue the tracker
    runs recorded in ``<out>/trackers.json``; ``eval_pending``: the checkpoint resumed at ``start`` put its
    evaluation off (see :attr:`Context.replay`)."""
    say = functools.partial(dist.print0, env)
    if not env.is_main:
        return Trackers(say=say)
    ids = read_ids(out) if resumed else {}
    replay = None
    if eval_pending and start:
        from .plots import scan_metrics

        got = scan_metrics(out / "metrics.jsonl")
        replay = [r for r in (got.records if got is not None else []) if r["step"] == start and "loss" in r]
    ctx = Context(cfg, out, start, ids, say, replay)
    live: list[Tracker] = []
    for name in names(cfg):
        try:
            live.append(CLASSES[name](ctx))
        except Exception as e:  # any failure to start is the same answer: fix the setup or drop the tracker
            if cfg.output.report_to is None:
                # TensorBoard because it is installed, not asked for: a broken install (a protobuf mismatch) is a
                # note, not the end of a run that asked for nothing.
                say(f"note: {name} is installed but could not start ({type(e).__name__}: {str(e)[:300]}); not "
                    f"reporting to it (set output.report_to: [] to silence this)")
                continue
            Trackers(live, say).close("failed")
            raise UsageError(f"config key 'output.report_to': {name} could not start ({type(e).__name__}: "
                             f"{str(e)[:2000]}); {start_hint(name, out)}, or remove {name} from output.report_to"
                             ) from None
    ids.update({t.name: t.ids() for t in live if t.ids()})
    if ids:
        (out / IDS_FILE).write_text(json.dumps(ids, indent=1) + "\n", encoding="utf-8")
    if live:
        say(f"reporting to {', '.join(t.name for t in live)}")
    return Trackers(live, say)
