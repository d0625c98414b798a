"""``ia3-dist plan``: what fits before anything is queued. No GPU, no weights: the model is built on the meta
device from its architecture (``model.arch`` or the model dir's config.json), so parameter counts are exact.

Per-rank memory model (bytes; b = 2 for bf16/fp16, 4 for fp32; N all params, T trainable IA3 params, W ranks):
- weights: N*b (ZeRO 0-2), N*b/W (ZeRO-3), 0 on the GPU with parameter offload;
- gradients: T*b, /W from ZeRO-2 on (IA3: tiny);
- optimizer: Adam m and v (8 bytes) plus an fp32 master copy in mixed precision (4), per trainable param, /W from
  ZeRO-1 on, 0 on the GPU with optimizer offload;
- activations per micro-batch (Korthikanti et al., 2022), per layer s*m*h*(34 + 5*a*s/h)*b/2 without
  checkpointing, s*m*h*b per layer plus one layer's full set with it; plus fp32 logits at label positions
  (the launcher computes no others), counted at the whole sequence as an upper bound;
- a fixed 1.5 GiB for the CUDA context and allocator slack.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config import RunConfig
from .errors import UsageError

GIB = 2**30
OVERHEAD = 1.5 * GIB
STAGES = (("zero0", 0, False), ("zero1", 1, False), ("zero2", 2, False), ("zero3", 3, False),
          ("zero3_offload", 3, True))


@dataclass
class Shape:
    n_params: int
    trainable: int
    vocab: int
    hidden: int
    layers: int
    heads: int
    line: str
    """PEFT's trainable-parameter line."""


def model_shape(cfg: RunConfig) -> Shape:
    from .arch import bloom_config
    from .model import build_on_meta, layers_of, trainable_line

    if cfg.model.arch:
        mc = bloom_config(cfg.model.arch)
    else:
        from transformers import AutoConfig

        try:
            mc = AutoConfig.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
        except (OSError, ValueError) as e:
            raise UsageError(f"model.path {cfg.model.path}: no config to plan from ({e}); set model.arch to one of "
                             f"the Bloom family names") from None
    peft = build_on_meta(mc, cfg.ia3)
    n = sum(p.numel() for p in peft.parameters())
    t = sum(p.numel() for p in peft.parameters() if p.requires_grad)
    return Shape(n, t, mc.vocab_size, mc.hidden_size, layers_of(mc),
                 getattr(mc, "n_head", getattr(mc, "num_attention_heads", 1)), trainable_line(peft))


@dataclass
class RankMemory:
    config: str
    weights: float
    grads: float
    optimizer: float
    activations: float
    cpu: float

    @property
    def gpu_total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + OVERHEAD


def activation_bytes(s: Shape, seq: int, micro: int, b: int, checkpointing: bool) -> float:
    per_layer_full = seq * micro * s.hidden * (34 + 5 * s.heads * seq / s.hidden) * b / 2
    layers = (s.layers * seq * micro * s.hidden * b + per_layer_full) if checkpointing else s.layers * per_layer_full
    logits = seq * micro * s.vocab * 4 * 2  # fp32 logits and their gradient
    return layers + logits


def rank_memory(s: Shape, name: str, stage: int, offload: bool, world: int, seq: int, micro: int, b: int,
                checkpointing: bool) -> RankMemory:
    weights_all = s.n_params * b
    weights = weights_all / world if stage == 3 else weights_all
    grads = s.trainable * b / (world if stage >= 2 else 1)
    opt_per = 8 + (4 if b == 2 else 0)
    opt = s.trainable * opt_per / (world if stage >= 1 else 1)
    cpu = 0.0
    if offload:
        cpu = weights + opt
        weights, opt = 0.0, 0.0
    return RankMemory(name, weights, grads, opt, activation_bytes(s, seq, micro, b, checkpointing), cpu)


def largest_micro(s: Shape, stage: int, offload: bool, world: int, seq: int, b: int, ckpt: bool,
                  gpu_bytes: float) -> int:
    m = 0
    while m < 4096 and rank_memory(s, "", stage, offload, world, seq, m + 1, b, ckpt).gpu_total <= gpu_bytes:
        m += 1
    return m


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


def plan(cfg: RunConfig, nodes: int, gpus_per_node: int, gpu_mem_gib: float) -> tuple[str, dict[str, Any]]:
    s = model_shape(cfg)
    world = nodes * gpus_per_node
    b = 4 if cfg.train.precision == "fp32" else 2
    seq, micro = cfg.data.max_length, cfg.train.micro_batch_size
    ckpt = cfg.train.gradient_checkpointing
    cap = gpu_mem_gib * GIB
    lines = [s.line, f"layout: {nodes} node(s) x {gpus_per_node} GPU(s) = {world} ranks, {gpu_mem_gib:g} GiB each; "
             f"{cfg.train.precision}, seq {seq}, micro-batch {micro}, gradient checkpointing "
             f"{'on' if ckpt else 'off'}",
             f"{'config':<14}{'weights':>9}{'grads':>9}{'optim':>9}{'activ':>9}{'GPU tot':>9}{'CPU':>9}"
             f"{'max micro':>11}{'(ckpt)':>8}  GiB per rank"]
    rows = {}
    fits_at = None
    for name, stage, off in STAGES:
        r = rank_memory(s, name, stage, off, world, seq, micro, b, ckpt)
        mm = largest_micro(s, stage, off, world, seq, b, False, cap)
        mm_ck = largest_micro(s, stage, off, world, seq, b, True, cap)
        rows[name] = {"gpu_gib": r.gpu_total / GIB, "cpu_gib": r.cpu / GIB, "max_micro": mm,
                      "max_micro_ckpt": mm_ck, "fits": r.gpu_total <= cap}
        lines.append(f"{name:<14}{gib(r.weights)}{gib(r.grads)}{gib(r.optimizer)}{gib(r.activations)}"
                     f"{gib(r.gpu_total)}{gib(r.cpu)}{mm:>11}{mm_ck:>8}")
        if fits_at is None and r.gpu_total <= cap:
            fits_at = name
    est = deepspeed_estimate(s, nodes, gpus_per_node)
    if est:
        lines.append(est)
    if fits_at is None:
        lines.append(f"does not fit: even {STAGES[-1][0]} needs {rows[STAGES[-1][0]]['gpu_gib']:.1f} GiB per GPU "
                     f"at micro-batch {micro}; turn on train.gradient_checkpointing, lower the micro-batch or add "
                     f"GPUs")
    else:
        lines.append(f"recommended: deepspeed.config={fits_at} (the lowest stage that fits: least communication); "
                     f"largest micro-batch there {rows[fits_at]['max_micro']} "
                     f"({rows[fits_at]['max_micro_ckpt']} with gradient checkpointing)")
    info = {"n_params": s.n_params, "trainable": s.trainable, "world": world, "rows": rows, "recommended": fits_at,
            "chosen": rows.get(_chosen(cfg))}
    return "\n".join(lines), info


def _chosen(cfg: RunConfig) -> str:
    name = cfg.deepspeed.config.rsplit("/", 1)[-1].removesuffix(".json")
    return name
