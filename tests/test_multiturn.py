"""Multi-turn rendering and masking: the label tokens of a conversation decode to exactly its assistant turns
(+ eos, or the chat template's end-of-turn markup), for each template; truncation modes; train_on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ia3_dist.config import DataSection
from ia3_dist.data.records import Conversation, Records, Turn, load_records
from ia3_dist.data.template import Template
from ia3_dist.data.tokenize import tokenize, truncate
from ia3_dist.errors import UsageError

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

CONVS = [
    Conversation([Turn("你好", "", "你好！有什么可以帮你？"), Turn("介绍一下熊猫。", "", "熊猫是中国的国宝。"),
                  Turn("它吃什么？", "", "主要吃竹子。")], system="你是一个乐于助人的助手。"),
    Conversation([Turn("翻译成英文", "猫很可爱", "Cats are cute.")]),
    Conversation([Turn("一", "", "二"), Turn("三", "", "四")]),
]


def _label_spans(data, i: int, tok) -> list[str]:
    s = slice(data.offsets[i], data.offsets[i + 1])
    ids, mask = data.ids[s], data.label_mask[s].astype(bool)
    spans, cur = [], []
    for t, m in zip(ids.tolist(), mask.tolist(), strict=True):
        if m:
            cur.append(t)
        elif cur:
            spans.append(cur)
            cur = []
    if cur:
        spans.append(cur)
    return [tok.decode(sp) for sp in spans]


def _records(convs: list[Conversation]) -> Records:
    return Records(list(convs), "test", "fp", [], {})


@pytest.fixture
def chat_tok(tiny_tokenizer):
    tok = tiny_tokenizer
    old = tok.chat_template
    tok.chat_template = CHATML
    yield tok
    tok.chat_template = old


@pytest.mark.parametrize("train_on", ["all", "last"])
def test_human_assistant_labels_are_the_answers(tiny_tokenizer, train_on: str) -> None:
    tok = tiny_tokenizer
    data = tokenize(_records(CONVS), tok, DataSection(path="x", max_length=1024, train_on=train_on))
    for i, conv in enumerate(CONVS):
        want = [t.output + tok.eos_token for t in conv.turns]
        assert _label_spans(data, i, tok) == (want if train_on == "all" else want[-1:])


def test_human_assistant_single_turn_is_the_reference_text(tiny_tokenizer) -> None:
    t = Template.of(DataSection(path="x"), tiny_tokenizer)
    segs = t.segments(CONVS[1], tiny_tokenizer)
    assert segs == [("\n".join(["Human: 翻译成英文", "猫很可爱"]).strip() + "\n\nAssistant: ", False),
                    ("Cats are cute." + tiny_tokenizer.eos_token, True)]
    multi = "".join(text for text, _ in t.segments(CONVS[0], tiny_tokenizer))
    assert multi == ("你是一个乐于助人的助手。\n\nHuman: 你好\n\nAssistant: 你好！有什么可以帮你？</s>"
                     "Human: 介绍一下熊猫。\n\nAssistant: 熊猫是中国的国宝。</s>"
                     "Human: 它吃什么？\n\nAssistant: 主要吃竹子。</s>")


@pytest.mark.parametrize("source", ["tokenizer", "file"])
@pytest.mark.parametrize("train_on", ["all", "last"])
def test_chat_template_labels_are_the_answers(chat_tok, tmp_path: Path, source: str, train_on: str) -> None:
    if source == "file":
        f = tmp_path / "chatml.jinja"
        f.write_text(CHATML, encoding="utf-8")
        chat_tok.chat_template = None
        template = str(f)
    else:
        template = "chat_template"
    cfg = DataSection(path="x", max_length=1024, template=template, train_on=train_on)
    data = tokenize(_records(CONVS), chat_tok, cfg)
    for i, conv in enumerate(CONVS):
        want = [t.output + "<|im_end|>\n" for t in conv.turns]
        assert _label_spans(data, i, chat_tok) == (want if train_on == "all" else want[-1:])
        s = slice(data.offsets[i], data.offsets[i + 1])
        text = chat_tok.decode(data.ids[s])
        assert text.startswith("<|im_start|>system\n" if conv.system else "<|im_start|>user\n")


# Mistral v0.1's chat template (its shape): answers follow "[/INST]" directly and end with the eos.
MISTRAL = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + "
           "' [/INST]' }}{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}")


def _sentencepiece_style_tokenizer():
    """A tiny BPE with a Metaspace pre-tokenizer (Llama 2 and Mistral's kind): every separate encoding starts with
    a word-start marker."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    bpe.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    corpus = ["[INST] hello there [/INST] fine thanks", "[INST] how are you [/INST] good, and you"] * 50
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.chat_template = MISTRAL
    return tok


@pytest.mark.parametrize("train_on", ["all", "last"])
def test_chat_template_tokens_are_apply_chat_templates(train_on: str) -> None:
    """A chat template's conversation is trained on the tokens ``apply_chat_template`` gives it (and inference
    feeds), labelled on the answers: encoded in pieces, a SentencePiece-style tokenizer put a word-start marker
    at the start of every answer that the whole text does not have."""
    tok = _sentencepiece_style_tokenizer()
    convs = [Conversation([Turn("hello there", "", "fine thanks"), Turn("how are you", "", "good, and you")])]
    data = tokenize(_records(convs), tok, DataSection(path="x", template="chat_template", train_on=train_on))
    msgs = [{"role": r, "content": c} for t in convs[0].turns for r, c in (("user", t.instruction),
                                                                           ("assistant", t.output))]
    want = tok.apply_chat_template(msgs, tokenize=True, return_dict=False)
    assert data.ids[data.offsets[0]:data.offsets[1]].tolist() == want
    answers = ["fine thanks</s>", "good, and you</s>"]
    assert _label_spans(data, 0, tok) == (answers if train_on == "all" else answers[-1:])


@pytest.mark.parametrize("template", ["human_assistant", "chat_template"])
def test_inference_feeds_the_ids_training_had_before_the_answer(template: str) -> None:
    """generate's prompt ids are the training example's up to the last answer: human_assistant encodes each turn's
    prompt and answer apart (the reference recipe's tok(prompt) + tok(output + eos)), so a tokenizer that starts
    every encoding with a word-start marker (SentencePiece's) has it between turns too, where one encoding of the
    joined text had not; one that adds a BOS on every call (Llama's) has it once, at the start, and no answer
    starts with a labelled BOS."""
    from tokenizers import processors

    from ia3_dist.tools.inference import prompt_ids

    tok = _sentencepiece_style_tokenizer()
    bos = tok.convert_tokens_to_ids("<s>")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>",
                                                                                                             bos)])
    conv = Conversation([Turn("hello there", "", "fine thanks"), Turn("how are you", "", "good, and you")])
    cfg = DataSection(path="x", template=template, train_on="last")
    data = tokenize(_records([conv]), tok, cfg)
    ids, mask = data.ids[data.offsets[0]:data.offsets[1]].tolist(), data.label_mask[data.offsets[0]:data.offsets[1]]
    answer = int(mask.argmax())  # where the last answer starts
    t = Template.of(cfg, tok)
    assert prompt_ids(t, conv, tok, 10**6) == (ids[:answer], False)
    assert prompt_ids(t, conv, tok, 5) == ([bos] + ids[answer - 4:answer], True)  # a cut keeps the BOS
    assert ids.count(bos) == 1 and ids[0] == bos
    if template == "human_assistant":
        assert bos not in [i for i, m in zip(ids, mask.tolist(), strict=True) if m]
        first = tok("Human: hello there\n\nAssistant: ").input_ids  # the recipe's tok(prompt), BOS and all
        assert ids[:len(first)] == first and ids[len(first)] != bos
    # generate feeds them, left-padded in a batch with a shorter conversation.
    import torch

    from ia3_dist.tools import inference

    fed = []

    class Model:
        config = type("C", (), {"max_position_embeddings": 4096})()

        def generate(self, input_ids, attention_mask, **kw):
            fed.append((input_ids.tolist(), attention_mask.tolist()))
            return torch.cat([input_ids, torch.full((len(input_ids), 1), tok.eos_token_id)], 1)

    short = Conversation([Turn("hello there", "", "")])
    inference.generate(Model(), tok, t, [conv, short], inference.GenOptions(max_new_tokens=4))
    (rows, masks), = fed
    assert rows[0] == ids[:answer] and masks[0] == [1] * answer
    k = len(prompt_ids(t, short, tok, 10**6)[0])
    assert rows[1][answer - k:] == prompt_ids(t, short, tok, 10**6)[0] and masks[1] == [0] * (answer - k) + [1] * k


