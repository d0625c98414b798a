"""Named architectures a run config may reference as ``model.arch``, so ``ia3-dist plan`` knows a model's shapes
without its weights or the network, and the per-``model_type`` facts planning and the IA3 variants need. Pure
data: :mod:`ia3_dist.models.families` builds the HF config from :data:`ARCHS`."""

from __future__ import annotations

from dataclasses import dataclass

# name: (model_type, config.json fields that differ from the family's defaults), from each model's hub config
# (bigscience/*, meta-llama/Llama-3.x-*, Qwen/Qwen2.5-*, mistralai/Mistral-7B-v0.1 and -v0.3). Only fields that
# shape the parameters or the memory are listed: rope and generation settings change neither.
ARCHS: dict[str, tuple[str, dict[str, int | float | bool]]] = {
    "bloom-560m": ("bloom", {"vocab_size": 250880, "hidden_size": 1024, "n_layer": 24, "n_head": 16}),
    "bloom-1b1": ("bloom", {"vocab_size": 250880, "hidden_size": 1536, "n_layer": 24, "n_head": 16}),
    "bloom-1b7": ("bloom", {"vocab_size": 250880, "hidden_size": 2048, "n_layer": 24, "n_head": 16}),
    "bloom-3b": ("bloom", {"vocab_size": 250880, "hidden_size": 2560, "n_layer": 30, "n_head": 32}),
    "bloom-7b1": ("bloom", {"vocab_size": 250880, "hidden_size": 4096, "n_layer": 30, "n_head": 32}),
    "bloom": ("bloom", {"vocab_size": 250880, "hidden_size": 14336, "n_layer": 70, "n_head": 112}),
    "bloom-1b4-zh": ("bloom", {"vocab_size": 46145, "hidden_size": 2048, "n_layer": 24, "n_head": 16}),
    "llama-3.2-1b": ("llama", {"vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
                               "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
                               "head_dim": 64, "tie_word_embeddings": True}),
    "llama-3.2-3b": ("llama", {"vocab_size": 128256, "hidden_size": 3072, "intermediate_size": 8192,
                               "num_hidden_layers": 28, "num_attention_heads": 24, "num_key_value_heads": 8,
                               "head_dim": 128, "tie_word_embeddings": True}),
    "llama-3.1-8b": ("llama", {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
                               "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                               "tie_word_embeddings": False}),
    "llama-3.1-70b": ("llama", {"vocab_size": 128256, "hidden_size": 8192, "intermediate_size": 28672,
                                "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
                                "tie_word_embeddings": False}),
    "qwen2.5-0.5b": ("qwen2", {"vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
                               "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
                               "tie_word_embeddings": True}),
    "qwen2.5-1.5b": ("qwen2", {"vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960,
                               "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
                               "tie_word_embeddings": True}),
    "qwen2.5-3b": ("qwen2", {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 11008,
                             "num_hidden_layers": 36, "num_attention_heads": 16, "num_key_value_heads": 2,
                             "tie_word_embeddings": True}),
    "qwen2.5-7b": ("qwen2", {"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
                             "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                             "tie_word_embeddings": False}),
    "qwen2.5-14b": ("qwen2", {"vocab_size": 152064, "hidden_size": 5120, "intermediate_size": 13824,
                              "num_hidden_layers": 48, "num_attention_heads": 40, "num_key_value_heads": 8,
                              "tie_word_embeddings": False}),
    "qwen2.5-32b": ("qwen2", {"vocab_size": 152064, "hidden_size": 5120, "intermediate_size": 27648,
                              "num_hidden_layers": 64, "num_attention_heads": 40, "num_key_value_heads": 8,
                              "tie_word_embeddings": False}),
    "qwen2.5-72b": ("qwen2", {"vocab_size": 152064, "hidden_size": 8192, "intermediate_size": 29568,
                              "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
                              "tie_word_embeddings": False}),
    "mistral-7b": ("mistral", {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
                               "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                               "tie_word_embeddings": False}),
    "mistral-7b-v0.3": ("mistral", {"vocab_size": 32768, "hidden_size": 4096, "intermediate_size": 14336,
                                    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                                    "tie_word_embeddings": False}),
}


@dataclass(frozen=True)
class BlockFacts:
    """What ``plan`` and ``ia3.variant`` need to know about one family's decoder block."""

    gated_mlp: bool
    """The MLP has three matrices (gate, up, down: SwiGLU) rather than two."""
    dropout_masks: bool
    """Count Korthikanti et al.'s dropout masks (Bloom's plan keeps the published formula as its upper bound;
    the newer families have no dropout in training configs)."""
    eager_scores: bool = False
    """The attention keeps its scores for the backward as transformers' eager code does (Bloom's default): the fp32
    softmax and its 16-bit copy, 6 bytes per score at 16 bits rather than Korthikanti's 5; and the backward of a
    layer holds about a layer and a quarter more while it runs (its score gradients in both precisions).
    Measured on CPU by tracking every live tensor of a bf16 Bloom with IA3: stored 1.2x the 5-byte figure, the
    peak 1 to 1.25 layers above the stored activations (tests/test_plan.py)."""
    fused_qkv: str | None = None
    """Name of the one Linear that computes queries, keys and values, laid out per head as [q, k, v] (each
    ``head_dim`` wide); None where they are separate projections."""
    paper_targets: tuple[tuple[str, ...], tuple[str, ...]] | None = None
    """``ia3.variant: paper`` on separate projections: (target modules, feed-forward modules): keys, values and
    the MLP's down projection's input, as in the IA3 paper."""


BLOCKS: dict[str, BlockFacts] = {
    "bloom": BlockFacts(gated_mlp=False, dropout_masks=True, eager_scores=True, fused_qkv="query_key_value"),
    "gpt_neox": BlockFacts(gated_mlp=False, dropout_masks=False, fused_qkv="query_key_value"),
    "llama": BlockFacts(gated_mlp=True, dropout_masks=False,
                        paper_targets=(("k_proj", "v_proj", "down_proj"), ("down_proj",))),
    "mistral": BlockFacts(gated_mlp=True, dropout_masks=False,
                          paper_targets=(("k_proj", "v_proj", "down_proj"), ("down_proj",))),
    # PEFT's default for qwen2 scales queries (q_proj, v_proj, down_proj); the paper's variant scales keys.
    "qwen2": BlockFacts(gated_mlp=True, dropout_masks=False,
                        paper_targets=(("k_proj", "v_proj", "down_proj"), ("down_proj",))),
}
"""Per ``model_type``; a type not listed is planned with the generic GPT block (two-matrix MLP of
``intermediate_size`` or 4h, dropout masks counted) and has no paper variant."""

GENERIC_BLOCK = BlockFacts(gated_mlp=False, dropout_masks=True)
