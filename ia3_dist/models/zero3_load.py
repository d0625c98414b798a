"""ZeRO-3 loading in which no rank ever holds the full model.

transformers' own ZeRO-3 path (``from_pretrained`` under ``HfDeepSpeedConfig``) has rank 0 read every checkpoint
file into one merged state dict and then broadcasts it module by module: rank 0 holds the whole model in host
memory (350 GB for bloom-176b), and the 2-rank 160M bench measured a higher peak RSS per rank on ZeRO-3 than on
ZeRO-0. Here the model is built empty under ``deepspeed.zero.Init`` (so every parameter is born partitioned) and
each rank then reads, straight from the checkpoint files, only the byte range of its own partition of each
tensor, into that partition. No collective, no gathered tensor, no full-size buffer: the largest temporary is one
partition of one tensor, and only when the file's dtype differs from the training dtype.

Safetensors files are read with ``pread`` on the exact byte ranges (the header is a JSON table of offsets);
PyTorch ``.bin`` files are memory-mapped, so a rank touches only the pages of its own ranges.
"""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UsageError
from .families import checkpoint_names
from .files import ST_TORCH, checkpoint_files, safetensors_header, torch_load_weights
from .files import local_model_dir as local_model_dir  # the launcher's import; shared with load.py
from .load import base_on_meta, no_code_prompt

# The dtypes the loader reads: FP8 checkpoints carry scales that a plain copy into the model would ignore.
ST_DTYPES = {k: getattr(torch, ST_TORCH[k]) for k in ("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8",
                                                     "BOOL")}


class SafetensorsFile:
    """Random access to the tensors of one ``.safetensors`` file by flat element range, without mmap."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # Every offset read_into uses is checked against the file size here, so a truncated or hostile file fails
        # at open, naming itself, and no read is sized from an unchecked header field.
        self.header: dict[str, Any]
        self.header, self.base = safetensors_header(path)
        try:
            self.fh = open(path, "rb")  # noqa: SIM115 - closed by close()
        except OSError as e:
            raise UsageError(f"{path}: cannot read the weights ({e})") from None

    def keys(self) -> Iterator[str]:
        return iter(self.header)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.header[key]["shape"])

    def read_into(self, key: str, start: int, out: torch.Tensor) -> int:
        """Elements ``[start, start + out.numel())`` of the flattened tensor into ``out`` (any dtype, CPU or GPU).
        Returns the bytes read from the file."""
        info = self.header[key]
        dtype = ST_DTYPES.get(info["dtype"])
        if dtype is None:
            raise UsageError(f"{self.path}: tensor {key} has dtype {info['dtype']}, which the loader cannot read")
        n = out.numel()
        item = torch.empty((), dtype=dtype).element_size()
        begin = self.base + info["data_offsets"][0] + start * item
        direct = out.dtype == dtype and out.device.type == "cpu" and out.is_contiguous()
        buf = out if direct else torch.empty(n, dtype=dtype)
        view = memoryview(buf.view(-1).view(torch.uint8).numpy())
        got = 0
        while got < len(view):
            k = os.preadv(self.fh.fileno(), [view[got:]], begin + got)
            if k <= 0:
                raise UsageError(f"{self.path}: truncated (tensor {key} ends past the end of the file)")
            got += k
        if not direct:
            out.copy_(buf.view(out.shape))
        return got

    def close(self) -> None:
        self.fh.close()


class TorchBinFile:
    """A PyTorch ``.bin`` checkpoint, memory-mapped: reading a range touches only that range's pages."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if not zipfile.is_zipfile(path):
            raise UsageError(f"{path}: cannot memory-map this checkpoint (saved before torch 1.6, not a zip "
                             f"archive); convert it to safetensors")
        self.sd = torch_load_weights(path, mmap=True)
        if not isinstance(self.sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                    for k, v in self.sd.items()):
            raise UsageError(f"{path}: not a state dict of tensors (it holds non-tensor objects); it will not be "
                             f"loaded")

    def keys(self) -> Iterator[str]:
        return iter(self.sd)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.sd[key].shape)

    def read_into(self, key: str, start: int, out: torch.Tensor) -> int:
        src = self.sd[key].reshape(-1).narrow(0, start, out.numel())
        out.copy_(src.view(out.shape))
        return src.numel() * src.element_size()

    def close(self) -> None:
        self.sd = {}


