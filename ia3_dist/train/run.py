"""The whole run: prepare (:mod:`.prepare`), start the process group, train (:mod:`.loop`), save the adapter."""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from ..config import RunConfig
from ..data.template import Template
from ..errors import Preempted, UsageError
from ..models.ia3 import fixed_entries
from ..models.load import save_tokenizer
from ..runtime import dist, faults, hostmem, lazy, manifest
from ..runtime import ds_config as dsc
from ..runtime.adapter import save_adapter
from ..runtime.build_locks import BuildLockSweeper
from ..runtime.preempt import StopFlag, WhileMeeting
from ..runtime.watchdog import Watchdog
from .loop import Trainer, TrainResult
from .plots import plot_metrics
from .prepare import PID_FILE, PREEMPTED_FILE, Prepared, prepare, write_run_files
from .report import report
from .trackers import Trackers, start_trackers


def train(p: Prepared, stop: StopFlag | None = None, watchdog: Watchdog | None = None,
          trackers: Trackers | None = None) -> TrainResult:
    """Train on the live process group, then write the adapter with the tokenizer and prompt template beside it
    (generate/chat/export need nothing else) and the metrics plot; the trackers get the adapter dir."""
    trainer = Trainer(p, stop or StopFlag(), watchdog, trackers)
    final_eval = trainer.fit()
    trainer.finish()
    best = None
    stopper = trainer.selection.stopper
    # Stopped early, by this config's early stopping: a run that stopped early resumed with early stopping off
    # (only to write the adapter it did not get to write) writes the last vectors.
    stopped = bool(trainer.selection.stopped_early) and stopper is not None
    if stopped and trainer.best_state is not None and stopper.best_step != trainer.end:
        best = trainer.best_state
        dist.print0(p.env, f"adapter: the vectors of step {stopper.best_step}, the best {stopper.metric} "
                           f"({stopper.best:.6g}; train.early_stopping.final=best)")
    elif stopped and p.cfg.train.early_stopping.final == "best" and stopper.best is None:
        dist.print0(p.env, f"adapter: the vectors of the last step ({trainer.end}): no evaluation of "
                           f"{stopper.metric} was finite")
    elif stopped and p.cfg.train.early_stopping.final == "best" \
            and stopper.best_step != trainer.end:
        dist.print0(p.env, f"adapter: the vectors of the last step ({trainer.end}), not those of step "
                           f"{stopper.best_step} (the best {stopper.metric}): the checkpoint this run resumed from "
                           f"did not carry them")

    def beside(d: Path) -> None:  # what generate, chat and export read with the vectors
        save_tokenizer(p.tokenizer, d)
        Template.of(p.cfg.data, p.tokenizer).save(d)

    with trainer.watchdog.saving(trainer.end):
        adapter_dir = save_adapter(trainer.peft_model, p.out / "adapter", p.env.is_main,
                                   fixed_entries(trainer.peft_model), state=best, extra=beside,
                                   step=trainer.end, vectors_step=trainer.end if best is None else stopper.best_step,
                                   engine=trainer.engine,
                                   final=trainer.end >= p.total_steps or bool(trainer.selection.stopped_early),
                                   base_weights=p.meta.get("base_weights"))
    # Training is over: the plot and a tracker's upload of the adapter (MLflow's, over the network) may take as
    # long as they need; under the watchdog they could end a finished run with 76, and a requeue.
    trainer.watchdog.stop()
    if p.env.is_main:
        plot_metrics(trainer.metrics_path, p.out / "metrics.png")
        if trackers is not None:
            trackers.artifact(adapter_dir)
        faults.hit("trained", trainer.end, 0)
    return TrainResult(adapter_dir, trainer.losses, trainer.engine, trainer.peft_model, trainer.start, final_eval,
                       trainer.selection.stopped_early)


