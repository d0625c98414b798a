"""Bloom's exact speed-ups: its GeLU as one fused kernel, attention through SDPA with the ALiBi bias, and the last
block's MLP only at label rows."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import Family
from .packed import PackedInputs, document_mask


class TanhGelu(nn.Module):
    """Bloom's GeLU (tanh approximation) as one fused ATen kernel with a fused backward. Bloom's own version is
    the same formula spelled as a Python autograd function of ~10 elementwise kernels: about 12% of a CPU training
    step on a 100M model. Results differ only in the last bits (max 5e-7)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")


def fuse_activations(model: nn.Module) -> int:
    """Swap Bloom's GeLU modules for :class:`TanhGelu`; returns how many were swapped."""
    from transformers.models.bloom.modeling_bloom import BloomGelu

    n = 0
    for mod in model.modules():
        if isinstance(getattr(mod, "gelu_impl", None), BloomGelu):
            mod.gelu_impl = TanhGelu()
            n += 1
    return n




def _sdpa_forward(self: nn.Module, hidden_states: torch.Tensor, residual: torch.Tensor, alibi: torch.Tensor,
                  attention_mask: torch.Tensor | None, layer_past: object = None, use_cache: bool = False,
                  output_attentions: bool = False, **kwargs: object) -> tuple[torch.Tensor, None]:
    """``BloomAttention.forward`` through ``scaled_dot_product_attention``: the ALiBi bias and the additive
    causal/padding mask go in as one float mask, the scale is Bloom's 1/sqrt(head_dim). Bloom computes
    ``alibi + scale * q k^T + mask``, softmax, then ``@ v``; SDPA computes the same, without keeping the
    probabilities for the backward pass (the fused kernels recompute them). Generation with a cache, returned
    attention weights and Bloom's tensor-parallel slicing keep the eager path."""
    from transformers.models.bloom.modeling_bloom import dropout_add

    if layer_past is not None or output_attentions or (self.pretraining_tp > 1 and self.slow_but_exact):
        return type(self).forward(self, hidden_states, residual, alibi, attention_mask, layer_past, use_cache,
                                  output_attentions, **kwargs)
    b, t, _ = hidden_states.shape
    q, k, v = self._reshape(self.query_key_value(hidden_states))  # [b, heads, t, head_dim]
    bias = alibi.view(b, self.num_heads, 1, -1)  # [b * heads, 1, kv] -> broadcast over query rows
    if attention_mask is None:
        causal = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
        attention_mask = torch.zeros(t, t, dtype=q.dtype, device=q.device).masked_fill(causal,
                                                                                        torch.finfo(q.dtype).min)
    mask = (bias + attention_mask).to(q.dtype)
    ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.inv_norm_factor,
                                         dropout_p=self.attention_dropout.p if self.training else 0.0)
    ctx = ctx.transpose(1, 2).reshape(b, t, self.hidden_size)
    out = dropout_add(self.dense(ctx), residual, self.hidden_dropout, self.training)
    return out, None


def _flex_forward(self: nn.Module, hidden_states: torch.Tensor, residual: torch.Tensor, alibi: torch.Tensor,
                  attention_mask: torch.Tensor | None, layer_past: object = None, use_cache: bool = False,
                  output_attentions: bool = False, **kwargs: object) -> tuple[torch.Tensor, None]:
    """``BloomAttention.forward`` through FlexAttention: ALiBi is a ``score_mod`` (Bloom's per-key bias
    ``slope x position``, in fp32, as Bloom adds it) and the causal/padding or per-document mask is applied in
    the same ``score_mod`` with Bloom's own fill value (the dtype's minimum: a row that sees nothing averages
    every value, as in eager, on the reference path; compiled, inductor scales scores by 1/ln 2, the fill becomes
    -inf and such a row gives 0, finite too: only left-padding query rows see nothing, and none reaches the loss).
    Compiled (always on a GPU: :func:`_flex_attention`), the scores never exist in memory;
    eager (CPU without ``train.compile``), it is a reference implementation, for the exactness tests.
    Generation with a cache, returned attention weights and Bloom's tensor-parallel slicing keep the eager
    path."""
    from torch.nn.attention.flex_attention import flex_attention
    from transformers.models.bloom.modeling_bloom import dropout_add

    if (layer_past is not None or output_attentions or (self.pretraining_tp > 1 and self.slow_but_exact)
            or (self.training and self.attention_dropout.p > 0)):
        return type(self).forward(self, hidden_states, residual, alibi, attention_mask, layer_past, use_cache,
                                  output_attentions, **kwargs)
    b, t, _ = hidden_states.shape
    q, k, v = self._reshape(self.query_key_value(hidden_states))  # [b, heads, t, head_dim]
    bias = alibi.view(b, self.num_heads, -1).float()
    if attention_mask is None:
        allowed = torch.ones(t, t, dtype=torch.bool, device=q.device).tril().expand(b, t, t)
    elif attention_mask.dtype == torch.bool:
        allowed = attention_mask[:, 0]
    else:
        allowed = attention_mask[:, 0] == 0
    fill = torch.finfo(q.dtype).min

    def score_mod(score: torch.Tensor, bi: torch.Tensor, h: torch.Tensor, qi: torch.Tensor,
                  ki: torch.Tensor) -> torch.Tensor:
        return torch.where(allowed[bi, qi, ki], score + bias[bi, h, ki], fill)

    ctx = _flex_attention(flex_attention, q, k, v, score_mod, self.inv_norm_factor)
    ctx = ctx.transpose(1, 2).reshape(b, t, self.hidden_size)
    out = dropout_add(self.dense(ctx), residual, self.hidden_dropout, self.training)
    return out, None


