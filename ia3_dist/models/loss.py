"""The loss the trainer optimises: the *sum* of token cross-entropies, computed only where a label exists."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..data.tokenize import IGNORE_INDEX


class RowSelector(Protocol):
    """A family's hook that makes the last block compute only some rows: Bloom's returns just those rows
    (``families.bloom.LastMLPRows``), the others every row with only those exact (``families.rows``)."""

    idx: torch.Tensor | None


def _softcap(config: Any) -> Callable[[torch.Tensor], torch.Tensor] | None:
    cap = getattr(config, "final_logit_softcapping", None)
    return None if not cap else (lambda x: torch.tanh(x / cap) * cap)


def _times(attr: str) -> Callable[[Any], Callable[[torch.Tensor], torch.Tensor] | None]:
    def make(config: Any) -> Callable[[torch.Tensor], torch.Tensor]:
        scale = getattr(config, attr)
        return lambda x: x * scale
    return make


def _divided_by(attr: str) -> Callable[[Any], Callable[[torch.Tensor], torch.Tensor] | None]:
    def make(config: Any) -> Callable[[torch.Tensor], torch.Tensor]:
        scale = getattr(config, attr)
        return lambda x: x / scale
    return make


FINAL_LOGITS: dict[str, Callable[[Any], Callable[[torch.Tensor], torch.Tensor] | None]] = {
    **dict.fromkeys(("gemma2", "gemma3_text", "gemma3n_text", "vaultgemma", "nanochat"), _softcap),
    **dict.fromkeys(("cohere", "cohere2"), _times("logit_scale")),
    **dict.fromkeys(("granite", "granite_swa", "granitemoe", "granitemoe_swa", "granitemoeshared",
                     "granitemoehybrid", "minicpm3"), _divided_by("logits_scaling")),
    "hyperclovax": _times("logits_scaling"),
}
"""``model_type`` -> what its ``*ForCausalLM.forward`` does to the LM head's output before the loss, from the
config. The losses here call the head themselves (only at label rows), so without this they would train these
models on logits their own forward never produces. Keyed by model type, not by attribute: ``logits_scaling``
divides in Granite and multiplies in HyperCLOVA X (MiniCPM3 divides the hidden states, the same for its bias-free
head)."""


def final_logits(config: Any) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The transform :data:`FINAL_LOGITS` gives ``config``'s model type, or None (logits are the head's output)."""
    make = FINAL_LOGITS.get(getattr(config, "model_type", None) or "")
    return make(config) if make is not None else None


