"""Tool-calling conversations: sharegpt's function_call/observation turns (LLaMA-Factory's glaive_toolcall) and
OpenAI-style messages (tool_calls, role: tool, a tools list) read into one conversation; rendered by the real
Qwen2.5 and Llama 3.1 chat templates exactly as ``tokenizer.apply_chat_template(messages, tools=...)`` renders
them, with labels on the assistant's text and calls and never on tool results; the documented human_assistant
form; the same conversation in both formats gives the same tokens and labels; bad tool data is named by file and
record; inference reads tool requests and shows the calls a model writes."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from test_multiturn import _label_spans

from ia3_dist.config import DataSection
from ia3_dist.data.formats import MESSAGES, SHAREGPT, Columns, to_conversation
from ia3_dist.data.records import load_records
from ia3_dist.data.template import Template
from ia3_dist.data.tokenize import tokenize
from ia3_dist.data.tools import parse_calls
from ia3_dist.errors import UsageError

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
WEATHER = {"name": "get_weather", "description": "The current weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "城市"}},
                          "required": ["city"]}}
TIME = {"name": "get_time", "description": "The local time in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}

# One conversation, written the two ways people bring it: a user question, a call, its result, an answer that
# uses it, a second question answered with a call made together with some text, its result, the last answer.
SHAREGPT_REC = {
    "conversations": [
        {"from": "human", "value": "巴黎天气怎么样？"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
        {"from": "observation", "value": '{"temp": 21, "sky": "晴"}'},
        {"from": "gpt", "value": "巴黎现在21度，晴。"},
        {"from": "human", "value": "那里几点了？"},
        {"from": "function_call", "value": json.dumps({"name": "get_time", "arguments": {"city": "Paris"}})},
        {"from": "observation", "value": '{"time": "14:05"}'},
        {"from": "gpt", "value": "现在是14:05。"},
    ],
    "system": "你是一个会用工具的助手。",
    "tools": json.dumps([WEATHER, TIME], ensure_ascii=False),
}
MESSAGES_REC = {
    "messages": [
        {"role": "system", "content": "你是一个会用工具的助手。"},
        {"role": "user", "content": "巴黎天气怎么样？"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                               "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21, "sky": "晴"}'},
        {"role": "assistant", "content": "巴黎现在21度，晴。"},
        {"role": "user", "content": "那里几点了？"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_time", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": '{"time": "14:05"}'},
        {"role": "assistant", "content": "现在是14:05。"},
    ],
    "tools": [{"type": "function", "function": WEATHER}, {"type": "function", "function": TIME}],
}
# What transformers' chat templates are given for it (arguments as objects, as its docs ask).
HF_MESSAGES = [
    {"role": "system", "content": "你是一个会用工具的助手。"},
    {"role": "user", "content": "巴黎天气怎么样？"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": '{"temp": 21, "sky": "晴"}'},
    {"role": "assistant", "content": "巴黎现在21度，晴。"},
    {"role": "user", "content": "那里几点了？"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_time", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": '{"time": "14:05"}'},
    {"role": "assistant", "content": "现在是14:05。"},
]
HF_TOOLS = [{"type": "function", "function": WEATHER}, {"type": "function", "function": TIME}]
ANSWERS = ("巴黎现在21度，晴。", "现在是14:05。")
RESULTS = ('{"temp": 21, "sky": "晴"}', '{"time": "14:05"}')
QUESTIONS = ("巴黎天气怎么样？", "那里几点了？")


def _both(tmp_path: Path) -> list[Path]:
    out = []
    for name, rec in (("glaive.jsonl", SHAREGPT_REC), ("openai.jsonl", MESSAGES_REC)):
        (tmp_path / name).write_text(json.dumps(rec, ensure_ascii=False) + "\n", encoding="utf-8")
        out.append(tmp_path / name)
    return out


def _tokenized(path: Path, tok, **kw):
    cfg = DataSection(path=str(path), max_length=4096, **kw)
    return tokenize(load_records(cfg), tok, cfg)


def test_both_formats_read_into_one_conversation() -> None:
    a = to_conversation(SHAREGPT_REC, SHAREGPT, Columns(None), "r")
    b = to_conversation(MESSAGES_REC, MESSAGES, Columns(None), "r")
    assert a.tools == b.tools == tuple(HF_TOOLS) and a.system == b.system
    # Turn by turn: question -> call, result -> answer, question -> call, result -> answer.
    for conv in (a, b):
        assert [(t.instruction, t.output, [c["function"]["name"] for c in t.calls],
                 [r["content"] for r in t.results]) for t in conv.turns] == [
            (QUESTIONS[0], "", ["get_weather"], []), ("", ANSWERS[0], [], [RESULTS[0]]),
            (QUESTIONS[1], "", ["get_time"], []), ("", ANSWERS[1], [], [RESULTS[1]])]
        assert all(c["function"]["arguments"] == {"city": "Paris"} for t in conv.turns for c in t.calls)
    # The messages version keeps what the data gave besides (ids), which templates may use.
    assert b.turns[0].calls[0]["id"] == "call_1" and b.turns[1].results[0]["tool_call_id"] == "call_1"


def test_human_assistant_form(tiny_tokenizer, tmp_path: Path) -> None:
    tok = tiny_tokenizer
    glaive, openai = _both(tmp_path)
    conv = load_records(DataSection(path=str(glaive))).examples[0]
    segs = Template().segments(conv, tok)
    eos = tok.eos_token
    tools = "Tools:\n" + "\n".join(json.dumps(t, ensure_ascii=False) for t in (WEATHER, TIME))
    assert segs == [
        (f"你是一个会用工具的助手。\n\n{tools}\n\nHuman: 巴黎天气怎么样？\n\nAssistant: ", False),
        ('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' + eos, True),
        ('Observation: {"temp": 21, "sky": "晴"}\n\nAssistant: ', False),
        ("巴黎现在21度，晴。" + eos, True),
        ("Human: 那里几点了？\n\nAssistant: ", False),
        ('<tool_call>{"name": "get_time", "arguments": {"city": "Paris"}}</tool_call>' + eos, True),
        ('Observation: {"time": "14:05"}\n\nAssistant: ', False),
        ("现在是14:05。" + eos, True),
    ]
    # The same tokens and labels from either format; the labels decode to the calls and answers only.
    a, b = _tokenized(glaive, tok), _tokenized(openai, tok)
    assert a.ids.tolist() == b.ids.tolist() and a.label_mask.tolist() == b.label_mask.tolist()
    spans = _label_spans(a, 0, tok)
    assert len(spans) == 4 and "get_weather" in spans[0] and spans[1].startswith(ANSWERS[0])
    assert not any(r in s for s in spans for r in RESULTS) and not any(q in s for s in spans for q in QUESTIONS)
    # train_on=last: only the final answer.
    last = _label_spans(_tokenized(glaive, tok, train_on="last"), 0, tok)
    assert len(last) == 1 and last[0].startswith(ANSWERS[1])


BAD = {
    "result without a call": ({"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "r"},
                                            {"role": "assistant", "content": "a"}]},
                              "message 1: a tool result with no preceding call"),
    "result first": ({"conversations": [{"from": "observation", "value": "r"}, {"from": "gpt", "value": "a"}]},
                     "message 0: a tool result with no preceding call"),
    "arguments not JSON": ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{city: Paris"}}]}]},
        "message 1: not valid JSON in tool call arguments"),
    "function_call not JSON": ({"conversations": [{"from": "human", "value": "q"},
                                                  {"from": "function_call", "value": "get_weather(Paris)"}]},
                               "message 1: not valid JSON in function_call"),
    "arguments not an object": ({"conversations": [{"from": "human", "value": "q"}, {
        "from": "function_call", "value": '{"name": "f", "arguments": [1, 2]}'}]},
        "message 1: malformed tool call arguments: expected a JSON object"),
    "call without a name": ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"arguments": {}}}]}]}, "message 1: malformed tool call"),
    "unknown tool role": ({"messages": [{"role": "user", "content": "q"}, {"role": "ipython", "content": "r"},
                                       {"role": "assistant", "content": "a"}]},
                          "message 1: unknown role 'ipython'; accepted roles: system (system), user (user), "
                          "assistant (assistant), tool (tool)"),
    "ends with a result": ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [
        {"function": {"name": "f", "arguments": {}}}]}, {"role": "tool", "content": "r"}]},
        "conversation ends with a tool result"),
    "undeclared tool": ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [
        {"function": {"name": "g", "arguments": {}}}]}], "tools": [WEATHER]},
        "turn 1 calls tool 'g', which the record's tools do not declare (get_weather)"),
    "tools not a list": ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                          "tools": {"name": "f"}}, "field 'tools' must be a list of function schemas"),
    "tools JSON broken": ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
                           "tools": "[{"}, "not valid JSON in field 'tools'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_tool_data_is_named_by_file_and_record(case: str, tmp_path: Path) -> None:
    rec, needle = BAD[case]
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps(rec) + "\n", encoding="utf-8")
    with pytest.raises(UsageError) as e:
        load_records(DataSection(path=str(f)))
    assert str(e.value).startswith(f"{f}:1: {needle}"), str(e.value)


def test_bad_tool_data_exits_2_in_the_preflight(tmp_path: Path, tiny_model: Path, capsys) -> None:
    from ia3_dist.cli import main

    f = tmp_path / "d.jsonl"
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    f.write_text(json.dumps(good) + "\n" + json.dumps(BAD["result without a call"][0]) + "\n", encoding="utf-8")
    out = tmp_path / "run"
    rc = main(["check", "--config", str(Path(__file__).parents[1] / "configs" / "tiny-cpu.yaml"),
               f"model.path={tiny_model}", f"data.path={f}", f"output.dir={out}"])
    assert rc == 2 and f"{f}:2: message 1: a tool result with no preceding call" in capsys.readouterr().err
    assert not out.exists()


def test_a_template_that_ignores_tools_is_refused(tiny_tokenizer, tmp_path: Path) -> None:
    glaive, _ = _both(tmp_path)
    plain = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    conv = load_records(DataSection(path=str(glaive))).examples[0]
    with pytest.raises(UsageError, match="drops the assistant's tool calls"):
        Template("chat_template", chat_template=plain).segments(conv, tiny_tokenizer)
    no_calls = copy.deepcopy(conv)
    no_calls.turns = [t for t in conv.turns if not t.calls and not t.results] or [
        type(conv.turns[0])(QUESTIONS[0], "", ANSWERS[0])]
    with pytest.raises(UsageError, match="does not render the record's tools"):
        Template("chat_template", chat_template=plain).segments(no_calls, tiny_tokenizer)
    # A template that renders the calls but never the tools: every declared tool is called, so each name is in
    # the rendered text, in the assistant's answers, which the model is trained to write, not shown before.
    calls_only = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}{% for c in m.tool_calls "
                  "or [] %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}<|im_end|>\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    called = {c["function"]["name"] for t in conv.turns for c in t.calls}
    every_called = copy.deepcopy(conv)
    every_called.tools = [t for t in conv.tools if t["function"]["name"] in called]
    assert every_called.tools
    with pytest.raises(UsageError, match="does not render the record's tools"):
        Template("chat_template", chat_template=calls_only).segments(every_called, tiny_tokenizer)


def test_parse_calls_reads_the_forms_models_write() -> None:
    assert parse_calls('先查一下。\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
                       '</tool_call>') == [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    assert parse_calls('{"name": "get_time", "parameters": {"city": "Paris"}}') == [
        {"name": "get_time", "parameters": {"city": "Paris"}}]
    assert parse_calls("巴黎现在21度。") == [] and parse_calls("<tool_call>not json</tool_call>") == []



@pytest.fixture(scope="module")
def adapter(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from peft import IA3Config, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    pm = get_peft_model(model, IA3Config(task_type="CAUSAL_LM"))
    d = tmp_path_factory.mktemp("adapter") / "adapter"
    pm.save_pretrained(str(d))
    return d


class _Recorder:
    """The real generate, recording each prompt it renders; ``answers`` (when given) replace the tiny random
    model's text, which never calls a tool, so the display of a call can be checked."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, answers: list[str] | None = None) -> None:
        from ia3_dist.tools import inference

        self.prompts: list[str] = []
        self.answers = list(answers or [])
        real = inference.generate

        def run(model, tok, template, requests, opts, batch_size=8):
            self.prompts += [template.prompt_of(c, tok) for c in requests]
            out = real(model, tok, template, requests, opts, batch_size)
            return [self.answers.pop(0) for _ in out] if self.answers else out

        monkeypatch.setattr(inference, "generate", run)


