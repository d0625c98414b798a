"""``ia3-dist eval RUN_OR_ADAPTER --tasks ...``: every checkpoint of a run on benchmarks (lm-evaluation-harness,
offline) and on the run's held-out data, with the base model loaded once; data-parallel over the ranks it is
launched on (``torchrun --nproc_per_node N launch.py eval ...``, ``srun``).

A checkpoint is a few hundred K IA3 scalings over a shared base: the base and the adapter structure are loaded
once (from the run's final adapter), and each checkpoint's vectors (the fp32 masters of its layout-independent
state, ``ia3_state.safetensors``) are copied into the IA3 parameters in place before its evaluation. Tasks come
from lm-eval's registry (their data must be on this machine: ``HF_DATASETS_OFFLINE`` is set) or from local task
YAML files (``--include DIR``). Results: ``<run>/eval/results.json`` (one row per task, metric and checkpoint),
a table on the console and a PNG per metric against the step.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config.schema import has_heldout
from ..errors import UsageError
from ..runtime import dist, manifest, safe_io
from ..runtime.checkpoint import comparable
from ..runtime.dist import DistEnv
from ..train.benchmarks import check_tasks, must_replicate, run_tasks
from .summary import RESULTS

TAG = re.compile(r"step([0-9]+)")
STATE = "ia3_state.safetensors"
ADAPTER = "adapter_model.safetensors"
MAX_STATE_BYTES = 4 << 30
"""A checkpoint's IA3 state (vectors and two AdamW moments) is a few MB; past this it is not ours."""


@dataclass(frozen=True)
class Point:
    """One thing to evaluate: a checkpoint (``stepN``) or the final adapter."""

    name: str
    step: int
    path: Path
    """The checkpoint dir (its ia3_state.safetensors) or the adapter dir."""


def _recorded_step(adapter: Path) -> int | None:
    """The step the adapter's record names (:func:`..runtime.manifest.adapter_record`); None without one."""
    rec = manifest.adapter_record(adapter)
    step = rec.get("step") if rec is not None else None
    return step if type(step) is int and step > 0 else None


def _step_of_adapter(run: Path) -> int:
    """The final adapter's step: the one it records (the step its vectors are of), else (an adapter of an earlier
    version) the last step the run logged, or the best evaluation's where early stopping ended the run and wrote
    the best vectors (train.early_stopping.final=best); 0 when unknown."""
    from ..runtime import checkpoint as ckpt
    from ..train.selection import META_KEY

    recorded = _recorded_step(run / "adapter")
    if recorded is not None:
        return recorded

    try:
        last = ckpt.latest(run / "checkpoints")
        sel = ckpt.read_meta(last).get(META_KEY) if last is not None else None
        from ..config import load_config

        final = load_config(run / "run.yaml").train.early_stopping.final if (run / "run.yaml").is_file() else ""
    except UsageError:
        sel, final = None, ""
    if isinstance(sel, dict) and sel.get("stopped_early") and final == "best":
        best = (sel.get("early_stopping") or {}).get("best_step")
        if type(best) is int and best > 0:
            return best
    from ..train.plots import last_step

    return max(last_step(run / "metrics.jsonl") or 0, 0)


