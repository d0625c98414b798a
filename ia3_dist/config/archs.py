"""Named architectures a run config may reference as ``model.arch``, so ``ia3-dist plan`` knows a model's shapes
without its weights or the network. Pure data: :mod:`ia3_dist.models.families` builds the HF config from it."""

from __future__ import annotations

# name: (model_type, config.json fields that differ from the family's defaults), from each model's hub config.
ARCHS: dict[str, tuple[str, dict[str, int]]] = {
    "bloom-560m": ("bloom", {"vocab_size": 250880, "hidden_size": 1024, "n_layer": 24, "n_head": 16}),
    "bloom-1b1": ("bloom", {"vocab_size": 250880, "hidden_size": 1536, "n_layer": 24, "n_head": 16}),
    "bloom-1b7": ("bloom", {"vocab_size": 250880, "hidden_size": 2048, "n_layer": 24, "n_head": 16}),
    "bloom-3b": ("bloom", {"vocab_size": 250880, "hidden_size": 2560, "n_layer": 30, "n_head": 32}),
    "bloom-7b1": ("bloom", {"vocab_size": 250880, "hidden_size": 4096, "n_layer": 30, "n_head": 32}),
    "bloom": ("bloom", {"vocab_size": 250880, "hidden_size": 14336, "n_layer": 70, "n_head": 112}),
    "bloom-1b4-zh": ("bloom", {"vocab_size": 46145, "hidden_size": 2048, "n_layer": 24, "n_head": 16}),
}