def test_an_adapter_saved_before_the_bos_key_is_prompted_as_it_was_trained(tmp_path: Path) -> None:
    """A template file without ``bos`` (adapters of earlier versions, trained with a BOS before every piece) loads
    as ``every_piece``, and inference gives such a model the BOS before each piece that it learned; a new one
    round-trips as ``start``. An unknown value is refused naming the file."""
    from tokenizers import processors

    from ia3_dist.tools.inference import prompt_ids

    tok = _sentencepiece_style_tokenizer()
    bos = tok.convert_tokens_to_ids("<s>")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>",
                                                                                                             bos)])
    conv = Conversation([Turn("hello there", "", "fine thanks"), Turn("how are you", "", "")])
    Template().save(tmp_path)
    saved = json.loads((tmp_path / "ia3_dist.json").read_text())
    assert saved["bos"] == "start" and Template.load(tmp_path).bos == "start"
    assert prompt_ids(Template.load(tmp_path), conv, tok, 10**6)[0].count(bos) == 1
    del saved["bos"]
    (tmp_path / "ia3_dist.json").write_text(json.dumps(saved))
    old = Template.load(tmp_path)
    assert old.bos == "every_piece"
    pieces = old.prompt_pieces(conv, tok)
    assert prompt_ids(old, conv, tok, 10**6)[0] == [i for p in pieces for i in tok(p).input_ids]
    assert prompt_ids(old, conv, tok, 10**6)[0].count(bos) == 3
    (tmp_path / "ia3_dist.json").write_text(json.dumps({**saved, "bos": "twice"}))
    with pytest.raises(UsageError, match=r"ia3_dist.json: unusable prompt template \(bos must be 'start' or "
                                         r"'every_piece', got 'twice'\)"):
        Template.load(tmp_path)


