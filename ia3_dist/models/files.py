"""What a model dir and a tokenizer dir must hold, checked before anything loads (exit 2 naming the file)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import UsageError

# (shard index, single file) as transformers saves them, in the order it prefers them.
WEIGHT_LAYOUTS = (("model.safetensors.index.json", "model.safetensors"),
                  ("pytorch_model.bin.index.json", "pytorch_model.bin"))


def shard_names(index: Path) -> list[str]:
    """The shard files a ``*.index.json`` names (its weight_map values), sorted."""
    try:
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UsageError(f"{index}: unreadable weight index ({e})") from None


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


def check_model_dir(path: str) -> None:
    """A local model dir must hold config.json and complete weights; a hub name is checked when it loads."""
    p = Path(path).expanduser()
    if not looks_local(path):
        return
    if not p.is_dir():
        raise UsageError(f"model.path {path}: no such directory")
    if not (p / "config.json").is_file():
        raise UsageError(f"model.path {p}: no config.json; point model.path at a save_pretrained directory")
    if not any((p / f).is_file() for f in WEIGHT_FILES) and not list(p.glob("*.safetensors")):
        raise UsageError(f"model.path {p}: no weights ({', '.join(WEIGHT_FILES)}); the download or copy is "
                         f"incomplete")
    for index, _ in WEIGHT_LAYOUTS:
        if (p / index).is_file():
            missing = [s for s in shard_names(p / index) if not (p / s).is_file()]
            if missing:
                raise UsageError(f"model.path {p}: weight shards missing: {', '.join(missing[:5])}"
                                 f"{' ...' if len(missing) > 5 else ''}")


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