def test_generate_takes_tools_and_shows_the_calls(adapter: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from ia3_dist.cli import main

    req = {"messages": HF_MESSAGES[1:4], "tools": HF_TOOLS}
    call = '<tool_call>{"name": "get_time", "arguments": {"city": "Paris"}}</tool_call>'
    rec = _Recorder(monkeypatch, ["巴黎现在21度。", call])
    assert main(["generate", "--adapter", str(adapter), "--max-new-tokens", "2", json.dumps(req, ensure_ascii=False),
                 json.dumps({"messages": [HF_MESSAGES[5]], "tools": HF_TOOLS}, ensure_ascii=False)]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    # The first request ends with the tool's result: the prompt is the training form up to it.
    tools = "Tools:\n" + "\n".join(json.dumps(t, ensure_ascii=False) for t in (WEATHER, TIME))
    assert rec.prompts[0] == (f"{tools}\n\nHuman: 巴黎天气怎么样？\n\nAssistant: "
                              '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call></s>'
                              'Observation: {"temp": 21, "sky": "晴"}\n\nAssistant: ')
    assert lines[0]["response"] == "巴黎现在21度。" and "tool_calls" not in lines[0]
    assert lines[1]["tool_calls"] == [{"name": "get_time", "arguments": {"city": "Paris"}}]
    # A request that ends with the assistant's call has nothing to answer.
    bad = {"messages": HF_MESSAGES[1:3], "tools": HF_TOOLS}
    assert main(["generate", "--adapter", str(adapter), json.dumps(bad)]) == 2
    assert "the last message must be the user's or a tool result" in capsys.readouterr().err


def test_chat_offers_tools_shows_a_call_and_takes_its_result(adapter: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import io

    from ia3_dist.cli import main

    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([WEATHER, TIME], ensure_ascii=False), encoding="utf-8")
    rec = _Recorder(monkeypatch, ['<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>',
                                  "巴黎现在21度，晴。"])
    monkeypatch.setattr("sys.stdin", io.StringIO('/result {"temp": 1}\n巴黎天气怎么样？\n/result {"temp": 21, "sky": '
                                                 '"晴"}\n/quit\n'))
    assert main(["chat", "--adapter", str(adapter), "--max-new-tokens", "2", "--tools", str(tools)]) == 0
    cap = capsys.readouterr()
    assert "2 tools offered" in cap.out and "there is none to answer" in cap.err
    assert 'Tool call: get_weather {"city": "Paris"}' in cap.out and "Assistant: 巴黎现在21度，晴。" in cap.out
    assert rec.prompts[1].endswith('</tool_call></s>Observation: {"temp": 21, "sky": "晴"}\n\nAssistant: ')
    assert rec.prompts[1].startswith("Tools:\n") and rec.prompts[1].count("<tool_call>") == 1  # the call once
    bad = tmp_path / "bad.json"
    bad.write_text('[{"description": "no name"}]')
    assert main(["chat", "--adapter", str(adapter), "--tools", str(bad)]) == 2
    assert f"--tools {bad}: the tools entry 0 is not a function schema" in capsys.readouterr().err


# The real templates' special tokens (bos for Llama 3.1 is its <|begin_of_text|>).
FAMILIES = {
    "qwen2_5": (["<|im_start|>", "<|im_end|>"], None),
    "llama3_1": (["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>",
                  "<|python_tag|>"], "<|begin_of_text|>"),
}
LABELS = {
    "qwen2_5": ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n',
                "巴黎现在21度，晴。<|im_end|>\n",
                '<tool_call>\n{"name": "get_time", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n',
                "现在是14:05。<|im_end|>\n"],
    "llama3_1": ['{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>', "巴黎现在21度，晴。<|eot_id|>",
                 '{"name": "get_time", "parameters": {"city": "Paris"}}<|eot_id|>', "现在是14:05。<|eot_id|>"],
}


def _family_tok(family: str, tiny_model: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    specials, bos = FAMILIES[family]
    tok.add_special_tokens({"additional_special_tokens": specials})
    if bos is not None:
        tok.bos_token = bos
    tok.chat_template = (TEMPLATES / f"{family}.jinja").read_text(encoding="utf-8")
    return tok


@pytest.mark.parametrize("family", list(FAMILIES))
def test_real_chat_templates_render_tools_as_transformers_does(family: str, tiny_model: Path, tmp_path: Path) -> None:
    tok = _family_tok(family, tiny_model)
    expected = tok.apply_chat_template(HF_MESSAGES, tools=HF_TOOLS, tokenize=False)
    assert "get_weather" in expected and "14:05" in expected  # tools, calls and results all rendered
    got = []
    for path in _both(tmp_path):
        cfg = DataSection(path=str(path), template="chat_template", max_length=4096)
        conv = load_records(cfg).examples[0]
        segs = Template.of(cfg, tok).segments(conv, tok)
        # The text is exactly transformers' rendering of the whole conversation with its tools.
        assert "".join(text for text, _ in segs) == expected
        data = tokenize(load_records(cfg), tok, cfg)
        # The labels decode to the assistant's calls and answers with the template's end-of-turn markup: never a
        # tool result, a user message or the tools.
        assert _label_spans(data, 0, tok) == LABELS[family]
        got.append((data.ids.tolist(), data.label_mask.tolist()))
    assert got[0] == got[1]  # the same conversation in both formats: the same tokens and labels
    # The prompt a model continues after a tool result is transformers' generation prompt there.
    conv = load_records(DataSection(path=str(tmp_path / "openai.jsonl"))).examples[0]
    conv.turns = conv.turns[:2]
    prompt = Template.of(DataSection(path="x", template="chat_template"), tok).prompt_of(conv, tok)
    assert prompt == tok.apply_chat_template(HF_MESSAGES[:4], tools=HF_TOOLS, tokenize=False,
                                             add_generation_prompt=True)


def test_llama_3_1_refuses_parallel_calls_by_name(tiny_model: Path, tmp_path: Path) -> None:
    tok = _family_tok("llama3_1", tiny_model)
    rec = copy.deepcopy(MESSAGES_REC)
    rec["messages"][2]["tool_calls"].append({"type": "function", "function": {"name": "get_time",
                                                                               "arguments": {"city": "Paris"}}})
    f = tmp_path / "par.jsonl"
    f.write_text(json.dumps(rec, ensure_ascii=False) + "\n", encoding="utf-8")
    cfg = DataSection(path=str(f), template="chat_template")
    with pytest.raises(UsageError, match="fails to render .*only supports single tool-calls at once"):
        tokenize(load_records(cfg), tok, cfg)


def _scripted_qwen2(d: Path, text: str, then: tuple[int, ...] = ()):
    """The tiny Qwen2 (ChatML template, <|im_end|> a special token) loaded as generate loads it, its LM head
    replaced by a script that writes ``text`` token by token and the ids ``then``, then repeats the last one."""
    import torch

    from ia3_dist.tools.inference import load_for_inference

    model, tok, template, _ = load_for_inference(str(d))
    want = tok(text, add_special_tokens=False)["input_ids"] + list(then) + tok("再见", add_special_tokens=False)[
        "input_ids"]
    calls: list[int] = []

    def hook(mod, inp, out):
        calls.append(1)
        new = torch.zeros_like(out)
        new[:, -1, want[min(len(calls) - 1, len(want) - 1)]] = 100.0
        return new

    model.get_output_embeddings().register_forward_hook(hook)
    return model, tok, template, len(want)


def test_generate_stops_at_the_templates_end_of_turn(family_models: dict, tmp_path: Path) -> None:
    # A model trained on ChatML ends its answer with <|im_end|>, not eos: generation must stop there instead of
    # running on into turns the model invents.
    from ia3_dist.data.records import Conversation, Turn
    from ia3_dist.tools.inference import GenOptions, generate

    model, tok, template, n = _scripted_qwen2(
        family_models["qwen2"], "好的<|im_end|>\n<|im_start|>user\n再见<|im_end|>\n<|im_start|>assistant\n拜拜")
    assert template.chat_template and "<|im_end|>" in template.chat_template
    out = generate(model, tok, template, [Conversation([Turn("你好", "", "")])], GenOptions(max_new_tokens=n))
    assert out == ["好的"]


def test_generation_config_eos_ids_are_kept_and_nothing_else(family_models: dict, tmp_path: Path) -> None:
    # An instruct model names its end-of-turn in generation_config.json (Llama 3's <|eot_id|>); only those ids are
    # taken from it, never its decoding settings.
    import shutil

    from ia3_dist.data.records import Conversation, Turn
    from ia3_dist.tools.inference import GenOptions, generate

    d = tmp_path / "qwen2"
    shutil.copytree(family_models["qwen2"], d)
    start = 1200  # <|im_start|>: special, neither the tokenizer's eos nor the template's end of turn
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [start], "num_beams": 1000,
                                                          "do_sample": True, "temperature": 100.0}))
    model, tok, template, n = _scripted_qwen2(d, "好的", then=(start,))
    assert tok.convert_ids_to_tokens(start) == "<|im_start|>"
    gc = model.generation_config
    assert start in gc.eos_token_id and tok.convert_tokens_to_ids("<|im_end|>") in gc.eos_token_id
    assert gc.num_beams in (None, 1) and not gc.do_sample and gc.temperature in (None, 1.0)
    out = generate(model, tok, template, [Conversation([Turn("你好", "", "")])], GenOptions(max_new_tokens=n))
    assert out == ["好的"]