@pytest.mark.parametrize("template", ["human_assistant", "chat_template"])
def test_preference_rows_start_with_the_prompt_inference_feeds(template: str) -> None:
    """Both rows of a two-turn pair start with the ids generate feeds for its prompt (one BOS, at the start), then
    the labelled answer. Under a chat template the prompt was encoded piece by piece, so a SentencePiece-style
    tokenizer trained on a word-start marker before every turn that inference never shows."""
    from tokenizers import processors

    from ia3_dist.data.pairs import Pair
    from ia3_dist.data.tokenize import _ChunkTokenizer
    from ia3_dist.tools.inference import prompt_ids

    tok = _sentencepiece_style_tokenizer()
    bos = tok.convert_tokens_to_ids("<s>")
    if template == "human_assistant":
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", bos)])
    first = [Turn("hello there", "", "fine thanks")]
    pair = Pair(Conversation([*first, Turn("how are you", "", "good, and you")]),
                Conversation([*first, Turn("how are you", "", "fine thanks")]))
    cfg = DataSection(path="x", template=template)
    c = _ChunkTokenizer(tok, cfg)([pair])
    want, _ = prompt_ids(Template.of(cfg, tok), pair.chosen, tok, 10**6)
    offs = [0, *c.lengths.cumsum().tolist()]
    for r in range(2):
        row, m = c.ids[offs[r]:offs[r + 1]].tolist(), c.label_mask[offs[r]:offs[r + 1]].tolist()
        assert row[:len(want)] == want and m == [0] * len(want) + [1] * (len(row) - len(want)), (row, m)
        assert row.count(bos) == 1 and row[0] == bos
        # Each row is its side's conversation as SFT tokenizes it (labels on the last answer): under a chat template
        # the answer encoded on its own began with a word-start marker ('▁good,') the whole text has not ('go').
        side = _ChunkTokenizer(tok, DataSection(path="x", template=template, train_on="last"))(
            [pair.chosen, pair.rejected][r:r + 1])
        assert row == side.ids.tolist() and m == side.label_mask.tolist(), (tok.convert_ids_to_tokens(row),
                                                                            tok.convert_ids_to_tokens(side.ids))


