"""``ia3-dist plan``: what fits before anything is queued. No GPU, no weights: the model is built on the meta
device from its architecture (``model.arch`` or the model dir's config.json), so parameter counts are exact.

Per-rank memory model (bytes; b = 2 for bf16/fp16, 4 for fp32; N all params, T trainable IA3 params, W ranks):
- weights: N*b (ZeRO 0-2), N*b/W (ZeRO-3), 0 on the GPU with parameter offload;
- gradients: T*b, /W from ZeRO-2 on (IA3: tiny);
- optimizer: Adam m and v (8 bytes) plus an fp32 master copy in mixed precision (4), per trainable param, /W from
  ZeRO-1 on, 0 on the GPU with optimizer offload;
- activations per micro-batch (Korthikanti et al., 2022), per layer s*m*(34h + 5*a*s)*b/2 for a GPT block
  without checkpointing, generalised per family to grouped k/v heads and gated MLPs of ``intermediate_size``
  (:func:`block_activations`; Bloom's eager attention keeps 6*a*s, its fp32 softmax and 16-bit copy, and the
  backward holds a layer and a quarter more while it runs), s*m*h*b per layer plus one layer's full set with it
  with checkpointing; plus the loss's fp32 logits,
  their log-softmax and its gradient (12 bytes per row and vocab entry) at label positions (the launcher computes
  no others, counted at the whole sequence as an upper bound), at most one ``train.loss_chunk_mib`` chunk of rows;
- ZeRO-3 gathers each parameter whole before use: the embedding matrix (used first, and again by the tied
  lm_head at the end) plus the live parameters DeepSpeed keeps within its reuse distance (the launcher's "auto"
  is two layers, capped at 1e9);
- a fixed 1.5 GiB for the CUDA context and allocator slack on a GPU; on CPU ranks (``--cpu``) everything is host
  memory (RSS) and the fixed part is the framework itself (torch, transformers, PEFT, DeepSpeed), measured in
  this process after importing the same stack.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..config.archs import ARCHS
from ..data.packing import ROW_ALIGN
from ..errors import UsageError
from ..models.families import arch_config
from ..models.load import load_model_config
from ..models.memory import (  # noqa: F401 - re-exported: plan's memory model, used by tests and bench
    GIB,
    OVERHEAD,
    STAGES,
    RankMemory,
    Shape,
    activation_bytes,
    block_activations,
    candidate_stages,
    count_params,
    framework_rss,
    largest_micro,
    rank_memory,
    shape_of,
)
from ..train import demo


def model_shape(cfg: RunConfig) -> Shape:
    """The shape planned: model.arch's (no files needed), checked against model.path's config.json where that is
    a local dir (the launcher trains model.path: an override of it alone would otherwise plan another model; the
    embedded demo model is no user's model, and a named shape with it plans that shape)."""
    if cfg.model.arch:
        mc = arch_config(cfg.model.arch)
        local = cfg.model.path
        if not local.startswith("demo:") and Path(local).is_dir():
            there = shape_of(load_model_config(local, cfg.model), cfg.ia3, cfg.train.loss_chunk_mib)
            named = shape_of(mc, cfg.ia3, cfg.train.loss_chunk_mib)
            if there.n_params != named.n_params:
                raise UsageError(f"model.arch {cfg.model.arch} ({named.n_params:,} params) is not the shape of "
                                 f"model.path {local} ({there.n_params:,} params), which the launcher trains; set "
                                 f"model.arch to its shape, or to null to plan from its config.json")
    else:
        try:
            mc = load_model_config(demo.model_path(cfg.model.path, cfg.data.cache_dir), cfg.model)
        except UsageError as e:
            raise UsageError(f"{e}; or set model.arch to one of the named shapes ({', '.join(ARCHS)}) to plan "
                             f"without it") from None
    return shape_of(mc, cfg.ia3, cfg.train.loss_chunk_mib)


def deepspeed_estimate(s: Shape, nodes: int, gpus: int) -> str:
    """DeepSpeed's own ZeRO-3 model-state estimator, which assumes every parameter is trained: the full
    fine-tuning comparison point."""
    try:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    except ImportError:
        return ""
    largest_layer = max(s.vocab * s.hidden, 12 * s.hidden * s.hidden)
    _, gpu, _ = estimate_zero3_model_states_mem_needs(s.n_params, largest_layer, gpus, nodes, cpu_offload=False,
                                                      cpu_offload_params=False, zero_init=True,
                                                      additional_buffer_factor=1.5)
    return f"DeepSpeed's estimator for *full* fine-tuning on ZeRO-3 (for comparison): {gpu / GIB:.1f} GiB per GPU"


def gib(x: float) -> str:
    return f"{x / GIB:8.2f}"


def plan(cfg: RunConfig, nodes: int, gpus_per_node: int, gpu_mem_gib: float,
         cpu: bool = False) -> tuple[str, dict[str, Any]]:
    """The table and its numbers. ``cpu``: CPU ranks (``gpus_per_node`` ranks per node, ``gpu_mem_gib`` of host
    memory per rank); every byte then counts against the same host memory, offloaded or not."""
    s = model_shape(cfg)
    world = nodes * gpus_per_node
    b = 4 if cfg.train.precision == "fp32" else 2
    seq, micro = cfg.data.max_length, cfg.train.micro_batch_size
    if micro == "auto":
        micro = 1  # the "max micro" columns are what auto chooses from
    # A preference pair is two sequences (chosen, rejected) in one forward pass: rows = 2 x micro-batch.
    per = 2 if cfg.train.objective != "sft" else 1
    rows_of = f"micro-batch {micro}" + (f" pairs ({per * micro} sequences)" if per > 1 else "")
    pack_note = ""
    if cfg.data.packing:
        # A packed micro-step is at most micro-batch rows of data.pack_length tokens, which may be far wider than
        # data.max_length. auto is chosen from the data at launch (no data here): the narrowest width it picks.
        if cfg.data.pack_length == "auto":
            seq = -(-seq // ROW_ALIGN) * ROW_ALIGN
            pack_note = (f"data.pack_length=auto: planned at rows of {seq} tokens, the narrowest auto picks; the "
                         f"launch states the width it picks (and deepspeed.config=auto sizes at it): plan again "
                         f"with data.pack_length=<that width> to see its memory")
        else:
            seq = int(cfg.data.pack_length)
        rows_of += f", packed rows of {seq} tokens"
    ckpt = cfg.train.gradient_checkpointing
    from ..train.autobatch import BUDGET_FRACTION

    # What the launch fits against (deepspeed.config and micro_batch_size auto): the rest is the allocator's.
    cap = gpu_mem_gib * GIB * BUDGET_FRACTION
    overhead = framework_rss() if cpu else OVERHEAD
    unit, total_name = ("CPU rank", "RSS") if cpu else ("GPU", "GPU tot")
    lines = [s.line, f"layout: {nodes} node(s) x {gpus_per_node} {unit}(s) = {world} ranks, {gpu_mem_gib:g} GiB "
             f"each (planned within {BUDGET_FRACTION:.0%} of it: {cap / GIB:.1f} GiB, as the launch sizes); "
             f"{cfg.train.precision}, seq {seq}, {rows_of}, gradient checkpointing "
             f"{'on' if ckpt else 'off'}"
             + (f"; framework {overhead / GIB:.2f} GiB per rank (measured here)" if cpu else ""),
             f"{'config':<14}{'weights':>9}{'grads':>9}{'optim':>9}{'activ':>9}{'gather':>9}{total_name:>9}"
             f"{'' if cpu else 'CPU':>9}{'max micro':>11}{'(ckpt)':>8}  GiB per rank"]
    rows = {}
    fits_at = None
    for name, stage, off in STAGES:
        # On CPU ranks "offloaded" memory is the same host memory: count it in place.
        dev_off = off and not cpu
        r = rank_memory(s, name, stage, dev_off, world, seq, per * micro, b, ckpt, overhead)
        total = r.gpu_total
        mm = largest_micro(s, stage, dev_off, world, seq, b, False, cap, overhead) // per
        mm_ck = largest_micro(s, stage, dev_off, world, seq, b, True, cap, overhead) // per
        rows[name] = {"gpu_gib": r.gpu_total / GIB, "cpu_gib": r.cpu / GIB, "total_gib": total / GIB,
                      "max_micro": mm, "max_micro_ckpt": mm_ck, "fits": total <= cap}
        lines.append(f"{name:<14}{gib(r.weights)}{gib(r.grads)}{gib(r.optimizer)}"
                     f"{gib(r.activations)}{gib(r.gathered)}{gib(total)}{'' if cpu else gib(r.cpu):>9}"
                     f"{mm:>11}{mm_ck:>8}")
        if fits_at is None and total <= cap and (name, stage, off) in candidate_stages(b, cfg.train.compile):
            fits_at = name
    if pack_note:
        lines.append(pack_note)
    est = deepspeed_estimate(s, nodes, gpus_per_node)
    if est and not cpu:
        lines.append(est)
    # Only what would change the outcome: checkpointing when it is off, a smaller micro-batch when it is above 1.
    levers = [x for x, on in (("turn on train.gradient_checkpointing", not ckpt),
                              ("lower the micro-batch", micro > 1)) if on]
    if fits_at is None and cfg.train.compile and any(r["fits"] for r in rows.values()):
        lines.append(f"does not fit with train.compile: only ZeRO-3 fits at {rows_of}, and compiled blocks do not "
                     f"run under ZeRO-3; set train.compile=false" + "".join(f", or {x}" for x in levers))
    elif fits_at is None:
        lines.append(f"does not fit: even {STAGES[-1][0]} needs {rows[STAGES[-1][0]]['total_gib']:.1f} GiB per "
                     f"{unit} at {rows_of}; " + ", ".join([*levers, f"add {unit}s"]))
    else:
        mixed = {"fp16": "; in fp16 ZeRO-0's optimizer checks every tensor on the host",
                 "bf16": "; mixed precision starts at ZeRO-1, which costs IA3 nothing"}
        why = "least communication" + (mixed.get(cfg.train.precision, "") if fits_at == "zero1" else "")
        r = rows[fits_at]
        # The figure for the run as configured first; the other setting's in brackets.
        largest = (f"{r['max_micro_ckpt']} (with gradient checkpointing, as configured; {r['max_micro']} without)"
                   if ckpt else f"{r['max_micro']} ({r['max_micro_ckpt']} with gradient checkpointing)")
        lines.append(f"recommended: deepspeed.config={fits_at} (the lowest stage that fits: {why}); "
                     f"largest micro-batch there {largest}")
        if r["cpu_gib"] and not cpu:
            # Pinned host memory, beside each rank's own framework: a node short of it fails before the first step.
            lines.append(f"host memory: {fits_at} keeps {r['cpu_gib']:.1f} GiB per rank on the host, "
                         f"{r['cpu_gib'] * gpus_per_node:.0f} GiB per node for its {gpus_per_node} ranks (pinned; "
                         f"plus each rank's framework): give the job that much (ia3-dist slurm --mem); "
                         f"deepspeed.config=auto takes an offloading stage only where the node has it")
    info = {"n_params": s.n_params, "trainable": s.trainable, "world": world, "seq": seq, "rows": rows,
            "recommended": fits_at, "chosen": rows.get(_chosen(cfg)), "overhead_gib": overhead / GIB}
    return "\n".join(lines), info


def _chosen(cfg: RunConfig) -> str:
    name = cfg.deepspeed.config.rsplit("/", 1)[-1].removesuffix(".json")
    return name
