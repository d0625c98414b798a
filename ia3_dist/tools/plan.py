"""``ia3-dist plan``: what fits before anything is queued. No GPU, no weights: the model is built on the meta
device from its architecture (``model.arch`` or the model dir's config.json), so parameter counts are exact.

Per-rank memory model (bytes; b = 2 for bf16/fp16, 4 for fp32; N all params, T trainable IA3 params, W ranks):
- weights: N*b (ZeRO 0-2), N*b/W (ZeRO-3), 0 on the GPU with parameter offload;
- gradients: T*b, /W from ZeRO-2 on (IA3: tiny);
- optimizer: Adam m and v (8 bytes) plus an fp32 master copy in mixed precision (4), per trainable param, /W from
  ZeRO-1 on, 0 on the GPU with optimizer offload;
- activations per micro-batch (Korthikanti et al., 2022), per layer s*m*(34h + 5*a*s)*b/2 for a GPT block
  without checkpointing, generalised per family to grouped k/v heads and gated MLPs of ``intermediate_size``
  (:func:`block_activations`), s*m*h*b per layer plus one layer's full set with it; plus fp32 logits at label
  positions (the launcher computes no others), counted at the whole sequence as an upper bound;
- ZeRO-3 gathers each parameter whole before use: the embedding matrix (used first, and again by the tied
  lm_head at the end) plus the live parameters DeepSpeed keeps within its reuse distance (the launcher's "auto"
  is two layers, capped at 1e9);
- a fixed 1.5 GiB for the CUDA context and allocator slack on a GPU; on CPU ranks (``--cpu``) everything is host
  memory (RSS) and the fixed part is the framework itself (torch, transformers, PEFT, DeepSpeed), measured in
  this process after importing the same stack.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any

from ..config import IA3Section, RunConfig
from ..config.archs import ARCHS, BLOCKS, GENERIC_BLOCK
from ..errors import UsageError
from ..models.families import arch_config
from ..models.ia3 import FIXED, build_on_meta, fixed_entries, trainable_text
from ..models.load import decoder_blocks, hidden_size_of, layers_of, load_model_config
from ..runtime.ds_config import live_params
from ..runtime.hostmem import rss_gib
from ..train import demo

GIB = 2**30
OVERHEAD = 1.5 * GIB
STAGES = (("zero0", 0, False), ("zero1", 1, False), ("zero2", 2, False), ("zero3", 3, False),
          ("zero3_offload", 3, True))


@dataclass
class Shape:
    n_params: int
    trainable: int
    """IA3 parameters allocated (optimizer states are per allocated entry)."""
    vocab: int
    hidden: int
    layers: int
    heads: int
    line: str
    """PEFT's trainable-parameter line (under ``ia3.variant: paper`` the trained count)."""
    act_per_token: float = 0.0
    """Activation bytes per token and layer at 16 bits, without the attention scores (Korthikanti et al.'s 34h
    for a GPT block)."""
    score_bytes: float = 5.0
    """Bytes per head and key position per token and layer at 16 bits for the attention scores (5 with
    Korthikanti's dropout masks, 2 for the softmax output alone)."""
    trained: int = 0
    """IA3 parameters actually trained (``trainable`` less the query entries ``ia3.variant: paper`` fixes)."""


def block_activations(mc: Any) -> tuple[float, float]:
    """``(act_per_token, score_bytes)`` of one decoder block at 16 bits, from the config and the family's block
    facts. Korthikanti et al. (2022) per token: layer norms 4h; attention 2h (q,k,v input) + 2h (q) + 2 kv (k)
    + 2 kv (v) + 2h (output projection input) + h (dropout mask); MLP 2h (input) + 2i + 2i (activation input and
    output) + h (dropout mask), or with a gate 2h + 4 x 2i (gate, up, activation, product). With kv = h, i = 4h
    and the masks: 34h, the published figure (kept for Bloom)."""
    facts = BLOCKS.get(getattr(mc, "model_type", ""), GENERIC_BLOCK)
    h = hidden_size_of(mc) or 0
    heads = mc.num_attention_heads
    head_dim = getattr(mc, "head_dim", None) or h // heads
    kv = (getattr(mc, "num_key_value_heads", None) or heads) * head_dim
    inter = getattr(mc, "intermediate_size", None) or getattr(mc, "ffn_dim", None) or 4 * h
    masks = facts.dropout_masks
    attn = 2 * h + 2 * heads * head_dim + 4 * kv + 2 * heads * head_dim + (h if masks else 0)
    mlp = 2 * h + 8 * inter if facts.gated_mlp else 2 * h + 4 * inter + (h if masks else 0)
    return float(4 * h + attn + mlp), 5.0 if masks else 2.0


