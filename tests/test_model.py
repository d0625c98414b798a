"""Model code: the bloom-1b4-zh IA3 parameter line from config alone; the token-sum loss equals HF's loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ia3_dist.config import DataSection, IA3Section
from ia3_dist.data.collate import collate
from ia3_dist.data.tokenize import load_or_tokenize
from ia3_dist.models.families import FAMILIES, arch_config
from ia3_dist.models.families.bloom import LastMLPRows
from ia3_dist.models.ia3 import apply_ia3, build_on_meta, trainable_line
from ia3_dist.models.loss import TokenSumLM
from ia3_dist.train.demo import make_records


def test_bloom_1b4_zh_from_config_on_meta(capsys: pytest.CaptureFixture) -> None:
    model = build_on_meta(arch_config("bloom-1b4-zh"))
    line = trainable_line(model)
    assert line.startswith("trainable params: 344,064 || all params: 1,303,455,744 || trainable%:"), line
    names = {n.split(".ia3_l")[0].split(".")[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"query_key_value", "dense_4h_to_h"}
    assert all(p.device.type == "meta" for p in model.parameters())


def test_custom_targets() -> None:
    model = build_on_meta(arch_config("bloom-560m"), IA3Section(target_modules=["query_key_value"],
                                                                 feedforward_modules=[]))
    assert "trainable params: 73,728 ||" in trainable_line(model)  # 24 layers x 3 x 1024


def _data_and_model(tmp_path: Path, tiny_model: Path, tokenizer) -> tuple:
    """16 demo records tokenized, and the tiny Bloom with IA3 vectors drawn away from 1 (so they matter)."""
    from transformers import AutoModelForCausalLM

    f = tmp_path / "d.json"
    f.write_text(json.dumps(make_records(16, 9, None), ensure_ascii=False), encoding="utf-8")
    data = load_or_tokenize(DataSection(path=str(f), cache_dir=str(tmp_path)), tokenizer)
    peft = apply_ia3(AutoModelForCausalLM.from_pretrained(str(tiny_model)), IA3Section())
    with torch.no_grad():
        for _, p in peft.named_parameters():
            if p.requires_grad:
                p.uniform_(0.5, 1.5)
    return data, peft


def test_token_sum_loss_equals_hf_loss(tmp_path: Path, tiny_model: Path, tiny_tokenizer) -> None:
    data, peft = _data_and_model(tmp_path, tiny_model, tiny_tokenizer)
    plain = TokenSumLM(peft)
    rows = TokenSumLM(peft, LastMLPRows(peft.get_base_model().transformer.h[-1]))
    assert rows.rows is not None
    # Label rows through the LM head 3 at a time, each chunk recomputed in backward.
    head = peft.get_base_model().get_output_embeddings()
    chunked = TokenSumLM(peft, chunk_bytes=3 * 4 * head.out_features)
    calls: list[int] = []
    hook = head.register_forward_hook(lambda m, args, out: calls.append(len(args[0])))
    for side in ("left", "right"):
        b = collate(data, [0, 5, 9, 11], tiny_tokenizer.pad_token_id, side)
        hf = peft(**b).loss
        grads = []
        for wrapper in (plain, rows, chunked):
            calls.clear()
            peft.zero_grad()
            loss_sum, n = wrapper(**b)
            assert n.item() == (b["labels"][:, 1:] != -100).sum().item()
            torch.testing.assert_close(loss_sum / n, hf, rtol=1e-6, atol=1e-6)
            (loss_sum / n).backward()
            grads.append({k: q.grad.clone() for k, q in peft.named_parameters() if q.requires_grad})
            if wrapper is chunked:  # forward chunks, then the same again in backward; never more than 3 rows
                assert max(calls) == 3 and sum(calls) == 2 * n.item(), calls
        # The last MLP on label rows only: same loss, same IA3 gradients; the full model afterwards is unaffected.
        for k in grads[0]:
            torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(grads[2][k], grads[0][k], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(peft(**b).loss, hf, rtol=0, atol=0)
    hook.remove()


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral", "gpt_neox"])
def test_family_last_mlp_rows_equal_full(model_type: str, tmp_path: Path, family_models: dict) -> None:
    """Llama-style blocks (and GPT-NeoX's): the last MLP at label rows only, scattered back into the residual,
    gives the same loss as HF's and the same IA3 gradients as the full model, with left and right padding; the
    MLP saw only label rows; with the selector idle the model is untouched."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(family_models[model_type]))
    data, peft = _data_and_model(tmp_path, family_models[model_type], tok)
    base = peft.get_base_model()
    selector = FAMILIES[model_type].last_rows(base)
    plain, rows = TokenSumLM(peft), TokenSumLM(peft, selector)
    mlp = FAMILIES[model_type].block_list(base)[-1].mlp
    seen: list[int] = []
    hook = mlp.register_forward_pre_hook(lambda m, args: seen.append(args[0].reshape(-1, args[0].shape[-1]).shape[0]))
    for side in ("left", "right"):
        b = collate(data, [0, 5, 9, 11], tok.pad_token_id, side)
        hf = peft(**b).loss
        grads = []
        for wrapper in (plain, rows):
            seen.clear()
            peft.zero_grad()
            loss_sum, n = wrapper(**b)
            torch.testing.assert_close(loss_sum / n, hf, rtol=1e-6, atol=1e-6)
            (loss_sum / n).backward()
            grads.append({k: q.grad.clone() for k, q in peft.named_parameters() if q.requires_grad})
            assert seen == [b["input_ids"].numel() if wrapper is plain else n.item()], seen
        for k in grads[0]:
            torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(peft(**b).loss, hf, rtol=0, atol=0)
    hook.remove()


@pytest.mark.parametrize("kind", ["sdpa", "flex"])
def test_fused_attention_equals_eager(kind: str, tmp_path: Path, tiny_model: Path, tiny_tokenizer) -> None:
    """model.attention=sdpa and flex (FlexAttention, ALiBi as a score_mod): the same loss and IA3 gradients as
    Bloom's eager attention (fp32 rounding), with left and right padding and on packed rows; switching back
    restores the eager forward. FlexAttention has no backward on CPU (torch 2.13): there the loss is compared
    (the gradients on a GPU, bench/gpu_check.sh) and training with it is refused in the preflight."""
    from ia3_dist.data.packing import collate_packed
    from ia3_dist.models.families import batch_inputs
    from ia3_dist.models.families.bloom import set_attention

    data, peft = _data_and_model(tmp_path, tiny_model, tiny_tokenizer)
    wrapper = TokenSumLM(peft, inputs=batch_inputs(peft.get_base_model(), packing=True))
    attn = peft.get_base_model().transformer.h[0].self_attention
    backward = kind != "flex" or torch.cuda.is_available()
    packed = collate_packed(data, [[0, 5], [9, 11]], tiny_tokenizer.pad_token_id,
                            sum(len(data.example(i)[0]) for i in (0, 5, 9, 11)))
    for b in (collate(data, [0, 5, 9, 11], tiny_tokenizer.pad_token_id, "left"),
              collate(data, [0, 5, 9, 11], tiny_tokenizer.pad_token_id, "right"), packed):
        results = []
        for k_ in ("eager", kind):
            assert set_attention(peft, k_) == len(peft.get_base_model().transformer.h)
            assert ("forward" in attn.__dict__) == (k_ == kind)
            peft.zero_grad()
            with torch.set_grad_enabled(backward):
                loss_sum, n = wrapper(**b)
            if backward:
                (loss_sum / n).backward()
            results.append((loss_sum.detach(), {k: q.grad.clone() for k, q in peft.named_parameters()
                                                if q.requires_grad and q.grad is not None}))
        (le, ge), (ls, gs) = results
        torch.testing.assert_close(ls, le, rtol=1e-6, atol=1e-5)
        assert len(gs) == len(ge) == (len(ge) if backward else 0)
        for k in ge:
            torch.testing.assert_close(gs[k], ge[k], rtol=1e-5, atol=1e-6)
    set_attention(peft, "eager")
    assert "forward" not in attn.__dict__


def test_fused_gelu_equals_bloom_gelu() -> None:
    """model.fused_gelu: the fused tanh GeLU against transformers' BloomGelu (the training-mode autograd function
    and the eval-mode formula), forward and backward, over inputs up to |x| ~ 40. Measured: 4.8e-7 absolute on the
    output, 1.1e-6 relative (to the upstream gradient) on the input gradient."""
    from transformers.models.bloom.modeling_bloom import BloomGelu

    from ia3_dist.models.families.bloom import TanhGelu

    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(1 << 13, generator=g) * s for s in (1.0, 4.0, 10.0)])
    up = torch.randn(x.shape, generator=g)
    ours_in = x.clone().requires_grad_(True)
    ours = TanhGelu()(ours_in)
    ours.backward(up)
    for mode in ("train", "eval"):
        ref_in = x.clone().requires_grad_(True)
        ref = getattr(BloomGelu(), mode)()(ref_in)
        assert (ours - ref).abs().max().item() <= 6e-7, mode
        ref.backward(up)
        assert ((ours_in.grad - ref_in.grad).abs() / up.abs().clamp_min(1.0)).max().item() <= 2e-6, mode
    # The comparison is not vacuous: the exact (erf) GeLU differs from the tanh formula by far more.
    assert (torch.nn.functional.gelu(x) - ours).abs().max().item() > 1e-4