def points_of(path: Path, which: str) -> tuple[Path, list[Point]]:
    """``(adapter dir, points)``: a run dir's checkpoints (``all``, ``latest``, ``best`` by held-out loss, or a
    comma list of tags such as ``step10,final``) and its final adapter; an adapter dir alone is one point."""
    if (path / "adapter_config.json").is_file():
        if which not in ("all", "latest", "final"):
            raise UsageError(f"--checkpoints {which}: {path} is an adapter dir (one point); give its run dir to pick "
                             f"checkpoints")
        return path, [Point("final", _recorded_step(path) or 0, path)]
    adapter = path / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise UsageError(f"{path}: neither a run dir with adapter/ (the final adapter, written at the end of "
                         f"training) nor an adapter dir; evaluate a finished run or an adapter")
    ckdir = path / "checkpoints"
    found = sorted(((int(m.group(1)), d) for d in (ckdir.iterdir() if ckdir.is_dir() else [])
                    if (m := TAG.fullmatch(d.name)) and (d / STATE).is_file()), key=lambda x: x[0])
    final = Point("final", _step_of_adapter(path), adapter)
    # A checkpoint at the final adapter's step holds the same vectors: the adapter file itself stands for it.
    pts = sorted([Point(d.name, s, d) for s, d in found if s != final.step] + [final], key=lambda q: q.step)
    if which == "all":
        return adapter, pts
    if which == "latest":
        return adapter, pts[-1:]
    if which == "best":
        kept = _kept_best(path, pts)
        return adapter, [kept or _best(path, pts)]
    want = [w.strip() for w in which.split(",") if w.strip()]
    by_name = {p.name: p for p in pts}
    if final.step > 0:
        # The checkpoint at the final step was folded into the final point above: its name still picks it.
        by_name.setdefault(f"step{final.step}", final)
    missing = [w for w in want if w not in by_name]
    if missing or not want:
        raise UsageError(f"--checkpoints {which}: no checkpoint {missing or which} in {path}; it has "
                         f"{', '.join(by_name)}")
    return adapter, list(dict.fromkeys(by_name[w] for w in want))


def _kept_best(run: Path, pts: list[Point]) -> Point | None:
    """The checkpoint ``checkpoints/best`` names (checkpoint.keep_best), if the run kept one."""
    from ..runtime import checkpoint as ckpt

    d = ckpt.latest(run / "checkpoints", ckpt.BEST)
    if d is None or not (d / STATE).is_file():
        return None
    step = ckpt.step_of(d)
    return next((p for p in pts if p.path == d), Point(ckpt.tag_for(step), step, d))


def _best(run: Path, pts: list[Point]) -> Point:
    """The point whose step has the lowest held-out loss in metrics.jsonl."""
    from ..train.plots import read_metrics

    m = run / "metrics.jsonl"
    # Finite only: an evaluation that diverged is logged as NaN, which min() would take as readily as any.
    evals = {r["step"]: r["eval_loss"] for r in (read_metrics(m, ("step", "eval_loss")) if m.is_file() else [])
             if isinstance(r.get("step"), int) and isinstance(r.get("eval_loss"), float)
             and math.isfinite(r["eval_loss"])}
    scored = [p for p in pts if p.step in evals]
    if not scored:
        raise UsageError(f"--checkpoints best: {run}/metrics.jsonl has no held-out loss at a checkpoint's step "
                         f"(train with data.eval_ratio or data.eval_path and train.eval_every = checkpoint.every)")
    return min(scored, key=lambda p: evals[p.step])


def loaded_vectors(peft_model: Any) -> dict[str, torch.Tensor]:
    """The model's IA3 vectors as loaded, by the names :func:`swap_in` uses: the final point's, read and checked
    by the same loader generate and export use (a .bin save, links in a hub snapshot) instead of the file again."""
    return {n.replace(".default", ""): q.detach().clone() for n, q in peft_model.named_parameters() if "ia3_l" in n}


def vectors_of(p: Point) -> dict[str, torch.Tensor]:
    """The point's IA3 vectors by PEFT parameter name without the adapter name (``...ia3_l``)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    f = p.path / (ADAPTER if p.name == "final" else STATE)
    try:
        raw = safe_io.read_bounded(f, MAX_STATE_BYTES, label="IA3 state ")
        tensors = load(raw)
    except (SafetensorError, OSError, ValueError) as e:
        raise UsageError(f"{f}: not a readable IA3 state ({e})") from None
    if p.name == "final":
        return {k: v for k, v in tensors.items()}
    out = {}
    for k, v in tensors.items():
        if k.startswith("param/"):
            name = k[len("param/"):].removeprefix("peft.").replace(".default", "")
            out[name] = v
    return out


def swap_in(peft_model: Any, vectors: dict[str, torch.Tensor], where: str) -> None:
    """Copy ``vectors`` into the model's IA3 parameters in place; every one must be there, with its shape."""
    params = {n.replace(".default", ""): q for n, q in peft_model.named_parameters() if "ia3_l" in n}
    if set(params) != set(vectors):
        miss = sorted(set(params) - set(vectors)) or sorted(set(vectors) - set(params))
        raise UsageError(f"{where}: its IA3 vectors do not match the run's adapter (e.g. {miss[0]}); is it from this "
                         f"run?")
    with torch.no_grad():
        for n, q in params.items():
            if tuple(vectors[n].shape) != tuple(q.shape):
                raise UsageError(f"{where}: {n} has shape {tuple(vectors[n].shape)}, the adapter's is "
                                 f"{tuple(q.shape)}")
            q.copy_(vectors[n].to(q.dtype))


