"""lm-evaluation-harness tasks on a loaded model, offline and data-parallel over a job's ranks: what ``ia3-dist
eval`` runs for each checkpoint and training runs at ``eval.every`` (``eval.tasks``).

Tasks come from lm-eval's registry (their data must be on this machine) or from local task YAML files whose data
files are local; both are checked before anything loads (:func:`check_tasks`).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..errors import UsageError
from ..runtime import dist
from ..runtime.dist import DistEnv


def require_lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError:
        raise UsageError("ia3-dist eval runs lm-evaluation-harness, which is not installed: pip install "
                         "'ia3-dist[eval]' (or lm-eval>=0.4.13,<0.5)") from None
    return lm_eval


# lm-eval's task index skips these when it walks an include dir.
_IGNORE_DIRS = {"__pycache__", ".ipynb_checkpoints"}


def _task_yaml_loader() -> Any:
    """A safe YAML loader that also reads lm-eval's ``!function module.fn`` tags (as their text): task files in
    lm-eval's own layout carry them, and they are valid task files."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    return Loader


def _data_files(files: Any) -> list[tuple[str, Any]]:
    """``(split, file)`` for each file of ``dataset_kwargs.data_files`` in the shapes ``datasets`` takes: one path,
    a list of them, or a mapping of splits to either."""
    if isinstance(files, dict):
        return [(str(split), one) for split, name in files.items()
                for one in (name if isinstance(name, list | tuple) else [name])]
    if isinstance(files, list | tuple):
        return [("train", one) for one in files]
    return [("train", files)] if files else []


def _data_base(dataset_path: Any, data_dir: Any) -> Path:
    """Where ``datasets`` resolves a task's relative ``data_files``: in ``dataset_path`` (and its ``data_dir``)
    where that is a local directory, in ``data_dir`` for a packaged builder (``json``, ``csv``), else in the
    working directory."""
    sub = Path(data_dir).expanduser() if isinstance(data_dir, str) and data_dir else Path()
    if isinstance(dataset_path, str) and dataset_path and Path(dataset_path).expanduser().is_dir():
        return Path(dataset_path).expanduser() / sub
    return sub


def _included(f: Path, spec: dict[str, Any], loader: Any, depth: int = 0) -> dict[str, Any]:
    """``spec`` over what its ``include:`` files give (a path or a list, relative to its folder; the file's own keys
    win), as lm-eval's YAML loader merges them: a task whose dataset_path or data_files come from a shared
    ``_base_yml`` is checked where lm-eval reads it."""
    import yaml

    includes = spec.get("include")
    if includes is None or depth > 16:
        return spec
    merged: dict[str, Any] = {}
    for inc in includes if isinstance(includes, list) else [includes]:
        if not isinstance(inc, str):
            continue  # lm-eval refuses it with its own message
        p = Path(inc) if Path(inc).is_absolute() else f.parent / inc
        try:
            parent = yaml.load(p.read_text(encoding="utf-8"), Loader=loader)  # noqa: S506 (a SafeLoader)
        except (OSError, yaml.YAMLError, UnicodeDecodeError):
            continue  # lm-eval names a missing or broken include itself
        if isinstance(parent, dict):
            parent = _included(p, parent, loader, depth + 1)
            parent.pop("task_list", None)
            merged.update(parent)
    merged.update({k: v for k, v in spec.items() if k != "include"})
    return merged


def _task_files(include: Path) -> Iterator[tuple[Path, dict[str, Any], list[tuple[str, str, list[Path]]]]]:
    """Each local task YAML under ``include`` (recursively, as lm-eval's TaskManager indexes an include path: a
    task in a subfolder runs as well), its spec, and ``(split, name, files here)`` for each data file it names."""
    import yaml

    loader = _task_yaml_loader()
    for f in sorted(include.rglob("*.yaml")):
        if _IGNORE_DIRS.intersection(f.relative_to(include).parts) or not f.is_file():
            continue
        try:
            spec = yaml.load(f.read_text(encoding="utf-8"), Loader=loader)  # noqa: S506 (a SafeLoader)
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise UsageError(f"{f}: not a valid task YAML ({' '.join(str(e).split())[:200]})") from None
        if not isinstance(spec, dict):
            raise UsageError(f"{f}: a task file is a mapping (task, dataset_path, output_type, ...)")
        spec = _included(f, spec, loader)
        kwargs = spec.get("dataset_kwargs")
        kwargs = kwargs if isinstance(kwargs, dict) else {}
        base = _data_base(spec.get("dataset_path"), kwargs.get("data_dir"))
        named = []
        for split, one in _data_files(kwargs.get("data_files")):
            if not isinstance(one, str):
                continue  # not a path; datasets refuses it with its own message
            p = base / Path(one).expanduser()  # an absolute path stays as it is
            # datasets also takes glob patterns (data/*.jsonl).
            found = ([Path(g) for g in sorted(glob.glob(str(p), recursive=True)) if Path(g).is_file()]
                     if any(c in one for c in "*?[") else [p] if p.is_file() else [])
            named.append((split, one, found))
        yield f, spec, named