_compiled_flex: Any = None


def _flex_attention(flex: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, score_mod: Any,
                    scale: float) -> torch.Tensor:
    """``flex`` compiled on a GPU: called eagerly, torch runs FlexAttention's unfused reference path (the whole
    score matrix in memory, and a warning). Inside ``train.compile``'s graphs it is compiled with them; on CPU
    it stays eager (the exactness tests' path)."""
    global _compiled_flex
    if q.device.type != "cuda" or torch.compiler.is_compiling():
        return flex(q, k, v, score_mod=score_mod, scale=scale)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex)
    return _compiled_flex(q, k, v, score_mod=score_mod, scale=scale)


FORWARDS = {"sdpa": _sdpa_forward, "flex": _flex_forward}


def set_attention(model: nn.Module, kind: str) -> int:
    """``sdpa`` / ``flex``: every BloomAttention runs :func:`_sdpa_forward` / :func:`_flex_forward` (per instance;
    the class is untouched); ``eager``: Bloom's own. Returns how many modules were set."""
    from transformers.models.bloom.modeling_bloom import BloomAttention

    n = 0
    for mod in model.modules():
        if isinstance(mod, BloomAttention):
            if kind in FORWARDS:
                mod.forward = FORWARDS[kind].__get__(mod)
            else:
                mod.__dict__.pop("forward", None)
            n += 1
    return n


class LastMLPRows:
    """Pre-hooks on the last Bloom block that hand its post-attention layernorm and MLP only the rows in ``idx``
    (flat batch x position indices); the block then returns those rows, in order, as an (N, hidden) tensor.
    Every op after the attention is row-wise, so those rows are computed exactly as before; the others never
    reach the loss, so the MLP (2/3 of a layer's FLOPs) is skipped on prompt and padding positions."""

    def __init__(self, block: nn.Module) -> None:
        self.idx: torch.Tensor | None = None
        block.post_attention_layernorm.register_forward_pre_hook(self._norm_rows)
        block.mlp.register_forward_pre_hook(self._mlp_rows)

    def _select(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, x.shape[-1]).index_select(0, self.idx)

    def _norm_rows(self, _mod: nn.Module, args: tuple) -> tuple | None:
        if self.idx is None:
            return None
        return (self._select(args[0]), *args[1:])

    def _mlp_rows(self, _mod: nn.Module, args: tuple) -> tuple | None:
        if self.idx is None:
            return None
        hidden, residual = args[0], args[1]
        if residual.dim() == 3:  # the attention output; already selected when the residual is the layernorm's
            residual = self._select(residual)
        return (hidden, residual, *args[2:])


def last_rows(model: nn.Module) -> LastMLPRows:
    """The row selector on the last block of a ``BloomForCausalLM``."""
    return LastMLPRows(model.transformer.h[-1])


def _alibi_slopes(num_heads: int, device: torch.device) -> torch.Tensor:
    """Bloom's per-head ALiBi slopes, read from its own ``build_alibi_tensor`` (a 2-token mask gives slope x 1)."""
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    ones = torch.ones(1, 2, dtype=torch.long, device=device)
    return build_alibi_tensor(ones, num_heads, torch.float32).view(num_heads, 2)[:, 1]


def _document_alibi(self: nn.Module, attention_mask: torch.Tensor, num_heads: int, dtype: torch.dtype
                    ) -> torch.Tensor:
    """``BloomModel.build_alibi_tensor`` that also takes a packed batch's 4-D document mask. Bloom's ALiBi is
    ``slope x key position`` (the query's own term cancels in the softmax); unpacked, the position is the token's
    index among the row's real tokens. Packed, it must be the index within its document: exactly the number of
    keys the token's own query row may see, minus one. Same formula and dtypes as Bloom's, so a document gets the
    bias it has unpadded, bit for bit."""
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    if attention_mask.dim() != 4:
        return build_alibi_tensor(attention_mask, num_heads, dtype)
    rows, _, t, _ = attention_mask.shape
    pos = ((attention_mask[:, 0] == 0).sum(-1) - 1)[:, None, :]
    alibi = _alibi_slopes(num_heads, attention_mask.device)[..., None] * pos
    return alibi.reshape(rows * num_heads, 1, t).to(dtype)


def packed_inputs(model: nn.Module) -> PackedInputs:
    """Bloom ignores ``position_ids`` and builds ALiBi and its causal mask from a 2-D mask, so a flattened batch
    lets every document see the previous ones. Packed, it gets the 4-D per-document mask (which transformers
    passes through as is) and ALiBi from each document's own positions (:func:`_document_alibi`, set on this
    model's ``BloomModel`` only)."""
    import types

    model.transformer.build_alibi_tensor = types.MethodType(_document_alibi, model.transformer)

    def inputs(seq_ids: torch.Tensor, _position_ids: torch.Tensor, dtype: torch.dtype) -> dict[str, object]:
        return {"attention_mask": document_mask(seq_ids, dtype)}

    return inputs


FAMILY = Family(model_type="bloom", name="Bloom", target_modules=("query_key_value", "mlp.dense_4h_to_h"),
                feedforward_modules=("mlp.dense_4h_to_h",), blocks="transformer.h", checkpoint_prefix="transformer",
                fuse_activations=fuse_activations, last_rows=last_rows, attention=set_attention,
                packed_inputs=packed_inputs, dropout_probs=("hidden_dropout",))