def _run_has_heldout(run: Path) -> bool:
    from ..config import load_config

    return (run / "run.yaml").is_file() and has_heldout(load_config(run / "run.yaml"))


def heldout_data(cfg: Any, tok: Any) -> Any:
    """The run's held-out examples (its data.eval_ratio split or data.eval_path), tokenized once for every point;
    None for a run without them or with pairs."""
    from ..data.tokenize import load_or_tokenize
    from ..train.prepare import eval_section, load_data

    if not has_heldout(cfg):
        return None
    if cfg.data.eval_path:  # the held-out file alone: the training data need not be reachable from here
        return load_or_tokenize(eval_section(cfg), tok)
    return load_data(cfg, tok)[1]


def heldout_loss(model: Any, tok: Any, data: Any, batch: int, env: DistEnv | None = None) -> float:
    """The held-out loss of ``data`` under the model's current vectors (sharded over the ranks of ``env``, summed
    by token as training's eval is)."""
    from ..train.evaluate import evaluate

    class _Engine:
        """What :func:`..train.evaluate.evaluate` asks of an engine, on a plain module."""

        def __init__(self, module: Any) -> None:
            self.module, self.device = module, next(model.parameters()).device

        def __call__(self, **kw: Any) -> Any:
            return self.module(**kw)

    from ..models.families import batch_inputs
    from ..models.loss import TokenSumLM

    module = TokenSumLM(model, inputs=batch_inputs(model.get_base_model()))
    res = evaluate(_Engine(module), data, env or DistEnv(0, 0, 1, 1), batch, tok.pad_token_id,
                   getattr(tok, "padding_side", "right"))
    return res["eval_loss"]


def evaluate_points(adapter: Path, pts: list[Point], tasks: list[str], tm: Any, batch_size: int,
                    limit: int | None, run: Path | None, base: str | None = None,
                    env: DistEnv | None = None, dtype: str = "fp32") -> list[dict]:
    """Rows ``{checkpoint, step, task, metric, value}``: the base loaded once, each point's vectors swapped in.
    On several ranks each evaluates its share of every task and of the held-out data; rank 0 returns the rows,
    the others ``[]``."""
    from ..models.ia3 import fix_query_scales
    from .inference import load_for_inference

    env = env or DistEnv(0, 0, 1, 1)
    model, tok, _, _ = load_for_inference(str(adapter), base, dtype)
    final = loaded_vectors(model)  # before fix_query_scales, as the final adapter's file holds them
    if torch.cuda.is_available():
        model.to(torch.device("cuda", dist.device_index(env)))
    held_out = None
    if run is not None and (run / "run.yaml").is_file():
        from ..config import load_config

        cfg = load_config(run / "run.yaml")
        if cfg.ia3.variant == "paper":
            # Raw checkpoint vectors may hold weight-decayed query entries that training's forward fixed at 1.0.
            fix_query_scales(model, getattr(model.config, "model_type", None))
        held_out = heldout_data(cfg, tok)
    # Decided once for every point: the tasks and their documents are the same for each.
    replicated = must_replicate(tasks, tm, limit, env)
    # Every point read and checked before the first is evaluated (a damaged last one fails in seconds, not after
    # the others' benchmarks). IA3 vectors: a few MB per point.
    from ..models.ia3 import check_finite

    vectors = [final if p.name == "final" else vectors_of(p) for p in pts]
    for p, v in zip(pts, vectors, strict=True):
        check_finite(v, str(p.path), "the checkpoint is damaged: leave it out of --checkpoints")
    rows = []
    for p, v in zip(pts, vectors, strict=True):
        swap_in(model, v, str(p.path))
        scores = run_tasks(model, tok, tasks, tm, batch_size, limit, env, replicated) if tasks else {}
        for task, metrics in scores.items():
            for metric, value in metrics.items():
                rows.append({"checkpoint": p.name, "step": p.step, "task": task, "metric": metric, "value": value})
        if held_out is not None:
            loss = heldout_loss(model, tok, held_out, batch_size, env)
            rows.append({"checkpoint": p.name, "step": p.step, "task": "heldout", "metric": "loss", "value": loss})
        dist.print0(env, f"evaluated {p.name} (step {p.step})" + (f" on {env.world_size} ranks"
                                                                   if env.world_size > 1 else ""))
    return rows if env.is_main else []


