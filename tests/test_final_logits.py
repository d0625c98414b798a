"""The final-logit transforms the losses apply (``models.loss.FINAL_LOGITS``): the table covers every causal LM of
the installed transformers whose forward changes its logits (read from transformers' own source, so an upgrade that
adds one fails here), each new entry gives the logits the model's own forward gives, and a model type the table
does not know whose config sets a logit soft cap or scale is refused before any rank starts (exit 2)."""

from __future__ import annotations

import ast
import json
import re
import shutil
from functools import cache
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from ia3_dist.errors import UsageError
from ia3_dist.models import loss as L

MODELS = Path(transformers.__file__).parent / "models"

REVIEWED = {
    "musicgen": "slices the sequence to the labels' length, no change to any logit",
    "musicgen_melody": "slices the sequence to the labels' length, no change to any logit",
    "prophetnet": "takes the first of its n-gram streams, no change to any logit",
}
"""Model types whose forward reassigns ``logits`` in a way the scan flags but that changes no logit value."""

KEEP_DTYPE = ("float", "contiguous", "to")


def _chain(node: ast.AST) -> str:
    """``self.a.b`` -> ``self.a.b``; anything else -> ''."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join(["self", *reversed(parts)]) if isinstance(node, ast.Name) and node.id == "self" else ""


def _uses(node: ast.AST, name: str) -> bool:
    return any(isinstance(n, ast.Name) and n.id == name for n in ast.walk(node))


def _arith(node: ast.AST) -> bool:
    return any(isinstance(n, ast.BinOp) for n in ast.walk(node))


def _plain_logits(value: ast.AST) -> bool:
    """``self.<head>(<hidden rows>)``, maybe followed by ``.float()``/``.contiguous()``/``.to(...)``: the head's
    output itself. Arithmetic in the head's input (a hidden-state scale) or any use of ``logits`` (a second
    transform) is not plain."""
    while (isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute) and value.func.attr in KEEP_DTYPE
           and not _chain(value.func)):
        value = value.func.value
    return (isinstance(value, ast.Call) and bool(_chain(value.func))
            and not any(_arith(a) or _uses(a, "logits") for a in [*value.args, *(k.value for k in value.keywords)]))


@cache
def _class_index() -> dict[str, Path]:
    idx: dict[str, Path] = {}
    for f in sorted(MODELS.glob("*/modeling_*.py")):
        for m in re.finditer(r"^class (\w+)\(", f.read_text(encoding="utf-8"), re.M):
            idx.setdefault(m.group(1), f)
    return idx


@cache
def _tree(f: Path) -> tuple[str, ast.Module]:
    src = f.read_text(encoding="utf-8")
    return src, ast.parse(src)


def _forward(name: str) -> tuple[str, ast.FunctionDef]:
    """The source and the ``forward`` that class ``name`` runs (its own, else the first base's that has one)."""
    f = _class_index().get(name)
    assert f is not None, f"class {name} not found under {MODELS}"
    src, tree = _tree(f)
    cls = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == name)
    fwd = next((n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "forward"), None)
    if fwd is not None:
        return src, fwd
    for base in cls.bases:
        if isinstance(base, ast.Name) and base.id in _class_index():
            try:
                return _forward(base.id)
            except AssertionError:
                continue
    raise AssertionError(f"no forward found for {name}")


def logit_changes(class_name: str) -> list[str]:
    """The statements of ``class_name``'s forward that change the logits beyond the LM head's output: any
    reassignment of ``logits`` that is not the plain head call, and arithmetic on the hidden states it is fed."""
    src, fwd = _forward(class_name)
    found = []
    for node in ast.walk(fwd):
        if isinstance(node, ast.AugAssign):
            targets, value = [node.target], node.value
        elif isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        else:
            continue
        names = {t.id for t in targets if isinstance(t, ast.Name)}
        if ("logits" in names and (isinstance(node, ast.AugAssign) or not _plain_logits(value))) or (
                "hidden_states" in names and _arith(value)):
            found.append(" ".join(ast.get_source_segment(src, node).split()))
    return found


@cache
def transformers_logit_changes() -> dict[str, list[str]]:
    """model_type -> what its causal-LM class(es) do to the logits, for those whose forward changes them."""
    out = {}
    for model_type, names in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        for name in names if isinstance(names, tuple) else (names,):
            if changes := logit_changes(name):
                out.setdefault(model_type, []).extend(changes)
    return out