def test_a_record_the_template_cannot_render_is_named_or_skipped(chat_tok, tmp_path: Path) -> None:
    """A template that raises on what one record holds (here: a system prompt, as several models' templates do)
    names that record by file and position; with data.on_bad_record=skip it is left out and reported with the
    reader's skips, in memory and through the token cache, and the other records are tokenized as without it."""
    from ia3_dist.data.tokenize import load_or_tokenize

    chat_tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System "
                              "role not supported') }}{% endif %}" + CHATML[len("{% for m in messages %}"):])
    recs = [{"instruction": f"q{i}", "input": "", "output": f"a{i}", **({"system": "s"} if i == 1 else {})}
            for i in range(4)]
    f = tmp_path / "d.json"
    f.write_text(json.dumps(recs), encoding="utf-8")
    common = {"path": str(f), "template": "chat_template", "cache_dir": str(tmp_path / "cache")}
    with pytest.raises(UsageError) as e:
        load_or_tokenize(DataSection(**common), chat_tok)
    assert str(e.value).startswith(f"{f}: record 1: data.template chat_template (the tokenizer's): the chat "
                                   f"template fails to render (") and "System role not supported" in str(e.value)
    assert str(e.value).endswith("(or set data.on_bad_record=skip to drop the records it cannot render)")
    f2 = tmp_path / "without.json"
    f2.write_text(json.dumps([r for i, r in enumerate(recs) if i != 1]), encoding="utf-8")
    want = load_or_tokenize(DataSection(**{**common, "path": str(f2)}), chat_tok)
    for _ in range(2):  # built, then read back from the cache
        got = load_or_tokenize(DataSection(**common, on_bad_record="skip"), chat_tok)
        assert got.ids.tolist() == want.ids.tolist() and got.label_mask.tolist() == want.label_mask.tolist()
        assert got.n_records == 3 and got.skipped_total == 1 and got.skipped[0].startswith(f"{f}: record 1: ")
    from ia3_dist.data.records import load_records

    mem = tokenize(load_records(DataSection(path=str(f), on_bad_record="skip")), chat_tok,
                   DataSection(path=str(f), template="chat_template", on_bad_record="skip"))
    assert mem.ids.tolist() == want.ids.tolist() and mem.skipped_total == 1 and "record 1" in mem.skipped[0]
    # Every record skipped: that is the cause named, not truncation (nothing was cut) or the template's labels.
    every = tmp_path / "every.json"
    every.write_text(json.dumps([{**r, "system": "s"} for r in recs]), encoding="utf-8")
    want_msg = rf"^{every}: every record was skipped \(data.on_bad_record=skip; 4 skipped, the first: {every}: record 0"
    with pytest.raises(UsageError, match=want_msg):
        load_or_tokenize(DataSection(**{**common, "path": str(every)}, on_bad_record="skip"), chat_tok)
    with pytest.raises(UsageError, match=want_msg):
        tokenize(load_records(DataSection(path=str(every), on_bad_record="skip")), chat_tok,
                 DataSection(path=str(every), template="chat_template", on_bad_record="skip"))


def test_a_prompt_template_without_input_refuses_records_with_one(tiny_tokenizer, tmp_path: Path) -> None:
    """data.prompt_template without {input}: a record with an input would lose it from its prompt, so it is named
    (or skipped with data.on_bad_record=skip); records without one tokenize as before."""
    from ia3_dist.data.tokenize import load_or_tokenize

    f = tmp_path / "d.json"
    f.write_text(json.dumps([{"instruction": "q0", "input": "", "output": "a0"},
                             {"instruction": "q1", "input": "x", "output": "a1"}]), encoding="utf-8")
    common = {"path": str(f), "prompt_template": "Q: {instruction}", "cache_dir": str(tmp_path / "cache")}
    with pytest.raises(UsageError, match=rf"^{f}: record 1: data.prompt_template 'Q: {{instruction}}' has no "
                                         rf"{{input}} field, and this record has an input"):
        load_or_tokenize(DataSection(**common), tiny_tokenizer)
    kept = load_or_tokenize(DataSection(**common, on_bad_record="skip"), tiny_tokenizer)
    assert kept.n_records == 1 and kept.skipped_total == 1
    assert tiny_tokenizer.decode(kept.ids.tolist()).startswith("Q: q0")


def test_named_chat_templates_use_default(chat_tok) -> None:
    """A tokenizer shipping several named templates renders with "default", as transformers does; without one the
    refusal names those it has and the way out (a file)."""
    want = tokenize(_records(CONVS), chat_tok, DataSection(path="x", template="chat_template"))
    chat_tok.chat_template = {"default": CHATML, "tool_use": "{{ messages }}"}
    got = tokenize(_records(CONVS), chat_tok, DataSection(path="x", template="chat_template"))
    assert got.ids.tolist() == want.ids.tolist() and got.label_mask.tolist() == want.label_mask.tolist()
    chat_tok.chat_template = {"rag": CHATML, "tool_use": CHATML}
    with pytest.raises(UsageError, match=r"named chat templates \('rag', 'tool_use'\) and none called 'default'; "
                                         r"save the one to train with as a Jinja file"):
        tokenize(_records(CONVS), chat_tok, DataSection(path="x", template="chat_template"))
    # Inference on a dir that saved no template of ours (a merged model, a hub model): the same choice, where it
    # fell back to Human/Assistant.
    from ia3_dist.tools.inference import default_template

    chat_tok.chat_template = {"default": CHATML, "tool_use": "{{ messages }}"}
    t = default_template(chat_tok)
    assert t.kind == "chat_template" and t.chat_template == CHATML
    chat_tok.chat_template = {"rag": CHATML}
    with pytest.raises(UsageError, match=r"named chat templates \('rag'\) and none called 'default'"):
        default_template(chat_tok)


