"""The per-rank memory model behind ``ia3-dist plan`` and ``train.micro_batch_size: auto``: exact parameter counts
from the real transformers model and PEFT on the meta device, and bytes per rank for weights, gradients,
optimizer states, activations and ZeRO-3's gathered working set (the formulas are in :mod:`ia3_dist.tools.plan`'s
docstring)."""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any

from ..config import IA3Section
from ..config.archs import BLOCKS, GENERIC_BLOCK
from ..runtime.ds_config import live_params
from ..runtime.hostmem import rss_gib
from .ia3 import FIXED, build_on_meta, fixed_entries, trainable_text
from .load import decoder_blocks, hidden_size_of, layers_of

GIB = 2**30
OVERHEAD = 1.5 * GIB


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
    Korthikanti's dropout masks, 2 for the softmax output alone, 6 for eager attention's fp32 softmax and its
    16-bit copy)."""
    backward_layers: float = 0.0
    """Layers' worth of activations the backward holds on top of the stored ones while it runs a layer (1.25 for
    eager attention: its score gradients)."""
    trained: int = 0
    """IA3 parameters actually trained (``trainable`` less the query entries ``ia3.variant: paper`` fixes)."""
    loss_chunk_bytes: int = 1024 << 20
    """``train.loss_chunk_mib`` in bytes (0: never chunked): at most this much of fp32 logits exists at a time."""


def block_activations(mc: Any) -> tuple[float, float, float]:
    """``(act_per_token, score_bytes, backward_layers)`` of one decoder block at 16 bits, from the config and the
    family's block facts (see :class:`..config.archs.BlockFacts` for eager attention's scores). Korthikanti et al.
    (2022) per token: layer norms 4h; attention 2h (q,k,v input) + 2h (q) + 2 kv (k) + 2 kv (v) + 2h (output
    projection input) + h (dropout mask); MLP 2h (input) + 2i + 2i (activation input and output) + h (dropout
    mask), or with a gate 2h + 4 x 2i (gate, up, activation, product). With kv = h, i = 4h and the masks: 34h, the
    published figure (kept for Bloom)."""
    facts = BLOCKS.get(getattr(mc, "model_type", ""), GENERIC_BLOCK)
    h = hidden_size_of(mc) or 0
    heads = mc.num_attention_heads
    head_dim = getattr(mc, "head_dim", None) or h // heads
    kv = (getattr(mc, "num_key_value_heads", None) or heads) * head_dim
    inter = getattr(mc, "intermediate_size", None) or getattr(mc, "ffn_dim", None) or 4 * h
    masks = facts.dropout_masks
    attn = 2 * h + 2 * heads * head_dim + 4 * kv + 2 * heads * head_dim + (h if masks else 0)
    mlp = 2 * h + 8 * inter if facts.gated_mlp else 2 * h + 4 * inter + (h if masks else 0)
    # A config.json naming eager attention ("attn_implementation": "eager") makes any family keep the fp32
    # softmax and its 16-bit copy, as Bloom's own attention does: charged as such (an SDPA charge was half of it).
    if facts.eager_scores or getattr(mc, "_attn_implementation", None) == "eager":
        return float(4 * h + attn + mlp), 6.0, 1.25
    return float(4 * h + attn + mlp), 5.0 if masks else 2.0, 0.0


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


def shape_of(mc: Any, section: IA3Section, loss_chunk_mib: int = 1024) -> Shape:
    """The planning shape of the model ``mc`` describes (a config, no weights) with IA3 as ``section`` says, and
    the loss's chunk size (``train.loss_chunk_mib``)."""
    n, t, fixed = count_params(mc, section)
    act, score, backward = block_activations(mc)
    return Shape(n, t, mc.vocab_size, hidden_size_of(mc) or 0, layers_of(mc), mc.num_attention_heads,
                 trainable_text(t, n, fixed), act, score, backward, t - fixed, loss_chunk_mib << 20)


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
    layers += s.backward_layers * per_layer_full  # the layer the backward is in, its transients on top
    # The loss's peak: one chunk of rows' fp32 logits, their log-softmax and its gradient at once (three rows x
    # vocab fp32 tensors, 12.25 bytes per element measured); the loss takes the rows in chunks of
    # train.loss_chunk_mib (models/loss.py), so more rows never hold more than one chunk.
    rows = seq * micro
    chunk = max(1, s.loss_chunk_bytes // (4 * s.vocab)) if s.loss_chunk_bytes else rows
    logits = min(rows, chunk) * s.vocab * 12
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


STAGES = (("zero0", 0, False), ("zero1", 1, False), ("zero2", 2, False), ("zero3", 3, False),
          ("zero3_offload", 3, True))
"""The shipped DeepSpeed configs in the order plan and ``deepspeed.config: auto`` try them: least communication
first. IA3 trains ~0.03% of the weights, so ZeRO-0/1 (gradients reduced once, at the accumulation boundary) fit
wherever the frozen weights do; ZeRO-2 reduces at every micro-step and ZeRO-3 gathers every layer."""


def candidate_stages(b: int, compiled: bool = False) -> tuple[tuple[str, int, bool], ...]:
    """:data:`STAGES` a recommendation may pick at ``b`` bytes per weight. Mixed precision (b = 2) starts at
    ZeRO-1: DeepSpeed 0.19's stage-0 fp16 optimizer checks every tensor for overflow at every step (its loss
    scaling needs it), a host sync per tensor, and ZeRO-1 costs IA3 nothing (its optimizer state is a few MB). In
    bf16 the launcher runs stage 0 without those checks (``runtime/ds_syncs``), and ZeRO-1 trains the same.
    ``compiled`` (``train.compile``): no ZeRO-3, which the launcher refuses with it (its parameter hooks)."""
    return tuple(st for st in (STAGES[1:] if b == 2 else STAGES) if not (compiled and st[1] == 3))


def lowest_stage(s: Shape, world: int, seq: int, micro: int, b: int, ckpt: bool, cap: float,
                 overhead: float = OVERHEAD, host: bool = False, compiled: bool = False,
                 host_cap: float | None = None) -> tuple[str, float] | None:
    """``(config name, bytes per rank)`` of the first of :func:`candidate_stages` that fits ``cap`` bytes per rank
    at this micro-batch, or None. ``host``: CPU ranks, where offloaded memory is the same memory. ``host_cap``: on
    GPU ranks, the host memory a rank may use, which an offloading stage's host part must fit too."""
    for name, stage, off in candidate_stages(b, compiled):
        mem = rank_memory(s, name, stage, off and not host, world, seq, micro, b, ckpt, overhead)
        if mem.gpu_total <= cap and (host or host_cap is None or mem.cpu <= host_cap):
            return name, mem.gpu_total
    return None


def largest_micro(s: Shape, stage: int, offload: bool, world: int, seq: int, b: int, ckpt: bool,
                  gpu_bytes: float, overhead: float = OVERHEAD) -> int:
    m = 0
    while m < 4096 and rank_memory(s, "", stage, offload, world, seq, m + 1, b, ckpt,
                                   overhead).gpu_total <= gpu_bytes:
        m += 1
    return m


def framework_rss() -> float:
    """Host memory of a rank before any model: this process's RSS with the same stack imported, DeepSpeed as a
    rank imports it (without MLflow: :func:`..runtime.lazy.import_deepspeed`)."""
    from ..runtime.lazy import import_deepspeed

    import_deepspeed()
    import peft  # noqa: F401 - imported for its footprint
    import transformers  # noqa: F401

    return rss_gib() * GIB