def table(rows: list[dict]) -> str:
    cols = sorted({(r["task"], r["metric"]) for r in rows})
    pts = list(dict.fromkeys((r["checkpoint"], r["step"]) for r in rows))
    val = {(r["checkpoint"], r["task"], r["metric"]): r["value"] for r in rows}
    heads = ["checkpoint", "step", *[f"{t} {m}" for t, m in cols]]
    cells = [[c, str(s), *[f"{val[(c, t, m)]:.4f}" if (c, t, m) in val else "-" for t, m in cols]] for c, s in pts]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(heads)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(line, widths, strict=True)).rstrip()
                     for line in [heads, *cells])


def plot(rows: list[dict], out: Path) -> list[Path]:
    """A PNG per (task, metric) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..train.plots import save_figure

    done = []
    pairs = sorted({(r["task"], r["metric"]) for r in rows})
    safe = {p: re.sub(r"[^A-Za-z0-9._-]+", "_", f"{p[0]}-{p[1]}") for p in pairs}
    shared = {n for n in safe.values() if list(safe.values()).count(n) > 1}
    for task, metric in pairs:
        pts = sorted((r["step"], r["value"]) for r in rows if (r["task"], r["metric"]) == (task, metric))
        fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
        ax.plot([s for s, _ in pts], [v for _, v in pts], "o-")
        ax.set_xlabel("optimizer step")
        ax.set_title(f"{task} {metric}")
        ax.grid(alpha=0.3)
        name = safe[(task, metric)]
        if name in shared:
            # Names that differ only in what the filter replaced (C-Eval's Chinese task names) shared one file.
            name += "-" + hashlib.sha256(f"{task}\0{metric}".encode()).hexdigest()[:8]
        name += ".png"
        done.append(save_figure(fig, out / name, "--out ", dpi=100))
    return done


def run_precision(run: Path) -> str:
    """The run's ``train.precision`` (its run.yaml): what its own evaluations ran in, and half the host memory of
    fp32 for a bf16 run's base; fp32 where there is no run.yaml."""
    if not (run / "run.yaml").is_file():
        return "fp32"
    from ..config import load_config

    return load_config(run / "run.yaml").train.precision


def default_out(path: Path, run: Path | None) -> Path:
    """Where results go without --out: ``<run>/eval``, for a run's final adapter (``<run>/adapter``) too. Never
    into an adapter dir: the next adapter a run writes replaces that dir whole, and the dir is what users copy
    and upload. An adapter dir outside a run needs --out."""
    if run is not None:
        return run / manifest.EVAL_DIR
    if path.name == "adapter" and (path.parent / manifest.MANIFEST).is_file():
        return path.parent / manifest.EVAL_DIR
    raise UsageError(f"{path}: an adapter dir outside a run; give --out DIR for the results (they are never written "
                     f"into the adapter dir)")


def base_of(adapter: Path, base: str | None) -> str:
    """The base model the adapter was evaluated on: ``--base``, else the one its adapter_config.json names."""
    from .inference import read_adapter_config

    return str(base or read_adapter_config(adapter).get("base_model_name_or_path") or "")


@dataclass
class Settings:
    """How this evaluation measures, written beside each value (:meth:`of`)."""

    held: dict[str, Any]
    """A held-out row's: the base model, the fingerprint of its weights (``base_weights``: a dir replaced by other
    weights keeps its name) and its dtype (the held-out loss takes every example: no limit)."""
    bench: dict[str, Any]
    """A benchmark row's: also the document limit, the lm-eval version and ``include_digest`` (None)."""
    digest: str | None = None
    """The digest of the ``--include`` dir's task files and their data (None without --include)."""
    local: frozenset[str] = frozenset()
    """The tasks and groups the ``--include`` dir defines: their rows carry :attr:`digest`."""

    def of(self, row: dict) -> dict[str, Any]:
        if row["task"] == "heldout":
            return self.held
        return {**self.bench, "include_digest": self.digest if row["task"] in self.local else None}


