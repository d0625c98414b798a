"""The engine loop: one optimizer step at a time on the DeepSpeed engine, with the reference recipe's loss (mean
over all label tokens of the global batch), metrics, periodic eval and checkpoints.

A step is :meth:`Trainer.step`: collate this rank's micro-batches, agree with every other rank on the step's
:class:`StepStats` (one collective: token counts and the stop flag), then forward/backward each micro-batch.
"""

from __future__ import annotations

import gc
import json
import math
import os
import sys
import time
from dataclasses import astuple, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from ..data.collate import to_device
from ..data.sampler import epochs_done, examples_consumed, iter_steps
from ..errors import CheckpointWriteError, NonFiniteLoss, Preempted, UsageError
from ..models.families import apply_speedups, batch_inputs, last_block
from ..models.files import snapshot_commit
from ..models.ia3 import apply_ia3, load_init_adapter, trainable_line
from ..models.load import (
    DTYPES,
    compile_blocks,
    copy_gradients,
    hidden_size_of,
    keep_hub_name,
    layers_of,
    load_base_model,
)
from ..models.zero3_load import build_partitioned, load_partitions, local_model_dir, untied
from ..runtime import checkpoint as ckpt
from ..runtime import dist, ds_syncs, faults, hostmem, portable
from ..runtime import ds_config as dsc
from ..runtime.adapter import gather_trainable
from ..runtime.preempt import StopFlag
from ..runtime.watchdog import Watchdog
from . import autobatch, objectives
from .metrics import MetricsLog, Shape, device_peak_tflops, peak_memory_gb, trim_metrics
from .prepare import Prepared, write_batch_files
from .schedule import lr_schedule
from .selection import Selection
from .stats import StepStats
from .trackers import Trackers


@dataclass
class Window:
    """Steps since the last logged line: their summed stats and mean loss."""

    stats: StepStats = field(default_factory=StepStats)
    loss: float = 0.0
    steps: int = 0
    t0: float = field(default_factory=time.perf_counter)