def _local_task_files(include: Path | None, key: str = "--include") -> None:
    """Every data file a local task YAML names must exist here: the job runs offline."""
    if include is None:
        return
    if not include.is_dir():
        raise UsageError(f"{key} {include}: not a directory of task YAML files")
    for f, spec, named in _task_files(include):
        for split, one, found in named:
            if not found:  # for a glob pattern, one file matching is what datasets needs
                raise UsageError(f"{f}: task {spec.get('task')!r} names data file {one} ({split}), which is not "
                                 f"on this machine; evaluation runs offline")


def local_task_names(include: Path) -> set[str]:
    """The tasks and groups the YAML files under ``include`` define (by their ``task`` and ``group`` names; a
    group's member list may name registry tasks, which are not counted)."""
    names = set()
    for _, spec, _ in _task_files(include):
        names.update(v for v in (spec.get("task"), spec.get("group")) if isinstance(v, str))
    return names


def include_digest(include: Path) -> str:
    """A digest of what the local tasks in ``include`` evaluate: every file under it (task YAMLs, the Python of
    their ``!function`` hooks, data beside them) and each data file a task names elsewhere, by content. A resume
    compares it with the checkpoint's, so an edited task or its data counts as other benchmarks."""
    h = hashlib.sha256()

    def add(label: str, f: Path) -> None:
        h.update(f"{label}\0{f.stat().st_size}\0".encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)

    for f in sorted(include.rglob("*")):
        if f.is_file() and not _IGNORE_DIRS.intersection(f.relative_to(include).parts):
            add(f"in {f.relative_to(include).as_posix()}", f)
    outside = {g.resolve() for _, _, named in _task_files(include) for _, _, found in named for g in found}
    root = include.resolve()
    for g in sorted(outside):
        if not g.is_relative_to(root):
            add(f"data {g}", g)
    return h.hexdigest()


def check_tasks(tasks: list[str], include: Path | None, keys: tuple[str, str] = ("--tasks", "--include")) -> Any:
    """lm-eval's TaskManager with the local tasks; every task known (a UsageError naming the unknown ones).
    ``keys``: how the caller names the tasks and the task dir (flags, or config keys)."""
    require_lm_eval()
    _local_task_files(include, keys[1])
    from lm_eval.tasks import TaskManager

    if include is not None:
        # Indexing lm-eval's registry (some 15,000 task files) takes seconds per process, per rank; a run whose
        # tasks are all local skips it.
        local = TaskManager(include_path=str(include), include_defaults=False)
        # A local group or tag may list registry tasks, which this index cannot load (a TypeError at the first
        # evaluation): groups go through the whole registry.
        nested = set(local.all_groups) | set(local.all_tags)
        if all(t in local.all_tasks and t not in nested for t in tasks):
            try:
                # Built now, as the evaluation will build them (lm-eval renders a first document in each task's
                # constructor): a typo in doc_to_text or a broken data line stops here, not at the first
                # evaluation of a run that has trained until then.
                local.load(tasks)
            except Exception as e:  # jinja2, datasets and lm-eval raise many types for a bad task
                raise UsageError(f"{keys[0]} {','.join(tasks)}: lm-eval cannot build them from {include} "
                                 f"({' '.join(str(e).split())[:300]})") from None
            return local
    tm = TaskManager(include_path=str(include) if include else None)
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        raise UsageError(f"{keys[0]}: unknown task(s) {unknown}: not in lm-eval's registry nor in "
                         f"{include or f'a local task dir ({keys[1]} DIR)'}")
    return tm


