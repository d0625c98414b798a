"""Model families beyond Bloom: each family's facts agree with PEFT and with the model itself, the preflight says
which support case a model is in (and refuses one IA3 cannot target), and export + generate/chat work on a tiny
random model of each family, in the tokenizer's own chat template where it ships one."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from _families import CHAT, FAMILY_TYPES

from ia3_dist.cli import main
from ia3_dist.config import IA3Section
from ia3_dist.data.template import CHAT_TEMPLATE, HUMAN_ASSISTANT
from ia3_dist.errors import UsageError
from ia3_dist.models.families import FAMILIES, peft_ia3_defaults, support_case
from ia3_dist.models.load import base_on_meta, decoder_blocks
from ia3_dist.models.zero3_load import check_checkpoint
from ia3_dist.tools.inference import load_for_inference
from ia3_dist.train.demo import make_records


def _dir(model_type: str, family_models: dict, tiny_model: Path) -> Path:
    return tiny_model if model_type == "bloom" else family_models[model_type]


@pytest.mark.parametrize("model_type", ["bloom", *FAMILY_TYPES])
def test_family_facts_agree_with_peft_and_the_model(model_type: str, family_models: dict, tiny_model: Path) -> None:
    from transformers import AutoConfig

    fam = FAMILIES[model_type]
    assert (list(fam.target_modules), list(fam.feedforward_modules)) == peft_ia3_defaults(model_type)
    d = _dir(model_type, family_models, tiny_model)
    config = AutoConfig.from_pretrained(str(d))
    check_checkpoint(config, d)  # every parameter found under the family's checkpoint key names
    model = base_on_meta(config)
    blocks = list(fam.block_list(model))
    assert blocks and blocks == decoder_blocks(model)
    assert fam.checkpoint_prefix == model.base_model_prefix
    names = {n for n, _ in blocks[-1].named_modules()}
    for t in fam.target_modules:  # every default target names a module of the last block
        assert any(n == t or n.endswith(f".{t}") for n in names), t


def _tiny_dir(kind: str, family_models: dict, root: Path) -> Path:
    """A tiny random model of a type that is not a tested family: gpt2 (PEFT has IA3 defaults for it) or phi3
    (it has none), with the tiny tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(family_models["mistral"]))
    shape = {"vocab_size": len(tok), "n_embd": 32, "n_layer": 1, "n_head": 2} if kind == "gpt2" else {
        "vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 2, "pad_token_id": tok.pad_token_id}
    d = root / kind
    AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **shape)).save_pretrained(str(d))
    tok.save_pretrained(str(d))
    return d


@pytest.mark.slow
def test_preflight_states_the_support_case(tmp_path: Path, family_models: dict, capsys) -> None:
    data = tmp_path / "d.json"
    data.write_text(json.dumps(make_records(8, 3, None), ensure_ascii=False), encoding="utf-8")
    common = [f"data.path={data}", f"output.dir={tmp_path / 'out'}", f"data.cache_dir={tmp_path}"]

    def check(model: Path, *extra: str) -> tuple[int, str]:
        rc = main(["check", f"model.path={model}", *common, *extra])
        out = capsys.readouterr()
        return rc, out.out + out.err

    rc, out = check(family_models["qwen2"])
    assert rc == 0 and "model: qwen2 (Qwen2 family, tested); IA3 on q_proj, v_proj, down_proj (PEFT's" in out, out
    assert "the tokenizer ships a chat template; data.template=chat_template" in out
    rc, out = check(_tiny_dir("gpt2", family_models, tmp_path))
    assert rc == 0 and "model: gpt2 (untested family; PEFT has IA3 defaults for it); IA3 on c_attn, mlp.c_proj" in out
    phi3 = _tiny_dir("phi3", family_models, tmp_path)
    rc, out = check(phi3)
    assert rc == 2 and "model_type 'phi3' is not a tested family" in out and "set ia3.target_modules" in out, out
    assert not (tmp_path / "out").exists()
    rc, out = check(phi3, "ia3.target_modules=[qkv_proj,down_proj]", "ia3.feedforward_modules=[down_proj]")
    assert rc == 0 and "model: phi3 (untested family; ia3.target_modules given); IA3 on qkv_proj, down_proj" in out
    # Names that match no module fail in the preflight, not after the ranks have met.
    rc, out = check(phi3, "ia3.target_modules=[q_proj]")
    assert rc == 2 and "q_proj" in out, out


def test_support_case_refuses_without_targets() -> None:
    from transformers import AutoConfig

    cfg = AutoConfig.for_model("phi3")
    with pytest.raises(UsageError, match="no IA3 defaults"):
        support_case(cfg, IA3Section())
    assert support_case(cfg, IA3Section(target_modules=["qkv_proj"]))[0] == "explicit-targets"
    assert support_case(AutoConfig.for_model("gpt2"), IA3Section())[0] == "peft-defaults"
    assert support_case(AutoConfig.for_model("llama"), IA3Section())[0] == "tested"


