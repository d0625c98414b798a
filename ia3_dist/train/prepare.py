"""Everything that can fail or take long, done *before* the process group starts: bad input exits 2 with nothing
written and no rank waiting on another."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..config.schema import fail
from ..data.sampler import ORDER_VERSION, Layout, split_eval, steps_per_epoch
from ..data.tokenize import TokenizedData, load_or_tokenize
from ..models.files import check_model_dir, check_vocab
from ..models.ia3 import paper_targets
from ..models.load import hidden_size_of, load_model_config, load_tokenizer
from ..models.zero3_load import check_checkpoint
from ..runtime import checkpoint as ckpt
from ..runtime import dist, manifest, safe_load
from ..runtime import ds_config as dsc
from ..runtime.watchdog import HUNG_FILE
from . import demo

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
    model_path = demo.model_path(cfg.model.path, cfg.data.cache_dir)
    check_model_dir(model_path)
    model_config = load_model_config(model_path, cfg.model)
    tok = load_tokenizer(cfg.model, model_path)
    check_vocab(tok, model_config, cfg.model.tokenizer or model_path)
    if cfg.ia3.variant == "paper":
        paper_targets(model_config.model_type)  # refuses a family it is not defined for, before any rank waits
    hidden = hidden_size_of(model_config)
    data = load_or_tokenize(demo.data_section(cfg.data), tok)
    eval_data = None
    if cfg.data.eval_ratio:
        data, eval_data = split_eval(data, cfg.data.eval_ratio, cfg.train.seed)
    elif cfg.data.eval_path:
        eval_data = load_or_tokenize(demo.data_section(replace(cfg.data, path=cfg.data.eval_path, eval_path=None,
                                                               limit=None)), tok)
    if cfg.train.grad_accum > len(data):
        # Refused before the sampler plans anything: each step's last micro-steps would hold no example on any rank.
        fail("train.grad_accum", f"{cfg.train.grad_accum} is more than the {len(data)} training examples, so every "
                                 f"optimizer step would run micro-steps with no example on any rank; set it to at most "
                                 f"{len(data)}")
    ds = dsc.resolve(cfg, env.world_size, hidden)
    if cfg.train.compile and dsc.stage_of(ds) == 3:
        # ZeRO-3 gathers and releases each parameter in module hooks that a compiled block would trace around.
        fail("train.compile", "is not supported with ZeRO-3 (deepspeed.config); use ZeRO-0/1/2 or set it to false")
    if Path(model_path).is_dir() and (dsc.stage_of(ds) == 3 or model_config.model_type == "bloom"):
        # ZeRO-3's loader needs every tensor; for Bloom (known key names) the other stages get the same check,
        # where from_pretrained would only warn and train on randomly initialised weights.
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
        safe_load.check_checkpoint_dir(resume_from)
    return Prepared(cfg, env, model_path, tok, data, model_config, ds, total, layout, out, resume_from, meta, eval_data)


def write_run_files(p: Prepared) -> None:
    """The run manifest, run.yaml and ds_config.json (and, with output.overwrite, the previous run's files go);
    rank 0 only."""
    if not p.env.is_main:
        return
    start_run_dir(p.out, p.cfg.output.overwrite and p.resume_from is None)
    (p.out / "run.yaml").write_text(p.cfg.to_yaml(), encoding="utf-8")
    (p.out / "ds_config.json").write_text(json.dumps(p.ds_config, indent=2) + "\n", encoding="utf-8")
    # For schedulers' preemption traps (slurm/lib.sh): signal rank 0 and every rank stops at the next step.
    (p.out / PID_FILE).write_text(str(os.getpid()))
    (p.out / PREEMPTED_FILE).unlink(missing_ok=True)
    (p.out / HUNG_FILE).unlink(missing_ok=True)


def start_run_dir(out: Path, start_over: bool) -> list[str]:
    """Create ``out`` and claim it with the manifest first, so a run that dies in the next line is still known as
    ours; ``start_over`` then removes what an earlier run wrote (only those names: see :mod:`..runtime.manifest`)
    and returns them."""
    out.mkdir(parents=True, exist_ok=True)
    manifest.write_manifest(out)
    return manifest.remove_owned(out) if start_over else []
