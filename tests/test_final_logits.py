"""The final-logit transforms the losses apply (``models.loss.FINAL_LOGITS``): the table covers every causal LM of
the installed transformers whose forward changes its logits, and refuses every one whose logits are not
get_output_embeddings() applied to base_model's first output (a prediction head, another stream, several heads),
both read from transformers' own source, so an upgrade that adds one fails here; each new entry gives the logits the
model's own forward gives, and a model type the table does not know whose config sets a logit soft cap or scale is
refused before any rank starts (exit 2), as is a refused one."""

from __future__ import annotations

import ast
import json
import re
import shutil
import sys
from collections.abc import Callable
from functools import cache
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
from _util import launch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from ia3_dist.errors import UsageError
from ia3_dist.models import loss as L

MODELS = Path(transformers.__file__).parent / "models"

REVIEWED: dict[str, str] = {}
"""Model types whose forward reassigns ``logits`` in a way the scan flags but that changes no logit value (MusicGen
and ProphetNet were here: their slicing changes no logit, but their logits are not the head of base_model's first
output, so FINAL_LOGITS refuses them, from the head scan's findings)."""

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


def _member(name: str, attr: str) -> tuple[str, ast.stmt] | None:
    """The source and the definition (a method, or a class-level assignment) of ``attr`` that class ``name`` uses:
    its own, else its bases' in turn, depth first (Python's order for transformers' single-inheritance chains);
    None where only a class outside ``transformers.models`` (``PreTrainedModel``) could define it."""
    f = _class_index().get(name)
    if f is None:
        return None
    src, tree = _tree(f)
    cls = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == name)
    for node in cls.body:
        if isinstance(node, ast.FunctionDef) and node.name == attr:
            return src, node
        if isinstance(node, ast.Assign | ast.AnnAssign) and any(
                isinstance(t, ast.Name) and t.id == attr
                for t in (node.targets if isinstance(node, ast.Assign) else [node.target])):
            return src, node
    for base in cls.bases:
        if isinstance(base, ast.Name) and (found := _member(base.id, attr)) is not None:
            return found
    return None


def _forward(name: str) -> tuple[str, ast.FunctionDef]:
    """The source and the ``forward`` that class ``name`` runs (its own, else the first base's that has one)."""
    assert _class_index().get(name) is not None, f"class {name} not found under {MODELS}"
    found = _member(name, "forward")
    assert found is not None and isinstance(found[1], ast.FunctionDef), f"no forward found for {name}"
    return found[0], found[1]


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
def _by_model_type(scan: Callable[[str], list[str]]) -> dict[str, list[str]]:
    """model_type -> what ``scan`` finds in its causal-LM class(es), for those where it finds something."""
    out: dict[str, list[str]] = {}
    for model_type, names in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        for name in names if isinstance(names, tuple) else (names,):
            if changes := scan(name):
                out.setdefault(model_type, []).extend(changes)
    return out


def transformers_logit_changes() -> dict[str, list[str]]:
    """model_type -> what its causal-LM class(es) do to the logits, for those whose forward changes them."""
    return _by_model_type(logit_changes)


POSITIONS_ONLY = ("slice_logits_to_keep",)
"""transformers' helpers that select positions of the hidden states (``logits_to_keep``) and change no value."""