def _one_block(mc: Any) -> Any | None:
    """A copy of the config with a single decoder block; None where the family is not known to stack identical
    blocks (the whole model is then built)."""
    if getattr(mc, "model_type", None) not in BLOCKS:
        return None
    one = copy.deepcopy(mc)
    one.num_hidden_layers = 1  # Bloom maps it to n_layer
    if isinstance(getattr(one, "layer_types", None), list):
        one.layer_types = one.layer_types[:1]  # same parameters whatever each layer's attention pattern
    return one


def count_params(mc: Any, section: IA3Section) -> tuple[int, int, int]:
    """``(all, trainable, fixed)`` parameters of the IA3 model: exact, from the real transformers model and PEFT
    on the meta device. Families of identical blocks are built with one block and counted as the parts outside
    the blocks plus L x one block (a 70B model plans in a fraction of a second)."""
    layers = layers_of(mc)
    one = _one_block(mc)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # PEFT calls transformers' deprecated spellings
        peft = build_on_meta(one if one is not None else mc, section)
    blocks = decoder_blocks(peft.get_base_model())
    extra = layers - len(blocks) if one is not None else 0
    if extra and len(blocks) != 1:
        raise RuntimeError(f"{mc.model_type}: expected one decoder block, found {len(blocks)}")

    def total(params: Any, trainable: bool) -> int:
        return sum(p.numel() for p in params if p.requires_grad or not trainable)

    per_block = (total(blocks[0].parameters(), False), total(blocks[0].parameters(), True)) if extra else (0, 0)
    fixed = sum(int(m.sum()) for m in fixed_entries(peft).values())
    fixed_block = sum(int(getattr(m, FIXED).sum()) for m in blocks[0].modules() if hasattr(m, FIXED)) \
        if extra else 0
    return (total(peft.parameters(), False) + extra * per_block[0],
            total(peft.parameters(), True) + extra * per_block[1], fixed + extra * fixed_block)


def model_shape(cfg: RunConfig) -> Shape:
    if cfg.model.arch:
        mc = arch_config(cfg.model.arch)
    else:
        try:
            mc = load_model_config(demo.model_path(cfg.model.path, cfg.data.cache_dir), cfg.model)
        except UsageError as e:
            raise UsageError(f"{e}; or set model.arch to one of the named shapes ({', '.join(ARCHS)}) to plan "
                             f"without it") from None
    n, t, fixed = count_params(mc, cfg.ia3)
    act, score = block_activations(mc)
    return Shape(n, t, mc.vocab_size, hidden_size_of(mc) or 0, layers_of(mc), mc.num_attention_heads,
                 trainable_text(t, n, fixed), act, score, t - fixed)


@dataclass
class RankMemory:
    config: str
    weights: float
    grads: float
    optimizer: float
    activations: float
    cpu: float
    gathered: float = 0.0
    """ZeRO-3's working set of whole parameters."""
    overhead: float = OVERHEAD

    @property
    def gpu_total(self) -> float:
        """Device memory per rank; on CPU ranks (where plan counts nothing as offloaded) all of it."""
        return self.weights + self.grads + self.optimizer + self.activations + self.gathered + self.overhead


def activation_bytes(s: Shape, seq: int, micro: int, b: int, checkpointing: bool) -> float:
    per_layer_full = seq * micro * (s.act_per_token + s.score_bytes * s.heads * seq) * b / 2
    layers = (s.layers * seq * micro * s.hidden * b + per_layer_full) if checkpointing else s.layers * per_layer_full
    logits = seq * micro * s.vocab * 4 * 2  # fp32 logits and their gradient
    return layers + logits