def _ranked_lm(model: Any, tok: Any, batch_size: int, env: DistEnv) -> Any:
    """lm-eval's HF model on the already loaded (vector-swapped) model, taking part in this job's process group:
    lm-eval then builds each task's requests for documents ``rank, rank + world, ...`` and gathers the per-document
    metrics to rank 0 before aggregating them (its own data-parallel path, which it otherwise runs only under
    ``accelerate launch`` with a model it loads itself)."""
    from lm_eval.models.huggingface import HFLM

    class RankedLM(HFLM):
        def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
            if self.world_size <= 1:
                return tensor
            one = tensor.reshape(1) if tensor.dim() == 0 else tensor
            parts = [torch.zeros_like(one) for _ in range(self.world_size)]
            torch.distributed.all_gather(parts, one)
            return torch.cat(parts)

        def barrier(self) -> None:
            dist.barrier()

    lm = RankedLM(pretrained=model, tokenizer=tok, batch_size=batch_size, device=str(next(model.parameters()).device))
    lm._rank, lm._world_size = env.rank, env.world_size
    return lm


def _lm_eval_failed(e: Exception, tasks: list[str], key: str, env: DistEnv) -> UsageError:
    """What lm-eval's failure to load or run ``tasks`` means here; re-raised on several ranks."""
    if isinstance(e, RuntimeError) or env.world_size > 1:
        # RuntimeError: out of memory, a failed collective: not bad input. On several ranks a rank that stops
        # alone leaves the others in a collective: fail the job, not exit 2.
        raise e
    return UsageError(f"{key} {','.join(tasks)}: lm-eval could not run them ({' '.join(str(e).split())[:300]}); is "
                      f"every task's data on this machine?")


def doc_counts(tasks: list[str], tm: Any, limit: int | None) -> dict[str, int]:
    """``{task: documents evaluated}`` for every leaf task of ``tasks`` (groups expanded), after ``limit`` as
    lm-eval applies it."""
    from lm_eval.evaluator_utils import get_sample_size

    out = {}
    for name, task in tm.load(tasks)["tasks"].items():
        n, cap = len(task.eval_docs), get_sample_size(task, limit)
        out[str(name)] = n if cap is None else min(n, cap)
    return out


def must_replicate(tasks: list[str], tm: Any, limit: int | None, env: DistEnv, key: str = "--tasks") -> bool:
    """Whether a data-parallel evaluation must run replicated instead: lm-eval deals a task's documents to the
    ranks as ``rank, rank + world, ...`` and refuses (on that rank alone) to run a task where a rank gets none,
    so any task with fewer documents than ranks makes every rank run every document. Every rank takes part
    (the decision is the same everywhere)."""
    if env.world_size <= 1 or not tasks:
        return False
    try:
        counts = doc_counts(tasks, tm, limit)
    except Exception as e:  # datasets and lm-eval raise many types for missing data and bad task definitions
        raise _lm_eval_failed(e, tasks, key, env) from None
    few = {t: n for t, n in counts.items() if n < env.world_size}
    # The same data on every rank gives the same counts; the maximum keeps the ranks on one path regardless.
    if not dist.host_max(int(bool(few))):
        return False
    listed = ", ".join(f"{t} ({n})" for t, n in few.items()) if few else "a task on another rank"
    dist.print0(env, f"benchmarks: fewer documents than the {env.world_size} ranks in {listed}: every rank "
                     f"evaluates every document (not split between the ranks)")
    return True


@contextlib.contextmanager
def _prompts_as_one_process() -> Iterator[None]:
    """Each rank builds a task's requests as one process would, then keeps its documents (``doc_id % world ==
    rank``, lm-eval's own split): lm-eval draws each document's few-shot examples from one seeded generator in the
    order a rank meets its documents, so split first, a document got other examples on N ranks than on one (23 of
    24 of a 2-shot task on 2 ranks) and the score depended on the allocation."""
    from lm_eval.api.task import Task

    build = Task.build_all_requests

    def one_process_then_split(self: Any, *, rank: int = 0, world_size: int = 1, **kw: Any) -> None:
        build(self, rank=0, world_size=1, **kw)
        if world_size > 1:
            mine = [inst for inst in self._instances if inst.doc_id % world_size == rank]
            if not mine:
                raise ValueError(f"{self.config.task}: no document for rank {rank} of {world_size}")
            self._instances = mine

    Task.build_all_requests = one_process_then_split  # type: ignore[method-assign]
    try:
        yield
    finally:
        Task.build_all_requests = build  # type: ignore[method-assign]


