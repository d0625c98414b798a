"""``train.micro_batch_size: auto``: the largest micro-batch that fits, keeping the requested global batch.

With ``auto``, ``train.grad_accum`` counts the examples each rank contributes to one optimizer step (what
micro-batch 1 would give), so the global batch is ``grad_accum x world`` whatever micro-batch is chosen. The
candidates are the divisors of ``grad_accum``; accumulation becomes ``grad_accum / micro``.

Two stages, both before step 1:

1. :func:`plan_pick` (in the preflight, no weights): ``plan``'s per-rank memory model at the data's longest
   example, against the device's memory (a GPU's total; on CPU ranks the host's memory shared by the local ranks).
   Deterministic, so every rank starts from the same pick.
2. :func:`probe` (after the engine is built, ZeRO-0/1/2): one forward and backward of the picked micro-batch made of
   the longest training examples, measured (CUDA peak allocation, or the process's RSS sampled during the probe
   on CPU) against the same budget (on a GPU less plan's fixed 1.5 GiB, which the allocator's peak does not
   see); a micro-batch that runs out of memory or over the budget is replaced by the next smaller divisor and
   probed again. The ranks agree on the smallest result. The probe's backward asks autograd for the
   gradients of the embeddings' output and of the IA3 vectors (``torch.autograd.grad``): every activation training
   keeps is kept, but no gradient is accumulated, so DeepSpeed's gradient hooks (ZeRO-1/2 reduce buckets) never
   fire; with the RNG state restored, training afterwards is exactly that of an explicit ``micro_batch_size``.
   Under ZeRO-3 the forward pass runs collectives (parameter gathers) that a rank running out of memory would
   leave its peers waiting in, so there the plan's pick stands alone.

A resumed run takes the micro-batch its checkpoint was written with (the continuation is then exact), unless it
resumes on less memory per rank than that run sized against and plan does not fit it there (:func:`choose`).
"""

from __future__ import annotations

import gc
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..config import RunConfig
from ..data.collate import to_device
from ..data.sampler import Layout
from ..models import memory
from ..runtime import dist, faults, hostmem
from ..runtime import ds_config as dsc

AUTO = "auto"
BUDGET_FRACTION = 0.9
"""Of the device's memory: the rest is left to the allocator's fragmentation and the optimizer step."""


@dataclass
class AutoBatch:
    """How ``auto`` was resolved (for the log and metrics)."""

    samples_per_rank: int
    """Examples per rank per optimizer step (``train.grad_accum`` as written)."""
    planned: int
    """The memory model's pick (or the checkpoint's micro-batch on resume)."""
    budget_gib: float
    """Memory per rank the pick must fit in."""
    micro: int = 0
    """The final micro-batch (after the probe)."""
    probe_peak_gib: float | None = None
    """Peak memory measured by the probe at the final micro-batch; None when no probe ran."""
    source: str = "plan"
    unfit: str = ""
    """On resume: that the checkpoint's micro-batch does not fit this allocation (and, where it is kept all the
    same, why), else empty."""

    def line(self) -> str:
        accum = self.samples_per_rank // self.micro
        head = (f"train.micro_batch_size=auto: {self.micro} x {accum} accumulation = {self.samples_per_rank} examples "
                f"per rank per step")
        if self.source == "checkpoint":
            return f"{head} (from the checkpoint it resumes{'; ' + self.unfit if self.unfit else ''})"
        planned = f"plan picked {self.planned} within {self.budget_gib:.1f} GiB per rank"
        if self.unfit:
            planned = f"{self.unfit}; {planned}"
        if self.source == "plan":
            return f"{head} ({planned}; no probe under ZeRO-3)"
        peak = f"{self.probe_peak_gib:.2f} GiB" if self.probe_peak_gib is not None else "not measured on this rank"
        return f"{head} ({planned}; probe peak at {self.micro}: {peak})"


