"""Bloom family architecture facts, so model shapes are known without weights (meta-device builds, planning)."""

from __future__ import annotations

from typing import Any

from .errors import UsageError

# name: (vocab_size, hidden_size, n_layer, n_head), from each model's config.json on the hub.
BLOOM_FAMILY: dict[str, tuple[int, int, int, int]] = {
    "bloom-560m": (250880, 1024, 24, 16),
    "bloom-1b1": (250880, 1536, 24, 16),
    "bloom-1b7": (250880, 2048, 24, 16),
    "bloom-3b": (250880, 2560, 30, 32),
    "bloom-7b1": (250880, 4096, 30, 32),
    "bloom": (250880, 14336, 70, 112),
    "bloom-1b4-zh": (46145, 2048, 24, 16),
}


def bloom_config(name: str) -> Any:
    from transformers import BloomConfig

    if name not in BLOOM_FAMILY:
        raise UsageError(f"model.arch {name!r}: unknown; known: {', '.join(BLOOM_FAMILY)}")
    vocab, hidden, layers, heads = BLOOM_FAMILY[name]
    return BloomConfig(vocab_size=vocab, hidden_size=hidden, n_layer=layers, n_head=heads)