def measured_with(dtype: str, limit: int | None, base: str, include: Path | None,
                  base_weights: str | None = None) -> Settings:
    """This evaluation's :class:`Settings`; a local task dir is read (and digested) here, before anything runs.
    ``base_weights``: :func:`.inference.base_weights_of` (None where the base has no local weights)."""
    from importlib.metadata import PackageNotFoundError, version

    held: dict[str, Any] = {"dtype": dtype, "base": base, "base_weights": base_weights}
    try:
        lm_eval = version("lm_eval")
    except PackageNotFoundError:
        lm_eval = None
    got = Settings(held, {**held, "limit": limit, "lm_eval": lm_eval, "include_digest": None})
    if include is not None:
        from ..train.benchmarks import include_digest, local_task_names

        got.digest, got.local = include_digest(include)[:16], frozenset(local_task_names(include))
    return got


# What a row written before ia3-dist recorded a setting was measured with, where that is known.
_UNRECORDED = {"dtype": "fp32", "limit": None}


def measured_otherwise(row: dict, settings: Settings, tasks: list[str]) -> str:
    """How an earlier row's settings differ from what this evaluation writes for the same row ("" where they do
    not): said when such rows stay beside new ones, which then compare unlike with like. A setting the row does
    not record (written by an earlier ia3-dist) shows as "?"; the local tasks' digest counts only for a task
    evaluated now (another task may come from another dir)."""
    diff = []
    for k, v in settings.of(row).items():
        if k == "include_digest" and row["task"] not in tasks:
            continue
        got = row.get(k, _UNRECORDED.get(k, "?"))
        if k == "base_weights" and k in row and isinstance(got, str) and isinstance(v, str) \
                and not comparable(got, v):
            continue  # fingerprinted otherwise (another ia3-dist version): unknown, not a difference
        if got != v:
            diff.append(f"{k.replace('_', ' ')} {got}")
    return ", ".join(diff)


def _row_key(r: dict) -> tuple:
    return r["checkpoint"], r["step"], r["task"], r["metric"]


def earlier_rows(f: Path) -> list[dict]:
    """The rows of an earlier ``results.json`` in ``f`` that are well formed; none (with a note) if it cannot be
    read. Read as untrusted: bounded, a regular file, never through a link."""
    from .summary import MAX_RESULTS_BYTES

    if not os.path.lexists(f):
        return []
    try:
        rows = json.loads(safe_io.read_bounded(f, MAX_RESULTS_BYTES, "run ia3-dist eval again").decode("utf-8"),
                          parse_constant=float)["rows"]
        if not isinstance(rows, list):
            raise TypeError("rows is not a list")
    except (UsageError, OSError, ValueError, KeyError, TypeError) as e:
        print(f"note: {f}: earlier results not readable ({str(e)[:200]}); it is replaced by this evaluation's")
        return []
    return [r for r in rows if isinstance(r, dict) and type(r.get("checkpoint")) is str
            and type(r.get("step")) is int and type(r.get("task")) is str and type(r.get("metric")) is str
            and type(r.get("value")) in (int, float)]