@pytest.mark.slow  # parses every modeling file of transformers (about 5 s)
def test_the_scan_sees_the_known_transforms() -> None:
    """The scan itself: it finds each kind of change the table handles (after the head, in the head's input, in
    the same expression, through a helper), and passes a plain head."""
    changes = transformers_logit_changes()
    for model_type in ("gemma2", "cohere", "granite", "minicpm3", "falcon_h1", "hyperclovax", "inkling2_text",
                       "inkling_text", "xlstm"):
        assert model_type in changes, model_type
    for model_type in ("llama", "bloom", "gpt_neox", "qwen2", "mistral", "mamba", "opt"):
        assert model_type not in changes, (model_type, changes.get(model_type))


@pytest.mark.slow  # parses every modeling file of transformers (about 5 s)
def test_every_transformers_model_type_that_changes_its_logits_is_in_the_table() -> None:
    """A transformers upgrade that adds a causal LM whose forward soft-caps or scales its logits fails here until
    FINAL_LOGITS says what that forward does (or it is refused there). And the reverse: an entry for a transform
    transformers' forward no longer applies, or a "does nothing" entry whose forward now does something."""
    changes = transformers_logit_changes()
    missing = {mt: lines for mt, lines in changes.items() if mt not in L.FINAL_LOGITS and mt not in REVIEWED}
    assert not missing, "add these model types to FINAL_LOGITS (ia3_dist/models/loss.py):\n" + "\n".join(
        f"  {mt}: {' | '.join(lines)}" for mt, lines in sorted(missing.items()))
    for mt, make in L.FINAL_LOGITS.items():
        if mt not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or make.__qualname__.startswith("_refuse."):
            continue
        if make is L._nothing:
            assert mt not in changes, f"{mt}: its forward now changes the logits: {changes[mt]}"
        else:
            assert mt in changes, f"{mt}: FINAL_LOGITS transforms its logits, its forward no longer does"


def test_no_stock_transformers_causal_lm_config_is_refused() -> None:
    """The catch-all refuses none of the causal LMs transformers ships at their default settings, except the
    table's deliberate refusals: an attribute that some family applies but another ships at a non-neutral value
    its forward ignores would otherwise stop a model that trains correctly."""
    refused = {}
    for mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        make = L.FINAL_LOGITS.get(mt)
        if make is not None and make.__qualname__.startswith("_refuse."):
            continue
        try:
            config = AutoConfig.for_model(mt)
        except Exception:  # noqa: BLE001 - a few need arguments to validate; they are not what this checks
            continue
        try:
            L.final_logits(config)
        except UsageError as e:
            refused[mt] = str(e)
    assert not refused, refused


class NewLMConfig(PretrainedConfig):
    """A model type transformers does not know, as a remote-code model's config is."""

    model_type = "my_new_lm"

    def __init__(self, hidden_size: int = 64, vocab_size: int = 100, **kwargs: object) -> None:
        self.hidden_size = hidden_size
        self.vocab_size = vocab_size
        super().__init__(**kwargs)


@pytest.mark.parametrize("setting", [
    {"final_logit_softcapping": 30.0}, {"logits_soft_cap": 30.0}, {"output_logit_soft_cap": 15},
    {"logit_scale": 0.0625}, {"logit_scale": "inv_sqrt_d_model"}, {"logits_scaling": 4.0},
    {"lm_head_multiplier": 0.5}, {"output_multiplier_scale": 0.5773}, {"output_multiplier": 0.2},
    {"mup_output_alpha": 2.22}, {"logits_mup_width_multiplier": 24.0}, {"dim_model_base": 16},
    {"unpadded_vocab_size": 90},
])
def test_an_unknown_model_type_with_a_logit_transform_is_refused(setting: dict) -> None:
    [(attr, value)] = setting.items()
    with pytest.raises(UsageError) as e:
        L.final_logits(NewLMConfig(**setting))
    msg = str(e.value)
    assert "'my_new_lm'" in msg and f"{attr}={value!r}" in msg, msg
    assert "not supported" in msg and "open an issue" in msg and "FINAL_LOGITS" in msg, msg
    assert "\n" not in msg and len(msg) < 1000, msg
    with pytest.raises(UsageError):
        L.check_final_logits(NewLMConfig(**setting))


@pytest.mark.parametrize("setting", [
    {}, {"final_logit_softcapping": None}, {"final_logit_softcapping": 0.0}, {"logits_soft_cap": 0},
    {"logit_scale": None}, {"logit_scale": 1.0}, {"logits_scaling": 1}, {"lm_head_multiplier": 1.0},
    {"output_multiplier_scale": None}, {"dim_model_base": 64}, {"dim_model_base": None},
    {"unpadded_vocab_size": 100}, {"unpadded_vocab_size": None},
    {"attn_logit_softcapping": 50.0},  # attention scores, not the logits
])
def test_an_unknown_model_type_with_neutral_settings_trains(setting: dict) -> None:
    assert L.final_logits(NewLMConfig(**setting)) is None
    L.check_final_logits(NewLMConfig(**setting))


