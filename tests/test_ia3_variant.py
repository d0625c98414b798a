"""``ia3.variant: paper``: keys and values only on a fused q,k,v (the query entries of its vector are exactly 1.0
and untrained), keys/values/down on separate projections; the layout each family gives its fused output; the
counts; and a real run whose adapter loads with ``PeftModel.from_pretrained``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _util import adapter_tensors, check, launch

from ia3_dist.config import IA3Section
from ia3_dist.errors import UsageError
from ia3_dist.models.ia3 import apply_ia3, fixed_entries, paper_targets, query_entries, trainable_line

FUSED = {
    "bloom": {"vocab_size": 64, "hidden_size": 24, "n_layer": 2, "n_head": 3},
    "gpt_neox": {"vocab_size": 64, "hidden_size": 24, "intermediate_size": 48, "num_hidden_layers": 2,
                 "num_attention_heads": 3, "rotary_pct": 1.0},
}


def _tiny(model_type: str, section: IA3Section) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, **FUSED[model_type])
    cfg._attn_implementation = "eager"
    return apply_ia3(AutoModelForCausalLM.from_config(cfg), section).eval()


def _qkv_vectors(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if "query_key_value.ia3_l" in n]


IDS = torch.tensor([[3, 17, 5, 40, 9, 22]])


@pytest.mark.parametrize("model_type", sorted(FUSED))
def test_query_entries_are_where_the_family_reads_its_queries(model_type: str) -> None:
    """Scaling the entries we call queries by 2 and the ones after them (keys) by 1/2 leaves every q.k product,
    hence the model's output, unchanged (powers of two: exact, rotary included); the first third (Bloom's and
    GPT-NeoX's layout is per head [q, k, v], not [all q, all k, all v]) does not."""
    model = _tiny(model_type, IA3Section())
    heads, width = 3, 3 * 24
    q = query_entries(width, heads)
    k = torch.roll(q, 24 // heads)  # the next head_dim entries of every head
    with torch.no_grad():
        ref = model(IDS).logits
        for vec in _qkv_vectors(model):
            vec.copy_((1 + q.float() - 0.5 * k.float()).view_as(vec))
        assert torch.allclose(model(IDS).logits, ref, rtol=1e-6, atol=1e-6)
        first_third = torch.arange(width) < width // 3
        middle_third = (torch.arange(width) >= width // 3) & (torch.arange(width) < 2 * width // 3)
        for vec in _qkv_vectors(model):
            vec.copy_((1 + first_third.float() - 0.5 * middle_third.float()).view_as(vec))
        assert not torch.allclose(model(IDS).logits, ref, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("model_type", sorted(FUSED))
def test_paper_query_entries_are_exactly_one_and_get_no_gradient(model_type: str) -> None:
    """Whatever the stored query entries become (weight decay shrinks them), the forward pass uses exactly 1.0
    there, bit for bit PEFT's own output with a vector whose query part is 1.0, and gives them a zero gradient."""
    paper, plain = _tiny(model_type, IA3Section(variant="paper")), _tiny(model_type, IA3Section())
    q = query_entries(3 * 24, 3)
    torch.manual_seed(1)
    with torch.no_grad():
        for a, b in zip(_qkv_vectors(paper), _qkv_vectors(plain), strict=True):
            drawn = 1 + 0.3 * torch.randn(a.shape)
            a.copy_(drawn.masked_fill(q.view(a.shape), 0.25))  # as if weight decay had pulled them from 1.0
            b.copy_(drawn.masked_fill(q.view(b.shape), 1.0))
    out = paper(IDS).logits
    assert torch.equal(out, plain(IDS).logits)
    out.square().mean().backward()
    for vec in _qkv_vectors(paper):
        g = vec.grad.flatten()
        assert torch.count_nonzero(g[q]) == 0 and torch.count_nonzero(g[~q]) == (~q).sum()
    assert set(fixed_entries(paper)) == {n for n, _ in paper.named_parameters() if "query_key_value.ia3_l" in n}


def test_paper_counts_and_line() -> None:
    """The trained count excludes the query entries: h per layer fewer than PEFT's 7h per layer on Bloom."""
    h, layers = 24, 2
    plain, paper = _tiny("bloom", IA3Section()), _tiny("bloom", IA3Section(variant="paper"))
    assert trainable_line(plain).startswith(f"trainable params: {layers * 7 * h:,d} ||")
    line = trainable_line(paper)
    assert line.startswith(f"trainable params: {layers * 6 * h:,d} ||") and f"{layers * h:,d} query scales" in line
    assert paper.get_nb_trainable_parameters() == plain.get_nb_trainable_parameters()  # the vector keeps its size


def test_paper_targets_and_refusals() -> None:
    assert paper_targets("bloom") is None and paper_targets("gpt_neox") is None
    for mt in ("llama", "mistral", "qwen2"):  # qwen2: PEFT's default scales q_proj; the paper's keys
        assert paper_targets(mt) == (["k_proj", "v_proj", "down_proj"], ["down_proj"])
    with pytest.raises(UsageError, match="gpt2"):
        paper_targets("gpt2")
    with pytest.raises(UsageError, match="ia3.variant"):
        IA3Section(variant="kv")
    with pytest.raises(UsageError, match="ia3.variant"):
        IA3Section(variant="paper", target_modules=["query_key_value"])


def test_the_preflight_line_names_the_paper_variants_modules() -> None:
    """What ia3_config scales: Qwen2's line said q_proj (PEFT's default) where the paper variant trains k_proj."""
    from transformers import AutoConfig

    from ia3_dist.models.families import support_case
    from ia3_dist.models.ia3 import ia3_config

    for mt in ("llama", "mistral", "qwen2"):
        line = support_case(AutoConfig.for_model(mt), IA3Section(variant="paper"))[1]
        assert set(ia3_config(IA3Section(variant="paper"), mt).target_modules) == {"k_proj", "v_proj", "down_proj"}
        assert "IA3 on k_proj, v_proj, down_proj (ia3.variant=paper" in line, line
    line = support_case(AutoConfig.for_model("bloom"), IA3Section(variant="paper"))[1]
    assert "IA3 on query_key_value, mlp.dense_4h_to_h (ia3.variant=paper" in line and "held at 1.0" in line


@pytest.mark.slow
def test_paper_run_saves_a_plain_adapter(tmp_path: Path, demo_model: Path) -> None:
    """A real run (1 process, ZeRO-3, weight decay on): the adapter loads with PeftModel.from_pretrained, the
    query entries of every fused vector are exactly 1.0 and its key and value entries trained."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "paper"
    proc = check(launch(["--config", "configs/tiny-cpu.yaml", f"output.dir={out}", "ia3.variant=paper",
                         "train.weight_decay=0.5", "train.max_steps=6", "deepspeed.config=zero3",
                         "checkpoint.at_end=false"]))
    h, layers = 128, 4
    assert f"trainable params: {layers * 6 * h:,d} || all params: 950,784" in proc.stdout, proc.stdout[-3000:]
    assert f"{layers * h:,d} query scales of the fused q,k,v fixed at 1.0" in proc.stdout
    base = AutoModelForCausalLM.from_pretrained(str(demo_model))
    model = PeftModel.from_pretrained(base, str(out / "adapter"))
    heads = base.config.num_attention_heads
    q = query_entries(3 * h, heads)
    vecs = {n: p.detach().flatten() for n, p in model.named_parameters() if "query_key_value.ia3_l" in n}
    assert len(vecs) == layers
    for name, v in vecs.items():
        assert v.numel() == 3 * h and torch.equal(v[q], torch.ones(h)), name
        assert (v[~q] - 1).abs().max() > 1e-3, f"{name}: keys and values never trained"


@pytest.mark.parametrize("model_type", sorted(FUSED))
def test_paper_init_from_refuses_an_adapter_with_trained_query_scales(model_type: str, tmp_path: Path) -> None:
    """Its query scales would silently become 1.0: the run would start from another model than the adapter's."""
    from ia3_dist.models.ia3 import load_init_adapter

    default = _tiny(model_type, IA3Section())
    with torch.no_grad():
        for p in _qkv_vectors(default):
            p.uniform_(0.8, 1.2)
    default.save_pretrained(str(tmp_path / "default"))
    with pytest.raises(UsageError, match=r"default/adapter_model.safetensors: .*ia3.variant=default"):
        load_init_adapter(_tiny(model_type, IA3Section(variant="paper")), str(tmp_path / "default"))

    # Query entries of exactly 1.0 (what a paper-variant run saves) are the paper variant's own: accepted.
    paper = _tiny(model_type, IA3Section(variant="paper"))
    params = dict(paper.named_parameters())
    with torch.no_grad():
        for name, mask in fixed_entries(paper).items():
            p = params[name]
            p.copy_(torch.where(mask, 1.0, torch.rand_like(p.flatten()) + 0.5).reshape(p.shape))
    paper.save_pretrained(str(tmp_path / "paper"))
    target = _tiny(model_type, IA3Section(variant="paper"))
    load_init_adapter(target, str(tmp_path / "paper"))
    assert torch.equal(_qkv_vectors(target)[0], _qkv_vectors(paper)[0])


def test_init_from_refuses_non_finite_vectors(tmp_path: Path) -> None:
    """A NaN vector would start the run from a NaN model: every loss non-finite, the run stopped at step 1."""
    from ia3_dist.models.ia3 import load_init_adapter

    model_type = sorted(FUSED)[0]
    src = _tiny(model_type, IA3Section())
    with torch.no_grad():
        _qkv_vectors(src)[-1][0] = float("nan")
    src.save_pretrained(str(tmp_path / "nan"))
    with pytest.raises(UsageError, match=r"nan/adapter_model.safetensors: .*query_key_value.* holds non-finite "
                                         r"values \(NaN or inf\); the adapter is damaged"):
        load_init_adapter(_tiny(model_type, IA3Section()), str(tmp_path / "nan"))


@pytest.fixture(scope="module")
def fp32_adapter(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Path:
    """An adapter trained 2 steps in fp32: vectors that bf16 cannot hold exactly."""
    out = tmp_path_factory.mktemp("fp32-src")
    check(launch(["--config", "configs/tiny-cpu.yaml", f"output.dir={out}", "train.max_steps=2"]))
    vectors = adapter_tensors(out / "adapter")
    assert not all(torch.equal(t, t.bfloat16().float()) for t in vectors.values())
    return out / "adapter"


@pytest.mark.slow
@pytest.mark.parametrize("ds", ["zero0", "zero1", "zero3"])
def test_init_from_gives_bf16_masters_the_files_fp32_values(fp32_adapter: Path, tmp_path: Path, ds: str) -> None:
    """In bf16 the parameters hold ia3.init_from's vectors rounded, and DeepSpeed built its fp32 masters from them:
    an SFT -> DPO run started half a bf16 step (2**-9) off its SFT adapter. The masters now get the file's values:
    a step that moves nothing (lr 1e-30) ends on the file's vectors exactly, on every ZeRO stage's masters."""
    out = tmp_path / ds
    check(launch(["--config", "configs/tiny-cpu.yaml", f"output.dir={out}", f"ia3.init_from={fp32_adapter}",
                  "train.precision=bf16", f"deepspeed.config={ds}", "train.max_steps=1", "train.lr=1e-30",
                  "train.weight_decay=0"]))
    want, got = adapter_tensors(fp32_adapter), adapter_tensors(out / "adapter")
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
