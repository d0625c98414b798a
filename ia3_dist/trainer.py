"""The training run: prepare everything that can fail or take long *before* the process group starts, then train
on the DeepSpeed engine with the reference recipe's loss (mean over all label tokens of the global batch)."""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from . import dist, hostmem, preflight
from . import ds_config as dsc
from .config import RunConfig
from .data import (
    ORDER_VERSION,
    Layout,
    TokenizedData,
    collate,
    iter_steps,
    load_or_tokenize,
    rank_slice,
    split_eval,
    steps_per_epoch,
)
from .errors import NonFiniteLoss, Preempted
from .evaluate import evaluate
from .export import save_template
from .metrics import MetricsLog, device_peak_tflops, model_flops, peak_memory_gb
from .model import (
    DTYPES,
    LastMLPRows,
    TokenSumLM,
    apply_ia3,
    fuse_gelu,
    hidden_size_of,
    layers_of,
    load_base_model,
    load_model_config,
    load_tokenizer,
    resolve_model_path,
    trainable_line,
)
from .plots import plot_metrics
from .preempt import StopFlag
from .schedule import lr_schedule

PID_FILE = "rank0.pid"
PREEMPTED_FILE = "preempted.json"


@dataclass
class Prepared:
    """Everything a rank needs before it joins the process group."""

    cfg: RunConfig
    env: dist.DistEnv
    model_path: str
    tokenizer: Any
    data: TokenizedData
    model_config: Any
    """The base model's config.json (shapes), read without weights."""
    ds_config: dict[str, Any]
    total_steps: int
    layout: Layout
    """Micro-batch x accumulation x world and the sample order: the one source of the batch sizes."""
    out: Path
    resume_from: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    """What a checkpoint records so a resume can check it continues the same run."""
    eval_data: TokenizedData | None = None


def total_steps_for(cfg: RunConfig, n_examples: int, layout: Layout) -> int:
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps
    return cfg.train.epochs * steps_per_epoch(n_examples, layout.global_batch)


def prepare(cfg: RunConfig, env: dist.DistEnv) -> Prepared:
    """Model files, tokenizer, tokenized data (file-locked cache), the resolved DeepSpeed config, the output-dir
    guard and the resume point. Raises :class:`UsageError` on bad input; nothing here waits on another rank."""
    out = Path(cfg.output.dir)
    ckpt.guard_output_dir(out, cfg.train.resume, cfg.output.overwrite)
    model_path = resolve_model_path(cfg.model, cfg.data.cache_dir)
    preflight.check_model_dir(model_path)
    model_config = load_model_config(model_path, cfg.model)
    tok = load_tokenizer(cfg.model, model_path)
    preflight.check_vocab(tok, model_config, cfg.model.tokenizer or model_path)
    hidden = hidden_size_of(model_config)
    data = load_or_tokenize(cfg.data, tok)
    eval_data = None
    if cfg.data.eval_ratio:
        data, eval_data = split_eval(data, cfg.data.eval_ratio, cfg.train.seed)
    elif cfg.data.eval_path:
        eval_data = load_or_tokenize(replace(cfg.data, path=cfg.data.eval_path, eval_path=None, limit=None), tok)
    ds = dsc.resolve(cfg, env.world_size, hidden)
    if Path(model_path).is_dir() and (dsc.stage_of(ds) == 3 or model_config.model_type == "bloom"):
        # ZeRO-3's loader needs every tensor; for Bloom (known key names) the other stages get the same check,
        # where from_pretrained would only warn and train on randomly initialised weights.
        from .zero_load import check_checkpoint

        check_checkpoint(model_config, Path(model_path), cfg.model.trust_remote_code)
    grouped = cfg.data.group_by_length
    if grouped is None:
        grouped = cfg.train.micro_batch_size > 1 and cfg.data.shuffle
    layout = Layout(cfg.train.micro_batch_size, cfg.train.grad_accum, env.world_size, cfg.train.seed,
                    cfg.data.shuffle, grouped)
    total = total_steps_for(cfg, len(data), layout)
    meta = {"world_size": env.world_size, "micro_batch_size": cfg.train.micro_batch_size,
            "grad_accum": cfg.train.grad_accum, "seed": cfg.train.seed, "shuffle": cfg.data.shuffle,
            "total_steps": total, "data_key": Path(data.cache_file).stem, "n_examples": len(data),
            "eval_ratio": cfg.data.eval_ratio, "group_by_length": grouped, "order_version": ORDER_VERSION}
    resume_from = ckpt.resolve_resume(cfg.train.resume, out)
    if resume_from is not None:
        ckpt.check_compatible(resume_from, meta)
    return Prepared(cfg, env, model_path, tok, data, model_config, ds, total, layout, out, resume_from, meta, eval_data)