def test_tokenizer_without_chat_template_is_refused(tiny_tokenizer) -> None:
    with pytest.raises(UsageError, match="ships no chat template"):
        tokenize(_records(CONVS), tiny_tokenizer, DataSection(path="x", template="chat_template"))
    with pytest.raises(UsageError, match="data.template /no/such.jinja"):
        tokenize(_records(CONVS), tiny_tokenizer, DataSection(path="x", template="/no/such.jinja"))


def test_truncation_modes() -> None:
    ids = list(range(10))
    mask = [0, 0, 0, 1, 1, 0, 0, 1, 1, 1]
    assert truncate(ids, mask, 7, 6, "right") == (ids[:6], mask[:6])
    assert truncate(ids, mask, 7, 6, "prompt") == (ids[4:], mask[4:])   # oldest text goes, the last answer stays
    assert truncate(ids, mask, 7, 2, "prompt") == ([7, 8], [1, 1])      # then the answer's end
    assert truncate(ids, mask, 7, 20, "prompt") == (ids, mask)
    # A head (the BOS) stays in front of what the cut leaves; never at the cost of the last answer.
    assert truncate(ids, mask, 7, 6, "prompt", head=1) == ([0, *ids[5:]], [0, *mask[5:]])
    assert truncate(ids, mask, 7, 3, "prompt", head=1) == ([0, 7, 8], [0, 1, 1])
    assert truncate(ids, mask, 7, 6, "right", head=1) == (ids[:6], mask[:6])


@pytest.mark.parametrize("template", ["human_assistant", "chat_template"])
def test_prompt_truncation_keeps_the_bos_as_inference_does(template: str) -> None:
    """data.truncation=prompt cuts the oldest text after the BOS the example starts with (the model saw one first
    in every sequence), and generate cuts a long prompt alike: the training row before its answer is what
    inference feeds at that budget. Preference pairs keep it too."""
    from tokenizers import processors

    from ia3_dist.data.pairs import Pair
    from ia3_dist.data.tokenize import _ChunkTokenizer
    from ia3_dist.tools.inference import prompt_ids

    tok = _sentencepiece_style_tokenizer()
    bos = tok.convert_tokens_to_ids("<s>")
    if template == "human_assistant":
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", bos)])
    first = [Turn(" ".join(["hello there"] * 20), "", "fine thanks")]
    conv = Conversation([*first, Turn("how are you", "", "good, and you")])
    cfg = DataSection(path="x", template=template, truncation="prompt", max_length=24, train_on="last")
    c = _ChunkTokenizer(tok, cfg)([conv])
    row, mask = c.ids.tolist(), c.label_mask.tolist()
    answer = mask.index(1)
    assert len(row) == 24 and row[0] == bos and row.count(bos) == 1 and c.truncated == 1
    assert tok.decode(row[answer:], skip_special_tokens=True).strip() == "good, and you"
    assert prompt_ids(Template.of(cfg, tok), conv, tok, answer) == (row[:answer], True)
    # A pair cut the same way: both rows start with the BOS, then the prompt's newest tokens.
    pair = Pair(conv, Conversation([*first, Turn("how are you", "", "fine thanks")]))
    p = _ChunkTokenizer(tok, cfg)([pair])
    rows = np.split(p.ids, np.cumsum(p.lengths)[:-1])
    assert all(r[0] == bos and r.tolist().count(bos) == 1 and len(r) <= 24 for r in rows), rows


def test_prompt_truncation_keeps_the_response(tiny_tokenizer) -> None:
    tok = tiny_tokenizer
    long = [Conversation([Turn("长" * 400, "", "短答案")])]
    right = tokenize(_records(long), tok, DataSection(path="x", max_length=64, unlabeled="keep"))
    assert right.unlabeled == 1 and not right.label_mask.any()
    kept = tokenize(_records(long), tok, DataSection(path="x", max_length=64, truncation="prompt"))
    assert kept.unlabeled == 0 and len(kept) == 1 and kept.lengths[0] == 64
    assert _label_spans(kept, 0, tok) == ["短答案" + tok.eos_token]
    with pytest.raises(UsageError, match="every record is all prompt"):
        tokenize(_records(long), tok, DataSection(path="x", max_length=64))