def main(argv: list[str], prog: str) -> int:
    ap = argparse.ArgumentParser(prog=prog, description="Evaluate a run's checkpoints (or an adapter) on "
                                 "lm-evaluation-harness tasks, offline, with the base model loaded once, and on the "
                                 "run's held-out data.")
    ap.add_argument("path", metavar="RUN_OR_ADAPTER", help="a run dir (output.dir) or an adapter dir")
    ap.add_argument("--tasks", default="", help="comma-separated lm-eval task names (registry or --include)")
    ap.add_argument("--include", type=Path, help="a dir of local task YAML files (data files local)")
    ap.add_argument("--checkpoints", default="all", help="all | latest | best (the checkpoint checkpoints/best names; "
                    "without one, the lowest held-out loss logged) | a comma list of names such as step10,final")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--limit", type=int, help="at most this many documents per task")
    ap.add_argument("--base", help="the base model (default: the adapter's base_model_name_or_path)")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"],
                    help="the base model's dtype (default: the run's train.precision, as training evaluated in; "
                         "fp32 for an adapter dir outside a run)")
    ap.add_argument("--out", type=Path, help="where results.json and the plots go (default: <run>/eval, for a "
                    "run's adapter dir too; an adapter dir elsewhere needs --out); rows of earlier evaluations "
                    "there stay, a point evaluated again replaces its own")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = Path(args.path).expanduser()
    if not path.is_dir():
        raise UsageError(f"{args.path}: no such directory (a run dir or an adapter dir)")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    run = None if (path / "adapter_config.json").is_file() else path
    if not tasks and run is None:
        raise UsageError("--tasks: name at least one task (an adapter dir has no held-out data of its own)")
    if not tasks and not _run_has_heldout(run):
        # Before the model loads, and before an earlier results.json is replaced by an empty one.
        from ..config import load_config
        from ..config.schema import why_no_heldout

        why = why_no_heldout(load_config(run / "run.yaml")) if (run / "run.yaml").is_file() else "no run.yaml"
        raise UsageError(f"--tasks: {run} has no held-out loss to evaluate ({why}), so there is nothing to evaluate "
                         f"without tasks; name lm-eval tasks")
    out = args.out or default_out(path, run)
    if args.out is None and out.is_symlink():  # a run dir from elsewhere decides nothing about where we write
        raise UsageError(f"{out}: a link; evaluation results go into a real directory there, or give --out")
    # Before any checkpoint is evaluated: found only when the results are written, they would be lost.
    manifest.check_writable_dir(out, "--out")
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        raise UsageError("--batch-size and --limit must be positive")
    adapter, pts = points_of(path, args.checkpoints)
    tm = check_tasks(tasks, args.include) if tasks else None
    # Launched on several ranks (torchrun, deepspeed, srun), every rank has made the checks above alike; they
    # then split each task's documents and the held-out data, and rank 0 writes what they found together.
    env = dist.detect()
    if env.world_size > 1:
        dist.setup_threads(env)
        dist.init(env)
    try:
        from .inference import base_weights_of

        dtype = args.dtype or run_precision(run if run is not None else path.parent)
        # Before the evaluation: a task file that cannot be read fails now, not once the results are in.
        settings = measured_with(dtype, args.limit, base_of(adapter, args.base), args.include,
                                 base_weights_of(adapter, args.base))
        rows = evaluate_points(adapter, pts, tasks, tm, args.batch_size, args.limit, run, args.base, env, dtype)
    finally:
        dist.destroy()
    if not env.is_main:
        return 0
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # checked before the evaluation: changed since
        raise UsageError(f"--out {out}: cannot create it ({e.strerror or e}); the results were:\n{table(rows)}") \
            from None
    # Beside the rows of earlier evaluations (other tasks, other checkpoints); a point evaluated again replaces its
    # rows.
    for r in rows:  # how each row was measured: rows of other settings may stay beside them
        r.update(settings.of(r))
    earlier = earlier_rows(out / RESULTS)
    new = {_row_key(r) for r in rows}
    kept = [r for r in earlier if _row_key(r) not in new]
    other = sorted({d for r in kept if (d := measured_otherwise(r, settings, tasks))})
    every = kept + rows
    text = json.dumps({"tasks": sorted({r["task"] for r in every} - {"heldout"}), "rows": every}, indent=1) + "\n"
    # Never through a link planted in a run dir from elsewhere; atomically, for `ia3-dist summary --metric`.
    safe_io.write_file(out / RESULTS, lambda f: f.write(text.encode("utf-8")), "--out ")
    print(table(rows))
    if kept:
        print(f"kept {len(kept)} row(s) of earlier evaluations in {out / RESULTS}"
              + (f"; some were measured otherwise ({'; '.join(other)}): evaluate them again to compare like with "
                 f"like" if other else ""))
    for f in plot(every, out):
        print(f"wrote {f}")
    print(f"results: {out / RESULTS}")
    bad = [r for r in rows if not math.isfinite(r["value"])]
    if bad:
        print(f"warning: {len(bad)} non-finite value(s), e.g. {bad[0]}")
    return 0
