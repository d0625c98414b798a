"""Everything that can fail or take long, done *before* the process group starts: bad input exits 2 with nothing
written and no rank waiting on another."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..config.schema import fail
from ..data.mixture import load_or_mix
from ..data.packing import check_pack_length, choose_pack_length
from ..data.report import data_lines
from ..data.sampler import ORDER_VERSION, Layout, plan_epoch, split_eval, steps_per_epoch
from ..data.tokenize import TokenizedData, load_or_tokenize
from ..errors import RunFinished, UsageError
from ..models.families import family_of, support_case
from ..models.families.packed import rescaled_rope
from ..models.files import (
    check_model_dir,
    check_vocab,
    error_line,
    hub_model_dir,
    local_model_dir,
    looks_local,
    snapshot_commit,
    weights_fingerprint,
)
from ..models.ia3 import ADAPTER_FILE, apply_ia3, load_init_adapter, paper_targets
from ..models.load import DTYPES, base_on_meta, hidden_size_of, load_model_config, load_tokenizer
from ..models.loss import check_final_logits, check_head
from ..models.zero3_load import check_checkpoint
from ..runtime import checkpoint as ckpt
from ..runtime import dist, manifest, safe_load
from ..runtime import ds_config as dsc
from ..runtime.watchdog import HUNG_FILE
from . import autobatch, demo, objectives, trackers
from .selection import Selection, check_measured, measured_keys, stopped_early

PID_FILE = manifest.PID_FILE
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
    auto: autobatch.AutoBatch | None = None
    """How ``train.micro_batch_size: auto`` was resolved (``cfg`` holds the result)."""
    support: str = ""
    """Which case the model is in (tested family, PEFT defaults, explicit targets): the preflight's model line."""
    stage_note: str = ""
    """How ``deepspeed.config: auto`` was resolved (empty when a config was named)."""
    resume_portable: bool = False
    """The checkpoint was saved on another layout (ranks, cut or ZeRO stage): its layout-independent state loads."""
    resume_line: str = ""
    resume_measured: str = ""
    """The part of ``resume_line`` about the measurements the checkpoint's run logged (``check_measured``)."""
    resumed: dict[str, Any] | None = None
    """The resumed checkpoint's meta.json, read and checked once here (None for a fresh run)."""
    resume_best: dict[str, Any] | None = None
    """train.early_stopping.final=best on resume: the best evaluation's vectors the checkpoint carries
    (:data:`..runtime.checkpoint.BEST_VECTORS`), read and checked here; None where it has none."""
    """What the rank log says about the resume (saved on W ranks, now on W')."""
    bench: Any = None
    """``eval.tasks``: the benchmark runner (:class:`.benchmarks.Benchmarks`), its tasks checked; None without."""
    weights_dir: Path | None = None
    """The dir the base model's weights load from, checked here: ``model_path`` itself, or a hub model's snapshot
    in the hub cache. The loaders read it, so they ask the hub nothing once the ranks have met and load the commit
    checked here even if the branch has moved since."""
    untie_head: bool = False
    """ZeRO-3: the config ties the LM head to the embeddings but the weights hold a different head
    (:func:`..models.zero3_load.stored_apart`): built untied, with that head, as ``from_pretrained`` loads it on
    the other stages. The config itself is left as read (the resume key is the same on every stage)."""


BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")


def check_packed_attention(cfg: RunConfig, model_config: Any) -> None:
    """Packing with a flash-attention implementation (a model's config.json may name one) keeps documents apart
    only in a one-row batch: transformers passes flash no mask and reads packed documents from the positions
    when the batch has a single row, so at micro-batch 2 or more every document would attend to the ones before
    it in its row, silently. Refused there, naming both keys."""
    impl = getattr(model_config, "_attn_implementation", None) or ""
    if cfg.data.packing and "flash" in str(impl) and cfg.train.micro_batch_size != 1:
        fail("data.packing", f"with the model's attention implementation {impl} (its config.json) keeps packed "
                             f"documents apart only at train.micro_batch_size=1 (transformers' flash path reads "
                             f"them from the positions of a one-row batch); set train.micro_batch_size=1, or "
                             f"data.packing=false")


