"""What a model dir and a tokenizer dir must hold, checked before anything loads (exit 2 naming the file)."""

from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import IO, Any

from ..errors import UsageError

# The safetensors library refuses headers past 100 MB; a larger length field means a corrupt or hostile file, and
# reading it would allocate that much.
MAX_SAFETENSORS_HEADER = 100_000_000
# Index and adapter config files are a few KB to a few MB; the bound keeps a hostile one from being read whole.
MAX_SMALL_JSON = 64 << 20
ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1, "C64": 8}

# (shard index, single file) as transformers saves them, in the order it prefers them.
WEIGHT_LAYOUTS = (("model.safetensors.index.json", "model.safetensors"),
                  ("pytorch_model.bin.index.json", "pytorch_model.bin"))


def error_line(e: BaseException) -> str:
    """An exception's message cut to one line (torch's run to paragraphs of advice)."""
    if isinstance(e, pickle.UnpicklingError) and "weights only" in str(e).lower():
        # torch's own text advises weights_only=False, i.e. running the code the pickle carries.
        return "a weights file holds non-tensor objects (a pickle that could run code); it will not be loaded"
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


def open_file(path: Path, what: str) -> IO[bytes]:
    """``path`` opened for reading if it is a regular file (through symlinks: the hub cache links its files), else
    a UsageError naming it: a FIFO or device in its place would hang or never end a read."""
    from ..runtime.safe_io import open_regular

    return open_regular(path, f"it should be the {what}; download or copy it again", follow=True)


def read_small_json(path: Path, what: str) -> Any:
    """A small JSON file (index, adapter config) parsed; UsageError naming the file if it is unreadable, too large
    or not JSON."""
    try:
        with open_file(path, what) as fh:
            raw = fh.read(MAX_SMALL_JSON + 1)
    except OSError as e:
        raise UsageError(f"{path}: cannot read the {what} ({error_line(e)})") from None
    if len(raw) > MAX_SMALL_JSON:
        raise UsageError(f"{path}: {what} larger than {MAX_SMALL_JSON >> 20} MiB; the file is corrupt")
    try:
        return json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, int digit limit
        raise UsageError(f"{path}: {what} is not valid JSON ({error_line(e)})") from None