class _HeadPath:
    """Reads one causal-LM class's forward for where its logits come from: the losses compute
    ``get_output_embeddings()(base_model(...)[0])`` (then :data:`FINAL_LOGITS`), so anything else is recorded in
    :attr:`found`: a call of another module (a prediction head, several heads, a module after the head), hidden
    states that are not ``base_model``'s first output as is (a projection or norm of the causal LM's own, another
    output, a ``base_model_prefix`` that names some other module or none)."""

    def __init__(self, name: str) -> None:
        self.found: list[str] = []
        self.src, self.fwd = _forward(name)
        goe = _member(name, "get_output_embeddings")
        if goe is None:  # PreTrainedModel's: lm_head
            self.head = "self.lm_head"
        else:
            returns = [n.value for n in ast.walk(goe[1]) if isinstance(n, ast.Return) and n.value is not None]
            self.head = _chain(returns[0]) if len(returns) == 1 else ""
            if not self.head:
                self.found.append(f"get_output_embeddings() returns {' or '.join(map(self.seg, returns))}")
        prefix = _member(name, "base_model_prefix")
        value = getattr(prefix[1], "value", None) if prefix is not None else None
        self.body = f"self.{value.value}" if isinstance(value, ast.Constant) and value.value else ""
        if not self.body:  # base_model is then the causal LM itself
            self.found.append("no base_model_prefix")
        self.wrapper = self._decoder_wrapper(name)
        returned = [k.value for r in ast.walk(self.fwd) if isinstance(r, ast.Return) and r.value is not None
                    for k in ast.walk(r.value) if isinstance(k, ast.keyword) and k.arg == "logits"]
        if not returned:
            self.found.append("its forward returns no logits=")
        if not any([self.logits(e, frozenset()) for e in returned]) and self.head:
            self.found.append(f"no call of get_output_embeddings() ({self.head}) makes its logits")

    def seg(self, node: ast.AST) -> str:
        return " ".join((ast.get_source_segment(self.src, node) or ast.unparse(node)).split())

    def _decoder_wrapper(self, name: str) -> bool:
        """Whether ``base_model`` only runs its ``decoder`` (BART's ``*DecoderWrapper``, ``OPTModel``): the
        causal LMs built on an encoder-decoder's decoder call ``base_model.decoder`` directly."""
        init = _member(name, "__init__")
        if init is None or not self.body:
            return False
        made = [n.value.func.id for n in ast.walk(init[1]) if isinstance(n, ast.Assign)
                and any(_chain(t) == self.body for t in n.targets)
                and isinstance(n.value, ast.Call) and isinstance(n.value.func, ast.Name)]
        fwd = _member(made[0], "forward") if len(made) == 1 else None
        return fwd is not None and any(isinstance(n, ast.Call) and _chain(n.func) == "self.decoder"
                                       for n in ast.walk(fwd[1]))

    def assigned(self, name: str) -> list[ast.expr | None]:
        """The values ``name`` is given in the forward; None for an unpacking (not followed)."""
        out: list[ast.expr | None] = []
        for n in ast.walk(self.fwd):
            targets = n.targets if isinstance(n, ast.Assign) else [n.target] if isinstance(
                n, ast.AnnAssign | ast.AugAssign | ast.NamedExpr) else []
            for t in targets:
                if isinstance(t, ast.Name) and t.id == name:
                    out.append(n.value)
                elif isinstance(t, ast.Tuple | ast.List | ast.Starred) and _uses(t, name):
                    out.append(None)
        return out

    def logits(self, e: ast.AST, seen: frozenset[str]) -> bool:
        """Follows what makes the logits ``e``; whether a call of the output embeddings is among it."""
        if isinstance(e, ast.Name):  # one the forward never assigns is an argument or a global (torch)
            if e.id in seen:
                return False
            values = self.assigned(e.id)
            if None in values:
                self.found.append(f"logits: {e.id} is unpacked from a tuple")
            return any([self.logits(v, seen | {e.id}) for v in values if v is not None])
        if isinstance(e, ast.Call) and (c := _chain(e.func)):
            if c in (self.body, f"{self.body}.decoder") or c.startswith("self.config."):
                return False  # hidden states not through the head: "no call of get_output_embeddings()" says so
            if c != self.head:
                self.found.append(f"logits: {self.seg(e)} (get_output_embeddings() is {self.head or '?'})")
                return False
            if len(e.args) != 1 or e.keywords:
                self.found.append(f"logits: {self.seg(e)}")
            for a in e.args:
                self.hidden(a, frozenset())
            return True
        if isinstance(e, ast.Subscript):  # positions or vocabulary rows kept: FINAL_LOGITS's scan reads those
            return self.logits(e.value, seen)
        if isinstance(e, ast.Attribute) and _chain(e):  # a config value or parameter in a transform
            return False
        return any([self.logits(c, seen) for c in ast.iter_child_nodes(e)])

    def hidden(self, e: ast.AST, seen: frozenset[str]) -> None:
        """Records what makes the head's input ``e`` other than base_model's first output, rows selected."""
        if isinstance(e, ast.Name):
            if e.id in seen:
                return
            values = self.assigned(e.id)
            if not values:
                self.found.append(f"hidden: {e.id} is not made in its forward")
            if None in values:
                self.found.append(f"hidden: {e.id} is unpacked from a tuple")
            for v in values:
                if v is not None:
                    self.hidden(v, seen | {e.id})
        elif isinstance(e, ast.Call):
            c = _chain(e.func)
            if c == self.body or (self.wrapper and c == f"{self.body}.decoder"):
                return
            if isinstance(e.func, ast.Name) and e.func.id in POSITIONS_ONLY and e.args:
                self.hidden(e.args[0], seen)
            elif isinstance(e.func, ast.Attribute) and e.func.attr in KEEP_DTYPE and not c:
                self.hidden(e.func.value, seen)
            else:
                self.found.append(f"hidden: {self.seg(e)}" + (f" (base_model is {self.body})" if c else ""))
        elif isinstance(e, ast.Subscript):
            if isinstance(e.slice, ast.Constant) and e.slice.value != 0:  # another output than the first
                self.found.append(f"hidden: {self.seg(e)}")
            else:
                self.hidden(e.value, seen)
        elif isinstance(e, ast.Attribute) and e.attr == "last_hidden_state":
            self.hidden(e.value, seen)
        elif isinstance(e, ast.IfExp):
            self.hidden(e.body, seen)
            self.hidden(e.orelse, seen)
        else:
            self.found.append(f"hidden: {self.seg(e)}")


