"""The loss the trainer optimises: the *sum* of token cross-entropies, computed only where a label exists."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..data.tokenize import IGNORE_INDEX
from ..errors import UsageError


class RowSelector(Protocol):
    """A family's hook that makes the last block compute only some rows: Bloom's returns just those rows
    (``families.bloom.LastMLPRows``), the others every row with only those exact (``families.rows``)."""

    idx: torch.Tensor | None


Transform = Callable[[torch.Tensor], torch.Tensor]


def _text(config: Any) -> Any:
    """Where the text model's settings live: a multimodal config's nested text config (Gemma 3n/4's
    ``*ForConditionalGeneration`` reads its soft cap there), else the config itself."""
    get = getattr(config, "get_text_config", None)
    if not callable(get):
        return config
    try:
        return get(decoder=True)  # the one that makes the logits where a config also nests a text encoder
    except (TypeError, ValueError):
        return config


def _softcap(attr: str = "final_logit_softcapping", fp32: bool = False) -> Callable[[Any], Transform | None]:
    """``tanh(x / cap) * cap`` with ``cap`` the config's ``attr`` (off when unset), in fp32 where the forward
    upcasts first (the logits' dtype otherwise, as the forward computes it)."""
    def make(config: Any) -> Transform | None:
        cap = getattr(_text(config), attr, None)
        if not cap:
            return None
        if fp32:
            return lambda x: torch.tanh(x.float() / cap) * cap
        return lambda x: torch.tanh(x / cap) * cap
    return make


def _times(attr: str) -> Callable[[Any], Transform | None]:
    def make(config: Any) -> Transform | None:
        scale = getattr(_text(config), attr)
        # Cohere Compass reads an unset scale as 1; Cohere's forward would fail on None, so nothing diverges.
        return None if scale is None else (lambda x: x * scale)
    return make


def _divided_by(attr: str) -> Callable[[Any], Transform | None]:
    def make(config: Any) -> Transform:
        scale = getattr(_text(config), attr)
        return lambda x: x / scale
    return make


def _inkling(config: Any) -> Transform:
    """Inkling divides the hidden states by ``logits_mup_width_multiplier`` before its bias-free head (the same
    as dividing the logits) and drops the logits of the vocabulary's padding rows (``unpadded_vocab_size``), so
    the softmax is over the real tokens only."""
    c = _text(config)
    width, keep = c.logits_mup_width_multiplier, c.unpadded_vocab_size

    def f(x: torch.Tensor) -> torch.Tensor:
        x = x / width
        return x[..., :keep] if keep is not None and keep < x.shape[-1] else x
    return f


def _nothing(config: Any) -> None:
    return None


def _refuse(why: str) -> Callable[[Any], Transform | None]:
    def make(config: Any) -> Transform | None:
        raise UsageError(f"model.path: model_type {getattr(config, 'model_type', None)!r} {why}. ia3-dist's losses "
                         f"compute the logits as get_output_embeddings() applied to base_model's final hidden "
                         f"states, so they would train on logits this model's own forward never produces: this "
                         f"model family is not supported for training")
    return make


def _prediction_head(modules: str) -> Callable[[Any], Transform | None]:
    return _refuse(f"computes its logits through a prediction head of several layers ({modules}), and "
                   f"get_output_embeddings() returns only its last layer, the only one the losses would call")


def _adaptive_softmax(config: Any) -> None:
    """XLM's head is a plain projection unless ``asm`` makes it an adaptive softmax, whose log-probabilities come
    from ``log_prob``, not from calling the module the losses are given."""
    if getattr(config, "asm", False):
        _refuse("uses an adaptive softmax (asm=True): its log-probabilities come from the head's log_prob(), not "
                "from calling get_output_embeddings()")(config)


FINAL_LOGITS: dict[str, Callable[[Any], Transform | None]] = {
    **dict.fromkeys(("gemma2", "gemma3_text", "gemma3n", "gemma3n_text", "gemma4", "gemma4_text", "gemma4_unified",
                     "gemma4_unified_text", "vaultgemma", "nanochat"), _softcap()),
    **dict.fromkeys(("beam", "inkling2_text", "inkling2_loop_text"), _softcap(fp32=True)),
    "recurrent_gemma": _softcap("logits_soft_cap"),
    "xlstm": _softcap("output_logit_soft_cap", fp32=True),
    **dict.fromkeys(("cohere", "cohere2", "cohere2_moe", "cohere_compass_text"), _times("logit_scale")),
    "falcon_h1": _times("lm_head_multiplier"),
    **dict.fromkeys(("granite", "granite_swa", "granitemoe", "granitemoe_swa", "granitemoeshared",
                     "granitemoehybrid", "minicpm3"), _divided_by("logits_scaling")),
    "hyperclovax": _times("logits_scaling"),
    "inkling_text": _inkling,
    # Gemma 3's multimodal forward applies no soft cap, whatever its text config says (its text-only one does).
    "gemma3": _nothing,
    **dict.fromkeys(("gemma4_assistant", "gemma4_unified_assistant"), _refuse(
        "is an assisted-decoding drafter: its forward needs the main model's embeddings and KV states and may "
        "compute logits over a subset of the vocabulary (use_ordered_embeddings)")),
    # Encoder-style LMs used as decoders (is_decoder=True): a dense, activation and LayerNorm before the decoder.
    **dict.fromkeys(("bert", "big_bird", "ernie", "megatron-bert", "rembert", "roc_bert", "roformer"),
                    _prediction_head("cls: dense, activation, LayerNorm, then cls.predictions.decoder")),
    **dict.fromkeys(("roberta", "camembert", "xlm-roberta", "xlm-roberta-xl", "roberta-prelayernorm",
                     "data2vec-text", "xmod"),
                    _prediction_head("lm_head: dense, gelu, layer_norm, then lm_head.decoder")),
    "electra": _prediction_head("generator_predictions: dense, gelu, LayerNorm, then generator_lm_head"),
    "modernbert-decoder": _prediction_head("lm_head: dense, activation, norm, then decoder"),
    "prophetnet": _refuse(
        "predicts from its n-gram predicting streams (the decoder's second output), not from the main stream that "
        "base_model returns first"),
    **dict.fromkeys(("musicgen", "musicgen_melody"), _refuse(
        "has one LM head per audio codebook (get_output_embeddings() is their list) and interleaves the codebooks' "
        "sequences")),
    # base_model is getattr(lm, base_model_prefix, lm): a prefix naming no submodule gives the causal LM itself.
    **dict.fromkeys(("llama4", "llama4_text", "mllama"), _refuse(
        "names 'language_model' as its base_model_prefix but keeps its decoder in .model, so base_model is the "
        "whole causal LM and returns logits, not hidden states")),
    "xlm": _adaptive_softmax,
}
"""``model_type`` -> what its ``*ForCausalLM.forward`` does to the LM head's output before the loss, from the
config. The losses here call the head themselves (only at label rows), so without this they would train these
models on logits their own forward never produces. Keyed by model type, not by attribute: ``logits_scaling``
divides in Granite and multiplies in HyperCLOVA X (MiniCPM3 divides the hidden states, the same for its bias-free
head). Covers every model type of transformers' causal-LM auto mapping whose forward changes its logits, and refuses
those whose logits are not ``get_output_embeddings()`` applied to ``base_model``'s first output at all (a
prediction head of several layers, another stream, several heads, a ``base_model`` that is the whole LM):
``tests/test_final_logits.py`` reads the installed transformers' source to keep it so. A model type not here
whose config sets one of :data:`LOGIT_ATTRS` is refused (:func:`final_logits`)."""


def _off(value: Any, config: Any) -> bool:
    return not value  # a soft cap of None or 0 is no cap


def _one(value: Any, config: Any) -> bool:
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool) and value == 1)