def rank_memory(s: Shape, name: str, stage: int, offload: bool, world: int, seq: int, micro: int, b: int,
                checkpointing: bool, overhead: float = OVERHEAD) -> RankMemory:
    weights_all = s.n_params * b
    weights = weights_all / world if stage == 3 else weights_all
    grads = s.trainable * b / (world if stage >= 2 else 1)
    opt_per = 8 + (4 if b == 2 else 0)
    opt = s.trainable * opt_per / (world if stage >= 1 else 1)
    cpu = 0.0
    if offload:
        cpu = weights + opt
        weights, opt = 0.0, 0.0
    gathered = 0.0
    if stage == 3:
        gathered = (s.vocab * s.hidden + min(live_params(s.hidden), s.n_params)) * b
    return RankMemory(name, weights, grads, opt, activation_bytes(s, seq, micro, b, checkpointing), cpu, gathered,
                      overhead)


def largest_micro(s: Shape, stage: int, offload: bool, world: int, seq: int, b: int, ckpt: bool,
                  gpu_bytes: float, overhead: float = OVERHEAD) -> int:
    m = 0
    while m < 4096 and rank_memory(s, "", stage, offload, world, seq, m + 1, b, ckpt,
                                   overhead).gpu_total <= gpu_bytes:
        m += 1
    return m


def framework_rss() -> float:
    """Host memory of a rank before any model: this process's RSS with the same stack imported."""
    import deepspeed  # noqa: F401 - imported for its footprint
    import peft  # noqa: F401
    import transformers  # noqa: F401

    return rss_gib() * GIB


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
    ckpt = cfg.train.gradient_checkpointing
    cap = gpu_mem_gib * GIB
    overhead = framework_rss() if cpu else OVERHEAD
    unit, total_name = ("CPU rank", "RSS") if cpu else ("GPU", "GPU tot")
    lines = [s.line, f"layout: {nodes} node(s) x {gpus_per_node} {unit}(s) = {world} ranks, {gpu_mem_gib:g} GiB "
             f"each; {cfg.train.precision}, seq {seq}, micro-batch {micro}, gradient checkpointing "
             f"{'on' if ckpt else 'off'}"
             + (f"; framework {overhead / GIB:.2f} GiB per rank (measured here)" if cpu else ""),
             f"{'config':<14}{'weights':>9}{'grads':>9}{'optim':>9}{'activ':>9}{'gather':>9}{total_name:>9}"
             f"{'' if cpu else 'CPU':>9}{'max micro':>11}{'(ckpt)':>8}  GiB per rank"]
    rows = {}
    fits_at = None
    for name, stage, off in STAGES:
        # On CPU ranks "offloaded" memory is the same host memory: count it in place.
        dev_off = off and not cpu
        r = rank_memory(s, name, stage, dev_off, world, seq, micro, b, ckpt, overhead)
        total = r.gpu_total
        mm = largest_micro(s, stage, dev_off, world, seq, b, False, cap, overhead)
        mm_ck = largest_micro(s, stage, dev_off, world, seq, b, True, cap, overhead)
        rows[name] = {"gpu_gib": r.gpu_total / GIB, "cpu_gib": r.cpu / GIB, "total_gib": total / GIB,
                      "max_micro": mm, "max_micro_ckpt": mm_ck, "fits": total <= cap}
        lines.append(f"{name:<14}{gib(r.weights)}{gib(r.grads)}{gib(r.optimizer)}"
                     f"{gib(r.activations)}{gib(r.gathered)}{gib(total)}{'' if cpu else gib(r.cpu):>9}"
                     f"{mm:>11}{mm_ck:>8}")
        if fits_at is None and total <= cap:
            fits_at = name
    est = deepspeed_estimate(s, nodes, gpus_per_node)
    if est and not cpu:
        lines.append(est)
    if fits_at is None:
        lines.append(f"does not fit: even {STAGES[-1][0]} needs {rows[STAGES[-1][0]]['total_gib']:.1f} GiB per "
                     f"{unit} at micro-batch {micro}; turn on train.gradient_checkpointing, lower the micro-batch or "
                     f"add {unit}s")
    else:
        lines.append(f"recommended: deepspeed.config={fits_at} (the lowest stage that fits: least communication); "
                     f"largest micro-batch there {rows[fits_at]['max_micro']} "
                     f"({rows[fits_at]['max_micro_ckpt']} with gradient checkpointing)")
    info = {"n_params": s.n_params, "trainable": s.trainable, "world": world, "rows": rows, "recommended": fits_at,
            "chosen": rows.get(_chosen(cfg)), "overhead_gib": overhead / GIB}
    return "\n".join(lines), info


def _chosen(cfg: RunConfig) -> str:
    name = cfg.deepspeed.config.rsplit("/", 1)[-1].removesuffix(".json")
    return name