def head_path_changes(class_name: str) -> list[str]:
    """Where ``class_name``'s forward makes its logits other than as the losses do,
    ``get_output_embeddings()(base_model(...)[0])`` (positions selected); see :class:`_HeadPath`."""
    return list(dict.fromkeys(_HeadPath(class_name).found))


@cache
def transformers_head_changes() -> dict[str, list[str]]:
    """model_type -> how its causal-LM class(es) make their logits other than the losses do, for those that do."""
    return _by_model_type(head_path_changes)


REVIEWED_HEADS = {
    "bert-generation": "its lm_head only runs lm_head.decoder (what get_output_embeddings() returns)",
    "reformer": "its lm_head only runs lm_head.decoder over chunks of the sequence",
}
"""Model types whose forward the head scan flags but whose logits are get_output_embeddings() of base_model's first
output all the same (``test_a_reviewed_head_gives_the_forward_logits`` checks it on tiny models)."""


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
    head = transformers_head_changes()  # xlm's entry answers that scan only
    for mt, make in L.FINAL_LOGITS.items():
        if mt not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or make.__qualname__.startswith("_refuse."):
            continue
        if make is L._nothing:
            assert mt not in changes, f"{mt}: its forward now changes the logits: {changes[mt]}"
        else:
            assert mt in changes or mt in head, f"{mt}: FINAL_LOGITS transforms its logits, its forward no longer does"
    for mt in REVIEWED:
        assert mt in changes and mt not in L.FINAL_LOGITS, f"REVIEWED[{mt!r}] is stale: the scan no longer flags it"


@pytest.mark.slow  # parses every modeling file of transformers (about 5 s)
def test_the_head_scan_sees_each_kind_of_other_head() -> None:
    """The head scan itself: it finds a prediction head called whole where get_output_embeddings() is its last
    layer (BERT's cls, RoBERTa's lm_head), one called on the hidden states before the head (ELECTRA, ModernBERT
    decoder), another output of base_model (ProphetNet), several heads (MusicGen), a base_model that is not what
    the forward calls (Llama 4), a head that needs the labels (XLM), arithmetic in the head's input (MiniCPM3); and
    passes plain heads, encoder-decoder wrappers that run base_model.decoder (OPT, BART, Whisper), custom head
    modules that the losses call whole (Dory's learned scale), and position slicing (GIT)."""
    changes = transformers_head_changes()
    for model_type in ("bert", "roberta", "electra", "modernbert-decoder", "prophetnet", "musicgen", "llama4_text",
                       "xlm", "gemma4_assistant", "minicpm3", "inkling_text"):
        assert model_type in changes, model_type
    for model_type in ("llama", "bloom", "gpt_neox", "qwen2", "mistral", "mamba", "rwkv", "opt", "bart", "whisper",
                       "trocr", "git", "dory", "ergo", "gemma2", "cohere", "xlstm", "gpt_neox_japanese"):
        assert model_type not in changes, (model_type, changes.get(model_type))