def test_prompt_for_inference_continues_the_conversation(tiny_tokenizer, chat_tok) -> None:
    t = Template()
    text = t.prompt_for(CONVS[0].turns[:1], CONVS[0].system, "再见", "", tiny_tokenizer)
    assert text == ("你是一个乐于助人的助手。\n\nHuman: 你好\n\nAssistant: 你好！有什么可以帮你？</s>"
                    "Human: 再见\n\nAssistant: ")
    c = Template("chat_template", chat_template=CHATML)
    text = c.prompt_for([Turn("一", "", "二")], "", "三", "", chat_tok)
    assert text == ("<|im_start|>user\n一<|im_end|>\n<|im_start|>assistant\n二<|im_end|>\n<|im_start|>user\n三"
                    "<|im_end|>\n<|im_start|>assistant\n")


def test_template_round_trips_beside_the_adapter(tmp_path: Path, chat_tok) -> None:
    t = Template.of(DataSection(path="x", template="chat_template"), chat_tok)
    t.save(tmp_path)
    assert Template.load(tmp_path) == t
    (tmp_path / "ia3_dist.json").write_text(json.dumps({"kind": "weird"}))
    with pytest.raises(UsageError, match="unknown template kind"):
        Template.load(tmp_path)


def test_chat_keeps_the_conversation_and_reset_clears_it(tiny_model: Path, capsys, monkeypatch) -> None:
    """``chat`` prompts each turn with the conversation so far (in the training template); /reset starts over;
    ``generate`` takes multi-turn JSON in the training spellings."""
    import io

    from transformers import AutoModelForCausalLM

    from ia3_dist.cli import main

    prompts: list[str] = []
    real = AutoModelForCausalLM.from_pretrained(str(tiny_model)).generate
    tok_holder: dict = {}

    def spy(self, **kw):
        prompts.append(tok_holder["tok"].decode(kw["input_ids"][0], skip_special_tokens=False))
        return real(**kw)

    from ia3_dist.tools import inference

    orig = inference.load_for_inference

    def load(*a, **k):
        model, tok, template, is_adapter = orig(*a, **k)
        tok_holder["tok"] = tok
        monkeypatch.setattr(type(model), "generate", spy)
        return model, tok, template, is_adapter

    monkeypatch.setattr(inference, "load_for_inference", load)
    monkeypatch.setattr("sys.stdin", io.StringIO("第一句\n第二句\n/reset\n第三句\n/quit\n"))
    assert main(["chat", "--adapter", str(tiny_model), "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("Assistant: ") == 3 and "(new conversation)" in out
    p1, p2, p3 = (p.replace("<pad>", "") for p in prompts)
    assert p1 == "Human: 第一句\n\nAssistant: "
    assert p2.startswith("Human: 第一句\n\nAssistant: ") and p2.endswith("</s>Human: 第二句\n\nAssistant: ")
    assert p3 == "Human: 第三句\n\nAssistant: "
    prompts.clear()
    msgs = {"messages": [{"role": "system", "content": "系统"}, {"role": "user", "content": "甲"},
                         {"role": "assistant", "content": "乙"}, {"role": "user", "content": "丙"}]}
    assert main(["generate", "--adapter", str(tiny_model), "--max-new-tokens", "2", json.dumps(msgs)]) == 0
    assert prompts[0].replace("<pad>", "") == "系统\n\nHuman: 甲\n\nAssistant: 乙</s>Human: 丙\n\nAssistant: "
    assert json.loads(capsys.readouterr().out)["messages"] == msgs["messages"]


DATED = ('{% if strftime_now is defined %}{% set day = strftime_now("%d %b %Y") %}{% else %}{% set day = "x" %}'
         '{% endif %}<|im_start|>system\nToday Date: {{ day }}<|im_end|>\n' + CHATML)


def test_template_date_pins_what_strftime_now_renders(chat_tok, tmp_path: Path) -> None:
    """data.template_date: a chat template that writes today's date (Llama 3.x's system header) gets that day in
    every record, in this process and in forked tokenizer workers, and the token cache is named by it (another day
    or none is another entry); a value that is not a YYYY-MM-DD day names the key."""
    from ia3_dist.config.schema import ConfigKeyError
    from ia3_dist.data.tokenize import cache_key, load_or_tokenize

    chat_tok.chat_template = DATED
    fixed = DATED.replace('strftime_now("%d %b %Y")', '"26 Jul 2024"')
    pinned = DataSection(path="x", template="chat_template", template_date="2024-07-26", num_proc=2)
    got = tokenize(_records(CONVS * 2), chat_tok, pinned, chunk=2)  # three chunks: forked workers render them
    chat_tok.chat_template = fixed
    want = tokenize(_records(CONVS * 2), chat_tok, DataSection(path="x", template="chat_template", num_proc=1))
    assert got.ids.tolist() == want.ids.tolist() and got.label_mask.tolist() == want.label_mask.tolist()
    assert "Today Date: 26 Jul 2024" in chat_tok.decode(got.ids[got.offsets[0]:got.offsets[1]].tolist())
    chat_tok.chat_template = DATED
    keys = {cache_key("fp", chat_tok, DataSection(path="x", template="chat_template", template_date=d))
            for d in ("2024-07-26", "2024-07-27", None)}
    assert len(keys) == 3
    f = tmp_path / "d.json"
    f.write_text(json.dumps([{"instruction": "q", "input": "", "output": "a"}]), encoding="utf-8")
    cached = load_or_tokenize(DataSection(path=str(f), template="chat_template", template_date="2024-07-26",
                                          cache_dir=str(tmp_path / "c")), chat_tok)
    assert "Today Date: 26 Jul 2024" in chat_tok.decode(cached.ids.tolist())
    for bad in ("2024-7-26", "2024-02-30", "26 Jul 2024"):
        with pytest.raises(ConfigKeyError, match=r"data.template_date.*must be a day written YYYY-MM-DD"):
            DataSection(template_date=bad)


@pytest.mark.parametrize("bos", ["none", "start", "every_piece"])
@pytest.mark.parametrize("shape", ["reference", "custom"])
def test_human_assistant_as_jinja_renders_what_inference_feeds(bos: str, shape: str) -> None:
    """The human_assistant template written as a Jinja chat template (what `ia3-dist export` gives the exported
    tokenizer, so transformers' apply_chat_template and vLLM prompt the model in its training format): for a
    system message and several turns, the text is the prompt inference feeds, the tokenizer's BOS written where
    training had it (once, or before every piece), and encoded the apply_chat_template way (no special tokens
    added) it gives the very ids `generate` feeds. Tool calls, tools and unknown roles raise."""
    from tokenizers import processors

    from ia3_dist.tools.inference import prompt_ids

    tok = _sentencepiece_style_tokenizer()
    if bos != "none":
        b = tok.convert_tokens_to_ids("<s>")
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                                             special_tokens=[("<s>", b)])
    kw = {} if shape == "reference" else {"prompt_template": 'Q{{uote}} "\\{instruction}" \\u00e9 {input}é',
                                          "strip_prompt": False, "response_prefix": "\n### A:\t"}
    t = Template.of(DataSection(path="x", **kw), tok)
    t.bos = "every_piece" if bos == "every_piece" else "start"
    tok.chat_template = t.jinja(tok)
    convs = [Conversation([Turn("hello there", "", "")]),
             Conversation([Turn("hello there", "", "fine thanks"), Turn("how are you", "", "")], "Be brief."),
             Conversation([Turn("a", "", "b"), Turn("c", "", "d\n"), Turn("  e  ", "", "")])]
    for conv in convs:
        msgs = ([{"role": "system", "content": conv.system}] if conv.system else []) + [
            {"role": r, "content": c} for tr in conv.turns for r, c in (("user", tr.instruction),
                                                                         ("assistant", tr.output))][:-1]
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        pieces = t.prompt_pieces(conv, tok)
        lead = "<s>" if bos != "none" else ""
        want = "".join((lead if k == 0 or t.bos == "every_piece" else "") + p for k, p in enumerate(pieces))
        assert text == want, (text, want)
        if len(conv.turns) == 1 and bos == "none":
            # One turn is one piece: encoded whole it is the ids generate feeds. (Later turns are encoded apart in
            # training, as the recipe's tok(prompt) + tok(output + eos); this tokenizer, like SentencePiece's,
            # starts each piece with a word-start marker that the whole text does not have there, nor after a
            # BOS written as text.)
            ids = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=False)
            assert ids == prompt_ids(t, conv, tok, 10**6)[0]
    for bad in ([{"role": "user", "content": "x"}, {"role": "assistant", "content": None,
                                                     "tool_calls": [{"function": {"name": "f", "arguments": {}}}]}],
                [{"role": "tool", "content": "x"}], [{"role": "assistant", "content": "x"}]):
        with pytest.raises(Exception, match="ia3-dist human_assistant"):
            tok.apply_chat_template(bad, tokenize=False)
    with pytest.raises(Exception, match="written its own way"):
        tok.apply_chat_template([{"role": "user", "content": "x"}], tools=[{"type": "function", "function": {
            "name": "f", "parameters": {"type": "object", "properties": {}}}}], tokenize=False)