@pytest.mark.skipif(torch.cuda.is_available(), reason="FlexAttention trains on GPUs")
def test_flex_attention_training_is_refused_on_cpu(tmp_path: Path, tiny_model: Path, capsys) -> None:
    from test_config_hardening import check_exits_2

    err = check_exits_2(tmp_path, tiny_model, capsys, ["model.attention=flex"])
    assert "model.attention" in err and "no backward pass on CPU" in err, err


def test_packing_with_flash_attention_at_micro_batch_2_is_refused(tmp_path: Path, family_models: dict[str, Path],
                                                                  capsys) -> None:
    """A config.json naming flash-attention: transformers keeps packed documents apart under flash only in a
    one-row batch, so packing at micro-batch 2 would attend across documents silently. Exit 2 naming both keys."""
    import json
    import shutil

    from test_config_hardening import check_exits_2

    model = tmp_path / "flash-model"
    shutil.copytree(family_models["llama"], model)
    conf = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**conf, "attn_implementation": "flash_attention_2"}))
    err = check_exits_2(tmp_path, model, capsys, ["data.packing=true", "train.micro_batch_size=2",
                                                  "train.grad_accum=2"])
    assert "data.packing" in err and "flash_attention_2" in err and "train.micro_batch_size=1" in err, err


def test_bf16_on_a_gpu_without_native_bf16_is_refused() -> None:
    """A V100 (7.0) or T4 (7.5) emulates bf16 or fails in DeepSpeed's kernels: exit 2 naming train.precision and
    the GPU, before any rank waits. The device is a stand-in (this machine has none); fp16, fp32 and the CPU pass."""
    from types import SimpleNamespace

    from ia3_dist.errors import UsageError
    from ia3_dist.train.prepare import check_device_precision

    def gpu(native: bool, cap: tuple[int, int], name: str) -> SimpleNamespace:
        return SimpleNamespace(is_available=lambda: True, get_device_capability=lambda: cap,
                               get_device_name=lambda: name, is_bf16_supported=lambda including_emulation: native)

    with pytest.raises(UsageError, match=r"train\.precision.*Tesla V100-SXM2-32GB \(compute capability 7\.0\).*fp16"):
        check_device_precision("bf16", gpu(False, (7, 0), "Tesla V100-SXM2-32GB"))
    check_device_precision("fp16", gpu(False, (7, 0), "Tesla V100-SXM2-32GB"))
    check_device_precision("fp32", gpu(False, (7, 5), "Tesla T4"))
    check_device_precision("bf16", gpu(True, (9, 0), "NVIDIA H100 80GB HBM3"))
    check_device_precision("bf16")  # this machine's torch.cuda: no GPU, bf16 on the CPU