LOGIT_ATTRS: dict[str, Callable[[Any, Any], bool]] = {
    **dict.fromkeys(("final_logit_softcapping", "final_logit_softcap", "logit_softcapping", "logit_softcap",
                     "logits_soft_cap", "logits_softcap", "output_logit_soft_cap", "output_logits_soft_cap"), _off),
    **dict.fromkeys(("logit_scale", "logits_scale", "logit_scaling", "logits_scaling", "logit_multiplier",
                     "logits_multiplier", "lm_head_multiplier", "output_multiplier", "output_multiplier_scale",
                     "output_logits_scale", "logits_mup_width_multiplier", "mup_output_alpha", "mup_width_scale"),
                    _one),
    # MiniCPM's remote code divides the hidden states by hidden_size / dim_model_base before the head.
    "dim_model_base": lambda v, c: v is None or v == getattr(c, "hidden_size", None),
    # Inkling drops the logits past it (a padded vocabulary), so the softmax covers fewer tokens than the head.
    "unpadded_vocab_size": lambda v, c: v is None or v >= getattr(c, "vocab_size", v),
}
"""Config attributes that, in the model families known to use them, soft-cap or scale the LM head's logits (or
its input) in the forward or cut the vocabulary the softmax covers -> whether a value leaves the logits alone.
Names from transformers (Gemma 2, Cohere, Granite, Falcon-H1, Recurrent Gemma, xLSTM, Inkling, Muse) and from
remote-code families (Grok-1's ``output_multiplier_scale``, BTLM's muP ``mup_output_alpha`` x
``mup_width_scale``, MiniCPM's ``dim_model_base``)."""


def logit_settings(config: Any) -> list[str]:
    """``name=value`` for each of :data:`LOGIT_ATTRS` that ``config`` (or its nested text config) sets to a value
    that changes the logits."""
    found = []
    for prefix, c in (("", config), ("text_config.", _text(config))):
        if prefix and c is config:
            continue
        for attr, neutral in LOGIT_ATTRS.items():
            value = getattr(c, attr, None)
            if not neutral(value, c):
                found.append(f"{prefix}{attr}={value!r}")
    return found