# Qwen3's chat template (its shape): an answer after the last question carries its reasoning in <think> tags (an
# empty block when it has none); the answers before it are rendered without, so a conversation's render is no
# prefix of its continuation's.
QWEN3 = (Path(__file__).parent / "data" / "chat_templates" / "qwen3_shape.jinja").read_text()


def _tokens(data, i: int) -> list[int]:
    return data.ids[data.offsets[i]:data.offsets[i + 1]].tolist()


def test_reasoning_is_rendered_and_labelled_as_transformers_renders_it(chat_tok, tmp_path: Path) -> None:
    """An assistant message's reasoning_content (or thinking / reasoning) reaches the chat template as
    apply_chat_template passes it, so the model learns the reasoning before the answer (it was dropped: Qwen3's
    template then labelled an empty <think> block); a template with no place for it, and human_assistant, refuse
    the record, naming its line."""
    chat_tok.chat_template = QWEN3
    cfg = DataSection(path="x", max_length=1024, template="chat_template")
    for key in ("reasoning_content", "thinking", "reasoning"):
        rec = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", key: "R"}]}
        f = tmp_path / f"{key}.jsonl"
        f.write_text(json.dumps(rec) + "\n")
        data = tokenize(load_records(DataSection(path=str(f))), chat_tok, cfg)
        want = chat_tok.apply_chat_template(rec["messages"], tokenize=True, return_dict=False)
        assert _tokens(data, 0) == want
        assert _label_spans(data, 0, chat_tok) == ["<think>\nR\n</think>\n\na<|im_end|>\n"]
    chat_tok.chat_template = CHATML
    with pytest.raises(UsageError, match=r"reasoning.jsonl:1: .*drops the assistant's reasoning \(turn 1"):
        tokenize(load_records(DataSection(path=str(f))), chat_tok, cfg)
    with pytest.raises(UsageError, match=r"reasoning.jsonl:1: .*human_assistant: assistant turn 1 carries reasoning"):
        tokenize(load_records(DataSection(path=str(f))), chat_tok, DataSection(path="x"))