def test_gradients_are_copied_before_autograd_keeps_them() -> None:
    """train.compile_mode: reduce-overhead: what a (CUDA-graph) backward returns is never kept as .grad itself -
    the next replay would overwrite it - and the accumulated gradient is the same."""
    from ia3_dist.models.load import copy_gradients

    lin = torch.nn.Linear(3, 2)
    lin.bias.requires_grad_(False)
    returned = []
    lin.weight.register_hook(lambda g: returned.append(g))  # sees what the backward returned, before the copy
    assert copy_gradients(lin) == 1
    x = torch.randn(4, 3)
    for _ in range(2):  # two micro-steps, accumulated
        lin(x).sum().backward()
    assert all(lin.weight.grad.data_ptr() != g.data_ptr() for g in returned)
    torch.testing.assert_close(lin.weight.grad, 2 * returned[0])


FINAL_LOGIT_CONFIGS = {
    "gemma2": {"head_dim": 8, "final_logit_softcapping": 3.0},
    "cohere": {"logit_scale": 0.3},
    "granite": {"logits_scaling": 0.25},
}


@pytest.mark.parametrize("model_type", sorted(FINAL_LOGIT_CONFIGS))
def test_losses_apply_the_model_final_logit_transform(model_type: str) -> None:
    """The losses call the LM head themselves; the transform the model's own forward applies to its logits
    (Gemma2's soft cap, Cohere's scale, Granite's divisor) must follow, or they train on logits the model never
    produces: the token-sum loss is HF's loss, the log-probs are log_softmax of HF's logits."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ia3_dist.data.collate import label_positions
    from ia3_dist.models.loss import TokenLogpLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager",
                               **FINAL_LOGIT_CONFIGS[model_type])
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40)  # logits large enough for a cap of 3 to matter
    # Explicit targets: PEFT has no IA3 defaults for Cohere or Granite (the preflight's explicit-targets case).
    peft = apply_ia3(model, IA3Section(target_modules=["k_proj", "v_proj", "down_proj"],
                                       feedforward_modules=["down_proj"]))
    ids = torch.randint(0, 64, (2, 10))
    labels = ids.clone()
    labels[:, :3] = -100
    mask = torch.ones_like(ids)
    hf = model(input_ids=ids, attention_mask=mask, labels=labels)
    s, n = TokenSumLM(peft).eval()(ids, labels, mask, label_pos=label_positions(labels))
    torch.testing.assert_close(s / n, hf.loss, rtol=1e-5, atol=1e-5)
    pos, target = torch.arange(3, 9), ids[1, 4:10]
    lp = TokenLogpLM(peft).eval()(ids, pos + 10, target, mask)
    torch.testing.assert_close(lp, torch.log_softmax(hf.logits[1, 3:9].float(), -1).gather(1, target[:, None])[:, 0],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_orpo_log1mexp_has_finite_gradients_near_zero(dtype: torch.dtype) -> None:
    """torch.where differentiates both branches: exp(x) rounding to 1 (or x = 0) made the unused one's gradient
    NaN, and ORPO's whole step with it. Values stay TRL's wherever TRL's formula is finite."""
    from ia3_dist.train.objectives.preference import log1mexp

    x = torch.tensor([-2e-8, -1e-30, 0.0], dtype=dtype, requires_grad=True)
    log1mexp(x).sum().backward()
    assert torch.isfinite(x.grad).all(), x.grad
    grid = -torch.logspace(-30, 2, 400, dtype=dtype)
    t = -0.6931471805599453
    trl = torch.where(grid < t, torch.log1p(-torch.exp(grid)), torch.log(-torch.expm1(grid)))
    ok = torch.isfinite(trl)
    assert ok.sum() > 300 and torch.equal(log1mexp(grid)[ok], trl[ok])


