"""Tokenizer, base model and the IA3 adapter; and the token-sum loss the trainer optimises."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import IA3Section, ModelConfig
from .errors import UsageError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_model_path(cfg: ModelConfig, cache_dir: str | None = None) -> str:
    """``demo:tiny-bloom`` -> the cached demo model dir (built on first use); anything else unchanged."""
    if cfg.path.startswith("demo:"):
        from . import demo

        return str(demo.ensure_model(cfg.path, cache_dir))
    return cfg.path


def load_tokenizer(cfg: ModelConfig, model_path: str) -> Any:
    from transformers import AutoTokenizer

    src = cfg.tokenizer or model_path
    from .preflight import check_tokenizer_dir

    check_tokenizer_dir(src)
    try:
        tok = AutoTokenizer.from_pretrained(src, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise UsageError(f"tokenizer {src}: cannot load it ({type(e).__name__}: {e})") from None
    if tok.eos_token is None:
        raise UsageError(f"tokenizer {src} has no eos token; add one to its special_tokens_map.json")
    if tok.pad_token is None:
        # DataCollatorForSeq2Seq needs a pad id; the padded positions are masked so eos is a safe stand-in.
        tok.pad_token = tok.eos_token
    return tok


def load_base_model(cfg: ModelConfig, model_path: str, precision: str) -> nn.Module:
    """``from_pretrained`` in the training dtype: every rank holds the whole model (ZeRO 0-2; ZeRO-3 loads
    through :mod:`ia3_dist.zero_load` instead)."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(model_path, revision=cfg.revision, dtype=DTYPES[precision],
                                                    trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise UsageError(f"model.path {model_path}: cannot load the model ({e})") from None


class TanhGelu(nn.Module):
    """Bloom's GeLU (tanh approximation) as one fused ATen kernel with a fused backward. Bloom's own version is
    the same formula spelled as a Python autograd function of ~10 elementwise kernels: about 12% of a CPU training
    step on a 100M model. Results differ only in the last bits (max 5e-7)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")


def fuse_gelu(model: nn.Module) -> int:
    """Swap Bloom's GeLU modules for :class:`TanhGelu`; returns how many were swapped (0 for other models)."""
    n = 0
    for mod in model.modules():
        if type(getattr(mod, "gelu_impl", None)).__name__ == "BloomGelu":
            mod.gelu_impl = TanhGelu()
            n += 1
    return n


def ia3_config(section: IA3Section) -> Any:
    from peft import IA3Config, TaskType

    kw: dict[str, Any] = {"task_type": TaskType.CAUSAL_LM}
    if section.target_modules is not None:
        kw["target_modules"] = list(section.target_modules)
        kw["feedforward_modules"] = list(section.feedforward_modules or [])
    return IA3Config(**kw)


def apply_ia3(model: nn.Module, section: IA3Section) -> Any:
    from peft import get_peft_model

    try:
        return get_peft_model(model, ia3_config(section))
    except ValueError as e:  # e.g. target modules not found in the model
        raise UsageError(f"ia3: {e}") from None


def trainable_line(peft_model: Any) -> str:
    """PEFT's own ``print_trainable_parameters`` line, captured (it also counts ZeRO-3 partitioned params)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        peft_model.print_trainable_parameters()
    return buf.getvalue().strip()


def base_on_meta(config: Any, trust_remote_code: bool = False) -> nn.Module:
    """The base model of an architecture from its config alone: no weights, no memory (meta device)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def build_on_meta(config: Any, section: IA3Section | None = None) -> Any:
    """The IA3 model of an architecture from its config alone (meta device)."""
    return apply_ia3(base_on_meta(config), section or IA3Section())


def trainable_named_parameters(peft_model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]


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

    @staticmethod
    def install(model: nn.Module) -> LastMLPRows | None:
        """On the last block of a Bloom model; None for other architectures."""
        blocks = getattr(getattr(model, "transformer", None), "h", None)
        if not blocks or type(blocks[-1]).__name__ != "BloomBlock":
            return None
        return LastMLPRows(blocks[-1])


class TokenSumLM(nn.Module):
    """Wraps the PEFT model; ``forward`` returns the *sum* of token cross-entropies and the label-token count.

    The trainer divides by the label-token count of the whole global batch (all micro-batches, all ranks), which
    is what HF Trainer (transformers >= 4.46) does through ``num_items_in_batch``. Logits are computed only at
    positions whose shifted label is not -100, so the vocabulary projection skips the prompt and the padding.
    """

    def __init__(self, peft_model: nn.Module, last_mlp_rows: LastMLPRows | None = None) -> None:
        super().__init__()
        self.peft = peft_model
        self.rows = last_mlp_rows

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

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lm = self.peft.get_base_model()
        target = labels[:, 1:]
        keep = target != -100
        if self.rows is None:
            out = lm.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            hidden = out[0][:, :-1][keep]
        else:
            # Positions t < T-1 whose next token is a label, as flat indices: the same rows, in the same order,
            # as hidden[:, :-1][keep].
            at = F.pad(keep, (0, 1))
            self.rows.idx = at.reshape(-1).nonzero().squeeze(1)
            try:
                hidden = lm.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]
            finally:
                self.rows.idx = None  # other callers of the model (eval via peft, generation) see every row
        logits = lm.get_output_embeddings()(hidden).float()
        loss_sum = F.cross_entropy(logits, target[keep], reduction="sum")
        return loss_sum, keep.sum()


def load_model_config(model_path: str, cfg: ModelConfig) -> Any:
    """The model's config.json (shapes for ZeRO bucket sizes and the vocabulary check), without weights."""
    from transformers import AutoConfig

    try:
        c = AutoConfig.from_pretrained(model_path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        if Path(model_path).exists():
            raise UsageError(f"model.path {model_path}: cannot read config.json ({e})") from None
        raise UsageError(f"model.path {model_path}: not a local dir and not reachable on the hub ({e})") from None
    return c


def hidden_size_of(model_config: Any) -> int | None:
    return getattr(model_config, "hidden_size", None) or getattr(model_config, "n_embed", None)


def layers_of(model_config: Any) -> int:
    return getattr(model_config, "n_layer", None) or getattr(model_config, "num_hidden_layers", 0)