def test_a_template_that_rewrites_history_trains_the_last_answer(chat_tok) -> None:
    """Qwen3's template renders earlier answers without their reasoning once a later question comes, so no turn
    but the last can be cut out of the whole: data.train_on=all refuses such a conversation and names
    data.train_on=last, which labels the last answer after the turns before it as the template renders them then:
    the tokens apply_chat_template gives the whole conversation. On a prefix-stable template train_on=last gives
    what it gave before (the same tokens, the last answer labelled)."""
    chat_tok.chat_template = QWEN3
    conv = Conversation([Turn("q1", "", "a1", reasoning="R1"), Turn("q2", "", "a2", reasoning="R2")])
    with pytest.raises(UsageError, match="set data.train_on=last"):
        tokenize(_records([conv]), chat_tok, DataSection(path="x", max_length=1024, template="chat_template"))
    data = tokenize(_records([conv]), chat_tok, DataSection(path="x", max_length=1024, template="chat_template",
                                                             train_on="last"))
    msgs = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1", "reasoning_content": "R1"},
            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2", "reasoning_content": "R2"}]
    assert _tokens(data, 0) == chat_tok.apply_chat_template(msgs, tokenize=True, return_dict=False)
    assert _label_spans(data, 0, chat_tok) == ["<think>\nR2\n</think>\n\na2<|im_end|>\n"]
    assert "R1" not in chat_tok.decode(_tokens(data, 0))  # the template's choice, as at inference
    chat_tok.chat_template = CHATML
    last = tokenize(_records(CONVS), chat_tok, DataSection(path="x", max_length=1024, template="chat_template",
                                                           train_on="last"))
    every = tokenize(_records(CONVS), chat_tok, DataSection(path="x", max_length=1024, template="chat_template"))
    assert last.ids.tolist() == every.ids.tolist()
    for i, conv in enumerate(CONVS):
        assert _label_spans(last, i, chat_tok) == [conv.turns[-1].output + "<|im_end|>\n"]


def test_role_content_messages_under_conversations_are_pointed_to_the_messages_format(tmp_path: Path) -> None:
    """Role/content messages in a 'conversations' column are detected as ShareGPT; the hint was to map role and
    content onto ShareGPT's keys, which reads no weight or tool_calls: a "weight": 0 answer was trained. The hint
    now names the messages format, and following it keeps that answer out of the labels."""
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"conversations": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "bad", "weight": 0},
        {"role": "user", "content": "q2"}, {"role": "assistant", "content": "good"}]}) + "\n")
    with pytest.raises(UsageError, match=r"c.jsonl:1: message 0: missing key 'from' .*set data.format=messages and "
                                         r"data.columns.messages=conversations"):
        load_records(DataSection(path=str(f)))
    conv = load_records(DataSection(path=str(f), format="messages", columns={"messages": "conversations"})).examples[0]
    assert [(t.output, t.train) for t in conv.turns] == [("bad", False), ("good", True)]