def head_logits(lm: nn.Module, head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """``lm``'s logits of ``hidden`` rows: its LM ``head`` and the final transform its own forward applies."""
    logits = head(hidden)
    f = final_logits(lm.config)
    return f(logits) if f is not None else logits


class TokenSumLM(nn.Module):
    """Wraps the PEFT model; ``forward`` returns the *sum* of token cross-entropies and the label-token count.

    The trainer divides by the label-token count of the whole global batch (all micro-batches, all ranks), which
    is what HF Trainer (transformers >= 4.46) does through ``num_items_in_batch``. Logits are computed only at
    positions whose shifted label is not ``IGNORE_INDEX``, so the vocabulary projection skips the prompt and the
    padding.
    """

    def __init__(self, peft_model: nn.Module, last_mlp_rows: RowSelector | None = None,
                 chunk_bytes: int = 0, packed: Callable[..., dict[str, Any]] | None = None) -> None:
        super().__init__()
        self.peft = peft_model
        self.rows = last_mlp_rows
        self.chunk_bytes = chunk_bytes
        self.packed = packed
        """The family's packed-batch inputs (``data.packing``; see ``families.packed``), None when not packing."""
        self.agree: Callable[[int], int] | None = None
        """Under ZeRO-3 on several ranks: the number of LM-head chunks all ranks use, from this rank's (the most any
        rank needs). Every head call gathers the head's partitions, a collective: ranks that chunked their rows
        differently called it a different number of times and their collectives crossed."""

    def chunks(self, hidden: torch.Tensor, vocab: int) -> int:
        """How many pieces the LM head takes ``hidden``'s rows in (:attr:`chunk_bytes` of fp32 logits each)."""
        if self.chunk_bytes <= 0:  # train.loss_chunk_mib: 0, never chunked (on every rank alike)
            return 1
        n = max(1, -(-len(hidden) // max(1, self.chunk_bytes // (4 * vocab))))
        return self.agree(n) if self.agree is not None else n

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Only trainable tensors. DeepSpeed's ``exclude_frozen_parameters`` drops frozen names it finds in
        ``named_parameters()``, which lists a tied weight once; Bloom's frozen ``lm_head.weight`` (tied to the
        embeddings) would otherwise ride along in every checkpoint under its second name."""
        sd = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        for name, p in self.named_parameters(remove_duplicate=False):
            if not p.requires_grad:
                sd.pop(prefix + name, None)
        return sd

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                position_ids: torch.Tensor | None = None, seq_ids: torch.Tensor | None = None,
                label_pos: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``seq_ids`` and ``position_ids`` mark a packed batch (``data.packing``). ``label_pos`` (from the
        collator, optional): the flat indices of positions whose next token is a label, found on the host, so the
        device never stops to learn how many rows the head computes."""
        lm = self.peft.get_base_model()
        if seq_ids is not None:
            if self.packed is None:
                raise ValueError("a packed batch reached a model that was not set up for packing (data.packing)")
            inputs = self.packed(seq_ids, position_ids, lm.dtype)
        else:
            inputs = {"attention_mask": attention_mask}
        # Flat (row x position) targets: position t predicts label t+1; the last position predicts nothing.
        flat_target = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)
        if label_pos is None:
            label_pos = (flat_target != IGNORE_INDEX).nonzero().squeeze(1)
        if self.rows is not None:
            self.rows.idx = label_pos
            try:
                hidden = lm.base_model(input_ids=input_ids, use_cache=False, **inputs)[0]
            finally:
                self.rows.idx = None  # other callers of the model (eval via peft, generation) see every row
        else:
            hidden = lm.base_model(input_ids=input_ids, use_cache=False, **inputs)[0]
        if hidden.dim() == 3:  # every row came back (no selector, or families.rows.ScatterMLPRows)
            hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, label_pos)
        count = torch.full((), label_pos.numel(), dtype=torch.long, device=labels.device)
        return self.head_loss(lm, hidden, flat_target.index_select(0, label_pos)), count

    def head_loss(self, lm: nn.Module, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Sum of cross-entropies of ``hidden`` rows through the LM head. When the fp32 logits of all rows would
        pass ``chunk_bytes``, rows go through in chunks of that size, each recomputed in the backward pass
        (non-reentrant checkpoint: ZeRO-3 gathers the head again), so at most one chunk's logits exist at a time:
        a 250,880-token vocabulary (bloom-560m..176b) costs 1 MB of fp32 logits per row. The extra cost is one
        more LM-head forward over the chunked rows."""
        head = lm.get_output_embeddings()
        # out_features, not weight.shape: under ZeRO-3 the weight is a partition.
        vocab = getattr(head, "out_features", None) or lm.config.vocab_size
        n = self.chunks(hidden, vocab)
        if n == 1:
            return F.cross_entropy(head_logits(lm, head, hidden).float(), target, reduction="sum")

        def ce(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(head_logits(lm, head, h).float(), t, reduction="sum")

        grad = torch.is_grad_enabled()
        parts = [checkpoint(ce, h, t, use_reentrant=False) if grad else ce(h, t)
                 for h, t in zip(hidden.tensor_split(n), target.tensor_split(n), strict=True)]
        return torch.stack(parts).sum()


class TokenLogpLM(TokenSumLM):
    """For sequence-level objectives (preference pairs): ``forward`` returns the log-probability of each target
    token at the flat positions ``pos`` (fp32, with gradient), which the objective sums per row. Only those
    positions go through the last block's row selector and the LM head."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pos: torch.Tensor,  # type: ignore[override]
                target: torch.Tensor) -> torch.Tensor:
        lm = self.peft.get_base_model()
        if self.rows is not None:
            self.rows.idx = pos
            try:
                hidden = lm.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]
            finally:
                self.rows.idx = None
        else:
            hidden = lm.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]
        if hidden.dim() == 3:
            hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, pos)
        head = lm.get_output_embeddings()
        vocab = getattr(head, "out_features", None) or lm.config.vocab_size
        n = self.chunks(hidden, vocab)

        def logp(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return torch.log_softmax(head_logits(lm, head, h).float(), -1).gather(1, t[:, None]).squeeze(1)

        if n == 1:
            return logp(hidden, target)
        grad = torch.is_grad_enabled()
        return torch.cat([checkpoint(logp, h, t, use_reentrant=False) if grad else logp(h, t)
                          for h, t in zip(hidden.tensor_split(n), target.tensor_split(n), strict=True)])
