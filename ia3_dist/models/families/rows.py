"""The last block's MLP only at label rows, for blocks that add the MLP's output to the residual themselves
(Llama, Qwen2, Mistral, GPT-NeoX): ``h = residual + mlp(post_attention_layernorm(x))``."""

from __future__ import annotations

import torch
from torch import nn


class ScatterMLPRows:
    """Hooks on one decoder block: its post-attention norm (and so the MLP) gets only the rows in ``idx`` (flat
    batch x position indices), and the MLP's (N, hidden) output is scattered back into a zero (batch, T, hidden)
    tensor. The block's own residual add then runs unchanged: the rows in ``idx`` are computed exactly as before,
    every other row becomes ``residual + 0``. Those rows never reach the loss (the final norm is row-wise), so the
    MLP, most of a layer's FLOPs (3 of 4 in a Llama layer with GQA), is skipped on prompt and padding positions.
    Unlike Bloom's selector the block still returns every row; :class:`~ia3_dist.models.loss.TokenSumLM` picks
    the label rows afterwards."""

    def __init__(self, block: nn.Module) -> None:
        self.idx: torch.Tensor | None = None
        self._shape: torch.Size | None = None
        block.post_attention_layernorm.register_forward_pre_hook(self._norm_rows)
        block.mlp.register_forward_hook(self._scatter)

    def _norm_rows(self, _mod: nn.Module, args: tuple) -> tuple | None:
        if self.idx is None:
            return None
        x = args[0]
        self._shape = x.shape
        return (x.reshape(-1, x.shape[-1]).index_select(0, self.idx), *args[1:])

    def _scatter(self, _mod: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor | None:
        if self.idx is None:
            return None
        shape, self._shape = self._shape, None
        assert shape is not None, "the MLP ran without the post-attention norm before it"
        full = out.new_zeros(shape[:-1].numel(), out.shape[-1]).index_copy(0, self.idx, out)
        return full.view(*shape[:-1], out.shape[-1])