def test_export_keeps_the_bases_dtype(tmp_path: Path, tiny_model: Path) -> None:
    """export's default dtype is the base's own: a bf16 base is written in bf16 (in fp32 it took twice the disk
    and memory, and its config said float32), its logits those of the adapter on the bf16 base; --dtype picks."""
    import json

    from peft import IA3Config, PeftModel, get_peft_model
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ia3_dist.cli import main

    base = tmp_path / "base-bf16"
    AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.bfloat16).save_pretrained(str(base))
    AutoTokenizer.from_pretrained(str(tiny_model)).save_pretrained(str(base))
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)), IA3Config(task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "ia3_l" in n:
                p.uniform_(0.5, 1.5)
    pm.save_pretrained(str(tmp_path / "adapter"))
    assert main(["export", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "m")]) == 0
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    conf = json.loads((tmp_path / "m" / "config.json").read_text())
    assert conf.get("dtype", conf.get("torch_dtype")) == "bfloat16"
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), dtype=torch.bfloat16).eval()
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16),
                                    str(tmp_path / "adapter")).eval()
    ids = torch.tensor([[5, 9, 14, 3, 7, 11]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits.float(), ref(ids).logits.float(), rtol=0.05, atol=0.05)
    assert main(["export", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "m32"),
                 "--dtype", "fp32"]) == 0
    with safe_open(str(tmp_path / "m32" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}


def test_dropout_is_off_for_preference_training_in_a_model_of_no_family() -> None:
    """Qwen3 and Gemma (PEFT-default cases, no family here) apply attention dropout functionally from a float
    attribute: zeroed with the nn.Dropout modules, or the policy's log-probs would be noisy against a dropout-free
    reference."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ia3_dist.models.families import disable_dropout, family_of

    for mt in ("qwen3", "gemma"):
        c = AutoConfig.for_model(mt, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=4, head_dim=8, attention_dropout=0.3,
                                 pad_token_id=0, bos_token_id=1, eos_token_id=2)
        m = AutoModelForCausalLM.from_config(c)
        assert family_of(m.config) is None
        assert disable_dropout(m) >= 1
        assert all(getattr(mod, "attention_dropout", 0.0) == 0.0 for mod in m.modules()), mt