def check_device_precision(precision: str, cuda: Any = None) -> None:
    """bf16 on a GPU without native bf16 (before Ampere: V100, T4) exits 2 before any rank waits: torch would
    emulate it (several times slower) or DeepSpeed's kernels fail mid-step. ``cuda``: torch.cuda (a stand-in in
    tests)."""
    if precision != "bf16":
        return
    if cuda is None:
        import torch

        cuda = torch.cuda
    if not cuda.is_available() or cuda.is_bf16_supported(including_emulation=False):
        return
    major, minor = cuda.get_device_capability()
    fail("train.precision", f"bf16: {cuda.get_device_name()} (compute capability {major}.{minor}) has no native "
                            f"bf16 (Ampere, 8.0, and later have it); use train.precision=fp16 there, or fp32")

def eval_section(cfg: RunConfig) -> Any:
    """The data section that reads ``data.eval_path`` (whole, in its own cache entry)."""
    return demo.data_section(replace(cfg.data, path=cfg.data.eval_path, eval_path=None, limit=None, sources=None),
                             objectives.is_pairwise(cfg))


def load_data(cfg: RunConfig, tok: Any, *, build: bool | None = None, progress: bool = False
              ) -> tuple[TokenizedData, TokenizedData | None]:
    """(training data, held-out data or None): ``data.path``'s token cache, or ``data.sources``' cache and draws;
    held out by ``data.eval_ratio`` (a mixture: from each source, before the draws) or read from
    ``data.eval_path``."""
    pairs = objectives.is_pairwise(cfg)
    eval_data = None
    if cfg.data.sources:
        data, eval_data = load_or_mix(cfg.data, tok, cfg.train.seed, cfg.data.eval_ratio, build=build,
                                      progress=progress, pairs=pairs)
    else:
        data = load_or_tokenize(demo.data_section(cfg.data, pairs), tok, build=build, progress=progress, pairs=pairs)
        if cfg.data.eval_ratio:
            data, eval_data = split_eval(data, cfg.data.eval_ratio, cfg.train.seed)
    if cfg.data.eval_path:
        eval_data = load_or_tokenize(eval_section(cfg), tok, build=build, progress=progress, pairs=pairs)
    return data, eval_data


def total_steps_for(cfg: RunConfig, n_examples: int, layout: Layout) -> int:
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps
    return cfg.train.epochs * steps_per_epoch(n_examples, layout.global_batch)