@pytest.mark.slow  # parses every modeling file of transformers (about 5 s)
def test_every_transformers_causal_lm_whose_logits_are_not_its_head_of_base_model_is_in_the_table() -> None:
    """A transformers upgrade that adds a causal LM whose logits are not get_output_embeddings() applied to
    base_model's first output (a prediction head, a module of the causal LM's own before or instead of the head,
    another stream, several heads) fails here until FINAL_LOGITS refuses it (or handles it, or REVIEWED_HEADS says
    why the logits are the same). And the reverse: a refusal or review that no scan supports any more."""
    head, changes = transformers_head_changes(), transformers_logit_changes()
    missing = {mt: lines for mt, lines in head.items() if mt not in L.FINAL_LOGITS and mt not in REVIEWED_HEADS}
    assert not missing, "refuse these model types in FINAL_LOGITS (ia3_dist/models/loss.py):\n" + "\n".join(
        f"  {mt}: {' | '.join(lines)}" for mt, lines in sorted(missing.items()))
    for mt in REVIEWED_HEADS:
        assert mt in head and mt not in L.FINAL_LOGITS, f"REVIEWED_HEADS[{mt!r}] is stale"
    stale = [mt for mt, make in L.FINAL_LOGITS.items() if make.__qualname__.startswith("_refuse.")
             and mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and mt not in head and mt not in changes]
    assert not stale, f"FINAL_LOGITS refuses {stale}, whose forward no scan flags any more: still needed?"


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
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:  # requirements.txt allows transformers 5.x releases before the model's
        pytest.skip(f"transformers {transformers.__version__} has no {model_type}")
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


REFUSED_KINDS = {
    "prediction head of several layers": ("bert", "big_bird", "ernie", "megatron-bert", "rembert", "roc_bert",
                                          "roformer", "roberta", "camembert", "xlm-roberta", "xlm-roberta-xl",
                                          "roberta-prelayernorm", "data2vec-text", "xmod", "electra",
                                          "modernbert-decoder"),
    "n-gram predicting streams": ("prophetnet",),
    "one LM head per audio codebook": ("musicgen", "musicgen_melody"),
    "base_model is the whole causal LM": ("llama4", "llama4_text", "mllama"),
}


@pytest.mark.parametrize("model_type", [mt for kind in REFUSED_KINDS.values() for mt in kind])
def test_a_model_whose_logits_are_not_its_head_of_base_model_is_refused_naming_why(model_type: str) -> None:
    """The table's answer alone (no transformers source read): the model type, why, and that it is not supported."""
    [why] = [k for k, types in REFUSED_KINDS.items() if model_type in types]
    with pytest.raises(UsageError) as e:
        L.check_final_logits(SimpleNamespace(model_type=model_type))
    msg = str(e.value)
    assert msg.startswith(f"model.path: model_type {model_type!r} "), msg
    assert why in msg and "get_output_embeddings()" in msg and "not supported for training" in msg, msg
    assert "\n" not in msg and len(msg) < 1000, msg


def test_xlm_is_refused_only_with_its_adaptive_softmax() -> None:
    assert L.final_logits(AutoConfig.for_model("xlm")) is None
    with pytest.raises(UsageError, match=r"'xlm' uses an adaptive softmax \(asm=True\).*not supported for training"):
        L.final_logits(AutoConfig.for_model("xlm", asm=True))


ENC = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
           is_decoder=True)