def test_a_top_level_system_goes_with_messages_as_in_training() -> None:
    from ia3_dist.tools.inference import parse_request

    rec = {"messages": [{"role": "user", "content": "你好"}], "system": "你是一只猫。"}
    conv = parse_request(json.dumps(rec, ensure_ascii=False), "prompt 1")
    train = to_conversation({**rec, "messages": [*rec["messages"], {"role": "assistant", "content": "喵"}]},
                            MESSAGES, Columns(None), "r")
    assert conv.system == train.system == "你是一只猫。"
    both = {"messages": [{"role": "system", "content": "甲"}, {"role": "user", "content": "你好"}], "system": "乙"}
    with pytest.raises(UsageError, match="prompt 1: both a leading system message and a top-level 'system'"):
        parse_request(json.dumps(both, ensure_ascii=False), "prompt 1")


def test_export_of_a_scaled_tied_head_equals_the_adapter(family_models: dict, tmp_path: Path) -> None:
    # The tiny Qwen2 ties its LM head to the input embeddings, as Qwen2.5-0.5B does: IA3 on lm_head must scale the
    # head only, in the merged export too.
    import torch
    from peft import IA3Config, get_peft_model
    from transformers import AutoModelForCausalLM

    from ia3_dist.tools.export import export_merged
    from ia3_dist.tools.inference import load_for_inference

    base = family_models["qwen2"]
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)),
                        IA3Config(task_type="CAUSAL_LM", target_modules=["v_proj", "lm_head"], feedforward_modules=[]))
    assert pm.config.tie_word_embeddings
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, q in pm.named_parameters():
            if "ia3_l" in n:
                q.copy_(1 + 0.3 * torch.randn(q.shape, generator=g))
    ad = tmp_path / "adapter"
    pm.save_pretrained(str(ad))
    out = export_merged(str(ad), str(tmp_path / "merged"))
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    x = torch.randint(4, 1000, (1, 16), generator=g)
    a = load_for_inference(str(ad))[0]
    m = load_for_inference(str(out))[0]
    with torch.no_grad():
        assert (a(input_ids=x).logits - m(input_ids=x).logits).abs().max() < 1e-5