def with_global_batch(cfg: RunConfig, world: int) -> RunConfig:
    """``train.global_batch_size`` > 0: the accumulation that makes it on ``world`` ranks (with ``micro_batch_size:
    auto``, the examples per rank per step); a UsageError when it does not divide."""
    from ..config.schema import MAX_GRAD_ACCUM

    g, micro = cfg.train.global_batch_size, cfg.train.micro_batch_size
    per = world * (micro if isinstance(micro, int) else 1)
    cut = f"micro_batch_size {micro} x {world} rank(s)" if isinstance(micro, int) else f"{world} rank(s)"
    if g % per:
        fail("train.global_batch_size", f"{g} is not a multiple of {cut} = {per}, so no whole accumulation makes it "
                                        f"on this allocation; choose a multiple of {per} (or another micro-batch)")
    if g // per > MAX_GRAD_ACCUM:
        # Checked here, not by the replace below: its TrainSection check would blame train.grad_accum, a key the
        # user did not set.
        fail("train.global_batch_size", f"{g} over {cut} = {per} makes an accumulation (train.grad_accum) of "
                                        f"{g // per} per step, more than {MAX_GRAD_ACCUM}; use a larger micro-batch, "
                                        f"more ranks or a smaller global batch")
    return replace(cfg, train=replace(cfg.train, grad_accum=g // per))


def run_keys(cfg: RunConfig, model_config: Any) -> dict[str, str]:
    """What, besides the data and the batch, a resume must share with the run it continues: the base model's
    architecture (its config.json, minus what loading sets), the IA3 settings and the optimizer's schedule."""
    import hashlib

    arch = {k: v for k, v in model_config.to_dict().items()
            if k not in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache",
                         "_attn_implementation", "_attn_implementation_autoset", "attn_implementation")}
    digest = hashlib.sha256(json.dumps(arch, sort_keys=True, default=str).encode()).hexdigest()[:16]
    t, ia3 = cfg.train, cfg.ia3
    objective = t.objective
    if t.objective == "dpo":
        objective += f" beta={t.beta} loss_type={t.loss_type} label_smoothing={t.label_smoothing}"
    elif t.objective == "orpo":
        objective += f" beta={t.beta}"
    elif t.objective == "simpo":
        objective += (f" beta={t.beta} simpo_gamma={t.simpo_gamma} cpo_alpha={t.cpo_alpha} "
                      f"label_smoothing={t.label_smoothing}")
    # DPO's reference is the model the run starts from: with ia3.init_from, that adapter's content (a resume
    # after it was retrained in place would compute another reference for the rest of the run).
    start = {}
    if t.objective == "dpo" and ia3.init_from:
        from .objectives.reference import adapter_digest

        start = {"reference_start": adapter_digest(Path(ia3.init_from))}
    return {"model_key": f"{getattr(model_config, 'model_type', '?')}-{digest}", **start,
            "ia3": json.dumps(asdict(ia3), sort_keys=True), "objective": objective,
            "schedule": f"lr {t.lr}, {t.scheduler}, warmup {t.warmup_steps}, weight_decay {t.weight_decay}, betas "
                        f"{t.betas}, eps {t.eps}, grad_clip {t.grad_clip}"}


def rank_memory_bytes(env: dist.DistEnv) -> tuple[float, bool]:
    """(bytes one rank may use, on the host?): the budget ``micro_batch_size: auto`` sizes against (this rank's
    GPU, else the node's memory under the cgroup's and Slurm's limits, shared by its ranks). The node's whole
    memory let a CPU job with ``--mem`` take a stage that its limit then killed."""
    import torch

    from .autobatch import memory_budget

    return memory_budget(env.local_world_size, env.local_rank), not torch.cuda.is_available()


def auto_stage(cfg: RunConfig, model_config: Any, env: dist.DistEnv, pack_length: int | None = None
               ) -> tuple[RunConfig, str]:
    """``deepspeed.config: auto``: the lowest shipped ZeRO stage whose per-rank memory (plan's model: weights,
    gradients, optimizer, activations at this micro-batch) fits this rank's device (or host share). Packed
    (``pack_length``), a micro-step is at most micro-batch rows of that width, which can be far wider than
    data.max_length: activations are counted at it."""
    from ..models.memory import GIB, OVERHEAD, framework_rss, lowest_stage, shape_of
    from .autobatch import host_share

    cap, host = rank_memory_bytes(env)
    micro = cfg.train.micro_batch_size if isinstance(cfg.train.micro_batch_size, int) else 1
    micro *= 2 if objectives.is_pairwise(cfg) else 1  # a pair is two sequences in one forward pass
    b = 4 if cfg.train.precision == "fp32" else 2
    shape = shape_of(model_config, cfg.ia3, cfg.train.loss_chunk_mib)
    seq = pack_length or cfg.data.max_length
    overhead = framework_rss() if host else OVERHEAD
    compiled = bool(cfg.train.compile)
    # On GPU ranks an offloading stage keeps its part on the host, beside each rank's own framework: it must fit
    # the node's memory too (pinned, it cannot swap).
    host_cap = None if host else max(host_share(env.local_world_size) - framework_rss(), 0.0)
    got = lowest_stage(shape, env.world_size, seq, micro, b, cfg.train.gradient_checkpointing, cap, overhead,
                       host, compiled, host_cap)
    rows = f"micro-batch {micro}" + (f" (packed rows of {pack_length} tokens)" if pack_length else "")
    if got is None:
        but3 = compiled and lowest_stage(shape, env.world_size, seq, micro, b, cfg.train.gradient_checkpointing,
                                         cap, overhead, host) is not None
        fail("train.compile" if but3 else "deepspeed.config",
             f"with deepspeed.config=auto only ZeRO-3 fits {cap / GIB:.1f} GiB per rank at {rows} (see ia3-dist "
             f"plan), and compiled blocks do not run under ZeRO-3; set train.compile=false, or fit a lower stage "
             f"(lower train.micro_batch_size, turn on train.gradient_checkpointing or add ranks)" if but3 else
             f"auto: no shipped ZeRO stage fits {cap / GIB:.1f} GiB per rank at {rows}"
             + ("" if host_cap is None else f" (an offloading one also within {host_cap / GIB:.1f} GiB of host "
                                           f"memory per rank)")
             + " (see ia3-dist plan); lower "
             f"train.micro_batch_size{', data.pack_length' if pack_length else ''}, turn on "
             f"train.gradient_checkpointing or add ranks")
    name, need = got
    note = (f"deepspeed.config=auto: {name}, the lowest stage that fits ({need / GIB:.1f} of "
            f"{cap / GIB:.1f} GiB per rank{' of host memory' if host else ''} at {rows}; plan's memory model)")
    return replace(cfg, deepspeed=replace(cfg.deepspeed, config=name)), note


def _layout(cfg: RunConfig, env: dist.DistEnv, pairs: bool) -> Layout:
    grouped = cfg.data.group_by_length
    if grouped is None:  # packed rows waste little whatever the lengths: the order stays freely shuffled
        grouped = cfg.train.micro_batch_size > 1 and cfg.data.shuffle and not cfg.data.packing
    return Layout(cfg.train.micro_batch_size, cfg.train.grad_accum, env.world_size, cfg.train.seed,
                  cfg.data.shuffle, grouped, consecutive=pairs)


def pack_length_for(cfg: RunConfig, model_config: Any, data: TokenizedData, layout: Layout, auto_micro: bool) -> int:
    """``data.pack_length`` resolved (``auto`` from epoch 0's batches), or a UsageError naming the key."""
    fam = family_of(model_config)
    if fam is None or fam.packed_inputs is None:
        from ..models.families import FAMILIES

        fail("data.packing", f"exact packing is built for the tested families ({', '.join(FAMILIES)}); model_type "
                             f"{getattr(model_config, 'model_type', None)!r} is not one. Set data.packing=false")
    if auto_micro:
        fail("data.packing", "does not combine with train.micro_batch_size=auto (the probe measures padded "
                             "batches); give train.micro_batch_size a number")
    if cfg.data.pack_length == "auto":
        n = choose_pack_length(plan_epoch(data.lengths, layout, 0), data.lengths, layout.accum, layout.world)
    else:
        n = int(cfg.data.pack_length)
        check_pack_length(n, data.lengths)
    rescaled = rescaled_rope(model_config)
    if rescaled is not None and n > rescaled[1]:
        kind, length = rescaled
        fail("data.packing", f"the model's rope_type {kind!r} rebuilds its rotary frequencies from a batch's longest "
                             f"position once it passes {length}: in packed rows of {n} tokens a document's positions "
                             f"would turn with frequencies chosen by the documents beside it (not exact); set "
                             f"data.pack_length to at most {length} (with data.max_length within it) or "
                             f"data.packing=false")
    return n


def _adapter_written_after(adapter: Path, meta: Path) -> bool:
    """Whether the run wrote ``adapter`` after the checkpoint whose meta.json is ``meta`` (the run writes its adapter
    after its last checkpoint; a kill in between leaves none, or an earlier chunk's). Both were written by the same
    process, so their times are one clock's."""
    try:
        return (adapter / ADAPTER_FILE).stat().st_mtime_ns >= meta.stat().st_mtime_ns
    except OSError:
        return False


def _meta_build(model_config: Any, cfg: RunConfig, env: dist.DistEnv) -> Any:
    """The model built on the meta device for the preflight's structure checks; None where it cannot be (remote
    code that reads a tensor's value in ``__init__``, which a meta tensor has not): the real load builds it on a
    device and the same checks (apply_ia3, the losses) run there, so a model that trains is not refused here."""
    try:
        return base_on_meta(model_config, cfg.model.trust_remote_code)
    except UsageError:
        raise  # transformers' own classes: the config is wrong
    except Exception as e:  # remote code raises anything; the real load reports a real failure
        if env.is_main:
            print(f"ia3-dist: note: model.path: cannot build the model on the meta device ({error_line(e)}); its "
                  f"structure, ia3.target_modules and ia3.init_from are checked once it is loaded", file=sys.stderr,
                  flush=True)
        return None


def tokenizer_dir(cfg: RunConfig, shared: str | None, files_dir: Path | None) -> Path | None:
    """Where the tokenizer loads from without asking the hub on every rank: a hub ``model.tokenizer``'s snapshot
    (resolved once per node, as the model's files), else the model's snapshot ``files_dir`` when no
    ``model.tokenizer`` is set; None: the local dir as configured. ``shared``: the launch's
    :func:`..runtime.dist.launch_key`."""
    name = cfg.model.tokenizer
    if not name or (name == cfg.model.path and files_dir is not None):
        return files_dir  # the model's own snapshot (the same commit as its weights)
    if looks_local(name):
        return None
    return hub_model_dir(name, cfg.model.revision, cfg.model.trust_remote_code, shared=shared, weights=False,
                         tokenizer=True)


def prepare(cfg: RunConfig, env: dist.DistEnv) -> Prepared:
    """Model files, tokenizer, tokenized data (file-locked cache), the resolved DeepSpeed config, the output-dir
    guard and the resume point. Raises :class:`UsageError` on bad input; nothing here waits on another rank."""
    out = Path(cfg.output.dir)
    ckpt.guard_output_dir(out, cfg.train.resume, cfg.output.overwrite)
    if env.is_main:
        manifest.refuse_live_run(out)
    trackers.check_installed(cfg, env)
    model_path = demo.model_path(cfg.model.path, cfg.data.cache_dir)
    check_model_dir(model_path)
    files_dir = None
    shared = dist.launch_key(env)
    if not Path(model_path).expanduser().is_dir():
        # A hub model's config and tokenizer: from a snapshot the ranks of a node resolve once (transformers, given
        # the hub name, asks the hub for each file on every rank: thousands of requests at a few hundred ranks).
        files_dir = local_model_dir(model_path, cfg.model.revision, cfg.model.trust_remote_code, shared,
                                    weights=False)
    model_config = load_model_config(model_path, cfg.model, files_dir)
    _, support = support_case(model_config, cfg.ia3)
    check_final_logits(model_config)  # exit 2 here, not at the first loss once every rank has loaded the model
    check_packed_attention(cfg, model_config)  # before the meta build, which needs the implementation installed
    # On the meta device (no memory, milliseconds): the structure the losses use, names that match no module and a
    # starting adapter that does not fit fail here, not after the ranks have met.
    on_meta = _meta_build(model_config, cfg, env)
    if on_meta is not None:
        check_head(on_meta)
    if on_meta is not None and (cfg.ia3.target_modules is not None or cfg.ia3.init_from):
        on_meta = apply_ia3(on_meta, cfg.ia3)
        if cfg.ia3.init_from:
            load_init_adapter(on_meta, cfg.ia3.init_from)
    tok = load_tokenizer(cfg.model, model_path, tokenizer_dir(cfg, shared, files_dir))
    check_vocab(tok, model_config, cfg.model.tokenizer or model_path)
    fam = family_of(model_config)
    if cfg.model.attention == "flex" and fam is not None and fam.attention is not None:
        import torch

        if not torch.cuda.is_available():
            fail("model.attention", "flex: FlexAttention has no backward pass on CPU (torch "
                                    f"{torch.__version__.split('+')[0]}); use eager or sdpa here, flex on GPUs")
    check_device_precision(cfg.train.precision)
    if cfg.ia3.variant == "paper":
        paper_targets(model_config.model_type)  # refuses a family it is not defined for, before any rank waits
    hidden = hidden_size_of(model_config)
    # Every rank opens the token cache memory-mapped; where it is missing, one rank per node tokenizes into it
    # (or, with data.require_prepared, the run stops here, before the process group).
    pairs = objectives.is_pairwise(cfg)
    data, eval_data = load_data(cfg, tok, progress=True)
    if cfg.train.global_batch_size:
        cfg = with_global_batch(cfg, env.world_size)
    auto_micro = cfg.train.micro_batch_size == autobatch.AUTO
    if auto_micro:
        # Provisional (micro-batch 1 over the same examples per step) for the checks and the DeepSpeed config.
        cfg = autobatch.with_micro(cfg, 1, cfg.train.grad_accum)
    if cfg.train.grad_accum > len(data):
        # Refused before the sampler plans anything: each step's last micro-steps would hold no example on any rank.
        # Named by the key that was set: the accumulation train.global_batch_size made on this world, or its own.
        why = (f"more than the {len(data)} training examples, so every optimizer step would run micro-steps with "
               f"no example on any rank")
        if cfg.train.global_batch_size:
            fail("train.global_batch_size", f"{cfg.train.global_batch_size} makes an accumulation (train.grad_accum) "
                                            f"of {cfg.train.grad_accum} on {env.world_size} rank(s), {why}; lower it")
        fail("train.grad_accum", f"{cfg.train.grad_accum} is {why}; set it to at most {len(data)}")
    pack_length = None
    if cfg.data.packing:
        # Before the stage choice, which sizes activations at the packed width (packing refuses an auto
        # micro-batch, so this layout is the run's).
        pack_length = pack_length_for(cfg, model_config, data, _layout(cfg, env, pairs), auto_micro)
    stage_note = ""
    if cfg.deepspeed.config == "auto":
        cfg, stage_note = auto_stage(cfg, model_config, env, pack_length)
    if auto_micro and cfg.deepspeed.config != "auto":
        # auto chooses the micro-batch and accumulation: a DeepSpeed file that fixes either would be compared
        # with the provisional micro-batch 1 here, and overwritten once auto has chosen.
        user = dsc.read(dsc.locate(cfg.deepspeed.config))
        fixed = [k for k in BATCH_KEYS if user.get(k, dsc.AUTO) != dsc.AUTO]
        if fixed:
            fail("train.micro_batch_size", f"auto chooses the micro-batch and the accumulation, and "
                                           f"{cfg.deepspeed.config} sets '{fixed[0]}' to {user[fixed[0]]!r}; set the "
                                           f"DeepSpeed file's batch keys to \"auto\" (or remove them), or give "
                                           f"train.micro_batch_size a number")
    ds = dsc.resolve(cfg, env.world_size, hidden)
    if cfg.train.compile and dsc.stage_of(ds) == 3:
        # ZeRO-3 gathers and releases each parameter in module hooks that a compiled block would trace around.
        fail("train.compile", "is not supported with ZeRO-3 (deepspeed.config); use ZeRO-0/1/2 or set it to false")
    weights_dir = Path(model_path)
    if not weights_dir.is_dir():
        # A hub model downloads here, before any rank waits on another: GBs fetched inside the process group run
        # into its timeouts, and a repo without loadable weights exits 2 now. The hub client locks, so the
        # ranks of a node fetch it once; the loaders then find it in the hub cache.
        # The commit the config and tokenizer came from, should the branch move meanwhile.
        revision = snapshot_commit(files_dir) if files_dir is not None else None
        weights_dir = local_model_dir(model_path, revision or cfg.model.revision, cfg.model.trust_remote_code,
                                      shared)
    # ZeRO-3 builds the model itself: where from_pretrained (the other stages) would leave a tied head untied, so
    # does it.
    zero3 = dsc.stage_of(ds) == 3
    untie = False
    if zero3 or family_of(model_config) is not None:
        # ZeRO-3's loader needs every tensor; for the tested families (known key names) the other stages get the
        # same check, where from_pretrained would only warn and train on randomly initialised weights.
        untie = check_checkpoint(model_config, weights_dir, cfg.model.trust_remote_code,
                                 DTYPES[cfg.train.precision] if zero3 else None)
    if untie and env.is_main:
        print(f"ia3-dist: note: model.path {weights_dir}: config.json ties the LM head to the embeddings, but the "
              f"weights hold both with different values; trained untied, with the stored head (as from_pretrained "
              f"loads it); set tie_word_embeddings: false there to say so", file=sys.stderr, flush=True)
    resume_from = ckpt.resolve_resume(cfg.train.resume, out)
    resume_best = None
    if resume_from is not None:
        why = stopped_early(ckpt.read_meta(resume_from))
        if why and not _adapter_written_after(out / "adapter", resume_from / ckpt.META):
            # Killed between its last checkpoint and its adapter: this resume trains nothing and writes it.
            dist.print0(env, f"{resume_from} is the last checkpoint of a run that ended by early stopping, and its "
                             f"adapter was not written after it: writing it")
        elif why:
            # Before anything is written or any rank waits: the run dir stays as the finished run left it.
            raise RunFinished(f"{resume_from} is the last checkpoint of a run that ended by early stopping ({why}); "
                              f"nothing to do: its adapter is in {out / 'adapter'}. To train on, start a new run "
                              f"from it with ia3.init_from={out / 'adapter'}")
        if cfg.train.resume != "auto" and ckpt.resumes_own(cfg.train.resume, out):
            # (A checkpoint of another dir: the guard refused this dir's own checkpoints, or overwrite sets them
            # aside.)
            ckpt.refuse_later(resume_from, out)
        es = cfg.train.early_stopping
        if es.metric and es.final == "best":
            resume_best = ckpt.read_best_vectors(resume_from)
    auto = None
    if auto_micro:
        auto = autobatch.choose(cfg, model_config, env, ds, int(data.lengths.max()), resume_from)
        cfg = autobatch.with_micro(cfg, auto.micro, auto.samples_per_rank)
        if auto.source != "checkpoint" and resume_from is not None and cfg.data.group_by_length is None:
            # Chosen afresh on resume: the order stays the checkpoint's (group_by_length follows the micro-batch
            # unless set, and the probe may still shrink it to 1).
            grouped = ckpt.read_meta(resume_from).get("group_by_length")
            if isinstance(grouped, bool):
                cfg = replace(cfg, data=replace(cfg.data, group_by_length=grouped))
        autobatch.set_ds_batch(ds, cfg, env.world_size)
    layout = _layout(cfg, env, pairs)
    if pack_length is not None:
        layout = replace(layout, pack_length=pack_length)
    total = total_steps_for(cfg, len(data), layout)
    data_key = data.mix.key if data.mix is not None else Path(data.cache_file).stem
    meta = {"world_size": env.world_size, "micro_batch_size": cfg.train.micro_batch_size,
            "grad_accum": cfg.train.grad_accum, "seed": cfg.train.seed, "shuffle": cfg.data.shuffle,
            "total_steps": total, "data_key": data_key, "n_examples": len(data),
            # Examples left out as copies of held-out ones: a checkpoint without the key trained on them.
            "held_copies": data.mix.held_copies if data.mix is not None else data.held_copies,
            "eval_ratio": cfg.data.eval_ratio, "group_by_length": layout.group_by_length,
            "order_version": ORDER_VERSION,
            "global_batch": layout.global_batch, "zero_stage": dsc.stage_of(ds), "precision": cfg.train.precision,
            "offload_optimizer": dsc.offloads_optimizer(ds), "optimizer": dsc.optimizer_key(ds),
            **run_keys(cfg, model_config), "base_weights": weights_fingerprint(weights_dir),
            **measured_keys(cfg, eval_data),
            # What micro_batch_size=auto sized against: a resume on less memory may choose afresh (autobatch.choose).
            **({"auto_budget_mib": autobatch.budget_mib(auto)} if auto is not None else {})}
    portable, line, saved, measured = False, "", None, ""
    if resume_from is not None:
        saved, portable = ckpt.check_compatible(
            resume_from, meta, () if cfg.checkpoint.check_base_weights else ("base_weights",))
        measured = check_measured(cfg, saved, meta, str(resume_from / ckpt.META))
        # Its trackers' state read as the run will read it: a damaged one is exit 2 here, before output.overwrite
        # sets anything aside and before the model loads, not in the trainer.
        Selection.of(cfg).restore(saved, str(resume_from / ckpt.META))
        if ckpt.comparable(saved.get("base_weights"), meta["base_weights"]) \
                and saved["base_weights"] != meta["base_weights"]:  # let through by the setting above
            # In `measured`, which the line rebuilt after a micro-batch probe keeps too.
            measured += (f"; on other base weights than the checkpoint's (fingerprint {saved['base_weights']}, now "
                         f"{meta['base_weights']}), as checkpoint.check_base_weights=false allows")
        line = ckpt.resume_line(resume_from, saved, meta, portable) + measured
        if not portable:
            safe_load.check_checkpoint_dir(resume_from, saved.get("world_size"), saved.get("zero_stage"))
    bench = None
    if cfg.eval.tasks:
        from .benchmarks import Benchmarks

        # lm-eval installed, every task known and its data on this machine: refused here, exit 2, not mid-run.
        bench = Benchmarks(cfg, env, replicated=dsc.stage_of(ds) == 3)
    return Prepared(cfg, env, model_path, tok, data, model_config, ds, total, layout, out, resume_from, meta, eval_data,
                    auto=auto, support=support, stage_note=stage_note, resume_portable=portable, resume_line=line,
                    resume_measured=measured, resumed=saved, resume_best=resume_best, bench=bench,
                    weights_dir=weights_dir, untie_head=untie)


def prepare_data(cfg: RunConfig) -> str:
    """``ia3-dist prepare``: tokenize ``data.path`` (and ``data.eval_path``) into the token cache under
    ``data.cache_dir``, once, and return the data report. Needs the tokenizer and the model's config.json, no
    weights, no process group and no output dir."""
    from ..data import token_cache

    model_path = demo.model_path(cfg.model.path, cfg.data.cache_dir)
    tok = load_tokenizer(cfg.model, model_path)
    check_vocab(tok, load_model_config(model_path, cfg.model), cfg.model.tokenizer or model_path)
    pairs = objectives.is_pairwise(cfg)
    sections = [("data.path", demo.data_section(cfg.data, pairs))] if not cfg.data.sources else []
    if cfg.data.eval_path:
        sections.append(("data.eval_path", eval_section(cfg)))
    lines = []
    if cfg.data.sources:
        data, held = load_or_mix(cfg.data, tok, cfg.train.seed, cfg.data.eval_ratio, build=True, progress=True,
                                 pairs=pairs)
        d = Path(data.cache_file)
        lines += ["data.sources:", *data_lines(data, cfg),
                  *([f"  held out for eval: {len(held)} examples"] if held is not None else []),
                  f"  cache: {d} ({int(data.offsets[-1])} tokens as {data.ids.dtype}, "
                  f"{token_cache.cache_bytes(d) / 2**20:.1f} MiB)"]
    for key, section in sections:
        data = load_or_tokenize(section, tok, build=True, progress=True, pairs=pairs)
        d = Path(data.cache_file)
        lines += [f"{key}:", *data_lines(data, replace(cfg, data=section)),
                  f"  cache: {d} ({int(data.offsets[-1])} tokens as {data.ids.dtype}, "
                  f"{token_cache.cache_bytes(d) / 2**20:.1f} MiB)"]
    lines.append("prepared: a run with this config and the same data.* settings and data.cache_dir reads this cache "
                 "(data.require_prepared=true makes a missing one an error instead of tokenizing in the job)")
    return "\n".join(lines)


def write_run_files(p: Prepared) -> None:
    """The run manifest, run.yaml and ds_config.json (and, with output.overwrite, the previous run's files go);
    rank 0 only."""
    if not p.env.is_main:
        return
    # A resume from another run dir's checkpoint starts this dir over too: what is here is not the run it continues.
    start_run_dir(p.out, p.cfg.output.overwrite and (p.resume_from is None
                                                     or not ckpt.resumes_own(p.cfg.train.resume, p.out)))
    write_batch_files(p)
    # For schedulers' preemption traps (slurm/lib.sh): signal rank 0 and every rank stops at the next step.
    manifest.write_pid_file(p.out)
    (p.out / PREEMPTED_FILE).unlink(missing_ok=True)
    (p.out / HUNG_FILE).unlink(missing_ok=True)


def write_batch_files(p: Prepared) -> None:
    """run.yaml and ds_config.json: the resolved run (``auto`` batch sizes written as chosen); rank 0 only."""
    (p.out / "run.yaml").write_text(p.cfg.to_yaml(), encoding="utf-8")
    (p.out / "ds_config.json").write_text(json.dumps(p.ds_config, indent=2) + "\n", encoding="utf-8")


def start_run_dir(out: Path, start_over: bool) -> list[str]:
    """Create ``out`` and claim it with the manifest first, so a run that dies in the next line is still known as
    ours; ``start_over`` then sets aside what an earlier run wrote (only those names: see :mod:`..runtime.manifest`;
    removed once the new run has started, :func:`..runtime.manifest.discard_aside`) and returns them."""
    out.mkdir(parents=True, exist_ok=True)
    manifest.write_manifest(out)
    return manifest.set_aside(out) if start_over else []
