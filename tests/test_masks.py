"""The rotary families' attention masks, built on the device (``models/families/masks.py``): the same losses and
IA3 gradients as transformers' own masks (full, sliding-window and mixed layers; SDPA and eager; padded right,
left, not at all, and packed), and no host sync in the forward pass where transformers' own mask code makes one or
two (it reads the padding mask, or the packed positions, back to decide what to build)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from profile_step import SYNC_READS  # noqa: E402

from ia3_dist.config import IA3Section  # noqa: E402
from ia3_dist.data.collate import label_positions, to_device  # noqa: E402
from ia3_dist.models.families import batch_inputs  # noqa: E402
from ia3_dist.models.ia3 import apply_ia3  # noqa: E402
from ia3_dist.models.loss import TokenSumLM  # noqa: E402

T = 12
# Sliding windows shorter than the rows, so that they change the masks: Mistral's on every layer, Qwen2's on its
# second layer only (config.layer_types mixes full and sliding layers).
CONFIGS = {
    "llama": {},
    "gpt_neox": {},
    "mistral": {"sliding_window": 5},
    "qwen2": {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 1},
}


def _model(model_type: str, impl: str) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
          "intermediate_size": 64, "max_position_embeddings": 64, **CONFIGS[model_type]}
    if model_type != "gpt_neox":
        kw["num_key_value_heads"] = 2
    cfg = AutoConfig.for_model(model_type, **kw)
    if model_type == "qwen2":
        assert cfg.layer_types == ["full_attention", "sliding_attention"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=impl).float()
    peft = apply_ia3(model, IA3Section())
    with torch.no_grad():
        for _, p in peft.named_parameters():
            if p.requires_grad:
                p.uniform_(0.5, 1.5)
    return peft


def _batch(side: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    lengths = [T, T, T] if side == "none" else [T, 7, 3]
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    labels = torch.full((3, T), -100)
    for r, n in enumerate(lengths):
        sl = slice(T - n, T) if side == "left" else slice(0, n)
        ids[r, sl] = torch.randint(1, 64, (n,), generator=g)
        mask[r, sl] = 1
        labels[r, sl] = ids[r, sl]
    labels[:, :1] = -100
    # label_pos as the training batches carry it (found on the host: no nonzero on the device).
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "label_pos": label_positions(labels)}


def _loss_and_grads(module: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list]:
    module.zero_grad()
    loss, _ = module(**batch)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in module.parameters() if p.requires_grad]


def _syncs(fn, **kw: object) -> int:  # noqa: ANN001
    """Host syncs (values read back, data-dependent shapes) while ``fn(**kw)`` runs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof, torch.no_grad():
        fn(**kw)
    return sum(1 for e in prof.events() if e.name in SYNC_READS)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_padded_masks_equal_transformers_and_read_nothing_back(model_type: str, impl: str) -> None:
    peft = _model(model_type, impl)
    base = peft.get_base_model()
    ours, theirs = TokenSumLM(peft, inputs=batch_inputs(base)), TokenSumLM(peft)
    for side in ("right", "left", "none"):
        batch = _batch(side)
        # The device copy: an all-ones mask is left out ("none"), as the training loop sends it.
        sent = to_device(batch, torch.device("cpu"))
        assert ("attention_mask" in sent) is (side != "none")
        got, want = _loss_and_grads(ours, sent), _loss_and_grads(theirs, batch)
        torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
        for a, b in zip(got[1], want[1], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        assert _syncs(ours, **sent) == 0, side
        if impl == "sdpa" and model_type != "mistral":
            # What the masks built here save: transformers reads the padding mask back to choose its mask (not
            # on layers whose window is shorter than the row, all of this Mistral's: those always get a mask).
            assert _syncs(theirs, **batch) > 0


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_packed_masks_equal_transformers_and_read_nothing_back(model_type: str, impl: str) -> None:
    """Two documents in a row, then padding: the logits of transformers' own packed path (no mask, positions that
    restart: it finds the documents by reading the positions back) where a label is."""
    peft = _model(model_type, impl)
    base = peft.get_base_model()
    inputs = batch_inputs(base, packing=True)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 64, (2, T), generator=g)
    seq_ids = torch.tensor([[1] * 7 + [2] * 4 + [0], [1] * 9 + [0] * 3])
    position_ids = torch.tensor([list(range(7)) + list(range(4)) + [0], list(range(9)) + list(range(3))])
    with torch.no_grad():
        kw = inputs(ids, None, seq_ids, position_ids, torch.float32)
        got = base(input_ids=ids, use_cache=False, **kw).logits
        want = base(input_ids=ids, use_cache=False, position_ids=position_ids).logits
    real = seq_ids > 0
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-6)
    def forward() -> None:  # the masks built, then the model run
        base(input_ids=ids, use_cache=False, **inputs(ids, None, seq_ids, position_ids, torch.float32))

    assert _syncs(forward) == 0
    if impl == "sdpa":
        assert _syncs(base, input_ids=ids, use_cache=False, position_ids=position_ids) > 0


def test_other_attention_implementations_keep_transformers_masks() -> None:
    """An implementation this module does not build masks for (flash-attention reads packed positions as
    variable-length sequences, and a 2-D padding mask to unpad) gets what transformers takes from the batch."""
    peft = _model("llama", "sdpa")
    base = peft.get_base_model()
    base.config._attn_implementation = "flash_attention_2"
    mask = torch.tensor([[1, 1, 0]])
    seq_ids, pos = torch.tensor([[1, 2, 0]]), torch.tensor([[0, 0, 0]])
    ids = torch.ones(1, 3, dtype=torch.long)
    padded = batch_inputs(base)(ids, mask, None, None, torch.float32)
    assert padded["attention_mask"] is mask
    packed = batch_inputs(base, packing=True)(ids, None, seq_ids, pos, torch.float32)
    assert packed["attention_mask"] is None and packed["position_ids"] is pos