OTHER_HEADS = {
    "bert": ENC, "roberta": ENC, "xlm-roberta": ENC, "ernie": ENC, "megatron-bert": ENC, "roformer": ENC,
    "big_bird": dict(ENC, attention_type="original_full"),
    # Sizes that match: with the embedding sizes the defaults give, skipping the layers fails on the shapes.
    "rembert": dict(ENC, input_embedding_size=32, output_embedding_size=32),
    "electra": dict(ENC, embedding_size=32),
    "modernbert-decoder": dict(ENC, pad_token_id=0, bos_token_id=1, eos_token_id=2, sep_token_id=3, cls_token_id=4),
    "prophetnet": dict(vocab_size=64, hidden_size=32, num_encoder_layers=1, num_decoder_layers=1, ngram=2,
                       num_encoder_attention_heads=4, num_decoder_attention_heads=4, encoder_ffn_dim=64,
                       decoder_ffn_dim=64),
}
SAME_HEADS = {
    "bert-generation": ENC,  # REVIEWED_HEADS
    "reformer": dict(vocab_size=64, hidden_size=32, num_attention_heads=2, attention_head_size=16,  # REVIEWED_HEADS
                     attn_layers=["local"], feed_forward_size=64, axial_pos_embds=False, local_attn_chunk_length=4,
                     max_position_embeddings=64, is_decoder=True, chunk_size_lm_head=2),
    "xlm": dict(vocab_size=64, emb_dim=32, n_layers=1, n_heads=4),  # asm=False
    "opt": dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, ffn_dim=64,
                word_embed_proj_dim=16),  # the forward calls base_model.decoder, which projects out itself
}