@pytest.mark.slow
@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_export_and_generate_each_family(model_type: str, family_models: dict, tmp_path: Path, capsys,
                                         monkeypatch) -> None:
    """An IA3 adapter on the family's tiny model (vectors drawn away from 1), saved as PEFT saves it (no
    ia3_dist.json): export merges it (logits equal to the adapter's, not the base's), generate and chat answer
    the same from the adapter and the merged dir, in the tokenizer's chat template where it ships one."""
    from transformers import AutoModelForCausalLM

    from ia3_dist.models.ia3 import apply_ia3

    peft = apply_ia3(AutoModelForCausalLM.from_pretrained(str(family_models[model_type])), IA3Section())
    torch.manual_seed(0)
    with torch.no_grad():
        for _, p in peft.named_parameters():
            if p.requires_grad:
                p.uniform_(0.5, 1.5)
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    peft.save_pretrained(str(adapter))
    assert main(["export", "--adapter", str(adapter), "--out", str(merged)]) == 0
    a_model, tok, a_tpl, _ = load_for_inference(str(adapter))
    m_model, _, m_tpl, _ = load_for_inference(str(merged))
    want = CHAT_TEMPLATE if CHAT[model_type][0] else HUMAN_ASSISTANT
    assert a_tpl.kind == m_tpl.kind == want
    if want == CHAT_TEMPLATE:
        assert a_tpl.prompt_for([], "", "你好", "", tok).startswith(("<s><|start_header_id|>user", "<|im_start|>user"))
    enc = tok(["Human: 请介绍一下猫。", "你知道长城吗？简短回答。"], return_tensors="pt", padding=True)
    with torch.no_grad():
        a, m = a_model(**enc).logits, m_model(**enc).logits
        with a_model.disable_adapter():
            base = a_model(**enc).logits
    torch.testing.assert_close(m, a, rtol=1e-5, atol=1e-5)
    assert (base - a).abs().max() > 1e-3
    capsys.readouterr()
    # Sampled from a seed: a random model's greedy answer may be only whitespace or special tokens (with tied
    # embeddings it repeats the prompt's last token), which decode to an empty string.
    opts = ["--max-new-tokens", "6", "--sample", "--seed", "1"]
    answers = []
    for d in (adapter, merged):
        assert main(["generate", "--adapter", str(d), *opts, "请介绍一下猫。"]) == 0
        answers.append(json.loads(capsys.readouterr().out.splitlines()[-1])["response"])
    assert answers[0] == answers[1] and answers[0]
    monkeypatch.setattr("sys.stdin", io.StringIO("请介绍一下猫。\n/quit\n"))
    assert main(["chat", "--adapter", str(merged), *opts]) == 0
    assert answers[0] in capsys.readouterr().out


DROPOUT_CONFIGS = {
    "bloom": {"vocab_size": 64, "hidden_size": 24, "n_layer": 2, "n_head": 3, "hidden_dropout": 0.3,
              "attention_dropout": 0.3},
    "gpt_neox": {"vocab_size": 64, "hidden_size": 24, "intermediate_size": 48, "num_hidden_layers": 2,
                 "num_attention_heads": 3, "hidden_dropout": 0.3, "attention_dropout": 0.3},
    "llama": {"vocab_size": 64, "hidden_size": 24, "intermediate_size": 48, "num_hidden_layers": 2,
              "num_attention_heads": 3, "attention_dropout": 0.3, "attn_implementation": "eager"},
}


def _dropout_model(model_type: str, tmp_path: Path, zero3: bool) -> torch.nn.Module:
    """The tiny model as each ZeRO path hands it over: ``from_pretrained`` (ZeRO 0-2, eval mode) or
    ``from_config`` (ZeRO-3's build_partitioned, train mode)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ia3_dist.config import ModelSection
    from ia3_dist.models.ia3 import apply_ia3
    from ia3_dist.models.load import load_base_model

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **DROPOUT_CONFIGS[model_type]))
    if not zero3:
        if not (tmp_path / model_type).is_dir():
            base.save_pretrained(str(tmp_path / model_type))
        base = load_base_model(ModelSection(), str(tmp_path / model_type), "fp32")
    return apply_ia3(base, IA3Section())


def _logps(wrapper: torch.nn.Module) -> list[torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(0, 64, (2, 9))
    return [wrapper(ids, torch.arange(3, 8), ids[0, 4:9], torch.ones_like(ids)) for _ in range(3)]


@pytest.mark.parametrize("zero3", [False, True], ids=["zero0", "zero3"])
@pytest.mark.parametrize("model_type", sorted(DROPOUT_CONFIGS))
def test_training_module_mode_and_dropout(model_type: str, zero3: bool, tmp_path: Path) -> None:
    """SFT trains in train mode from step 1 on every ZeRO path (HF Trainer's model.train(): dropout on); the
    preference objectives in train mode with every dropout at 0 (TRL's disable_dropout=True), the family's
    functional ones (Bloom's hidden_dropout, the attention dropout probabilities) included."""
    import types

    from ia3_dist.train.objectives.preference import Preference
    from ia3_dist.train.objectives.sft import SFT

    sft = SFT().module(_dropout_model(model_type, tmp_path, zero3), None, 0, None)
    assert all(m.training for m in sft.modules())
    for objective in ("dpo", "orpo", "simpo"):
        t = types.SimpleNamespace(objective=objective, cpo_alpha=0.0)
        wrapper = Preference(t).module(_dropout_model(model_type, tmp_path, zero3), None, 0, None)
        assert all(m.training for m in wrapper.modules())
        assert all(m.p == 0 for m in wrapper.modules() if isinstance(m, torch.nn.Dropout))
        runs = _logps(wrapper)
        assert all(torch.equal(runs[0], r) for r in runs[1:])


def test_evaluation_restores_each_module_mode() -> None:
    """A blanket .train() after evaluating turned on what had been in eval mode (dropout then depended on whether
    an evaluation had run)."""
    from ia3_dist.train.evaluate import eval_mode

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5)).train()
    model[1].eval()
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert model.training and model[0].training and not model[1].training