def shard_names(index: Path) -> list[str]:
    """The shard files a ``*.index.json`` names (its weight_map values), sorted."""
    data = read_small_json(index, "weight index")
    wm = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(v, str) and v for v in wm.values()):
        raise UsageError(f"{index}: unreadable weight index (needs a 'weight_map' object of tensor name -> shard "
                         f"file name)")
    names = sorted(set(wm.values()))
    # A shard outside the model dir would make a hostile index read arbitrary files as weights.
    bad = [n for n in names if Path(n).is_absolute() or ".." in Path(n).parts]
    if bad:
        raise UsageError(f"{index}: shard path {bad[0]!r} points outside the model dir; shard names must be file "
                         f"names inside it")
    return names


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The weight files of a model dir: sharded (an index) or single, safetensors preferred."""
    for index, single in WEIGHT_LAYOUTS:
        if (model_dir / index).exists():
            return [model_dir / n for n in shard_names(model_dir / index)]
        if (model_dir / single).exists():
            return [model_dir / single]
    raise UsageError(f"model.path {model_dir}: no model.safetensors, pytorch_model.bin or shard index in it")


WEIGHT_FILES = tuple(f for layout in WEIGHT_LAYOUTS for f in reversed(layout))
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def looks_local(path: str) -> bool:
    return path.startswith(("/", ".", "~")) or Path(path).expanduser().exists()


def check_model_dir(path: str, what: str = "model.path") -> None:
    """A local model dir must hold config.json and complete, well-formed weights (headers and sizes checked, a
    ``.bin`` loaded weights-only); a hub name is checked when it loads. ``what`` names the dir in messages."""
    p = Path(path).expanduser()
    if not looks_local(path):
        return
    if not p.is_dir():
        raise UsageError(f"{what} {path}: no such directory")
    if not (p / "config.json").is_file():
        raise UsageError(f"{what} {p}: no config.json; point model.path at a save_pretrained directory")
    if (p / "config.json").stat().st_size > MAX_SMALL_JSON:
        raise UsageError(f"{what} {p}: config.json is larger than {MAX_SMALL_JSON >> 20} MiB; the file is "
                         f"corrupt")
    if not any((p / f).is_file() for f in WEIGHT_FILES) and not list(p.glob("*.safetensors")):
        raise UsageError(f"{what} {p}: no weights ({', '.join(WEIGHT_FILES)}); the download or copy is "
                         f"incomplete")
    for index, _ in WEIGHT_LAYOUTS:
        if (p / index).is_file():
            missing = [s for s in shard_names(p / index) if not (p / s).is_file()]
            if missing:
                raise UsageError(f"{what} {p}: weight shards missing: {', '.join(missing[:5])}"
                                 f"{' ...' if len(missing) > 5 else ''}")
    if any((p / f).exists() for layout in WEIGHT_LAYOUTS for f in layout):
        files = checkpoint_files(p)
    else:
        files = sorted(p.glob("*.safetensors"))
    for f in files:
        check_weight_file(f)


def safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """The tensor table of a ``.safetensors`` file (``__metadata__`` removed) and the offset its data starts at,
    read from the header alone. UsageError naming the file if the header is corrupt or the file is shorter (or
    longer) than the header says: a truncated download must fail here, not halfway through loading."""
    try:
        with open_file(path, "weights") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(8)
            if len(head) != 8:
                raise UsageError(f"{path}: not a safetensors file ({size} bytes, shorter than its 8-byte header "
                                 f"length)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_SAFETENSORS_HEADER or 8 + n > size:
                raise UsageError(f"{path}: corrupt safetensors header: its length field says {n} bytes, the file "
                                 f"has {size}; the file is truncated or not safetensors")
            raw = fh.read(n)
    except OSError as e:
        raise UsageError(f"{path}: cannot read the weights ({error_line(e)})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise UsageError(f"{path}: corrupt safetensors header (not JSON: {error_line(e)})") from None
    if not isinstance(header, dict):
        raise UsageError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, not an object)")
    header.pop("__metadata__", None)
    end = 0
    for key, info in header.items():
        problem = _tensor_entry_problem(info)
        if problem:
            raise UsageError(f"{path}: corrupt safetensors header (tensor {key[:200]!r}: {problem})")
        end = max(end, info["data_offsets"][1])
    need = 8 + n + end
    if size < need:
        raise UsageError(f"{path}: truncated: {size} bytes, header needs {need}; download or copy it again")
    if size > need:
        raise UsageError(f"{path}: corrupt: {size} bytes, header accounts for {need}; download or copy it again")
    return header, 8 + n


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _tensor_entry_problem(info: Any) -> str | None:
    if not isinstance(info, dict):
        return "entry is not an object"
    dtype, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str):
        return "no string 'dtype'"
    if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
        return "'shape' is not a list of non-negative integers"
    if not isinstance(offs, list) or len(offs) != 2 or not all(_is_int(o) for o in offs) or offs[0] > offs[1]:
        return "'data_offsets' is not [begin, end] with 0 <= begin <= end"
    item = ST_ITEMSIZE.get(dtype)
    if item is not None:
        numel = 1
        for d in shape:
            numel *= d
        if numel * item != offs[1] - offs[0]:
            return f"data_offsets span {offs[1] - offs[0]} bytes, shape {shape} of {dtype} needs {numel * item}"
    return None


def check_torch_bin(path: Path) -> None:
    """A PyTorch ``.bin`` checkpoint must be a dict of tensors loadable with ``weights_only``: anything else is
    refused before transformers, PEFT or the ZeRO-3 loader touch it. Memory-mapped, so only the pickle is read."""
    sd = torch_load_weights(path)
    if not isinstance(sd, dict) or not all(isinstance(k, str) for k in sd):
        raise UsageError(f"{path}: not a state dict (a {type(sd).__name__}, not tensor name -> tensor); it will "
                         f"not be loaded")
    import torch

    bad = next((k for k, v in sd.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise UsageError(f"{path}: entry {bad[:200]!r} is a {type(sd[bad]).__name__}, not a tensor; the file holds "
                         f"non-tensor objects and will not be loaded")


def torch_load_weights(path: Path, mmap: bool = True) -> Any:
    """``torch.load`` with ``weights_only``: a pickle that would build arbitrary objects (and could run code) is
    refused with a UsageError naming the file; so is any file torch cannot read, anything but a regular file, and
    a zip whose directory is not what torch.save writes (a compressed pickle inflates before it can be refused:
    see ``runtime/safe_load.check_torch_zip``). ``mmap``: map the tensors instead of reading them (zip files)."""
    import torch

    from ..runtime.safe_load import check_torch_zip

    with open_file(path, "weights") as fh:
        is_zip = zipfile.is_zipfile(fh)
        if is_zip:
            check_torch_zip(fh, path, "the weights file is corrupt or not a torch.save file; download or copy it "
                                      "again, or use safetensors weights")
    try:
        # Files from before torch 1.6 (not zip) cannot be memory-mapped: read whole, as from_pretrained would.
        return torch.load(path, map_location="cpu", mmap=mmap and is_zip, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower():
            raise UsageError(f"{path}: holds non-tensor objects (a pickle that builds arbitrary Python objects and "
                             f"could run code); it will not be loaded. Use safetensors weights from a source you "
                             f"trust") from None
        raise UsageError(f"{path}: not a PyTorch checkpoint ({error_line(e)})") from None
    except Exception as e:  # torch raises RuntimeError, OSError, EOFError, KeyError... for corrupt files
        raise UsageError(f"{path}: cannot read this PyTorch checkpoint ({error_line(e)}); the file is corrupt, "
                         f"truncated or not a torch.save file") from None


def check_weight_file(path: Path) -> None:
    """Header and size of a safetensors file, else (as the loaders do) a weights-only load: before anything
    loads it."""
    if path.suffix == ".safetensors":
        safetensors_header(path)
    else:
        check_torch_bin(path)


def has_tokenizer_files(d: Path) -> bool:
    return any((d / f).is_file() for f in TOKENIZER_FILES)


def check_tokenizer_dir(path: str) -> None:
    p = Path(path).expanduser()
    if looks_local(path) and p.is_dir() and not has_tokenizer_files(p):
        raise UsageError(f"tokenizer {p}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); set model.tokenizer "
                         f"to the tokenizer's directory")


def check_vocab(tok: Any, model_config: Any, where: str) -> None:
    vocab = getattr(model_config, "vocab_size", None)
    if vocab is not None and len(tok) > vocab:
        raise UsageError(f"{where}: the tokenizer has {len(tok)} tokens but the model's embeddings have {vocab} "
                         f"rows; ids past {vocab - 1} would index out of range. Use the model's own tokenizer "
                         f"(model.tokenizer)")