def test_a_nested_text_config_is_read() -> None:
    """A multimodal model type the table does not know, whose text config scales the logits (Aya Vision's forward
    multiplies by ``text_config.logit_scale``): refused, naming where the setting is."""
    with pytest.raises(UsageError, match=r"'aya_vision' sets text_config\.logit_scale=0\.0625"):
        L.final_logits(AutoConfig.for_model("aya_vision"))


def test_the_table_decides_for_the_model_types_it_knows() -> None:
    """A known model type gets its entry's transform, whatever else its config carries; a refused one is refused
    with its reason."""
    cfg = AutoConfig.for_model("gemma2", final_logit_softcapping=3.0, logit_scale=7.0)
    x = torch.tensor([-100.0, 0.5, 100.0])
    torch.testing.assert_close(L.final_logits(cfg)(x), torch.tanh(x / 3.0) * 3.0)
    assert L.final_logits(AutoConfig.for_model("gemma2", final_logit_softcapping=None)) is None
    assert L.final_logits(AutoConfig.for_model("cohere_compass_text", logit_scale=None)) is None
    gemma3 = AutoConfig.for_model("gemma3")
    gemma3.text_config.final_logit_softcapping = 30.0  # its multimodal forward ignores it
    assert L.final_logits(gemma3) is None
    with pytest.raises(UsageError, match="assisted-decoding drafter"):
        L.final_logits(AutoConfig.for_model("gemma4_unified_assistant"))


TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, attn_implementation="eager")
NEW_ENTRIES = {
    "beam": dict(TINY, final_logit_softcapping=3.0),
    "cohere2_moe": dict(TINY, logit_scale=0.3),
    "falcon_h1": dict(TINY, lm_head_multiplier=0.3),
    "gemma3n_text": dict(TINY, final_logit_softcapping=3.0, layer_types=["full_attention"], num_kv_shared_layers=0,
                         hidden_size_per_layer_input=8, laurel_rank=4, activation_sparsity_pattern=[0.0]),
    "gemma4_text": dict(TINY, final_logit_softcapping=3.0),
    "granitemoe_swa": dict(TINY, logits_scaling=0.25),
    "granitemoehybrid": dict(TINY, logits_scaling=0.25, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8,
                             mamba_chunk_size=4, layer_types=["attention"], num_local_experts=2,
                             num_experts_per_tok=1),
    "hyperclovax": dict(TINY, logits_scaling=0.25),
    "inkling_text": dict(TINY, logits_mup_width_multiplier=4.0, unpadded_vocab_size=60, layer_types=["hybrid"],
                         mlp_layer_types=["dense"]),
    "inkling2_text": dict(TINY, final_logit_softcapping=3.0),
    "minicpm3": dict(TINY, dim_model_base=8, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=16,
                     qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8),
    "nanochat": dict(TINY, final_logit_softcapping=3.0),
    "recurrent_gemma": dict(TINY, num_key_value_heads=4, logits_soft_cap=3.0, lru_width=32,
                            block_types=["attention"], attention_window_size=16),
    "vaultgemma": dict(TINY, final_logit_softcapping=3.0),
    "xlstm": dict(vocab_size=64, hidden_size=32, embedding_dim=32, num_blocks=1, num_hidden_layers=1, num_heads=4,
                  output_logit_soft_cap=3.0, chunk_size=4, mode="train"),
}


@pytest.mark.parametrize("model_type", sorted(NEW_ENTRIES))
def test_head_logits_are_the_model_forward_logits(model_type: str) -> None:
    """The head's output through the entry's transform is the logits of the model's own forward (the transform
    active: logits large enough for a cap of 3 to bite, a scale away from 1, a vocabulary cut)."""
    cfg = AutoConfig.for_model(model_type, **NEW_ENTRIES[model_type])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    head = model.get_output_embeddings()
    ids = torch.randint(0, 60, (1, 8))
    with torch.no_grad():
        head.weight.mul_(40)
        want = model(input_ids=ids, use_cache=False).logits.float()
        hidden = model.base_model(input_ids=ids, use_cache=False)[0]
        got = L.head_logits(model, head, hidden).float()
        raw = head(hidden).float()
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert raw.shape != got.shape or not torch.allclose(raw, got), "the transform changed nothing"


def test_the_preflight_refuses_it_with_exit_2(tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture
                                              ) -> None:
    """``ia3-dist check`` on the tiny Bloom with a soft cap added to its config.json (Bloom's forward has none,
    and the losses cannot know whether this model's does): exit 2, no traceback, output dir untouched."""
    from test_config_hardening import check_exits_2

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "final_logit_softcapping": 30.0}))
    err = check_exits_2(tmp_path, model, capsys, [])
    assert "'bloom' sets final_logit_softcapping=30.0" in err and "not supported" in err, err