def test_export_writes_the_end_of_turn_into_the_generation_config(family_models: dict, tmp_path: Path) -> None:
    # The tiny Qwen2's eos is </s>, its chat template ends an answer with <|im_end|> (as Qwen2.5 base models:
    # <|endoftext|> and ChatML): the merged model, served by anything but ia3-dist, must stop at the end of turn.
    from peft import IA3Config, get_peft_model
    from transformers import AutoModelForCausalLM, GenerationConfig

    from ia3_dist.tools.export import export_merged

    base = family_models["qwen2"]
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)), IA3Config(task_type="CAUSAL_LM"))
    pm.save_pretrained(str(tmp_path / "adapter"))
    out = export_merged(str(tmp_path / "adapter"), str(tmp_path / "merged"))
    gc = GenerationConfig.from_pretrained(str(out))
    base_gc = GenerationConfig.from_pretrained(str(base))
    assert base_gc.eos_token_id == 2
    assert gc.eos_token_id == [2, 1201]  # </s>, <|im_end|>
    assert (gc.bos_token_id, gc.pad_token_id) == (base_gc.bos_token_id, base_gc.pad_token_id)
    # Every file 0666 less the umask, as ia3-dist writes its own: transformers saves the weights 0600.
    from ia3_dist.runtime.safe_io import current_umask

    want = 0o666 & ~current_umask()
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in out.iterdir()} == \
        {f.name: oct(want) for f in out.iterdir()}