def run_tasks(model: Any, tok: Any, tasks: list[str], tm: Any, batch_size: int, limit: int | None,
              env: DistEnv | None = None, replicated: bool = False, key: str = "--tasks") -> dict:
    """``{task: {metric: value}}`` (lm-eval's ``metric,filter`` keys; stderr entries left out); on ranks other than
    0 of a data-parallel evaluation, ``{}`` (rank 0 holds the gathered result). ``replicated``: every rank runs
    every request, in the same order, and returns the result (ZeRO-3, whose forward passes gather parameters
    collectively: every rank must run the same ones; tasks with fewer documents than ranks, see
    :func:`must_replicate`). ``key`` names the tasks in messages. lm-eval's fixed seeds for Python, NumPy and
    torch, as its CLI sets them (training puts its own random state back after: :meth:`Benchmarks.run`)."""
    from lm_eval import simple_evaluate

    env = env or DistEnv(0, 0, 1, 1)
    lm = _ranked_lm(model, tok, batch_size, DistEnv(0, 0, 1, 1) if replicated else env)
    try:
        with _prompts_as_one_process():
            res = simple_evaluate(model=lm, tasks=tasks, task_manager=tm, bootstrap_iters=0, log_samples=False,
                                  limit=limit)
    except Exception as e:  # datasets and lm-eval raise many types for missing data and bad task definitions
        raise _lm_eval_failed(e, tasks, key, env) from None
    if res is None:
        return {}
    out = {}
    for task, metrics in res["results"].items():
        # lm-eval's metrics are "metric,filter"; its other numbers (sample_len) and the stderr entries are not.
        out[task] = {k: float(v) for k, v in metrics.items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool) and "," in k and "_stderr" not in k}
    return out


class Benchmarks:
    """``eval.tasks`` during training: when due, lm-eval on the live model (the loop's PEFT model, its vectors as
    trained so far), every rank taking part; the scores reach every rank, so each decides early stopping and the
    best checkpoint alike."""

    def __init__(self, cfg: Any, env: DistEnv, replicated: bool) -> None:
        e = cfg.eval
        # None: decided at the first evaluation, once the tasks' documents are counted (must_replicate).
        self.cfg, self.env, self.replicated = cfg, env, (True if replicated else None)
        self.tasks = list(e.tasks or [])
        self.every = e.every or cfg.train.eval_every
        self.tm = check_tasks(self.tasks, Path(e.include).expanduser() if e.include else None,
                              ("eval.tasks", "eval.include"))

    def due(self, step: int, end: int) -> bool:
        return step == end or bool(self.every and step % self.every == 0)

    def run(self, model: Any, tok: Any, beat: Any = None) -> dict[str, float]:
        """``{"<task>/<metric>": value}`` on every rank; ``beat`` runs after each forward pass (the hang
        watchdog's progress beat: a benchmark may take minutes)."""
        # On the innermost model: generation (generate_until tasks) runs its forward passes, not the PEFT wrapper's.
        from ..runtime.checkpoint import rng_state, set_rng_state
        from .evaluate import eval_mode

        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        hook = inner.register_forward_hook(lambda *_: beat()) if beat is not None else None
        # lm-eval's fixed seeds, as `ia3-dist eval` runs them (a sampling task scores alike in both), and the run's
        # own random state back after: a task that samples, or seeds Python's random, would otherwise change every
        # later dropout mask and the run would train differently for having been evaluated.
        saved = rng_state()
        try:
            if beat is not None:
                beat()  # loading a task's data comes before its first forward pass
            if self.replicated is None:
                self.replicated = must_replicate(self.tasks, self.tm, self.cfg.eval.limit, self.env, "eval.tasks")
            with eval_mode(model):  # lm-eval sets eval mode itself; each submodule's own mode comes back
                scores = run_tasks(model, tok, self.tasks, self.tm, self.cfg.eval.batch_size, self.cfg.eval.limit,
                                   self.env, self.replicated, key="eval.tasks")
        finally:
            if hook is not None:
                hook.remove()
            set_rng_state(saved)
        flat = {f"{task}/{metric}": value for task, metrics in scores.items() for metric, value in metrics.items()}
        # Rank 0's scores on every rank, replicated or not: each rank's trackers then decide the same stop and
        # checkpoint (collectives), even where kernels round differently from rank to rank.
        if self.env.world_size > 1:
            box = [flat]
            torch.distributed.broadcast_object_list(box, src=0)
            flat = box[0]
        return flat