def final_logits(config: Any) -> Transform | None:
    """The transform :data:`FINAL_LOGITS` gives ``config``'s model type, or None (logits are the head's output).
    A UsageError for a model type the table refuses, and for one it does not know whose config sets an attribute
    that other families' forwards use to change their logits (:data:`LOGIT_ATTRS`): the losses cannot know what
    this model's forward does with it."""
    model_type = getattr(config, "model_type", None) or ""
    make = FINAL_LOGITS.get(model_type)
    if make is not None:
        return make(config)
    found = logit_settings(config)
    if found:
        raise UsageError(
            f"model.path: model_type {model_type!r} sets {', '.join(found)} in its config, which the model families "
            f"that use {'it' if len(found) == 1 else 'them'} apply to the LM head's logits in their forward (a soft "
            f"cap or a scale). ia3-dist's losses call the LM head themselves and apply only the transforms of the "
            f"model types they know (FINAL_LOGITS in ia3_dist/models/loss.py), which {model_type!r} is not one of, "
            f"so they would train on logits this model's own forward never produces: this model family is not "
            f"supported for training. Please open an issue with its modeling code (what its *ForCausalLM.forward "
            f"does to the logits), or add a FINAL_LOGITS entry for {model_type!r} that does the same")
    return None


def check_head(lm: nn.Module) -> None:
    """What the losses take from a causal LM's structure, checked on its meta-device build before any rank starts:
    a body (``base_model``) that is not the LM itself, and a head module (``get_output_embeddings()``) with a weight.
    A model that breaks either (remote code with a ``base_model_prefix`` naming no submodule, no output embeddings)
    is refused: its first step would fail on every rank once all had loaded it, or train on other logits."""
    model_type = getattr(getattr(lm, "config", None), "model_type", None)
    if getattr(lm, "base_model", lm) is lm:
        raise UsageError(f"model.path: model_type {model_type!r}: its base_model_prefix "
                         f"{getattr(lm, 'base_model_prefix', '')!r} names no submodule, so base_model is the whole "
                         f"causal LM, and the losses (which run base_model for the hidden states, then the head at "
                         f"label rows) would get logits; this model is not supported for training")
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if not isinstance(head, nn.Module) or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise UsageError(f"model.path: model_type {model_type!r}: get_output_embeddings() gives "
                         f"{type(head).__name__}, not an LM head module with a weight, which the losses call at label "
                         f"rows; this model is not supported for training")


def check_final_logits(config: Any) -> None:
    """The preflight's check (before any rank waits): :func:`final_logits` raises now, not in the first step."""
    final_logits(config)


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
                 chunk_bytes: int = 0, inputs: Callable[..., dict[str, Any]] | None = None) -> None:
        super().__init__()
        self.peft = peft_model
        self.rows = last_mlp_rows
        self.chunk_bytes = chunk_bytes
        self.inputs = inputs
        """How a batch becomes the base model's keyword arguments (``families.base.BatchInputs``: the family's
        masks, packed rows); None: the 2-D padding mask as is."""
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

    def base_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                    seq_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None
                    ) -> dict[str, Any]:
        """The base model's keyword arguments besides the ids (see :attr:`inputs`)."""
        if self.inputs is not None:
            return self.inputs(input_ids, attention_mask, seq_ids, position_ids, self.peft.get_base_model().dtype)
        if seq_ids is not None:
            raise ValueError("a packed batch reached a model that was not set up for packing (data.packing)")
        return {"attention_mask": attention_mask}

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, seq_ids: torch.Tensor | None = None,
                label_pos: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``attention_mask``: None where no row is padded. ``seq_ids`` and ``position_ids`` mark a packed batch
        (``data.packing``). ``label_pos`` (from the collator, optional): the flat indices of positions whose next
        token is a label, found on the host, so the device never stops to learn how many rows the head computes."""
        lm = self.peft.get_base_model()
        inputs = self.base_inputs(input_ids, attention_mask, seq_ids, position_ids)
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

    def forward(self, input_ids: torch.Tensor, pos: torch.Tensor, target: torch.Tensor,  # type: ignore[override]
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        lm = self.peft.get_base_model()
        inputs = self.base_inputs(input_ids, attention_mask)
        if self.rows is not None:
            self.rows.idx = pos
            try:
                hidden = lm.base_model(input_ids=input_ids, use_cache=False, **inputs)[0]
            finally:
                self.rows.idx = None
        else:
            hidden = lm.base_model(input_ids=input_ids, use_cache=False, **inputs)[0]
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


def row_sums(values: torch.Tensor, gather: torch.Tensor) -> torch.Tensor:
    """Per row, the sum of its positions' ``values`` (``gather``: :func:`..data.collate.pair_batch`'s
    ``row_gather``), with no host sync. Deterministic, so the reference pass and the step add alike (a pair whose
    policy is still the reference has a margin of exactly 0): on the CPU a running sum in order (torch's CPU cumsum
    accumulates in double), the same bits whatever else is in the micro-batch (the padding zeros come after); on
    a GPU, where index_add adds in atomics' order and a float cumsum may too, a reduction over the fixed shape."""
    per_row = torch.cat([values, values.new_zeros(1)])[gather]
    return per_row.cumsum(1)[:, -1] if per_row.device.type == "cpu" else per_row.sum(1)