CheckpointFile = SafetensorsFile | TorchBinFile


def _open(path: Path) -> CheckpointFile:
    if not path.exists():
        raise UsageError(f"{path}: listed in the shard index but missing")
    return SafetensorsFile(path) if path.suffix == ".safetensors" else TorchBinFile(path)


def build_partitioned(model_config: Any, ds_config: dict[str, Any], dtype: torch.dtype,
                      trust_remote_code: bool = False) -> nn.Module:
    """The model's modules with every parameter partitioned at birth and left uninitialised (it is loaded next)."""
    import deepspeed
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights
    from transformers.modeling_utils import set_zero3_state

    # set_zero3_state stops from_config from opening a zero.Init of its own (and then re-initialising every
    # weight with gathers); no_init_weights skips random init that the load overwrites anyway. zero.Init gets its
    # dtype from the config's bf16/fp16 blocks only: given both a config and dtype=float32 it picks bf16 on a
    # CPU (an operator-precedence slip in DeepSpeed 0.19's Init._set_dtype), silently rounding every weight.
    with no_init_weights(), deepspeed.zero.Init(config_dict_or_path=ds_config), set_zero3_state(), no_code_prompt():
        model = AutoModelForCausalLM.from_config(model_config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.tie_weights()  # from_config leaves tying to from_pretrained; Bloom's lm_head is the embedding matrix
    _fp32_rotary(model)
    wrong = {p.dtype for p in model.parameters()} - {dtype}
    if wrong:
        raise RuntimeError(f"ZeRO-3 built parameters in {wrong}, not {dtype}: the DeepSpeed config's bf16/fp16 "
                           f"blocks disagree with the training precision")
    return model


def _fp32_rotary(model: nn.Module) -> None:
    """zero.Init casts every floating tensor a constructor makes to the ZeRO dtype, buffers too: a rotary
    embedding's ``inv_freq`` (which transformers computes in fp32 and the other stages keep so) would hold
    bf16-rounded frequencies, angles off by radians a few thousand positions in (Llama 2, Qwen2, Mistral,
    GPT-NeoX; Llama 3's scaled init builds its ``arange`` as integers). Rebuilt here, outside zero.Init, from the
    module's own class and config: every module holding a buffer named ``inv_freq`` or ending so (Gemma 3 keeps
    ``sliding_attention_inv_freq`` and ``full_attention_inv_freq``), each of its float buffers the fresh one holds
    in fp32."""
    for m in model.modules():
        bufs = dict(m.named_buffers(recurse=False))
        rounded = [n for n, b in bufs.items() if n.endswith("inv_freq") and b.dtype != torch.float32]
        if not rounded or getattr(m, "config", None) is None:
            continue
        try:
            fresh = type(m)(m.config)
        except TypeError:  # a remote-code rotary class built otherwise: left as zero.Init made it
            continue
        for name, value in fresh.named_buffers(recurse=False):
            if name in bufs and value.dtype == torch.float32 and bufs[name].dtype != torch.float32:
                setattr(m, name, value.to(bufs[name].device))


def checkpoint_keys(name: str, prefix: str, renames: tuple[tuple[str, str], ...] = ()) -> list[str]:
    """Checkpoint keys a parameter may be stored under: with or without the base-model prefix (bigscience's
    Bloom checkpoints have no ``transformer.``; models saved by transformers do: ``model.`` for Llama, Qwen2 and
    Mistral, ``gpt_neox.`` for GPT-NeoX), and under the family's renamed prefix (GPT-NeoX's ``embed_out.``)."""
    out = [name]
    for ours, theirs in renames:
        if name.startswith(ours):
            out.append(theirs + name[len(ours):])
    if prefix and name.startswith(prefix + "."):
        out.append(name[len(prefix) + 1:])
    elif prefix:
        out.append(f"{prefix}.{name}")
    return out


def _params_by_identity(model: nn.Module) -> list[tuple[nn.Parameter, list[str]]]:
    """Each parameter once, with every name it has: a tied weight (lm_head = embeddings) may be stored under
    either name."""
    names: dict[int, list[str]] = {}
    params: dict[int, nn.Parameter] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
        params[id(p)] = p
    return [(params[i], names[i]) for i in params]


def _match(model: nn.Module, where: dict[str, CheckpointFile], model_dir: Path) -> list[tuple[nn.Parameter, str]]:
    """The checkpoint key of every parameter, checked for presence and shape (UsageError naming the first
    problems). Works on a meta model as well as on a partitioned one."""
    prefix, renames = checkpoint_names(model)
    out, missing = [], []
    for p, names in _params_by_identity(model):
        key = next((c for n in names for c in checkpoint_keys(n, prefix, renames) if c in where), None)
        if key is None:
            missing.append(names[0])
            continue
        full = tuple(getattr(p, "ds_shape", p.shape))
        if where[key].shape(key) != full:
            raise UsageError(f"{where[key].path}: {key} has shape {list(where[key].shape(key))}, the model config "
                             f"expects {list(full)}; config.json and the weights disagree")
        out.append((p, key))
    if missing:
        raise UsageError(f"model.path {model_dir}: the checkpoint has no weights for {', '.join(missing[:5])}"
                         f"{' ...' if len(missing) > 5 else ''} ({len(missing)} parameter(s))")
    return out


TIE_COMPARE_ELEMENTS = 1 << 22
"""Elements of two stored copies of a tied weight compared at a time (:func:`stored_apart`): 32 MB per side."""


def _same_values(where: dict[str, CheckpointFile], a: str, b: str, dtype: torch.dtype) -> bool:
    """Whether tensors ``a`` and ``b`` hold the same values in ``dtype`` (as from_pretrained compares the two
    parameters it loaded): one storage under two names (a ``.bin``) is the same without a read."""
    shape = where[a].shape(a)
    if shape != where[b].shape(b):
        return False
    fa, fb = where[a], where[b]
    if isinstance(fa, TorchBinFile) and isinstance(fb, TorchBinFile):
        ta, tb = fa.sd[a], fb.sd[b]
        if ta.untyped_storage().data_ptr() == tb.untyped_storage().data_ptr() and \
                ta.storage_offset() == tb.storage_offset() and ta.stride() == tb.stride() and ta.dtype == tb.dtype:
            return True
    n = math.prod(shape)
    x = torch.empty(min(n, TIE_COMPARE_ELEMENTS), dtype=dtype)
    y = torch.empty_like(x)
    for start in range(0, n, TIE_COMPARE_ELEMENTS):
        k = min(TIE_COMPARE_ELEMENTS, n - start)
        where[a].read_into(a, start, x[:k])
        where[b].read_into(b, start, y[:k])
        if not torch.equal(x[:k], y[:k]):
            return False
    return True


def untied(model_config: Any) -> Any:
    """A copy of ``model_config`` whose LM head is its own parameter (:func:`stored_apart`)."""
    import copy

    out = copy.deepcopy(model_config)
    out.tie_word_embeddings = False
    return out


def stored_apart(model_config: Any, model_dir: Path, dtype: torch.dtype = torch.float32,
                 trust_remote_code: bool = False) -> bool:
    """Whether a config that ties the LM head to the embeddings (``tie_word_embeddings``) comes with a checkpoint
    holding both under their own names with different values (an untied fine-tune or merge that kept the flag):
    ``from_pretrained`` then leaves them untied, with a warning, and trains the stored head; the ZeRO-3 loader
    tied them and filled both from the embeddings. Both alike in the training ``dtype`` (a ``.bin`` always holds
    both) stay tied."""
    if not getattr(model_config, "tie_word_embeddings", False):
        return False
    model = base_on_meta(model_config, trust_remote_code)
    with _opened(model_dir) as where:
        return _apart(model, where, dtype)


def _apart(model: nn.Module, where: dict[str, CheckpointFile], dtype: torch.dtype) -> bool:
    """:func:`stored_apart` on a built (meta) model and the opened files."""
    prefix, renames = checkpoint_names(model)
    for _, names in _params_by_identity(model):
        if len(names) < 2:
            continue
        keys = list(dict.fromkeys(c for n in names for c in checkpoint_keys(n, prefix, renames) if c in where))
        if len(keys) >= 2 and not _same_values(where, keys[0], keys[1], dtype):
            return True
    return False


def check_checkpoint(model_config: Any, model_dir: Path, trust_remote_code: bool = False,
                     tie_dtype: torch.dtype | None = None) -> bool:
    """Before any process group: the checkpoint files hold a tensor of the right shape for every parameter of
    the architecture (built on the meta device: no memory), so a mismatch fails on every rank with exit 2
    instead of after the ranks have met. With ``tie_dtype`` (ZeRO-3, which builds the model itself), also
    :func:`stored_apart` in that dtype, on the same build and open files, which it returns (else False). A head
    stored apart has the embeddings' shape (:func:`_same_values` compares shapes first), so the tied build's
    check covers the untied one's."""
    model = base_on_meta(model_config, trust_remote_code)
    with _opened(model_dir) as where:
        _match(model, where, model_dir)
        return tie_dtype is not None and bool(getattr(model_config, "tie_word_embeddings", False)) \
            and _apart(model, where, tie_dtype)


@contextmanager
def _opened(model_dir: Path) -> Iterator[dict[str, CheckpointFile]]:
    """Every tensor name of the model dir's checkpoint files -> its open file."""
    with ExitStack() as stack:
        opened = []
        for f in checkpoint_files(model_dir):
            opened.append(_open(f))
            stack.callback(opened[-1].close)
        yield {k: f for f in opened for k in f.keys()}


def load_partitions(model: nn.Module, model_dir: Path) -> dict[str, int]:
    """Fill each rank's partition of every parameter from the checkpoint files. Returns {"bytes_read", "tensors",
    "largest_read"} for this rank (the tests check that a rank reads its share, not the model)."""
    import torch.distributed as tdist

    stats = {"bytes_read": 0, "tensors": 0, "largest_read": 0}
    prefix, renames = checkpoint_names(model)
    with _opened(model_dir) as where:
        for p, key in _match(model, where, model_dir):
            part = p.ds_tensor
            size = part.ds_numel
            rank = tdist.get_rank(group=p.ds_process_group) if tdist.is_initialized() else 0
            start = size * rank
            n = max(0, min(size, p.ds_numel - start))
            if n:
                got = where[key].read_into(key, start, part.data.view(-1).narrow(0, 0, n))
                stats["bytes_read"] += got
                stats["largest_read"] = max(stats["largest_read"], got)
            stats["tensors"] += 1
        # Buffers are not partitioned: persistent ones (none in Bloom) are read whole, non-persistent ones were
        # computed by their modules' constructors.
        missing = []
        for mname, mod in model.named_modules():
            for bname, b in mod.named_buffers(recurse=False):
                if b is None or bname in mod._non_persistent_buffers_set:
                    continue
                full_name = f"{mname}.{bname}" if mname else bname
                key = next((c for c in checkpoint_keys(full_name, prefix, renames) if c in where), None)
                if key is None:
                    missing.append(full_name)
                    continue
                stats["bytes_read"] += where[key].read_into(key, 0, b.data.view(-1))
        if missing:
            raise UsageError(f"model.path {model_dir}: the checkpoint has no buffers {', '.join(missing[:5])}")
    return stats
