"""Tokenizer, base model and its config.json: the users' ``from_pretrained`` path (ZeRO 0-2; ZeRO-3 loads
through :mod:`ia3_dist.models.zero3_load`)."""

from __future__ import annotations

import io
import os
import pickle
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ModelSection
from ..errors import UsageError
from .files import check_config_counts, check_tokenizer_dir, error_line, local_model_dir

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@contextmanager
def no_code_prompt() -> Iterator[None]:
    """Around every transformers load: with ``trust_remote_code`` left unset, transformers asks "run the custom
    code? [y/N]" on stdin, where a piped prompt (``ia3-dist chat``) would answer it. Every load here passes the
    flag; inside this block a path that did not still cannot ask: the question times out at once (an error) and
    stdin reads as empty."""
    from transformers import dynamic_module_utils

    timeout, stdin = dynamic_module_utils.TIME_OUT_REMOTE_CODE, sys.stdin
    dynamic_module_utils.TIME_OUT_REMOTE_CODE = 0
    sys.stdin = io.StringIO()
    try:
        yield
    finally:
        dynamic_module_utils.TIME_OUT_REMOTE_CODE, sys.stdin = timeout, stdin


def load_tokenizer(cfg: ModelSection, model_path: str, files_dir: Path | None = None) -> Any:
    """``model.tokenizer``, else the model's tokenizer; from ``files_dir`` where given (the hub snapshot of that
    tokenizer or model the preflight resolved once per node: no hub request per rank), named as configured all
    the same."""
    from transformers import AutoTokenizer

    name = cfg.tokenizer or model_path
    src = str(files_dir) if files_dir is not None else name
    check_tokenizer_dir(src, name)
    try:
        with no_code_prompt():
            tok = AutoTokenizer.from_pretrained(src, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except Exception as e:  # noqa: BLE001 - the Rust tokenizers library raises a bare Exception for a bad file
        hint = "" if isinstance(e, OSError) else "; its tokenizer.json or tokenizer_config.json is not one " \
                                                  "transformers can read (a truncated or hand-edited file?)"
        raise UsageError(f"tokenizer {name}: cannot load it ({type(e).__name__}: {str(e)[:500]}){hint}") from None
    if src != name:
        tok.name_or_path = name
    if tok.eos_token is None:
        raise UsageError(f"tokenizer {name} has no eos token; add one to its special_tokens_map.json")
    if getattr(tok, "split_special_tokens", False):
        # The templates write special tokens as text (the recipe's output + eos, a chat template's turn markers):
        # split, the model would learn the characters of "</s>" instead of ending its answers.
        raise UsageError(f"tokenizer {name}: split_special_tokens is true in its tokenizer_config.json, so the eos "
                         f"token the training examples end with ({tok.eos_token!r}) would be split into plain text; "
                         f"set it to false there for training")
    if tok.pad_token is None:
        # DataCollatorForSeq2Seq needs a pad id; the padded positions are masked so eos is a safe stand-in.
        pad_with_eos(tok)
    return tok


_PAD_IS_EOS = "_ia3_dist_pad_is_eos"


def pad_with_eos(tok: Any) -> None:
    """A pad token for batching where the tokenizer has none: its eos (padded positions are masked). Marked, so
    :func:`save_tokenizer` writes the tokenizer as it was read."""
    tok.pad_token = tok.eos_token
    setattr(tok, _PAD_IS_EOS, True)


def save_tokenizer(tok: Any, out_dir: Path) -> None:
    """``tok.save_pretrained(out_dir)`` without a pad token :func:`pad_with_eos` set: shipped with pad = eos (an
    adapter, an export), the tokenizer would lead collators that mask pad labels to mask the eos as well, and a
    model trained on it never learns to stop."""
    if not getattr(tok, _PAD_IS_EOS, False):
        tok.save_pretrained(str(out_dir))
        return
    tok.pad_token = None
    try:
        tok.save_pretrained(str(out_dir))
    finally:
        tok.pad_token = tok.eos_token


HUB_KERNELS = False
"""``from_pretrained(use_kernels=...)``: transformers 5 (with the ``kernels`` package, which it requires) by default
swaps kernels from the hub into a model's modules (Llama's RMSNorm and rotary, ...) for the device it is on, again
at every train()/eval() switch: on a GPU the first evaluation (held-out loss, eval.tasks, DPO's reference pass) ran
after DeepSpeed had moved the model there, so offline (a cluster's compute nodes) it failed fetching them, and
online the run went on with other code than it trained and was tested with. The modules stay transformers' own."""


def load_base_model(cfg: ModelSection, model_path: str, precision: str, weights_dir: Path | None = None) -> nn.Module:
    """``from_pretrained`` in the training dtype: every rank holds the whole model (ZeRO 0-2; ZeRO-3 loads
    through :mod:`ia3_dist.models.zero3_load` instead). A hub model loads from the snapshot
    :func:`~ia3_dist.models.files.local_model_dir` downloads, as under ZeRO-3: the same weight files, one format
    downloaded, checked before it loads. ``weights_dir``: that dir as the preflight resolved it (no hub request
    here then)."""
    from transformers import AutoModelForCausalLM

    src = weights_dir if weights_dir is not None else local_model_dir(model_path, cfg.revision, cfg.trust_remote_code)
    try:
        with no_code_prompt():
            model = AutoModelForCausalLM.from_pretrained(str(src), dtype=DTYPES[precision],
                                                         trust_remote_code=cfg.trust_remote_code,
                                                         use_kernels=HUB_KERNELS)
    except (OSError, ValueError, pickle.UnpicklingError) as e:
        raise UsageError(f"model.path {model_path}: cannot load the model ({error_line(e)})") from None
    keep_hub_name(model, model_path)
    return model


def keep_hub_name(model: nn.Module, model_path: str) -> None:
    """A hub model keeps its hub name, loaded from a snapshot dir as it is: PEFT writes it into the adapter
    (base_model_name_or_path), which generate/chat/export load the base from, where a path into this machine's
    hub cache would not exist."""
    if not Path(model_path).expanduser().is_dir():
        model.config.name_or_path = model_path
        model.name_or_path = model_path


def base_on_meta(config: Any, trust_remote_code: bool = False) -> nn.Module:
    """The base model of an architecture from its config alone: no weights, no memory (meta device). A config that
    transformers' own classes cannot build from (a field it validates only then: an activation, a dtype, a head
    count that does not divide) is a UsageError naming config.json; remote code raises as it does."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"), no_code_prompt():
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as e:
        if trust_remote_code and getattr(config, "auto_map", None):
            raise
        where = getattr(config, "name_or_path", "") or "the model"
        raise UsageError(f"{where}/config.json: transformers cannot build a {getattr(config, 'model_type', '?')} "
                         f"model from it ({error_line(e)}); the file is damaged or edited (restore it from the "
                         f"model's source)") from None


def load_model_config(model_path: str, cfg: ModelSection, files_dir: Path | None = None) -> Any:
    """The model's config.json (shapes for ZeRO bucket sizes and the vocabulary check), without weights; from
    ``files_dir`` where given (a hub model's snapshot, whose remote code, if trusted, it then loads too)."""
    from transformers import AutoConfig

    try:
        with no_code_prompt():
            c = AutoConfig.from_pretrained(str(files_dir or model_path), revision=cfg.revision,
                                           trust_remote_code=cfg.trust_remote_code)
    except UsageError:
        raise
    except Exception as e:  # transformers validates fields with its own error types (TypeError, strict dataclasses)
        if files_dir is not None or Path(model_path).exists():
            # Its field validators put the field's value and the reason on the lines after the first.
            why = f"{type(e).__name__}: {' '.join(str(e).split())}"[:400]
            raise UsageError(f"model.path {model_path}: cannot read config.json ({why})") from None
        raise UsageError(f"model.path {model_path}: not a local dir and not reachable on the hub "
                         f"({error_line(e)})") from None
    # A hub model's config (a local dir's was checked with its files).
    check_config_counts(c.to_dict(), f"model.path {model_path}: config.json")
    return c


def hidden_size_of(model_config: Any) -> int | None:
    return getattr(model_config, "hidden_size", None) or getattr(model_config, "n_embed", None)


def layers_of(model_config: Any) -> int:
    return getattr(model_config, "n_layer", None) or getattr(model_config, "num_hidden_layers", 0)


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks, in order: modules of the classes the model itself declares as its blocks
    (``_no_split_modules``, e.g. BloomBlock, LlamaDecoderLayer)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def copy_gradients(model: nn.Module) -> int:
    """Give autograd a copy of each trainable parameter's gradient to accumulate; returns how many parameters.
    Under CUDA graphs (``train.compile_mode: reduce-overhead``) a compiled block's backward returns the gradients
    in the graph's static output buffers; autograd keeps the first micro-step's as ``.grad`` itself, and the next
    replay overwrites it, so the sum over ``grad_accum`` micro-steps is silently wrong (pytorch#96693, #169545).
    IA3's vectors are a few MB: the copy is not measurable next to the step."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.register_hook(torch.Tensor.clone)
    return len(params)


def _avoid_avx512_codegen() -> None:
    """Inductor's C++ code at 256 bits where it would write 512-bit (AVX-512) code, unless the user chose a width
    (``cpp.simdlen``) or an ISA (``ATEN_CPU_CAPABILITY``, which inductor honours): torch 2.13's AVX-512 code for
    these blocks wrote past a buffer (heap corruption, "malloc(): unaligned tcache chunk detected": 5 of 5 runs of
    tiny Bloom on packed rows, 2 threads, an AMD EPYC with AVX-512; pytorch#181618 and its duplicates show the same
    on AMD). Its AVX2 code ran clean (0 of 6), and the matmuls are MKL's either way. Other CPUs (ARM's 128-bit
    NEON/SVE, AVX2-only x86) keep inductor's choice. Process-wide: this process trains one model."""
    import torch._inductor.config as inductor_config
    from torch._inductor import cpu_vec_isa

    if inductor_config.cpp.simdlen is not None or os.environ.get("ATEN_CPU_CAPABILITY"):
        return
    if cpu_vec_isa.pick_vec_isa().bit_width() == 512 and \
            any(isa.bit_width() == 256 for isa in cpu_vec_isa.valid_vec_isa_list()):
        inductor_config.cpp.simdlen = 256


def compile_blocks(model: nn.Module, skip: nn.Module | None = None, dynamic: bool | None = None,
                   mode: str = "default", backend: str = "inductor") -> int:
    """``torch.compile`` every decoder block in place, except ``skip``; returns how many. Blocks, not the whole
    model: the loss, IA3's PEFT wrapper and DeepSpeed's hooks stay eager, and one compiled graph serves all layers
    of the same shape. ``dynamic=True`` (packed rows: fixed width, a row count that varies) compiles shape-generic
    graphs at the first step, so no later step recompiles; None lets dynamo decide (it recompiles once when a
    size first changes). ``mode``, ``backend``: ``train.compile_mode``, ``train.compile_backend``."""
    blocks = [b for b in decoder_blocks(model) if b is not skip]
    if dynamic:
        # Duck sizing makes sizes that happen to be equal at the first compile one symbol, guarded equal: Bloom's
        # alibi carries the head count beside the row count, so a first step of 4 rows on a 4-head model compiled
        # graphs that every later step of another row count recompiled. Read when dynamo builds its shape
        # environment, at the first call: process-wide, and this process trains one model.
        import torch.fx.experimental._config as fx_config

        if hasattr(fx_config, "use_duck_shape"):  # a config module refuses unknown keys; older torch may lack it
            fx_config.use_duck_shape = False
    # The blocks are still on the host here on GPU runs too (the engine moves them): where they will run decides.
    if backend == "inductor" and not torch.cuda.is_available():
        _avoid_avx512_codegen()
    for b in blocks:
        b.compile(dynamic=dynamic, mode=None if mode == "default" else mode, backend=backend)
    return len(blocks)