@dataclass
class TrainResult:
    adapter_dir: Path
    losses: list[float]
    """Per-step losses of this invocation (steps start_step+1 .. end)."""
    engine: Any
    """The DeepSpeed engine, still live until the process group is destroyed."""
    peft_model: Any
    start_step: int = 0
    eval: dict[str, float] | None = None
    stopped_early: str = ""
    """Why train.early_stopping ended the run ("" if it did not)."""

    def loss_change(self, window: int) -> tuple[int, float, float]:
        """Mean loss of the first and last ``k`` steps, k = min(window, steps // 4) (at least 1)."""
        k = max(1, min(window, len(self.losses) // 4))
        return k, sum(self.losses[:k]) / k, sum(self.losses[-k:]) / k


def base_revision(p: Prepared) -> str | None:
    """The hub base's version the adapter is trained on: the commit of the snapshot the preflight checked (its dir
    is named by it), else ``model.revision``; None for a local base."""
    if Path(p.model_path).expanduser().is_dir():
        return None
    if p.weights_dir is not None and snapshot_commit(p.weights_dir):
        return p.weights_dir.name
    return p.cfg.model.revision


def load_base(p: Prepared) -> tuple[Any, Any]:
    """The base model; under ZeRO-3 built partitioned and filled rank by rank (see zero3_load.py). Returns it and
    the ``HfDeepSpeedConfig`` that must stay referenced while it lives under ZeRO-3 (transformers and PEFT then
    treat its parameters as partitioned: shapes, gradient checkpointing, generation)."""
    if dsc.stage_of(p.ds_config) != 3:
        return load_base_model(p.cfg.model, p.model_path, p.cfg.train.precision, p.weights_dir), None
    from transformers.integrations import HfDeepSpeedConfig

    keep_alive = HfDeepSpeedConfig(p.ds_config)
    base = build_partitioned(untied(p.model_config) if p.untie_head else p.model_config, p.ds_config,
                             DTYPES[p.cfg.train.precision], p.cfg.model.trust_remote_code)
    keep_hub_name(base, p.model_path)  # built from a config read in a snapshot dir
    src = p.weights_dir or local_model_dir(p.model_path, p.cfg.model.revision, p.cfg.model.trust_remote_code)
    stats = load_partitions(base, src)
    gc.collect()  # the untied lm_head that tie_weights replaced still holds its partition until collected
    hostmem.trim()
    dist.print0(p.env, f"ZeRO-3 load: rank 0 read {stats['bytes_read'] / 2**20:.1f} MiB of weights (its partition "
                       f"of {stats['tensors']} tensors; largest single read {stats['largest_read'] / 2**20:.1f} MiB)")
    return base, keep_alive


def build_engine(p: Prepared, objective: objectives.Objective | None = None) -> tuple[Any, Any, Any]:
    """``(engine, peft_model, keep_alive)``: base + family speed-ups + IA3 (from ``ia3.init_from`` when set),
    wrapped in the objective's module (default: the token-sum loss)."""
    import deepspeed

    torch.manual_seed(p.cfg.train.seed)
    base, keep_alive = load_base(p)
    gc_on = p.cfg.train.gradient_checkpointing
    if gc_on:
        # Non-reentrant: works with frozen inputs (IA3 leaves the embeddings frozen) and under every ZeRO stage.
        base.config.use_cache = False
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    rows = apply_speedups(base, p.cfg.model, gc_on)
    if p.cfg.train.compile:
        # The last block keeps eager mode when it computes only label rows: its row count changes every batch.
        n = compile_blocks(base, skip=last_block(base) if rows is not None else None,
                           dynamic=True if p.layout.pack_length else None, mode=p.cfg.train.compile_mode,
                           backend=p.cfg.train.compile_backend)
        dist.print0(p.env, f"train.compile: {n} decoder blocks compiled (the first steps include the compile)")
    inputs = batch_inputs(base, packing=bool(p.layout.pack_length))
    peft_model = apply_ia3(base, p.cfg.ia3)
    revision = base_revision(p)
    if revision:
        # PEFT writes it beside base_model_name_or_path: generate, chat, export and AutoPeftModel load that
        # version of a hub base, not whatever its branch names by then.
        peft_model.peft_config["default"].revision = revision
    if p.cfg.train.compile and p.cfg.train.compile_mode == "reduce-overhead":
        copy_gradients(peft_model)
    init_values = None
    if p.cfg.ia3.init_from:
        init_values = load_init_adapter(peft_model, p.cfg.ia3.init_from)
        dist.print0(p.env, f"ia3.init_from: starting from the adapter in {p.cfg.ia3.init_from}")
    dist.print0(p.env, trainable_line(peft_model))
    objective = objective or objectives.build(p.cfg)
    wrapper = objective.module(peft_model, rows, p.cfg.train.loss_chunk_mib << 20, inputs)
    if dsc.stage_of(p.ds_config) == 3 and p.env.world_size > 1:
        wrapper.agree = dist.host_max  # ZeRO-3 gathers the head at each call: every rank calls it equally often
    params = [q for q in wrapper.parameters() if q.requires_grad]
    if not ds_syncs.install():
        dist.print0(p.env, f"deepspeed {deepspeed.__version__}: its ZeRO gradient-norm code is not the one the "
                           f"launcher's sync-free form was checked against; kept as is (two host syncs per step)")
    engine, _, _, _ = deepspeed.initialize(model=wrapper, model_parameters=params, config=p.ds_config,
                                           lr_scheduler=lr_schedule(p.cfg.train, p.total_steps))
    if init_values is not None and p.cfg.train.precision != "fp32":
        # The masters from the file, not from its bf16/fp16 rounding in the parameters (a resume then overwrites
        # them with the checkpoint's).
        portable.set_masters(engine, init_values)
    return engine, peft_model, keep_alive


def model_shape(peft_model: Any) -> Shape:
    """Parameter counts for the FLOP formulas; ``ds_numel`` under ZeRO-3, where a weight is a partition."""
    base = peft_model.get_base_model()
    mc = base.config
    head = base.get_output_embeddings()

    def numel(q: torch.Tensor) -> int:
        return int(getattr(q, "ds_numel", q.numel()))

    linear = sum(numel(m.weight) for m in base.modules() if isinstance(m, torch.nn.Linear) and m is not head)
    return Shape(n_params=sum(numel(q) for q in peft_model.parameters()), linear_params=linear,
                 n_layer=layers_of(mc), hidden=hidden_size_of(mc) or 0,
                 vocab=int(getattr(head, "out_features", None) or mc.vocab_size))


def process_start_time() -> float:
    """When this process started (epoch seconds): the launcher's start-up counts too, not only ours."""
    import psutil

    return psutil.Process().create_time()


def grad_norm(module: torch.nn.Module) -> torch.Tensor | None:
    """L2 norm of the trainable parameters' gradients, before clipping, as a device tensor (read on log steps
    only). Called at the accumulation boundary after the backward pass, when ZeRO-0 has all-reduced them: every
    rank holds the global batch's full gradient."""
    norms = [torch.linalg.vector_norm(q.grad.detach(), dtype=torch.float64) for q in module.parameters()
             if q.requires_grad and q.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else None


def grad_norm_ok(norm: Any, device: torch.device) -> bool | torch.Tensor | None:
    """Whether an applied step's gradient norm is a real one (finite and not DeepSpeed's -1 sentinel): a host bool
    where the norm is a host number, else a flag left on ``device`` for :meth:`Trainer.flush` to read with the
    losses (a norm on another device, as with ZeRO-3 offload, is read now). None: no norm to check."""
    if norm is None:
        return None
    if not torch.is_tensor(norm):
        return math.isfinite(float(norm)) and float(norm) >= 0
    ok = torch.isfinite(norm) & (norm >= 0)
    return ok if ok.device == device else bool(ok)


class Trainer:
    """Holds the live engine and the loop's state; :meth:`fit` runs the steps of this invocation."""

    def __init__(self, p: Prepared, stop: StopFlag, watchdog: Watchdog | None = None,
                 trackers: Trackers | None = None) -> None:
        self.p, self.stop = p, stop
        self.watchdog = watchdog or Watchdog(0.0, p.env)
        self.objective = objectives.build(p.cfg)
        self.engine, self.peft_model, self._keep_alive = build_engine(p, self.objective)
        self.device = self.engine.device
        self.pad_id = p.tokenizer.pad_token_id
        self.side = getattr(p.tokenizer, "padding_side", "right")
        t = p.cfg.train
        self.shape = model_shape(self.peft_model)
        self.recompute = t.gradient_checkpointing
        self.chunk_rows = max(1, (t.loss_chunk_mib << 20) // (4 * self.shape.vocab)) if t.loss_chunk_mib else 0
        if p.auto is not None:
            self._settle_micro_batch()
        # Before a checkpoint is loaded: the model is still the run's starting point (DPO's reference).
        self.objective.setup(self)
        # Peak host RSS of the worst rank once the engine is ready: what loading cost (ZeRO-3: a partition, not
        # the model). Every rank joins the reduction.
        self.load_rss = dist.all_reduce_max(torch.tensor([hostmem.peak_rss_gib()], dtype=torch.float64,
                                                         device=self.device)).item()
        self.start = 0
        self.eval_pending = False
        """The checkpoint resumed from was saved when a signal came before its step's evaluation: it runs first."""
        self.stale: int | None = None
        """A step whose checkpoint still says its evaluation is pending after it ran: saved again when it is needed
        (a resume from it would evaluate, and log, that step twice)."""
        self.selection = Selection.of(p.cfg)
        self.best_state: dict[str, torch.Tensor] | None = None
        """train.early_stopping.final=best: the best evaluation's vectors (rank 0; gathered on every rank)."""
        if p.resume_from is not None:
            assert p.resumed is not None, "prepare reads the resumed checkpoint's meta.json"
            line = p.resume_line
            if p.auto is not None and p.auto.source == "probe":
                # Built in the preflight, before the probe settled the micro-batch: said with the layout it uses.
                line = ckpt.resume_line(p.resume_from, p.resumed, p.meta, p.resume_portable) + p.resume_measured
            dist.print0(p.env, line)
            self.start = ckpt.load(self.engine, p.resume_from, p.resume_portable)
            self.selection.restore(p.resumed, str(p.resume_from / ckpt.META))
            self._restore_best()
            self.eval_pending = bool(p.resumed.get("eval_pending"))
        self.end = p.total_steps if not t.stop_after_steps else min(p.total_steps, self.start + t.stop_after_steps)
        if self.selection.stopped_early:  # the stopped run's last checkpoint, resumed to write its adapter
            self.end = self.start
        # A checkpoint of another run's dir (continue elsewhere) is not one of this run's: a stop before the first
        # step saves it here.
        own = p.resume_from is None or p.resume_from.parent.resolve() == ckpt.root_of(p.out).resolve()
        self.saved = self.start if own else -1
        self.saved_stopped = bool(self.selection.stopped_early)
        """Whether the checkpoint of step :attr:`saved` records the early stop (written by this invocation, or the
        stopped run's last one, resumed to write its adapter)."""
        self.metrics_path = p.out / "metrics.jsonl"
        if p.env.is_main:
            if self.start:
                note = trim_metrics(self.metrics_path, self.start, self.eval_pending)
                if note:
                    dist.print0(p.env, note)
            else:
                self.metrics_path.unlink(missing_ok=True)
        self.examples_path = p.out / "examples.jsonl"
        self.examples = None
        self.log_error: OSError | None = None
        """Rank 0's first failed write of examples.jsonl: the next checkpoint fails with it on every rank."""
        if p.env.is_main and p.cfg.output.log_examples:
            if self.start:
                trim_metrics(self.examples_path, self.start)
            try:
                self.examples = open(self.examples_path, "a" if self.start else "w", encoding="utf-8")
            except OSError as e:  # rank 0 alone, the ranks have met: raised here, the others waited for it
                self._log_failed(e)
        self.log = MetricsLog(self.metrics_path if p.env.is_main else None, p.total_steps, p.env.is_main,
                              initial=self.start, trackers=trackers)
        # DeepSpeed reports the global gradient norm only through optimizers that compute one (ZeRO, fp16, bf16);
        # plain fp32 at ZeRO-0 clips with torch and keeps no norm, so the step measures it (see grad_norm).
        self.own_grad_norm = not hasattr(self.engine.optimizer, "_global_grad_norm")
        # What DeepSpeed's reduction divides each gradient by: the ranks, unless gradient_allreduce_op is "sum",
        # which ZeRO-0/1/2 honour (no division) and ZeRO-3 does not (it always averages).
        averages = getattr(self.engine, "gradient_average", True) or dsc.stage_of(p.ds_config) == 3
        self.reduce_divisor = p.env.world_size if averages else 1
        self.grad_norm: torch.Tensor | None = None
        self.pending: list[tuple[int, torch.Tensor, bool | torch.Tensor | None]] = []
        """(step, loss, gradient norm ok) of steps whose loss is still on the device: read together at the next
        log step, eval or save (one host sync there instead of one per step), checked finite before anything is
        saved. The norm is checked for steps the optimizer applied: bf16 without DeepSpeed's overflow check, and
        fp32 ZeRO-0, apply a step whose gradients are not finite (where DeepSpeed skips one, nothing is applied)."""
        self.window = Window()
        self.paused_at: float | None = None
        """When training paused for the step's evaluation and save (the window's time ends there)."""
        self.peak_tflops = device_peak_tflops(t.peak_tflops, t.precision)
        self.losses: list[float] = []
        self._warned = False
        self.startup_s = 0.0

    def _restore_best(self) -> None:
        """train.early_stopping.final=best on resume: the best evaluation's vectors from the checkpoint (on rank 0,
        as :meth:`follow` holds them), checked against this model's trainable parameters on every rank."""
        stopper, p = self.selection.stopper, self.p
        if stopper is None or p.cfg.train.early_stopping.final != "best" or not stopper.best_step:
            return
        if p.resume_best is None:
            dist.print0(p.env, f"train.early_stopping.final=best: {p.resume_from} carries no best vectors (written "
                               f"by an earlier ia3-dist); if the run stops early before a new best, its adapter "
                               f"holds the last step's vectors, not step {stopper.best_step}'s")
            return
        shapes = {n: tuple(getattr(q, "ds_shape", q.shape)) for n, q in self.peft_model.named_parameters()
                  if q.requires_grad}
        got = {n: tuple(t.shape) for n, t in p.resume_best.items()}
        if got != shapes:
            raise UsageError(f"{p.resume_from / ckpt.BEST_VECTORS}: its tensors are not this model's trainable "
                             f"vectors ({len(got)} against {len(shapes)}; first difference: "
                             f"{next(iter(sorted(set(got.items()) ^ set(shapes.items()))), None)}); delete the file "
                             f"(the run then writes its last vectors if it stops early) or resume from another "
                             f"checkpoint")
        self.best_state = dict(p.resume_best) if p.env.is_main else {}

    def _settle_micro_batch(self) -> None:
        """``train.micro_batch_size: auto``: probe the preflight's pick (ZeRO-0/1/2, fresh runs), switch the
        engine and the layout if it had to shrink, and say what was chosen."""
        p = self.p
        if p.auto.source == "plan" and dsc.stage_of(p.ds_config) < 3:
            planned = p.cfg.train.micro_batch_size
            p.auto = autobatch.probe(self.engine, p, p.auto)
            if p.auto.micro != planned:
                autobatch.relayout(p, p.auto.micro, self.engine)
                failed: OSError | None = None
                if p.env.is_main:  # what the run really uses, for resume and for the reader
                    try:
                        write_batch_files(p)
                    except OSError as e:
                        failed = e
                # Every rank: rank 0 failing alone (a full disk) left the others waiting in the next collective.
                if dist.host_max(int(failed is not None)):
                    raise CheckpointWriteError(
                        f"{p.out}: run.yaml and ds_config.json could not be rewritten with the micro-batch the probe "
                        f"chose ({failed.strerror or failed if failed else 'on rank 0; its log says why'}); free "
                        f"space there, or set train.micro_batch_size, and start the run again")
        dist.print0(p.env, p.auto.line())

    # -- one step --------------------------------------------------------------------------------------------

    def step(self, step: int, step_mbs: list[list[int]]) -> tuple[float, StepStats]:
        """One optimizer step; returns its loss (the objective's: sft, the mean over the global batch's label
        tokens) and its stats."""
        env, t = self.p.env, self.p.cfg.train
        faults.hit("step", step + 1, env.rank, self.stop)
        batches, real = self.objective.batches(self, step_mbs)
        glob = self.objective.stats(self, batches, real).all_reduce()
        if glob.stop_requested > 0:
            if self.window.steps:  # the steps since the last training line get theirs (every rank joins it)
                self.flush()
                self.log_window(self.window, step, *self.window_at)
                self.window = Window()
            # (The checkpoint resumed from by its own path: a step cut off between its renames is a stepN.new.)
            where = self.save(step) if step > self.saved or step == self.stale else \
                self.p.resume_from if step == self.start and self.p.resume_from is not None else \
                ckpt.root_of(self.p.out) / ckpt.tag_for(step)
            # Step 0 of a fresh run has no checkpoint (a resume starts it afresh); a resumed run's is the one it
            # resumed from.
            raise Preempted(step, self.stop.signame or "a signal on another rank", str(where) if step else None)
        # DeepSpeed divides by accumulation steps and (reduce_divisor) the ranks; undo both so the gradient is
        # sum(terms of the global batch) / normaliser (sft: label tokens of the global batch, like HF Trainer).
        norm = self.objective.normaliser(glob)
        scale = t.grad_accum * self.reduce_divisor / norm if norm else 0.0
        loss_local = torch.zeros((), dtype=torch.float64, device=self.device)
        skipped = self.engine.skipped_steps
        packed = bool(self.p.layout.pack_length)
        for k, (b, r) in enumerate(zip(batches, real, strict=True)):
            if packed:
                # Packed steps may end before grad_accum micro-steps (none holds a row on any rank after the last
                # run): the boundary is said at every micro-step, since DeepSpeed's own count would drift.
                self.engine.set_gradient_accumulation_boundary(k == len(batches) - 1)
            loss_sum = faults.poisoned(self.objective.term(self.engine, to_device(b, self.device), r), step + 1,
                                       env.rank)
            # Empty slots (short last batch) still run forward/backward so every rank joins the same
            # collectives; weight 0 keeps them out of the gradient.
            self.engine.backward(loss_sum * (scale if r else 0.0))
            if self.own_grad_norm and self.engine.is_gradient_accumulation_boundary():
                self.grad_norm = grad_norm(self.engine.module)
            self.engine.step()
            if r:
                loss_local += loss_sum.detach().double()
        # Stays on the device (the all-reduce is queued, not waited for); flush() reads it.
        loss = dist.all_reduce_sum(loss_local) / max(norm, 1.0)
        applied = self.engine.skipped_steps == skipped  # DeepSpeed's skip is a host decision already made
        gn = self.grad_norm if self.own_grad_norm else self.engine.get_global_grad_norm()
        self.pending.append((step + 1, loss, grad_norm_ok(gn, loss.device) if applied else None))
        return loss, glob

    def flush(self) -> None:
        """Read the pending steps' losses (and gradient-norm flags) from the device at once, add the losses to the
        window and the run's list, and stop at the first step whose loss is not finite or whose applied update
        came from non-finite gradients (naming it) before anything else is logged or saved."""
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        on_device = [i for i, (_, _, ok) in enumerate(pending) if torch.is_tensor(ok)]
        read = torch.stack([v for _, v, _ in pending] + [pending[i][2].to(torch.float64) for i in on_device]).tolist()
        values, flags = read[:len(pending)], dict(zip(on_device, read[len(pending):], strict=True))
        for i, ((s, _, ok), v) in enumerate(zip(pending, values, strict=True)):
            grads_ok = bool(flags[i]) if i in flags else ok is not False
            if not math.isfinite(v) or not grads_ok:
                last = ckpt.latest(ckpt.root_of(self.p.out))
                what = (f"loss is {v}" if not math.isfinite(v) else
                        f"the gradient norm is not finite (inf or NaN) while the loss is {v:.6g}, and the update "
                        f"was applied")
                raise NonFiniteLoss(f"{what} at optimizer step {s}; stopped without saving. Last good checkpoint: "
                                    f"{last if last else 'none'} (lower train.lr or check the data, then resume "
                                    f"with train.resume=auto; in bf16, DeepSpeed skips such steps instead with "
                                    f"\"check_grad_overflow\": true in the bf16 block of the DeepSpeed config)")
        self.losses.extend(values)
        self.window.loss += sum(values)

    # -- around the steps -------------------------------------------------------------------------------------

    def _log_failed(self, e: OSError) -> None:
        """Rank 0 could not write examples.jsonl: said now (a buffered write's error names no file), and the next
        checkpoint fails with it on every rank."""
        if self.log_error is not None:
            return
        e.filename = e.filename or str(self.examples_path)
        self.log_error = e
        print(f"ia3-dist: {self.examples_path} could not be written ({e.strerror or e}); the next checkpoint stops "
              f"the run (exit 74)", file=sys.stderr, flush=True)

    def save(self, step: int, best: bool = False, eval_pending: bool = False) -> Path:
        """``best``: this step's evaluation is the best so far of checkpoint.keep_best (the pointer moves).
        ``eval_pending``: saved before this step's evaluation (a signal came first); a resume runs it first."""
        self.flush()  # a run whose loss went non-finite saves nothing
        if self.examples is not None and self.log_error is None:
            # What the checkpoint covers is on disk before it exists: a kill after it (the watchdog's exit, a
            # SIGKILL) would lose buffered lines that the resume, starting after this step, never writes again.
            try:
                self.examples.flush()
                os.fsync(self.examples.fileno())
            except OSError as e:
                self._log_failed(e)
        self.log.trackers.flush()
        self.saved = step
        self.saved_stopped = bool(self.selection.stopped_early)
        if self.stale == step:
            self.stale = None
        with self.watchdog.saving(step):
            meta = {**self.p.meta, "examples_consumed": examples_consumed(step, len(self.p.data), self.p.layout),
                    **self.selection.meta(), **({"eval_pending": True} if eval_pending else {}),
                    **self.window_record()}
            return ckpt.save(self.engine, self.p.out, step, meta, self.p.cfg.checkpoint.keep, self.p.env, best,
                             {ckpt.BEST_VECTORS: self.best_state} if self.best_state else None,
                             self.log_error or self.log.error)

    def stop_before_eval(self, step: int) -> None:
        """Before the evaluation at ``step`` (every rank joins): a signal that came during the step, or before an
        evaluation that could outlast the scheduler's grace time, stops the run here. Its checkpoint says the
        evaluation is still to do, and the resume runs it first, so the run logs and follows the same evaluations
        as an uninterrupted one."""
        faults.hit("eval", step, self.p.env.rank, self.stop)
        flag = torch.tensor([float(self.stop.requested)], dtype=torch.float64, device=self.device)
        if dist.all_reduce_sum(flag).item() > 0:
            if self.window.steps:  # the steps since the last training line get theirs, as at a stop in step()
                self.flush()
                self.log_window(self.window, step, *self.window_at)
                self.window = Window()
            # The checkpoint this run resumed from says so already (stopped again before the evaluation it put off).
            kept = step == self.start == self.saved and self.eval_pending and self.p.resume_from is not None
            where = self.p.resume_from if kept else self.save(step, eval_pending=True)
            raise Preempted(step, self.stop.signame or "a signal on another rank",
                            f"{where} (its evaluation runs first when resumed)")

    def pending_eval(self) -> dict[str, float] | None:
        """The mid-run evaluation of step :attr:`start` that a signal put off (the run's end evaluates in
        :meth:`fit`'s own path); returns it when it stopped the run (early stopping)."""
        start = self.start
        heldout, bench = self.due(start)
        if heldout or bench:
            # A signal that came while the job loaded: the evaluation could outlast the scheduler's grace time.
            self.stop_before_eval(start)
        self.stale = start
        if not (heldout or bench):
            return None
        dist.print0(self.p.env, f"step {start}: the evaluation a signal put off")
        res = self.run_eval(start, heldout, bench)
        if self.selection.active and self.follow(start, res):
            self.end = start
            return res
        return None

    def follow(self, step: int, res: dict[str, float]) -> bool:
        """After the evaluation at ``step``: keep its checkpoint if it is the best, remember its vectors if the
        early-stopping metric improved, and say whether to stop here."""
        keep, best, stop = self.selection.after_eval(step, res)
        es = self.p.cfg.train.early_stopping
        if best and es.final == "best":
            self.best_state = gather_trainable(self.peft_model, self.p.env.is_main, self.engine)
        if keep:
            k = self.selection.keeper
            dist.print0(self.p.env, f"checkpoint.keep_best: {k.metric} {k.best:.6g} at step {step} is the best so "
                                    f"far; checkpoints/best names it")
            self.save(step, best=True)
        if stop:
            dist.print0(self.p.env, f"early stopping: {self.selection.stopped_early}")
        return stop

    def due(self, step: int) -> tuple[bool, bool]:
        """Whether the held-out evaluation (``train.eval_every``) and the benchmarks (``eval.every``) fall on
        ``step``."""
        p, every = self.p, self.p.cfg.train.eval_every
        return (p.eval_data is not None and bool(every) and step % every == 0,
                p.bench is not None and p.bench.due(step, p.total_steps))

    def evaluate(self, step: int, heldout: bool = True, bench: bool = False
                 ) -> tuple[dict[str, float], dict[str, float]]:
        """The held-out evaluation and (``eval.tasks``) the benchmarks asked for at ``step`` (each where the run has
        it), logged as one line; returned apart."""
        self.flush()
        beat = lambda: self.watchdog.beat(step, "eval", arm=False)  # noqa: E731
        held: dict[str, float] = {}
        marks: dict[str, float] = {}
        if heldout and self.p.eval_data is not None:
            held = self.objective.evaluate(self, on_batch=beat)
        if bench and self.p.bench is not None:
            marks = self.p.bench.run(self.peft_model, self.p.tokenizer, beat)
        self.log.log({"step": step, **held, **marks})
        return held, marks

    def run_eval(self, step: int, heldout: bool = True, bench: bool = False) -> dict[str, float]:
        """:meth:`evaluate`, as one result."""
        held, marks = self.evaluate(step, heldout, bench)
        return {**held, **marks}

    def _grad_norm(self) -> float | None:
        gn = self.engine.get_global_grad_norm()
        if gn is None and self.grad_norm is not None:
            gn = float(self.grad_norm)
        return None if gn is None else float(gn)

    def window_record(self) -> dict[str, Any]:
        """The open window (steps since the last training line) for a checkpoint's meta.json: a run killed after
        the checkpoint (the watchdog, OOM, a lost node) never writes their line, and the resume starts after them;
        it writes it from this (:meth:`log_saved_window`). Empty when the window is."""
        w = self.window
        if not w.steps:
            return {}
        gn = self._grad_norm()
        # Every rank saves, so every rank joins the objective's reduction here (the resume's line is rank 0's).
        objective = {k: v for k, v in self.objective.window_metrics(w.stats.micro_batches, reset=False).items()
                     if math.isfinite(v)}
        return {"window": {"steps": w.steps, "loss": w.loss, "seconds": (self.paused_at or time.perf_counter()) - w.t0,
                           "lr": float(self.window_at[0]), "grad_norm": gn if gn is not None and math.isfinite(gn)
                           else None, "stats": list(astuple(w.stats)), "objective": objective}}

    def log_saved_window(self, rec: Any, t_start: float) -> None:
        """The training line of the steps a resumed checkpoint's run had not logged (:meth:`window_record`), at the
        checkpoint's step: every step's loss is in some line. A malformed record (an edited meta.json) is
        skipped."""
        def num(v: Any) -> bool:
            return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)

        n = len(fields(StepStats))
        objective = rec.get("objective", {}) if isinstance(rec, dict) else None
        if not (isinstance(rec, dict) and type(rec.get("steps")) is int and rec["steps"] > 0
                and all(num(rec.get(k)) for k in ("loss", "seconds", "lr"))
                and (rec.get("grad_norm") is None or num(rec["grad_norm"]))
                and isinstance(rec.get("stats"), list) and len(rec["stats"]) == n and all(map(num, rec["stats"]))
                and isinstance(objective, dict) and all(isinstance(k, str) and num(v) for k, v in objective.items())):
            return
        w = Window(StepStats(*map(float, rec["stats"])), float(rec["loss"]), rec["steps"])
        self.log.log(self._line(w, self.start, rec["lr"], rec.get("grad_norm"), max(float(rec["seconds"]), 1e-9),
                                t_start, objective))

    def _line(self, w: Window, done: int, lr: float, gn: float | None, dt: float, t_start: float,
              objective: dict[str, float]) -> dict[str, Any]:
        s = w.stats
        return {"step": done, "epoch": round(epochs_done(done, len(self.p.data), self.p.layout), 4),
                "loss": w.loss / w.steps, "lr": float(lr),
                "grad_norm": float(gn) if gn is not None else None,
                "tokens_per_s": s.real_tokens / dt, "padded_tokens_per_s": s.padded_tokens / dt,
                "samples_per_s": s.samples / dt, "padding_efficiency": s.real_tokens / max(s.padded_tokens, 1.0),
                "rows_per_step": s.rows / w.steps, **objective,
                "step_time_s": dt / w.steps, "elapsed_s": time.perf_counter() - t_start}

    def log_window(self, w: Window, done: int, lr: float, t_start: float) -> None:
        """Every rank joins the memory reduction; rank 0 writes the line."""
        dt = max(time.perf_counter() - w.t0, 1e-9)
        gn = self._grad_norm()
        mem = dist.all_reduce_max(torch.tensor([peak_memory_gb(self.device), hostmem.peak_rss_gib()],
                                               dtype=torch.float64, device=self.device)).tolist()
        s = w.stats
        tflops, executed = s.flops / dt / 1e12, s.executed_flops / dt / 1e12
        perf = {"tflops": tflops, "tflops_executed": executed, "peak_mem_gb": mem[0], "peak_rss_gb": mem[1],
                "load_peak_rss_gb": self.load_rss}
        if self.p.cfg.train.compile:
            # Graphs dynamo has compiled so far: flat after warm-up means no recompiles (a changing shape would
            # add graphs); packed rows keep the width fixed for that reason.
            from torch._dynamo.utils import counters

            perf["compiled_graphs"] = int(counters["stats"]["unique_graphs"])
            # reduce-overhead: inductor falls back to a plain compiled graph where it cannot capture one (CPU
            # tensors, mutated inputs), saying so only to a logger that is off by default.
            skips = int(counters["inductor"]["cudagraph_skips"])
            if skips:
                perf["cudagraph_skips"] = skips
        if self.peak_tflops:
            perf["mfu"] = tflops / (self.peak_tflops * self.p.env.world_size)
            perf["mfu_executed"] = executed / (self.peak_tflops * self.p.env.world_size)
        objective = self.objective.window_metrics(s.micro_batches)  # every rank: it may reduce
        self.log.log({**self._line(w, done, lr, gn, dt, t_start, objective), **perf,
                      **({"startup_s": self.startup_s} if done == self.start + 1 else {})})

    def fit(self) -> dict[str, float] | None:
        """Steps ``start .. end``; returns the final eval (None without eval data)."""
        p, t = self.p, self.p.cfg.train
        self.window = Window()
        t_start = time.perf_counter()
        self.window_at = (t.lr, t_start)
        """``(lr, start time)`` of the window's last step, for a line a stop writes in :meth:`step`."""
        # Process start to the first step: loading, partitioning, engine set-up (and on resume the checkpoint).
        self.startup_s = time.time() - process_start_time()
        dist.print0(p.env, f"startup: {self.startup_s:.1f} s from process start to the first step")
        if p.resumed is not None and p.resumed.get("window") is not None and p.env.is_main:
            from .plots import scan_metrics

            # Not twice: an earlier resume from this checkpoint wrote it (the resume trims only lines past it). A
            # training line, not any: the checkpoint's step may have an evaluation line.
            got = scan_metrics(p.out / "metrics.jsonl", ("step", "step_time_s"))
            if not any("step_time_s" in r and r["step"] >= self.start for r in (got.records if got else [])):
                self.log_saved_window(p.resumed["window"], t_start)
        try:
            if self.eval_pending and self.start < self.end:
                res = self.pending_eval()
                if res is not None:
                    return res
                self.window.t0 = time.perf_counter()  # the first window's time starts after that evaluation
            elif self.eval_pending:
                self.stale = self.start  # the end's evaluation below is the one put off
            if self.start == self.end and not self.eval_pending:
                # The run's last checkpoint (a requeue after the run ended, or an adapter its run did not get to
                # write): its run evaluated and followed this step before saving it; again would log it twice and
                # count it twice towards train.early_stopping.patience.
                dist.print0(p.env, f"step {self.start} is the run's last: nothing to train; writing its adapter")
                return None
            for step, _, step_mbs in iter_steps(p.data.lengths, p.layout, self.end, self.start):
                # Armed from the second step on: the first one of an invocation may compile and warm up.
                self.watchdog.beat(step + 1, arm=step > self.start)
                lr = self.engine.optimizer.param_groups[0]["lr"] if self.engine.optimizer is not None else t.lr
                _, stats = self.step(step, step_mbs)
                done = step + 1
                self.window.steps += 1
                self.window.stats += stats
                self.window_at = (lr, t_start)
                self.log.step()
                if self.examples is not None and self.log_error is None:
                    try:
                        self.examples.write(json.dumps({"step": done, "examples": [i for mb in step_mbs for i in mb]})
                                            + "\n")
                    except OSError as e:  # rank 0's alone: the next checkpoint fails with it on every rank
                        self._log_failed(e)
                if done % t.log_every == 0 or done in (p.total_steps, self.start + 1, self.end):
                    self.flush()
                    self.log_window(self.window, done, lr, t_start)
                    self.window = Window()
                    warn = self.watchdog.headroom()
                    if warn and not self._warned:
                        self._warned = True
                        dist.print0(p.env, warn)
                heldout, bench = self.due(done)
                paused = time.perf_counter()  # evaluations and saves are not training: out of the window's time
                self.paused_at = paused
                if (heldout or bench) and done < self.end:
                    self.stop_before_eval(done)
                    res = self.run_eval(done, heldout, bench)
                    if self.selection.active and self.follow(done, res):
                        self.end = done  # finish() saves this step, with the reason in its meta.json
                        if self.window.steps:  # the last steps' training line, as a run's end has one
                            self.window.t0 += time.perf_counter() - paused
                            self.flush()
                            self.log_window(self.window, done, lr, t_start)
                            self.window = Window()
                        return res
                if p.cfg.checkpoint.every and done % p.cfg.checkpoint.every == 0 and self.saved < done < self.end:
                    self.save(done)
                self.window.t0 += time.perf_counter() - paused
                self.paused_at = None
            self.flush()
            if p.eval_data is None and p.bench is None:
                return None
            last = self.end == p.total_steps
            heldout_due, bench_due = self.due(self.end)
            if not (last or heldout_due or bench_due):
                # A chunk (train.stop_after_steps) ending off the evaluation grid: the uninterrupted run evaluates
                # nothing here, so neither does the chunk (its metrics stay the uninterrupted run's).
                return None
            self.stop_before_eval(self.end)
            # The run's end evaluates everything it has; a chunk ending on the grid what is due there.
            parts = self.evaluate(self.end, last or heldout_due, (last and p.bench is not None) or bench_due)
            if self.selection.active:
                # The last evaluation counts (a best is kept); a chunk ending on the grid follows its evaluation
                # here, or no invocation would (the next one starts past it). Stopping here, finish() saves this
                # step with the reason, as the whole run would.
                self.follow(self.end, {**parts[0], **parts[1]})
            return {**parts[0], **parts[1]}
        finally:
            self.log.close()
            if self.examples is not None:
                try:
                    self.examples.close()
                except OSError as e:
                    self._log_failed(e)
                self.examples = None  # the end's save (finish) has nothing of it left to write out

    def finish(self) -> None:
        """The last checkpoint (stopped early, or ``checkpoint.at_end``) unless this step is saved already; a run
        that early stopping ended saves its step again with the reason, so a resume of it is a no-op."""
        stopped = bool(self.selection.stopped_early)
        # Not twice: keep_best's save of this step already carries the reason when the same evaluation stopped it
        # (a second write of a complete tag could only lose it).
        again = stopped and not self.saved_stopped
        if ((self.end < self.p.total_steps or self.p.cfg.checkpoint.at_end) and (self.saved < self.end or again)) \
                or self.stale == self.end:
            self.save(self.end)