def test_an_answer_cut_inside_a_character_drops_its_incomplete_bytes(family_models: dict) -> None:
    # Byte-level tokenizers spell a character outside the vocabulary in several tokens (龘: three here): an answer
    # that --max-new-tokens cuts after the first two ended in U+FFFD.
    from ia3_dist.data.records import Conversation, Turn
    from ia3_dist.tools.inference import GenOptions, generate

    model, tok, template, _ = _scripted_qwen2(family_models["qwen2"], "好的", then=(169, 126))
    assert tok.decode([169, 126, 250]) == "龘" and tok.decode([169, 126]).endswith("\ufffd")
    req = [Conversation([Turn("你好", "", "")])]
    n = len(tok("好的", add_special_tokens=False)["input_ids"])
    assert generate(model, tok, template, req, GenOptions(max_new_tokens=n + 2)) == ["好的"]


def test_a_prompt_reads_content_parts_and_role_aliases_as_the_training_data_does() -> None:
    """generate/chat prompts in the shape of a training record: OpenAI's text parts, developer as system,
    ShareGPT's chatgpt as the assistant; an image part is refused naming the message."""
    from ia3_dist.tools.inference import parse_request

    conv = parse_request(json.dumps({"messages": [
        {"role": "developer", "content": [{"type": "text", "text": "be brief"}]},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": "ok"}, {"role": "user", "content": "c"}]}), "input 1")
    assert conv.system == "be brief" and [(t.instruction, t.output) for t in conv.turns] == [("a\nb", "ok"), ("c", "")]
    conv = parse_request(json.dumps({"conversations": [
        {"from": "human", "value": "q"}, {"from": "chatgpt", "value": "x"}, {"from": "human", "value": "r"}]}),
        "input 2")
    assert [(t.instruction, t.output) for t in conv.turns] == [("q", "x"), ("r", "")]
    with pytest.raises(UsageError, match="input 3: message 0 content part 0 is not a text part"):
        parse_request(json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}), "input 3")


def test_export_refuses_weights_beyond_the_dtype_and_an_unfinished_export(adapter: Path, tiny_model: Path,
                                                                         tmp_path: Path) -> None:
    """A base weight beyond fp16's range becomes inf in an fp16 export: refused naming the tensor (bf16 holds it).
    A merged dir whose export was stopped while moving files in (its marker says complete: false) may mix two
    exports' shards: generate refuses it and names the fix."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from ia3_dist.errors import UsageError
    from ia3_dist.tools.export import export_merged
    from ia3_dist.tools.inference import EXPORT_MARKER, load_for_inference

    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    weights = load_file(str(base / "model.safetensors"))
    name = next(k for k in weights if k.endswith("dense_4h_to_h.weight"))
    weights[name][0, 0] = 1e6
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UsageError, match=rf"the merged .*{name.removeprefix('transformer.')} holds non-finite "
                                         r"values in --dtype fp16 .*export with --dtype bf16 or fp32"):
        export_merged(str(adapter), str(tmp_path / "fp16"), base=str(base), dtype="fp16")
    out = export_merged(str(adapter), str(tmp_path / "bf16"), base=str(base), dtype="bf16")
    assert torch.isfinite(load_for_inference(str(out))[0].get_parameter(name).float()).all()

    marker = json.loads((out / EXPORT_MARKER).read_text())
    (out / EXPORT_MARKER).write_text(json.dumps({**marker, "complete": False}))
    with pytest.raises(UsageError, match="stopped while it moved the merged model in .* again with --force"):
        load_for_inference(str(out))


@pytest.mark.parametrize("fmt", ["parquet", "arrow"])
def test_tool_records_read_from_arrow_are_the_jsonl_records(fmt: str, tmp_path: Path) -> None:
    """Arrow stores a column of objects as one struct type of every key any record has, null where a record has
    none: read back, get_weather's call gained search's arguments (query=null, limit=null) and its schema search's
    properties. Those nulls are dropped: the records equal the JSONL ones."""
    from test_formats import write_arrow, write_parquet

    def call(name: str, args: dict) -> dict:
        return {"type": "function", "function": {"name": name, "arguments": args}}

    def tool(name: str, props: dict) -> dict:
        return {"type": "function", "function": {"name": name, "description": name,
                                                 "parameters": {"type": "object", "properties": props}}}

    recs = [{"messages": [{"role": "user", "content": "weather?"},
                          {"role": "assistant", "content": "", "tool_calls": [call("get_weather", {"city": "Paris"})]},
                          {"role": "tool", "content": "21"}, {"role": "assistant", "content": "21C"}],
             "tools": [tool("get_weather", {"city": {"type": "string"}})]},
            {"messages": [{"role": "user", "content": "search?"},
                          {"role": "assistant", "content": "", "tool_calls": [call("search", {"query": "x",
                                                                                              "limit": 3})]},
                          {"role": "tool", "content": "r"}, {"role": "assistant", "content": "done"}],
             "tools": [tool("search", {"query": {"type": "string"}, "limit": {"type": "integer"}})]}]
    j = tmp_path / "d.jsonl"
    j.write_text("".join(json.dumps(r) + "\n" for r in recs))
    a = (write_parquet if fmt == "parquet" else write_arrow)(tmp_path / f"d.{fmt}", recs)
    want = load_records(DataSection(path=str(j))).examples
    got = load_records(DataSection(path=str(a))).examples
    assert got == want
    assert got[0].turns[0].calls[0]["function"]["arguments"] == {"city": "Paris"}


def test_a_lone_surrogate_in_tool_data_is_a_bad_record(tmp_path: Path) -> None:
    """A \\ud800 escape in a call's arguments or a tool schema reached the tokenizer, whose TypeError named no
    record and escaped data.on_bad_record=skip: now a bad record, named by its line, skippable."""
    call = {"name": "f", "arguments": {"x": "\ud800"}}
    good = {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}
    bad_call = {"conversations": [{"from": "human", "value": "h"}, {"from": "function_call", "value": json.dumps(call)},
                                  {"from": "observation", "value": "o"}, {"from": "gpt", "value": "g"}]}
    bad_tool = {**good, "tools": [{"name": "f", "description": "\udc00", "parameters": {}}]}
    good_sg = {"conversations": [{"from": "human", "value": "h"}, {"from": "gpt", "value": "g"}]}
    for k, (ok, bad) in enumerate(((good_sg, bad_call), (good, bad_tool))):
        f = tmp_path / f"d{k}.jsonl"
        f.write_text(json.dumps(ok) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(UsageError, match=f"{f}:2: .*unpaired UTF-16 surrogate"):
            load_records(DataSection(path=str(f)))
        assert len(load_records(DataSection(path=str(f), on_bad_record="skip")).examples) == 1


def test_alpaca_requests_read_as_training_reads_them(tmp_path: Path, capsys, monkeypatch) -> None:
    """generate/chat read an alpaca request with the training parser: nulls as absent fields (exported datasets
    write them), tools offered with an instruction, a training record's own answer ignored; a role that is not a
    string is named (it was a TypeError traceback that ended a chat); a .json list or a table given to --file is
    refused (read line by line, a list was one prompt and a table's rows prompts each)."""
    from ia3_dist.cli import main
    from ia3_dist.tools.inference import parse_request

    conv = parse_request(json.dumps({"instruction": "q", "input": None, "system": None, "history": None,
                                     "tools": None, "output": "the record's answer"}), "prompt 1")
    assert [(t.instruction, t.input, t.output) for t in conv.turns] == [("q", "", "")]
    assert conv.system == "" and conv.tools == ()
    tool = {"type": "function", "function": {"name": "weather", "description": "d",
                                             "parameters": {"type": "object", "properties": {}}}}
    conv = parse_request(json.dumps({"instruction": "巴黎天气怎么样？", "tools": [tool],
                                     "history": [["hi", "hello"]]}, ensure_ascii=False), "prompt 1")
    assert [t["function"]["name"] for t in conv.tools] == ["weather"] and len(conv.turns) == 2
    train = to_conversation({"instruction": "巴黎天气怎么样？", "output": "", "tools": [tool]},
                            "alpaca", Columns(None), "r")
    assert conv.tools == train.tools
    for role in (["user"], {"r": 1}, 3):
        with pytest.raises(UsageError, match="prompt 1: message 0 has role"):
            parse_request(json.dumps({"messages": [{"role": role, "content": "hi"}]}), "prompt 1")
    with pytest.raises(UsageError, match="prompt 1"):
        parse_request('{"instruction": 3}', "prompt 1")
    with pytest.raises(UsageError, match="prompt 1: a JSON prompt needs 'instruction'"):
        parse_request('{"instruction": null, "input": "x"}', "prompt 1")
    for name, text in (("held.json", '[{"instruction": "a"}]\n'), ("pretty.json", '[\n  {"instruction": "a"}\n]\n'),
                       ("rows.CSV", "instruction,output\na,b\n"), ("t.parquet", "x\n")):
        (tmp_path / name).write_text(text)
        assert main(["generate", "--adapter", str(tmp_path), "--file", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert f"--file {tmp_path / name}" in err and "prompts are read one per line" in err, err
    # JSON lines in a .json file, and a plain prompt that starts with a bracket, are prompts: read, then the
    # (missing) adapter is what stops them.
    for name, text in (("lines.json", '{"instruction": "a"}\n'), ("inst.txt", "[INST] hello\n")):
        (tmp_path / name).write_text(text)
        assert main(["generate", "--adapter", str(tmp_path / "none"), "--file", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert "prompts are read one per line" not in err and "no such directory" in err, err


def test_chat_samples_each_line_from_its_own_seed(capsys, monkeypatch) -> None:
    """The k-th chat line read draws from --seed + k, as generate's prompt k (every turn reseeded with --seed gave
    the same sampled answer to the same question, asked again after /reset); the same session replays them."""
    import io

    from ia3_dist.cli import main
    from ia3_dist.tools import inference

    seeds = []

    def fake_generate(model, tok, template, convs, opts, *a, **k):
        seeds.append(opts.seed)
        return ["ok"]

    monkeypatch.setattr(inference, "load_for_inference", lambda *a: (None, None, Template(), True))
    monkeypatch.setattr(inference, "generate", fake_generate)
    for _ in range(2):
        monkeypatch.setattr("sys.stdin", io.StringIO("hi\n/reset\nhi\n/quit\n"))
        assert main(["chat", "--adapter", "x", "--sample", "--seed", "5"]) == 0
    assert seeds == [5, 7, 5, 7]