def write_run_files(p: Prepared) -> None:
    """run.yaml and ds_config.json (and, with output.overwrite, the old checkpoints go); rank 0 only."""
    if not p.env.is_main:
        return
    if p.cfg.output.overwrite and p.resume_from is None:
        shutil.rmtree(ckpt.root_of(p.out), ignore_errors=True)
    p.out.mkdir(parents=True, exist_ok=True)
    (p.out / "run.yaml").write_text(p.cfg.to_yaml(), encoding="utf-8")
    (p.out / "ds_config.json").write_text(json.dumps(p.ds_config, indent=2) + "\n", encoding="utf-8")
    # For schedulers' preemption traps (slurm/lib.sh): signal rank 0 and every rank stops at the next step.
    (p.out / PID_FILE).write_text(str(os.getpid()))
    (p.out / PREEMPTED_FILE).unlink(missing_ok=True)


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

    def loss_change(self, window: int) -> tuple[int, float, float]:
        """Mean loss of the first and last ``k`` steps, k = min(window, steps // 4) (at least 1)."""
        k = max(1, min(window, len(self.losses) // 4))
        return k, sum(self.losses[:k]) / k, sum(self.losses[-k:]) / k


def _load_base(p: Prepared) -> tuple[Any, Any]:
    """The base model; under ZeRO-3 built partitioned and filled rank by rank (see zero_load.py). Returns it and
    the ``HfDeepSpeedConfig`` that must stay referenced while it lives under ZeRO-3 (transformers and PEFT then
    treat its parameters as partitioned: shapes, gradient checkpointing, generation)."""
    if dsc.stage_of(p.ds_config) != 3:
        return load_base_model(p.cfg.model, p.model_path, p.cfg.train.precision), None
    from transformers.integrations import HfDeepSpeedConfig

    from .zero_load import build_partitioned, load_partitions, local_model_dir

    keep_alive = HfDeepSpeedConfig(p.ds_config)
    base = build_partitioned(p.model_config, p.ds_config, DTYPES[p.cfg.train.precision],
                             p.cfg.model.trust_remote_code)
    stats = load_partitions(base, local_model_dir(p.model_path, p.cfg.model.revision))
    gc.collect()  # the untied lm_head that tie_weights replaced still holds its partition until collected
    hostmem.trim()
    dist.print0(p.env, f"ZeRO-3 load: rank 0 read {stats['bytes_read'] / 2**20:.1f} MiB of weights (its partition "
                       f"of {stats['tensors']} tensors; largest single read {stats['largest_read'] / 2**20:.1f} MiB)")
    return base, keep_alive


def _build_engine(p: Prepared) -> tuple[Any, Any, Any]:
    import deepspeed

    torch.manual_seed(p.cfg.train.seed)
    base, keep_alive = _load_base(p)
    if p.cfg.model.fused_gelu:
        fuse_gelu(base)
    if p.cfg.train.gradient_checkpointing:
        # Non-reentrant: works with frozen inputs (IA3 leaves the embeddings frozen) and under every ZeRO stage.
        base.config.use_cache = False
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model = apply_ia3(base, p.cfg.ia3)
    dist.print0(p.env, trainable_line(peft_model))
    rows = None
    if p.cfg.model.last_mlp_at_labels and not p.cfg.train.gradient_checkpointing:
        rows = LastMLPRows.install(base)
    wrapper = TokenSumLM(peft_model, rows)
    params = [q for q in wrapper.parameters() if q.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=wrapper, model_parameters=params, config=p.ds_config,
                                           lr_scheduler=lr_schedule(p.cfg.train, p.total_steps))
    return engine, peft_model, keep_alive


def _trim_metrics(path: Path, upto: int) -> None:
    """On resume, drop metric lines past the checkpoint (steps a killed run logged but never saved)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= upto]
    path.write_text("".join(ln + "\n" for ln in keep))


def train(p: Prepared, stop: StopFlag | None = None) -> TrainResult:
    from .adapter import save_adapter

    cfg, env, data = p.cfg, p.env, p.data
    engine, peft_model, _keep = _build_engine(p)
    # Peak host RSS of the worst rank once the engine is ready: what loading cost (ZeRO-3: a partition, not the
    # model). Every rank joins the reduction.
    load_rss = dist.all_reduce_max(torch.tensor([hostmem.peak_rss_gib()], dtype=torch.float64,
                                                device=engine.device)).item()
    start = ckpt.load(engine, p.resume_from) if p.resume_from is not None else 0
    device = engine.device
    t = cfg.train
    pad_id = p.tokenizer.pad_token_id
    side = getattr(p.tokenizer, "padding_side", "right")
    mpath = p.out / "metrics.jsonl"
    if env.is_main:
        if start:
            _trim_metrics(mpath, start)
        else:
            mpath.unlink(missing_ok=True)
    log = MetricsLog(mpath if env.is_main else None, p.total_steps, env.is_main, initial=start)
    stop = stop or StopFlag()
    end = p.total_steps if not t.stop_after_steps else min(p.total_steps, start + t.stop_after_steps)
    saved = start

    def run_eval(step: int) -> dict[str, float]:
        res = evaluate(engine, p.eval_data, env, t.micro_batch_size, pad_id, side)
        log.log({"step": step, **res})
        return res

    def save(step: int) -> Path:
        nonlocal saved
        saved = step
        return ckpt.save(engine, p.out, step, p.meta, cfg.checkpoint.keep, env)

    losses: list[float] = []

    def new_window() -> dict[str, float]:
        return {"loss": 0.0, "steps": 0, "real": 0.0, "padded": 0.0, "samples": 0.0, "flops": 0.0,
                "t0": time.perf_counter()}

    window = new_window()
    mc = peft_model.get_base_model().config
    n_params = sum(getattr(q, "ds_numel", q.numel()) for q in peft_model.parameters())
    shape = (n_params, layers_of(mc), hidden_size_of(mc) or 0)
    peak = device_peak_tflops(t.peak_tflops)
    t_start = time.perf_counter()
    try:
        for step, epoch, step_mbs in iter_steps(data.lengths, p.layout, end, start):
            mbs = rank_slice(step_mbs, env.rank, t.grad_accum)
            filler = next(mb for mb in step_mbs if mb)[:1]
            batches = [collate(data, mb if mb else filler, pad_id, side) for mb in mbs]
            real = [bool(mb) for mb in mbs]
            local = torch.zeros(6, dtype=torch.float64, device=device)
            for b, r in zip(batches, real, strict=True):
                if r:
                    local[:4] += torch.tensor([(b["labels"][:, 1:] != -100).sum().item(),
                                               b["attention_mask"].sum().item(), b["input_ids"].numel(),
                                               len(b["input_ids"])], dtype=torch.float64, device=device)
                    local[5] += model_flops(b["attention_mask"].sum(1), *shape)
            local[4] = float(stop.requested)
            # One collective per step carries the token counts and the stop flag, so all ranks agree on both.
            glob = dist.all_reduce_sum(local.clone())
            if glob[4].item() > 0:
                where = save(step) if step > saved else ckpt.root_of(p.out) / ckpt.tag_for(step)
                raise Preempted(step, stop.signame or "a signal on another rank", str(where))
            n_label = glob[0].item()
            # DeepSpeed divides by accumulation steps and averages over ranks; undo both so the gradient is
            # sum(token losses of the global batch) / (label tokens of the global batch), like HF Trainer.
            scale = t.grad_accum * env.world_size / n_label
            lr = engine.optimizer.param_groups[0]["lr"] if engine.optimizer is not None else t.lr
            loss_local = torch.zeros((), dtype=torch.float64, device=device)
            for b, r in zip(batches, real, strict=True):
                b = {k: v.to(device) for k, v in b.items()}
                loss_sum, _ = engine(**b)
                # Empty slots (short last batch) still run forward/backward so every rank joins the same
                # collectives; weight 0 keeps them out of the gradient.
                engine.backward(loss_sum * (scale if r else 0.0))
                engine.step()
                if r:
                    loss_local += loss_sum.detach().double()
            step_loss = dist.all_reduce_sum(loss_local).item() / n_label
            done = step + 1
            if not math.isfinite(step_loss):
                last = ckpt.latest(ckpt.root_of(p.out))
                raise NonFiniteLoss(f"loss is {step_loss} at optimizer step {done}; stopped without saving. Last "
                                    f"good checkpoint: {last if last else 'none'} (lower train.lr or check the "
                                    f"data, then resume with train.resume=auto)")
            losses.append(step_loss)
            window["loss"] += step_loss
            window["steps"] += 1
            window["real"] += glob[1].item()
            window["padded"] += glob[2].item()
            window["samples"] += glob[3].item()
            window["flops"] += glob[5].item()
            log.step()
            if done % t.log_every == 0 or done == p.total_steps or done == start + 1 or done == end:
                dt = max(time.perf_counter() - window["t0"], 1e-9)
                gn = engine.get_global_grad_norm()
                mem = dist.all_reduce_max(torch.tensor([peak_memory_gb(device), hostmem.peak_rss_gib()],
                                                       dtype=torch.float64, device=device)).tolist()
                tflops = window["flops"] / dt / 1e12
                perf = {"tflops": tflops, "peak_mem_gb": mem[0], "peak_rss_gb": mem[1], "load_peak_rss_gb": load_rss}
                if peak:
                    perf["mfu"] = tflops / (peak * env.world_size)
                log.log({"step": done, "epoch": epoch, "loss": window["loss"] / window["steps"], "lr": float(lr),
                         "grad_norm": float(gn) if gn is not None else None,
                         "tokens_per_s": window["real"] / dt, "padded_tokens_per_s": window["padded"] / dt,
                         "samples_per_s": window["samples"] / dt,
                         "padding_efficiency": window["real"] / max(window["padded"], 1.0),
                         "step_time_s": dt / window["steps"], **perf, "elapsed_s": time.perf_counter() - t_start})
                window = new_window()
            if p.eval_data is not None and t.eval_every and done % t.eval_every == 0 and done < end:
                run_eval(done)
            if cfg.checkpoint.every and done % cfg.checkpoint.every == 0 and done < end:
                save(done)
        final_eval = run_eval(end) if p.eval_data is not None else None
    finally:
        log.close()
    if end < p.total_steps or cfg.checkpoint.at_end:
        if saved < end:
            save(end)
    adapter_dir = save_adapter(peft_model, p.out / "adapter", env.is_main)
    if env.is_main:
        # Tokenizer and prompt template beside the adapter: generate/chat/export need nothing else.
        p.tokenizer.save_pretrained(str(adapter_dir))
        save_template(cfg.data, adapter_dir)
        plot_metrics(mpath, p.out / "metrics.png")
    return TrainResult(adapter_dir, losses, engine, peft_model, start, final_eval)


def run(cfg: RunConfig, on_trained: Callable[[Prepared, TrainResult], None] | None = None) -> TrainResult:
    """The whole run. ``on_trained`` runs on every rank after the adapter is saved, while the engine and the
    process group are still alive (evaluation hooks, tests)."""
    env = dist.detect()
    # Installed first, so a signal while the model loads is honoured at the first step boundary.
    stop = StopFlag().install()
    dist.setup_threads(env, cfg.train.threads, cfg.train.bind_cores)
    try:
        p = prepare(cfg, env)
    except BaseException:
        stop.uninstall()
        raise
    dist.print0(env, preflight.report(p))
    lean = cfg.train.lean_host_memory
    if lean is None:
        from deepspeed.accelerator import get_accelerator

        lean = dsc.stage_of(p.ds_config) == 3 and get_accelerator().device_name() == "cpu"
    if lean and not hostmem.lean_malloc():
        dist.print0(env, "train.lean_host_memory: not a glibc C library; the allocator keeps its defaults")
    write_run_files(p)
    dist.init(env, cfg.deepspeed.timeout_minutes)
    try:
        res = train(p, stop)
        if res.losses:
            k, first, last = res.loss_change(cfg.train.log_every)
            dist.print0(env, f"loss: first {k} steps {first:.4f} -> last {k} steps {last:.4f} "
                             f"({100.0 * (last - first) / first:+.1f}%)")
        if res.eval is not None:
            dist.print0(env, f"eval: loss {res.eval['eval_loss']:.4f}, perplexity {res.eval['eval_ppl']:.2f} over "
                             f"{int(res.eval['eval_tokens'])} tokens")
        done = res.start_step + len(res.losses)
        if done < p.total_steps:
            dist.print0(env, f"stopped after step {done} of {p.total_steps} (train.stop_after_steps); continue "
                             f"with train.resume=auto")
        dist.print0(env, f"adapter written to {res.adapter_dir}")
        if on_trained is not None:
            on_trained(p, res)
        return res
    except Preempted as e:
        if env.is_main:
            (p.out / PREEMPTED_FILE).write_text(json.dumps({"step": e.step, "message": str(e)}))
        raise
    finally:
        stop.uninstall()
        if env.is_main:
            (p.out / PID_FILE).unlink(missing_ok=True)
        dist.destroy()