def divisors_desc(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def with_micro(cfg: RunConfig, micro: int, samples_per_rank: int) -> RunConfig:
    """``cfg`` with ``auto`` replaced by ``micro`` and the accumulation that keeps the global batch."""
    return replace(cfg, train=replace(cfg.train, micro_batch_size=micro, grad_accum=samples_per_rank // micro))


UNLIMITED = 1 << 60
"""cgroup v1 writes "no limit" as the largest page-aligned 64-bit count (9223372036854771712): at or past this, none."""


def _cgroup_dirs(base: Path, rel: str) -> list[Path]:
    """``base/rel`` and each of its parents up to ``base``: a cgroup's ancestors limit it too. Inside a
    container's cgroup namespace ``rel`` is ``/`` and ``base`` is the container's own cgroup."""
    d = base / rel.strip("/")
    out = [d]
    while d != base and base in d.parents:
        d = d.parent
        out.append(d)
    return out


def host_memory_limit(root: Path = Path("/sys/fs/cgroup"), environ: Mapping[str, str] | None = None,
                      proc_cgroup: Path = Path("/proc/self/cgroup")) -> int | None:
    """Bytes this node's ranks may use together beyond what the host has, the smallest of: the cgroup's limit
    (v2 ``memory.max``, v1 ``memory/memory.limit_in_bytes``; this process's cgroup, named by ``proc_cgroup``, and
    its ancestors) and Slurm's allocation on the node (``SLURM_MEM_PER_NODE``, or ``SLURM_MEM_PER_CPU`` x
    ``SLURM_CPUS_ON_NODE``, in MiB). None when nothing limits it. A job over its limit is killed by the kernel or
    by Slurm, whatever the host has."""
    e = os.environ if environ is None else environ
    try:
        text = proc_cgroup.read_text()
    except OSError:
        text = ""
    v2, v1 = "/", "/"
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and parts[0] == "0" and parts[1] == "":
            v2 = parts[2]
        elif len(parts) == 3 and "memory" in parts[1].split(","):
            v1 = parts[2]
    limits = []
    for f in [d / "memory.max" for d in _cgroup_dirs(root, v2)] + \
             [d / "memory.limit_in_bytes" for d in _cgroup_dirs(root / "memory", v1)]:
        try:
            limits.append(int(f.read_text().strip()))
        except (OSError, ValueError):  # absent, or "max" (v2's "no limit")
            continue
    mib = 1 << 20
    try:
        per_node = int(e.get("SLURM_MEM_PER_NODE", ""))
        limits.append(per_node * mib if per_node > 0 else 0)
    except ValueError:
        try:
            per_cpu, cpus = int(e.get("SLURM_MEM_PER_CPU", "")), int(e.get("SLURM_CPUS_ON_NODE", ""))
            limits.append(per_cpu * cpus * mib if per_cpu > 0 and cpus > 0 else 0)
        except ValueError:
            pass
    limits = [n for n in limits if 0 < n < UNLIMITED]
    return min(limits) if limits else None


def memory_budget(local_world: int, local_rank: int) -> float:
    """Bytes one rank may use: its GPU's memory, or on CPU ranks the host's memory (capped by the cgroup's and
    Slurm's limits, :func:`host_memory_limit`) split between the local ranks (total, not available: the same
    figure on every rank)."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(local_rank % torch.cuda.device_count()).total_memory * BUDGET_FRACTION
    return host_share(local_world)


def host_share(local_world: int) -> float:
    """Bytes of host memory one of the node's ``local_world`` ranks may use: the node's memory under the cgroup's
    and Slurm's limits (:func:`host_memory_limit`), within the budget fraction, split between them."""
    import psutil

    total = psutil.virtual_memory().total
    limit = host_memory_limit()
    return min(total, limit or total) * BUDGET_FRACTION / max(local_world, 1)


def plan_pick(cfg: RunConfig, model_config: Any, env: dist.DistEnv, ds: dict[str, Any], longest: int,
              budget: float | None = None) -> AutoBatch:
    """The largest divisor of ``grad_accum`` that ``plan``'s memory model fits in the budget at ``longest``
    tokens per example (at least 1: a micro-batch of 1 that does not fit is ``plan``'s message to give)."""
    on_cpu = not torch.cuda.is_available()
    s = memory.shape_of(model_config, cfg.ia3, cfg.train.loss_chunk_mib)
    stage = dsc.stage_of(ds)
    # The memory model's offload moves the weights (and the optimizer) to the host: with the optimizer's alone the
    # weight shards stay on the GPU (IA3's optimizer state is a few MB either way).
    offload = not on_cpu and stage == 3 and dsc.offloads_params(ds)
    b = 4 if cfg.train.precision == "fp32" else 2
    budget = memory_budget(env.local_world_size, env.local_rank) if budget is None else budget
    overhead = memory.framework_rss() if on_cpu else memory.OVERHEAD
    fits = memory.largest_micro(s, stage, offload, env.world_size, longest, b, cfg.train.gradient_checkpointing,
                                 budget, overhead)
    samples = cfg.train.grad_accum
    pick = next((d for d in divisors_desc(samples) if d <= fits), 1)
    return AutoBatch(samples, pick, budget / 2**30)


def choose(cfg: RunConfig, model_config: Any, env: dist.DistEnv, ds: dict[str, Any], longest: int,
           resume_from: Any) -> AutoBatch:
    """The preflight's pick: the checkpoint's micro-batch on resume (when it divides the examples per step; a
    mismatch is then refused by the resume check), else :func:`plan_pick`. ``cfg`` is the provisional config
    (micro-batch 1, ``grad_accum`` = examples per rank per step).

    A checkpoint's micro-batch is kept (the continuation is then exact) unless plan does not fit it here and the
    run resumes on less memory per rank than the checkpoint's run sized against (``auto_budget_mib`` in its
    meta: another GPU, a smaller host share) or on another number of ranks or ZeRO stage: then it is chosen
    afresh (plan, and the probe under ZeRO-0/1/2) and the run resumes from the layout-independent state, as on
    another allocation. On the same allocation the budget is the same, so a plan that estimates a little
    otherwise from one start to the next never changes it. A checkpoint that resumes only at its own micro-batch
    (fp16, offload, no layout-independent state: :func:`layout_change_refusal`) keeps it and is told."""
    auto = plan_pick(cfg, model_config, env, ds, longest)
    if resume_from is not None:
        from ..runtime.checkpoint import layout_change_refusal, read_meta

        meta = read_meta(resume_from)
        m = meta.get("micro_batch_size")
        if isinstance(m, int) and m >= 1 and auto.samples_per_rank % m == 0:
            saved = meta.get("auto_budget_mib")
            less = isinstance(saved, int) and budget_mib(auto) < saved
            # Another number of ranks or ZeRO stage resumes from the layout-independent state anyway (ZeRO-3's
            # shards grow on fewer ranks): nothing exact to keep.
            moved = meta.get("world_size") != env.world_size or meta.get("zero_stage", dsc.stage_of(ds)) != \
                dsc.stage_of(ds)
            if m <= auto.planned or not (less or moved):
                return replace(auto, planned=m, micro=m, source="checkpoint")
            unfit = (f"the checkpoint's micro-batch {m} does not fit the {auto.budget_gib:.1f} GiB per rank here"
                     + (f" (it was sized for {saved / 1024:.1f} GiB)" if less else ""))
            refusal = layout_change_refusal(resume_from, meta, {"precision": cfg.train.precision,
                                                                "offload_optimizer": dsc.offloads_optimizer(ds)},
                                            ["micro_batch_size"])
            if refusal:  # kept, and said: the step may run out of memory
                return replace(auto, planned=m, micro=m, source="checkpoint",
                               unfit=f"{unfit}; kept, as this checkpoint resumes only at its own micro-batch (see "
                                     f"ia3-dist plan for the memory it needs; ia3.init_from starts a new run from its "
                                     f"vectors)")
            return replace(auto, micro=auto.planned, unfit=unfit)
    return replace(auto, micro=auto.planned)


def budget_mib(auto: AutoBatch) -> int:
    """What a checkpoint records of ``auto``'s budget (meta ``auto_budget_mib``), for :func:`choose` on resume."""
    return int(auto.budget_gib * 1024)


def set_ds_batch(ds: dict[str, Any], cfg: RunConfig, world_size: int) -> None:
    """The DeepSpeed config's three batch keys from ``cfg`` (resolved from the provisional micro-batch 1)."""
    t = cfg.train
    ds.update(train_micro_batch_size_per_gpu=t.micro_batch_size, gradient_accumulation_steps=t.grad_accum,
              train_batch_size=t.micro_batch_size * t.grad_accum * world_size)


class RssSampler:
    """The largest RSS seen between :meth:`start` and :meth:`stop`, polled every millisecond."""

    def __init__(self) -> None:
        self.peak = hostmem.rss_gib() * 2**30
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="ia3-dist-rss", daemon=True)

    def _poll(self) -> None:
        while not self._done.wait(0.001):
            self.peak = max(self.peak, hostmem.rss_gib() * 2**30)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, hostmem.rss_gib() * 2**30)


_OOM_TEXT = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED", "CUDNN_STATUS_NOT_INITIALIZED")


def _out_of_memory(e: RuntimeError) -> bool:
    """Whether ``e`` is an allocation that failed for want of device memory (its text is all there is)."""
    text = str(e)
    return any(t in text for t in _OOM_TEXT)


def _measure(engine: Any, batch: dict[str, torch.Tensor], leaf: dict[str, torch.Tensor], rank: int,
             trainable: list[torch.Tensor] = ()) -> float | None:  # type: ignore[assignment]
    """Peak bytes of one forward + backward of ``batch`` (None: out of memory)."""
    cuda = engine.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(engine.device)
        torch.cuda.reset_peak_memory_stats(engine.device)
    # On CPU ranks the process's RSS, sampled while the probe runs: the kernel's high-water mark (ru_maxrss)
    # never comes down, so it could not tell a smaller micro-batch's peak from a larger one's.
    sampler = None if cuda else RssSampler().start()
    try:
        faults.hit("probe", len(batch["input_ids"]), rank)
        # The module, not the engine: the engine's forward arms its backward prologue (ZeRO bucket state) on the
        # output, which this backward must not touch. Under ZeRO-0/1/2 every weight is local, so nothing else differs.
        loss_sum, _ = engine.module(**to_device(batch, engine.device))
        # The IA3 vectors' gradients too: with a vector frozen, autograd keeps none of what its gradient needs (the
        # scaled outputs' inputs), 24-32% of the activations. Asked for by autograd.grad, they are returned, never
        # accumulated: no .grad is written and DeepSpeed's accumulation hooks (ZeRO-1/2 buckets) never run.
        # allow_unused: a vector the text forward never reaches (a vision tower's q_proj) has no gradient here.
        grads = torch.autograd.grad(loss_sum, [leaf.pop("embeds"), *trainable], allow_unused=True)
        del loss_sum, grads
    except torch.OutOfMemoryError:
        return None
    except RuntimeError as e:
        # A library's own allocation that fails on a full GPU (cuBLAS's workspace, a cuDNN or NCCL buffer) comes
        # as a RuntimeError naming it, not as torch's OutOfMemoryError: the same answer, it does not fit.
        if not _out_of_memory(e):
            raise
        return None
    finally:
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        if sampler is not None:
            sampler.stop()
    if cuda:
        return float(torch.cuda.max_memory_allocated(engine.device))
    return sampler.peak


def probe(engine: Any, p: Any, auto: AutoBatch) -> AutoBatch:
    """Probe the planned micro-batch (and smaller divisors while it does not fit) of ``p`` (the run's
    :class:`~.prepare.Prepared`, which imports this module); every rank joins the agreement once. Returns
    ``auto`` with the final micro-batch and the measured peak."""
    from ..data.collate import collate
    from ..data.tokenize import IGNORE_INDEX

    data = p.data
    order = sorted(range(len(data)), key=lambda i: -int(data.lengths[i]))
    trainable = [q for q in engine.module.parameters() if q.requires_grad]
    leaf: dict[str, torch.Tensor] = {}

    def embeds_leaf(_mod: Any, _inp: Any, out: torch.Tensor) -> torch.Tensor:
        leaf["embeds"] = out.detach().requires_grad_()
        return leaf["embeds"]
    budget = auto.budget_gib * 2**30
    if torch.cuda.is_available():
        # max_memory_allocated leaves out what plan counts as its fixed part (the CUDA context, NCCL's buffers,
        # the allocator's cached blocks): the same budget as plan's, not 1.5 GiB more of it.
        budget -= memory.OVERHEAD
    pad_id = p.tokenizer.pad_token_id
    side = getattr(p.tokenizer, "padding_side", "right")
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    chosen, peak = 1, None
    hook = engine.module.peft.get_input_embeddings().register_forward_hook(embeds_leaf)
    try:
        for m in [d for d in divisors_desc(auto.samples_per_rank) if d <= auto.planned]:
            idx = [order[i % len(order)] for i in range(m)]
            batch = collate(data, idx, pad_id, side)
            # Every real position labelled: the LM head (and the last MLP, model.last_mlp_at_labels) runs only at
            # label rows, so the longest examples with their own few labels can measure less than shorter ones
            # with many; this is the most any micro-batch of these lengths can take.
            batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
            got = _measure(engine, batch, leaf, p.env.rank, trainable)
            leaf.clear()
            if got is not None and got <= budget:
                chosen, peak = m, got
                break
    finally:
        hook.remove()
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    # The smallest pick of any rank: max of the negated micro-batch.
    agreed = -int(dist.all_reduce_max(torch.tensor([-chosen], dtype=torch.float64, device=engine.device)).item())
    return replace(auto, micro=agreed, probe_peak_gib=peak / 2**30 if peak is not None and agreed == chosen else None,
                   source="probe")


def relayout(p: Any, micro: int, engine: Any | None = None) -> None:
    """Make ``p`` (config, layout, resume meta, DeepSpeed config) and the live engine use ``micro``."""
    cfg = with_micro(p.cfg, micro, p.layout.micro * p.layout.accum)
    t = cfg.train
    grouped = cfg.data.group_by_length
    if grouped is None:
        grouped = t.micro_batch_size > 1 and cfg.data.shuffle
    p.cfg = cfg
    p.layout = Layout(t.micro_batch_size, t.grad_accum, p.env.world_size, t.seed, cfg.data.shuffle, grouped)
    p.meta.update(micro_batch_size=t.micro_batch_size, grad_accum=t.grad_accum, group_by_length=grouped)
    set_ds_batch(p.ds_config, cfg, p.env.world_size)
    if engine is not None:
        engine.set_train_micro_batch_size(t.micro_batch_size)
        engine.set_train_batch_size(p.layout.global_batch)