def same_plan_on_every_rank(p: Prepared) -> None:
    """Every rank resolved the same DeepSpeed config, batch layout and data (``auto`` choices are made per rank
    from its own GPU or host memory before the process group exists; a node with other hardware, or a stale token
    cache, would choose otherwise): else all ranks stop together here, exit 2, instead of crossing collectives in
    the engine's start."""
    import hashlib

    stage = dsc.stage_of(p.ds_config)
    if p.auto is not None and p.auto.source == "plan" and stage < 3:
        # micro_batch_size: auto below ZeRO-3: the probe at the engine's start agrees on the smallest pick.
        what: dict = {"stage": stage, "global": p.layout.global_batch}
    else:
        what = {"ds": p.ds_config, "layout": asdict(p.layout)}
    # The tokens too (a node whose cache was built otherwise, e.g. on another day under a dated chat template,
    # holds other lengths and so other batches), and the checkpoint each rank resolved on its own: train.resume=auto
    # reads the filesystem, which two nodes may see at different moments of a save that was cut off.
    resume = (p.resume_from.name, p.resume_portable) if p.resume_from is not None else None
    plan = json.dumps({**what, "steps": p.total_steps, "examples": len(p.data), "tokens": int(p.data.lengths.sum()),
                       "resume": resume, "start": start_step(p)}, sort_keys=True, default=str)
    h = int(hashlib.sha256(plan.encode()).hexdigest()[:15], 16)
    if dist.host_max(h) != -dist.host_max(-h):
        where = f"resuming {p.resume_from}" if p.resume_from is not None else "a fresh start"
        raise UsageError(f"the ranks resolved different runs (rank {p.env.rank}: ZeRO-{stage}, "
                         f"micro-batch {p.layout.micro} x {p.layout.accum} accumulation, {len(p.data)} examples of "
                         f"{int(p.data.lengths.sum())} tokens, {p.total_steps} steps, {where}): nodes with different "
                         f"GPUs or memory choose differently for micro_batch_size/deepspeed.config auto; set them "
                         f"explicitly (or check that every node reads the same data, token cache and checkpoints)")


def _preempted_meeting(p: Prepared, trackers: Trackers, signame: str) -> None:
    """Rank 0, stopped by a signal while the ranks met (:class:`.WhileMeeting`): the earlier run back; for the job
    script's USR1 under Slurm, preempted.json, which slurm/lib.sh requeues on where the launcher does not pass exit
    75 on (torchrun, srun) (not for SIGTERM: a launcher ending the ranks because one failed at its start would
    requeue for ever); the trackers closed as killed, within a few seconds (the process exits next)."""
    if not p.env.is_main:
        return
    _undo_start(p)
    if dist.under_slurm() and signame == "SIGUSR1":
        (p.out / PREEMPTED_FILE).write_text(json.dumps({"step": 0, "message": "stopped by a signal while the "
                                                        "ranks met, before the first step"}))
    closing = threading.Thread(target=trackers.close, args=("killed",), daemon=True)
    closing.start()
    closing.join(timeout=10)


def _undo_start(p: Prepared) -> None:
    """Rank 0, a start that failed before training: no pid file left, and the run output.overwrite set aside is
    back where it was (with its own run.yaml: the dir says what it holds)."""
    (p.out / PID_FILE).unlink(missing_ok=True)
    (p.out / manifest.ALIVE_FILE).unlink(missing_ok=True)
    back = manifest.restore_aside(p.out)
    if back:
        dist.print0(p.env, f"output.dir {p.out}: the start failed; the earlier run's files are back ({len(back)})")


def start_step(p: Prepared) -> int:
    """The optimizer step the run resumes from (0 for a fresh run), known before the engine loads the checkpoint."""
    return int(p.resumed["step"]) if p.resumed is not None else 0


