"""The FLOP formula behind tokens-to-TFLOP/s and MFU, and the per-step statistics that travel as one collective."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import BloomConfig, BloomForCausalLM

from ia3_dist.config import IA3Section
from ia3_dist.models.ia3 import apply_ia3
from ia3_dist.models.loss import TokenSumLM
from ia3_dist.train.loop import StepStats, model_shape
from ia3_dist.train.metrics import executed_flops, model_flops


def test_formula_by_hand() -> None:
    # 6 N per token plus 12 L h T per token of a length-T sequence: two sequences of 3 and 5 tokens.
    n, layers, h = 1000, 2, 16
    want = 6 * n * (3 + 5) + 12 * layers * h * (3 * 3 + 5 * 5)
    assert model_flops(torch.tensor([3, 5]), n, layers, h) == want


def test_formula_matches_counted_matmuls() -> None:
    """Forward matmul FLOPs counted by torch equal a third of the training formula (2N + 4LhT per token) within
    a few percent on a small Bloom: the attention term and the (tied) LM head are both accounted for."""
    torch.manual_seed(0)
    cfg = BloomConfig(vocab_size=512, hidden_size=64, n_layer=3, n_head=4)
    model = BloomForCausalLM(cfg).eval()
    T = 96
    ids = torch.randint(0, 512, (2, T))
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(input_ids=ids)
    n = sum(p.numel() for p in model.parameters())  # the tied embedding counts once, as the LM head
    formula = model_flops(torch.tensor([T, T]), n, cfg.n_layer, cfg.hidden_size)
    assert fc.get_total_flops() == pytest.approx(formula / 3, rel=0.05)


def test_step_stats_travel_as_one_tensor_and_add_by_name() -> None:
    a = StepStats(label_tokens=3, real_tokens=10, padded_tokens=12, samples=2, stop_requested=0, flops=5e9)
    b = StepStats(label_tokens=1, real_tokens=4, padded_tokens=4, samples=1, stop_requested=1, flops=1e9)
    a += b
    assert a == StepStats(4, 14, 16, 3, 1, 6e9)
    # No process group: the reduction is the identity, and the fields come back by name.
    assert a.all_reduce() == a


@pytest.mark.parametrize("chunk_rows", [0, 7])
def test_executed_flops_match_counted_forward_and_backward(chunk_rows: int) -> None:
    """An IA3 step's matmuls counted by torch (forward + backward through activations, frozen base, LM head on label
    rows only, optionally chunked and recomputed) match :func:`executed_flops` within a few percent; the 6N figure
    is far above it."""
    torch.manual_seed(0)
    cfg = BloomConfig(vocab_size=512, hidden_size=64, n_layer=6, n_head=4)
    peft = apply_ia3(BloomForCausalLM(cfg), IA3Section())
    wrapper = TokenSumLM(peft, chunk_bytes=chunk_rows * 4 * cfg.vocab_size)
    T, rows = 48, 2
    ids = torch.randint(0, 512, (rows, T))
    labels = ids.clone()
    labels[:, : T // 2] = -100  # the prompt half
    with FlopCounterMode(display=False) as fc:
        loss, n = wrapper(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
        loss.backward()
    shape = model_shape(peft)
    assert shape.vocab == 512 and shape.linear_params == 6 * 12 * 64 * 64
    chunked = float(n) if chunk_rows else 0.0
    want = executed_flops(T, rows, float(n), shape, recompute=False, chunked_rows=chunked)
    assert fc.get_total_flops() == pytest.approx(want, rel=0.05)
    assert model_flops(torch.tensor([T] * rows), shape.n_params, 6, 64) > 1.3 * want


def test_the_peak_follows_the_device_and_the_precision() -> None:
    """MFU's denominator: the tensor-core peak for bf16/fp16, the fp32 peak for an fp32 run (TF32 only where torch
    is told to use it), the device named as a whole word (an H100 PCIe is not an SXM H100, an L40 not an L4)."""
    import torch

    from ia3_dist.train.metrics import device_peak_tflops

    assert device_peak_tflops(0, "bf16", "NVIDIA H100 80GB HBM3") == 989.0
    assert device_peak_tflops(0, "fp16", "NVIDIA H100 PCIe") == 756.0
    assert torch.get_float32_matmul_precision() == "highest"  # torch's default: no TF32
    assert device_peak_tflops(0, "fp32", "NVIDIA H200") == 67.0
    assert device_peak_tflops(0, "fp32", "NVIDIA A100-SXM4-80GB") == 19.5
    torch.set_float32_matmul_precision("high")
    try:
        assert device_peak_tflops(0, "fp32", "NVIDIA A100-SXM4-80GB") == 156.0
        assert device_peak_tflops(0, "fp32", "Tesla T4") == 8.1  # no TF32 there
    finally:
        torch.set_float32_matmul_precision("highest")
    named = {n: device_peak_tflops(0, "bf16", f"NVIDIA {n}") for n in ("L40", "L4", "A10", "L40S")}
    assert named == {"L40": 181.0, "L4": 121.0, "A10": 125.0, "L40S": 362.0}
    assert device_peak_tflops(0, "bf16", "NVIDIA GH200 480GB") == 989.0
    assert device_peak_tflops(0, "bf16", "Some Future GPU") is None
    assert device_peak_tflops(500.0, "fp32", "NVIDIA H100 80GB HBM3") == 500.0  # train.peak_tflops decides