def _both_logits(model_type: str, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """A tiny random model's forward logits, and what the losses compute without the table: its
    get_output_embeddings() applied to its base_model's first output."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kwargs)).eval()
    ids = torch.randint(5, 60, (1, 8))
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits
        got = model.get_output_embeddings()(model.base_model(input_ids=ids, use_cache=False)[0])
    return got, want


@pytest.mark.parametrize("model_type", sorted(OTHER_HEADS))
def test_a_refused_head_would_train_on_other_logits(model_type: str) -> None:
    """Why the refusal: the losses' logits have the forward's shape, so nothing would fail, but other values."""
    got, want = _both_logits(model_type, OTHER_HEADS[model_type])
    assert got.shape == want.shape
    assert not torch.allclose(got, want, atol=1e-3)
    assert model_type in L.FINAL_LOGITS


@pytest.mark.parametrize("model_type", sorted(SAME_HEADS))
def test_a_head_the_scan_lets_through_gives_the_forward_logits(model_type: str) -> None:
    """The reviewed heads (a wrapper that only runs get_output_embeddings()), XLM without its adaptive softmax, and
    a causal LM whose forward calls base_model.decoder: the losses' logits are the forward's, and none is refused."""
    got, want = _both_logits(model_type, SAME_HEADS[model_type])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert L.final_logits(AutoConfig.for_model(model_type, **SAME_HEADS[model_type])) is None


def test_llama4_base_model_is_the_whole_causal_lm() -> None:
    """Why Llama 4 is refused: base_model_prefix names no submodule, so the losses would read logits as the hidden
    states (and fail on the head's shapes once every rank has loaded the model)."""
    cfg = AutoConfig.for_model("llama4_text", **dict(TINY, intermediate_size_mlp=64))
    model = AutoModelForCausalLM.from_config(cfg)
    assert model.base_model is model
    with pytest.raises(UsageError, match="base_model is the whole causal LM"):
        L.check_final_logits(cfg)


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_the_preflight_refuses_a_prediction_head_with_exit_2(model_type: str, tmp_path: Path, tiny_model: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    """``ia3-dist check`` on a tiny real BertLMHeadModel / RobertaForCausalLM (is_decoder=True, the tiny
    tokenizer beside it; PEFT has IA3 defaults for both, so nothing else stops them): exit 2 naming the model type
    and why, before anything is written to the output dir."""
    from test_config_hardening import check_exits_2

    model = tmp_path / "model"
    vocab = json.loads((tiny_model / "config.json").read_text())["vocab_size"]
    cfg = AutoConfig.for_model(model_type, **dict(ENC, vocab_size=vocab, max_position_embeddings=512))
    AutoModelForCausalLM.from_config(cfg).save_pretrained(model)
    for f in tiny_model.glob("tokenizer*"):
        shutil.copy(f, model / f.name)
    capsys.readouterr()  # save_pretrained's progress bar is not the check's output
    err = check_exits_2(tmp_path, model, capsys, [])
    assert f"model_type {model_type!r} computes its logits through a prediction head of several layers" in err, err
    assert "get_output_embeddings()" in err and "not supported for training" in err, err


SYNTHETIC = '''
class LMBase(PreTrainedModel):
    base_model_prefix = "model"

class Wrapper(LMBase):
    def forward(self, *args, **kwargs):
        return self.decoder(*args, **kwargs)

class Plain(LMBase):
    def forward(self, input_ids, logits_to_keep=0):
        outputs = self.model(input_ids)
        hidden_states = outputs.last_hidden_state
        logits = self.lm_head(slice_logits_to_keep(hidden_states, logits_to_keep)).float()
        return Out(logits=logits)

class OnDecoder(LMBase):
    def __init__(self, config):
        self.model = Wrapper(config)
    def forward(self, input_ids):
        outputs = self.model.decoder(input_ids)
        return Out(logits=self.lm_head(outputs[0]))

class FinalNorm(LMBase):
    def forward(self, input_ids):
        hidden_states = self.norm(self.model(input_ids)[0])
        return Out(logits=self.lm_head(hidden_states))

class Projected(LMBase):
    def forward(self, input_ids):
        return Out(logits=self.lm_head(self.proj(self.model(input_ids).last_hidden_state)))

class Summed(LMBase):
    def forward(self, input_ids):
        h = self.model(input_ids)[0]
        logits = self.lm_head(h) + self.aux_head(h)
        return Out(logits=logits)

class PredictionHead(LMBase):
    def get_output_embeddings(self):
        return self.cls.decoder
    def forward(self, input_ids):
        return Out(logits=self.cls(self.model(input_ids)[0]))

class SecondOutput(LMBase):
    def forward(self, input_ids):
        outputs = self.model(input_ids)
        return Out(logits=self.lm_head(outputs[1]))

class EarlierLayer(LMBase):
    def forward(self, input_ids):
        outputs = self.model(input_ids, output_hidden_states=True)
        return Out(logits=self.lm_head(outputs.hidden_states[-2]))

class OtherBody(LMBase):
    base_model_prefix = "language_model"
    def forward(self, input_ids):
        return Out(logits=self.lm_head(self.model(input_ids)[0]))
'''


def test_the_head_scan_on_each_kind_of_forward(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The head scan on forwards written for it (no transformers source read): a plain head on base_model's
    output (positions sliced, upcast) and on an encoder-decoder wrapper's decoder pass; a final norm or a
    projection of the causal LM's own, a second head summed in, a prediction head around the output embeddings,
    another output or an earlier layer of base_model, and a forward that calls a module base_model is not, do not."""
    f = tmp_path / "modeling_synthetic.py"
    f.write_text(SYNTHETIC)
    monkeypatch.setattr(sys.modules[__name__], "_class_index", lambda: dict.fromkeys(
        re.findall(r"^class (\w+)\(", SYNTHETIC, re.M), f))
    assert head_path_changes("Plain") == [] and head_path_changes("OnDecoder") == []
    for name, needle in [("FinalNorm", "hidden: self.norm("), ("Projected", "hidden: self.proj("),
                         ("Summed", "logits: self.aux_head(h)"), ("PredictionHead", "logits: self.cls("),
                         ("SecondOutput", "hidden: outputs[1]"), ("EarlierLayer", "hidden: outputs.hidden_states"),
                         ("OtherBody", "(base_model is self.language_model)")]:
        found = head_path_changes(name)
        assert any(needle in line for line in found), (name, found)


REMOTE_CONFIG = '''from transformers import LlamaConfig


class XConfig(LlamaConfig):
    model_type = "x-llama"
'''
REMOTE_MODEL = '''from transformers import LlamaForCausalLM

from .configuration_x import XConfig


class XForCausalLM(LlamaForCausalLM):
    config_class = XConfig
    base_model_prefix = "language_model"  # names no submodule: base_model is the whole LM
'''


def _remote_code_model(model: Path, tiny_model: Path, model_type: str, config_code: str, model_code: str) -> Path:
    """A tiny Llama-shaped model dir with its own code (``auto_map``: ``configuration_x.py``, ``modeling_x.py``),
    random weights and the tiny tokenizer, as trust_remote_code loads it."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    model.mkdir()
    fields = dict(vocab_size=1200, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512)
    state = LlamaForCausalLM(LlamaConfig(**fields)).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(model / "model.safetensors"),
              metadata={"format": "pt"})
    (model / "configuration_x.py").write_text(config_code)
    (model / "modeling_x.py").write_text(model_code)
    cfg = {**LlamaConfig(**fields).to_dict(), "model_type": model_type, "architectures": ["XForCausalLM"],
           "auto_map": {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"}}
    (model / "config.json").write_text(json.dumps(cfg))
    for f in tiny_model.glob("*token*"):
        shutil.copy(f, model / f.name)
    return model


def test_remote_code_whose_base_model_is_the_whole_lm_is_refused(tmp_path: Path, tiny_model: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    """A model with its own code (trust_remote_code, from the model dir) that no table knows: the preflight builds
    it on the meta device and refuses the structure the losses cannot use, exit 2 before any rank starts."""
    from test_config_hardening import check_exits_2

    model = _remote_code_model(tmp_path / "model", tiny_model, "x-llama", REMOTE_CONFIG, REMOTE_MODEL)
    err = check_exits_2(tmp_path, model, capsys, ["model.trust_remote_code=true",
                                                  "ia3.target_modules=[q_proj,v_proj,down_proj]",
                                                  "ia3.feedforward_modules=[down_proj]"])
    assert "'x-llama': its base_model_prefix 'language_model' names no submodule" in err, err


def test_a_model_without_an_lm_head_module_is_refused() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    class NoHead(LlamaForCausalLM):
        def get_output_embeddings(self) -> None:
            return None

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    with torch.device("meta"):
        L.check_head(LlamaForCausalLM(cfg))
        with pytest.raises(UsageError, match="get_output_embeddings\\(\\) gives NoneType, not an LM head module"):
            L.check_head(NoHead(cfg))


REMOTE_CONFIG_LLAMA = '''from transformers import LlamaConfig


class XConfig(LlamaConfig):
    model_type = "qwen3"  # remote code under a type PEFT has IA3 defaults for (and not a tested family)
'''
REMOTE_MODEL_ITEM = '''import torch
from transformers import LlamaForCausalLM

from .configuration_x import XConfig


class XForCausalLM(LlamaForCausalLM):
    config_class = XConfig

    def __init__(self, config):
        super().__init__(config)
        self.rate = float(torch.linspace(0, 0.1, 3)[1])  # a value computed at build time: no meta tensor has one
'''


@pytest.mark.slow  # `ia3-dist check` in a process of its own
@pytest.mark.parametrize("targets", [[], ["ia3.target_modules=[k_proj,v_proj,down_proj]",
                                         "ia3.feedforward_modules=[down_proj]"]])
def test_remote_code_that_cannot_be_built_on_meta_skips_the_structure_check(
        tmp_path: Path, tiny_model: Path, targets: list[str]) -> None:
    """Remote code that reads a tensor's value in __init__ loads with from_pretrained but not on the meta device:
    the preflight's structure check (check_head) must not turn a model that trains into a traceback."""
    from test_config_hardening import TINY

    model = _remote_code_model(tmp_path / "model", tiny_model, "qwen3", REMOTE_CONFIG_LLAMA, REMOTE_MODEL_ITEM)
    # A process of its own: after any from_pretrained in this one, torch.device("meta") no longer reaches the
    # factory calls (torch 2.13, transformers 5), so the meta build would succeed here on the CPU. Forked from the
    # tests' warm interpreter, which imports but never loads a model (a process where the meta build succeeded
    # would fail the "meta device" check below, never pass it).
    run = launch(["check", "--config", str(TINY), "model.trust_remote_code=true", *targets, f"model.path={model}",
                  f"output.dir={tmp_path / 'out'}"])
    err = run.stderr
    assert "Traceback" not in err, err
    assert run.returncode == 0, err
    assert "meta device" in err, err