def run(cfg: RunConfig, on_trained: Callable[[Prepared, TrainResult], None] | None = None) -> TrainResult:
    """The whole run. ``on_trained`` runs on every rank after the adapter is saved, while the engine and the
    process group are still alive (evaluation hooks, tests)."""
    env = dist.detect()
    # Installed first, so a signal while DeepSpeed imports or the model loads is honoured at the first step
    # boundary (while the ranks meet, at once: WhileMeeting).
    stop = StopFlag().install()
    try:
        lazy.import_deepspeed()
        dist.announce(env, dist.setup_threads(env, cfg.train.threads, cfg.train.bind_cores))
        p = prepare(cfg, env)
    except BaseException:
        stop.uninstall()
        raise
    dist.print0(env, report(p))
    lean = cfg.train.lean_host_memory
    if lean is None:
        from deepspeed.accelerator import get_accelerator

        lean = dsc.stage_of(p.ds_config) == 3 and get_accelerator().device_name() == "cpu"
    if lean and not hostmem.lean_malloc():
        dist.print0(env, "train.lean_host_memory: not a glibc C library; the allocator keeps its defaults")
    write_run_files(p)
    try:
        # Rank 0, before the process group: a tracker that cannot start ends the run here with exit 2.
        pending = p.resumed is not None and bool(p.resumed.get("eval_pending"))
        trackers = start_trackers(cfg, env, p.out, start_step(p), p.resumed is not None, pending)
    except BaseException:
        stop.uninstall()
        if env.is_main:
            _undo_start(p)
        raise
    status = "failed"
    # Before the process group: DeepSpeed loads its first JIT op there (see runtime/build_locks).
    locks = BuildLockSweeper(lambda msg: print(msg, file=sys.stderr, flush=True)).start()
    heartbeat = manifest.PidHeartbeat(p.out).start() if env.is_main else None
    try:
        with WhileMeeting(stop, lambda signame: _preempted_meeting(p, trackers, signame)):
            dist.init(env, cfg.deepspeed.timeout_minutes)
            same_plan_on_every_rank(p)
        faults.setup()
        watchdog = Watchdog(cfg.train.hang_timeout_s, env, p.out).start()
    except BaseException:
        locks.stop()
        if heartbeat is not None:
            heartbeat.stop()
        trackers.close(status)
        stop.uninstall()
        if env.is_main:
            _undo_start(p)
        dist.destroy()
        raise
    if env.is_main:
        # Started: the run that output.overwrite replaces goes now (until here a failed start put it back).
        left = manifest.discard_aside(p.out)
        if left:
            dist.print0(env, f"ia3-dist: note: {left}")
    try:
        res = train(p, stop, watchdog, trackers)  # it stops the watchdog once the adapter is written
        if res.losses:
            k, first, last = res.loss_change(cfg.train.log_every)
            # A first mean of 0 (data.unlabeled=keep, steps without a label token) has no relative change.
            change = f" ({100.0 * (last - first) / first:+.1f}%)" if first else ""
            dist.print0(env, f"loss: first {k} steps {first:.4f} -> last {k} steps {last:.4f}{change}")
        bench = {k: v for k, v in (res.eval or {}).items() if "/" in k and not k.startswith(("eval_", "rewards"))}
        if bench:
            dist.print0(env, "benchmarks: " + ", ".join(f"{k} {v:.4f}" for k, v in bench.items()))
        if res.eval is not None and "eval_ppl" in res.eval:
            per = ", ".join(f"{k.removeprefix('eval_loss/')} {v:.4f}" for k, v in res.eval.items()
                            if k.startswith("eval_loss/"))
            dist.print0(env, f"eval: loss {res.eval['eval_loss']:.4f}, perplexity {res.eval['eval_ppl']:.2f} over "
                             f"{int(res.eval['eval_tokens'])} tokens" + (f"; by source: {per}" if per else ""))
        elif res.eval is not None and "eval_rewards/accuracies" in res.eval:
            e = res.eval
            dist.print0(env, f"eval: loss {e['eval_loss']:.4f}, pair accuracy {e['eval_rewards/accuracies']:.3f}, "
                             f"margin {e['eval_rewards/margins']:.4f} over {int(e['eval_pairs'])} held-out pairs")
        done = res.start_step + len(res.losses)
        if res.stopped_early:
            dist.print0(env, f"stopped early after step {done} of {p.total_steps}: a resume of this run is a no-op")
        elif done < p.total_steps:
            dist.print0(env, f"stopped after step {done} of {p.total_steps} (train.stop_after_steps); continue "
                             f"with train.resume=auto")
        dist.print0(env, f"adapter written to {res.adapter_dir}")
        if on_trained is not None:
            on_trained(p, res)
        status = "finished"
        return res
    except Preempted as e:
        status = "killed"
        if env.is_main:
            (p.out / PREEMPTED_FILE).write_text(json.dumps({"step": e.step, "message": str(e)}))
        raise
    finally:
        # Stopped first: a tracker's close (an online wandb sync, MLflow retrying its server) may take longer than
        # train.hang_timeout_s, and the watchdog would turn a preemption's 75 (or a failure's 3 or 74) into 76.
        watchdog.stop()
        locks.stop()
        if heartbeat is not None:
            heartbeat.stop()
        trackers.close(status)
        if env.is_main:
            (p.out / PID_FILE).unlink(missing_ok=True)
        if status in ("finished", "killed"):
            # Every rank ends here at the same step (a preemption's stop rides on the step's all-reduce); a failed
            # rank may never come (its launcher ends the rest).
            dist.leave_together()
        dist.destroy()
        # Last: until here a scheduler's signal (a forwarded USR1, the step's TERM) only sets the flag; restored
        # earlier, it would kill a finished run during its teardown with 138 or 143, reported as a failed job.
        stop.uninstall()
