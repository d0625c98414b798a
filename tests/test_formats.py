"""Instruction formats (alpaca, sharegpt, messages) from every file type into one :class:`Conversation` list:
equal conversations from every writing of the same data, column and role renaming, format detection, each kind of
malformed record with its message, the skip policy, broken tables, and fuzzing of the conversation structures."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ia3_dist.config import DataSection
from ia3_dist.data.records import Conversation, Records, Turn, load_records
from ia3_dist.errors import UsageError

CONVS = [
    Conversation([Turn("把这句话翻译成英文", "今天天气很好。", "The weather is nice today.")]),
    Conversation([Turn("Hi!", "", "Hello, how can I help?"), Turn("What is 2+2?", "", "4."),
                  Turn("And times 3?", "", "12.")]),
    Conversation([Turn("Name a colour.", "", "Blue.")], system="Answer in one word."),
    Conversation([Turn("问题", "", "回答。"), Turn("再说一遍", "", "回答。")]),
    Conversation([Turn("42", "", "0")]),  # numbers as text: CSV cells stay strings
]
SINGLE = [c for c in CONVS if len(c.turns) == 1]


def merged(conv: Conversation) -> Conversation:
    """What a chat format can say of an alpaca conversation: the input joins the user's message."""
    return Conversation([Turn("\n".join(x for x in (t.instruction, t.input) if x), "", t.output) for t in conv.turns],
                        conv.system)


def alpaca(conv: Conversation) -> dict:
    *hist, last = conv.turns
    rec = {"instruction": last.instruction, "input": last.input, "output": last.output}
    if hist:
        rec["history"] = [[t.instruction, t.output] for t in hist]
    if conv.system:
        rec["system"] = conv.system
    return rec


def sharegpt(conv: Conversation, roles: tuple[str, str] = ("human", "gpt")) -> dict:
    msgs = [{"from": "system", "value": conv.system}] if conv.system else []
    for t in merged(conv).turns:
        msgs += [{"from": roles[0], "value": t.instruction}, {"from": roles[1], "value": t.output}]
    return {"conversations": msgs}


def messages(conv: Conversation) -> dict:
    msgs = [{"role": "system", "content": conv.system}] if conv.system else []
    for t in merged(conv).turns:
        msgs += [{"role": "user", "content": t.instruction}, {"role": "assistant", "content": t.output}]
    return {"messages": msgs}


def write_json(p: Path, recs: list) -> Path:
    p.write_text(json.dumps(recs), encoding="utf-8")
    return p


def write_jsonl(p: Path, recs: list) -> Path:
    p.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    return p


def table(recs: list) -> pa.Table:
    """``recs`` as a table; a key some records lack is null there (from_pylist sees only the first's keys)."""
    keys = list(dict.fromkeys(k for r in recs for k in r))
    return pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in recs])


def write_parquet(p: Path, recs: list) -> Path:
    pq.write_table(table(recs), p)
    return p


def write_arrow(p: Path, recs: list) -> Path:
    """An Arrow stream file as ``datasets`` writes them (``Dataset.from_file`` reads these)."""
    t = table(recs)
    with pa.OSFile(str(p), "wb") as sink, pa.ipc.new_stream(sink, t.schema) as w:
        w.write_table(t)
    return p


def write_arrow_file(p: Path, recs: list) -> Path:
    """An Arrow IPC *file* (Feather v2: pandas' to_feather, Polars' write_ipc), in two batches."""
    t = table(recs)
    with pa.OSFile(str(p), "wb") as sink, pa.ipc.new_file(sink, t.schema) as w:
        half = max(1, len(recs) // 2)
        w.write_table(t.slice(0, half))
        w.write_table(t.slice(half))
    return p


def write_csv(p: Path, recs: list, fields: tuple[str, ...] | None = None) -> Path:
    with open(p, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(fields or dict.fromkeys(k for r in recs for k in r)))
        w.writeheader()
        w.writerows(recs)
    return p


def load(path: str | Path | list, **kw) -> Records:
    p = [str(x) for x in path] if isinstance(path, list) else str(path)
    return load_records(DataSection(path=p, **kw))


def error(path: str | Path | list, **kw) -> str:
    with pytest.raises(UsageError) as e:
        load(path, **kw)
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


# --- one representation from every format and file type ------------------------------------------------------------

WRITERS: dict[str, tuple[Callable[[Path, list], Path], Callable[[Conversation], dict], str, str]] = {
    "alpaca-json": (write_json, alpaca, ".json", "alpaca"),
    "alpaca-jsonl": (write_jsonl, alpaca, ".jsonl", "alpaca"),
    "alpaca-parquet": (write_parquet, alpaca, ".parquet", "alpaca"),
    "alpaca-arrow": (write_arrow, alpaca, ".arrow", "alpaca"),
    "alpaca-arrow-file": (write_arrow_file, alpaca, ".arrow", "alpaca"),
    "messages-arrow-file": (write_arrow_file, messages, ".arrow", "messages"),
    "sharegpt-jsonl": (write_jsonl, sharegpt, ".jsonl", "sharegpt"),
    "sharegpt-arrow": (write_arrow, sharegpt, ".arrow", "sharegpt"),
    "messages-parquet": (write_parquet, messages, ".parquet", "messages"),
    "messages-json": (write_json, messages, ".json", "messages"),
}


@pytest.mark.parametrize("name", list(WRITERS))
@pytest.mark.parametrize("fmt", ["auto", "explicit"])
def test_same_conversations_from_every_format(name: str, fmt: str, tmp_path: Path) -> None:
    write, convert, suffix, kind = WRITERS[name]
    f = write(tmp_path / f"d{suffix}", [convert(c) for c in CONVS])
    r = load(f, format="auto" if fmt == "auto" else kind)
    expected = CONVS if kind == "alpaca" else [merged(c) for c in CONVS]
    assert r.examples == expected
    assert r.formats == {str(f): kind} and r.source == str(f) and r.skipped == [] and len(r) == len(CONVS)


def test_alpaca_history_comes_before_the_turn_and_input_stays_apart(tmp_path: Path) -> None:
    f = write_json(tmp_path / "d.json", [{"instruction": "c", "input": "in", "output": "d", "system": "s",
                                          "history": [["a", "b"], ["a2", "b2"]]}])
    assert load(f).examples == [Conversation([Turn("a", "", "b"), Turn("a2", "", "b2"), Turn("c", "in", "d")], "s")]


def test_csv_history_is_a_json_cell(tmp_path: Path) -> None:
    """A CSV cell is text: history there is a JSON list of pairs (as tools is), so multi-turn alpaca works in CSV."""
    f = write_csv(tmp_path / "d.csv", [{"instruction": "c", "input": "in", "output": "d",
                                        "history": json.dumps([["a", "b"], ["a2", "b2"]])}])
    assert load(f).examples == [Conversation([Turn("a", "", "b"), Turn("a2", "", "b2"), Turn("c", "in", "d")])]


def test_csv_single_turn_cells_are_strings(tmp_path: Path) -> None:
    f = write_csv(tmp_path / "d.csv", [alpaca(c) for c in SINGLE], ("instruction", "input", "output", "system"))
    assert load(f).examples == SINGLE
    # Empty cells are "" (no NA guessing); a quoted cell may span lines; numbers stay text.
    g = tmp_path / "e.csv"
    g.write_text('instruction,input,output\n"two\nlines",,007\nNA,null,1.50\n', encoding="utf-8")
    assert load(g).examples == [Conversation([Turn("two\nlines", "", "007")]),
                                Conversation([Turn("NA", "null", "1.50")])]


def test_list_of_files_each_in_its_own_format(tmp_path: Path) -> None:
    a = write_json(tmp_path / "a.json", [alpaca(c) for c in CONVS[:2]])
    b = write_jsonl(tmp_path / "b.jsonl", [sharegpt(c) for c in CONVS[2:]])
    r = load([a, b])
    assert r.examples == CONVS[:2] + [merged(c) for c in CONVS[2:]]
    assert r.formats == {str(a): "alpaca", str(b): "sharegpt"} and r.source == f"{a}, {b}"
    c = write_parquet(tmp_path / "c.parquet", [messages(c) for c in CONVS])
    d = write_csv(tmp_path / "d.csv", [alpaca(c) for c in SINGLE], ("instruction", "input", "output", "system"))
    r = load([c, d], limit=len(CONVS) + 1)
    assert r.examples == [merged(x) for x in CONVS] + SINGLE[:1]
    assert r.formats == {str(c): "messages", str(d): "alpaca"}
    # A bad record in the second file names that file.
    write_jsonl(b, [sharegpt(CONVS[0]), {"conversations": []}])
    assert error([a, b]).startswith(f"{b}:2: empty conversation")


def test_save_to_disk_dir_and_split(tmp_path: Path) -> None:
    import datasets

    ds = datasets.Dataset.from_list([messages(c) for c in CONVS])
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))
    assert load(tmp_path / "dd").examples == [merged(c) for c in CONVS]
    assert load(tmp_path / "dd", split="test").examples == [merged(CONVS[0])]
    assert "no split 'dev'" in error(tmp_path / "dd", split="dev")


def test_a_save_to_disk_dir_reading_arrow_files_elsewhere_hashes_them(tmp_path: Path) -> None:
    """datasets follows a state.json naming ``../other/data.arrow``: those rows are read, so an edit there must
    change the fingerprint (the token cache's key) as an edit inside the dir does."""
    import datasets

    datasets.Dataset.from_list([messages(CONVS[0])]).save_to_disk(str(tmp_path / "dd"))
    datasets.Dataset.from_list([messages(CONVS[1])]).save_to_disk(str(tmp_path / "other"))
    state = json.loads((tmp_path / "dd" / "state.json").read_text())
    state["_data_files"] = [{"filename": "../other/" + (tmp_path / "other").glob("*.arrow").__next__().name}]
    (tmp_path / "dd" / "state.json").write_text(json.dumps(state))
    got = load(tmp_path / "dd")
    assert got.examples == [merged(CONVS[1])]
    datasets.Dataset.from_list([messages(CONVS[2])]).save_to_disk(str(tmp_path / "other2"))
    for f in (tmp_path / "other").glob("*.arrow"):
        f.write_bytes(next((tmp_path / "other2").glob("*.arrow")).read_bytes())
    again = load(tmp_path / "dd")
    assert again.examples == [merged(CONVS[2])] and again.fingerprint != got.fingerprint


def test_fingerprint_is_content_plus_meaning_settings(tmp_path: Path) -> None:
    recs = [{"question": "q", "instruction": "i", "output": "o"}]
    f = write_json(tmp_path / "d.json", recs)
    fp = load(f).fingerprint
    assert load(f).fingerprint == fp
    g = write_json(tmp_path / "other-name.json", recs)
    assert load(g).fingerprint == fp  # content, not the path
    assert load(f, columns={"instruction": "question"}).fingerprint != fp
    assert load(f, format="alpaca").fingerprint != fp
    assert load(f, on_bad_record="skip").fingerprint == fp
    write_json(f, [{"question": "q", "instruction": "i", "output": "o2"}])
    assert load(f).fingerprint != fp
    assert load([f, g]).fingerprint != load([g, f]).fingerprint


# --- renaming columns, message keys and roles ----------------------------------------------------------------------


def test_column_mapping_alpaca(tmp_path: Path) -> None:
    recs = [{"question": "q1", "context": "c1", "answer": "a1", "prompt": "sys", "instruction": "ignored",
             "past": [["u", "v"]]}]
    cols = {"instruction": "question", "input": "context", "output": "answer", "system": "prompt", "history": "past"}
    expected = [Conversation([Turn("u", "", "v"), Turn("q1", "c1", "a1")], "sys")]
    assert load(write_json(tmp_path / "d.json", recs), columns=cols).examples == expected
    assert load(write_parquet(tmp_path / "d.parquet", recs), columns=cols).examples == expected
    csv_recs = [{k: v for k, v in recs[0].items() if k != "past"}]
    f = write_csv(tmp_path / "d.csv", csv_recs, tuple(csv_recs[0]))
    assert load(f, columns={"instruction": "question", "output": "answer"}).examples == \
        [Conversation([Turn("q1", "", "a1")])]


@pytest.mark.parametrize("fmt", ["sharegpt", "messages"])
def test_key_and_role_mapping(fmt: str, tmp_path: Path) -> None:
    name = "conversations" if fmt == "sharegpt" else "messages"
    recs = [{"dialog": [{"speaker": "system", "text": "be kind"}, {"speaker": "customer", "text": "hi"},
                        {"speaker": "agent", "text": "hello"}, {"speaker": "customer", "text": "bye"},
                        {"speaker": "agent", "text": "bye!"}]}]
    cols = {name: "dialog", "role": "speaker", "content": "text", "user": "customer", "assistant": "agent"}
    expected = [Conversation([Turn("hi", "", "hello"), Turn("bye", "", "bye!")], "be kind")]
    r = load(write_jsonl(tmp_path / "d.jsonl", recs), columns=cols)
    assert r.examples == expected and r.formats == {str(tmp_path / "d.jsonl"): fmt}
    assert load(write_parquet(tmp_path / "d.parquet", recs), columns=cols).examples == expected
    # A system message under another role name: data.columns.system_role maps it.
    sys_named = write_jsonl(tmp_path / "s.jsonl", [{"conversations": [{"from": "System", "value": "be brief"},
                                                                     {"from": "human", "value": "q"},
                                                                     {"from": "gpt", "value": "a"}]}])
    assert load(sys_named, columns={"system_role": "System"}).examples == [Conversation([Turn("q", "", "a")],
                                                                                         "be brief")]
    # Renamed roles replace the defaults: "user" is now an unknown role.
    recs[0]["dialog"][1]["speaker"] = "user"
    msg = error(write_json(tmp_path / "d.json", recs), columns=cols)
    assert "record 0: message 1: unknown role 'user'" in msg and "customer (user)" in msg and "agent (assistant)" in msg


def test_sharegpt_accepts_user_assistant_and_top_level_system(tmp_path: Path) -> None:
    recs = [{"system": "top", "conversations": [{"from": "user", "value": "a"}, {"from": "assistant", "value": "b"},
                                                {"from": "human", "value": "c"}, {"from": "gpt", "value": "d"}]}]
    assert load(write_json(tmp_path / "d.json", recs)).examples == \
        [Conversation([Turn("a", "", "b"), Turn("c", "", "d")], "top")]


def test_mapped_column_missing_from_the_data(tmp_path: Path) -> None:
    recs = [alpaca(c) for c in CONVS]
    # A table: the file, the mapped name and the columns there are.
    f = write_parquet(tmp_path / "d.parquet", recs)
    msg = error(f, columns={"output": "answer"})
    assert msg.startswith(f"{f}: dataset has no column(s) ['answer']") and "data.columns maps {'output': 'answer'}" \
        in msg and "columns are ['instruction', 'input', 'output', " in msg
    msg = error(f, columns={"system": "sys_prompt"})
    assert "no column(s) ['sys_prompt']" in msg
    # Record files: a required column is missing from each record, named with the keys the record has.
    j = write_json(tmp_path / "d.json", recs)
    msg = error(j, columns={"output": "answer"})
    assert f"{j}: record 0: missing field 'answer' (data.columns.output)" in msg and "keys ['instruction'" in msg
    # An optional one must occur in some record.
    msg = error(j, columns={"system": "sys_prompt"})
    assert msg.startswith(f"{j}: data.columns maps system -> 'sys_prompt', but no record has such a field")
    assert "first record has keys ['instruction', 'input', 'output']" in msg
    # A mapped key a message lacks.
    k = write_jsonl(tmp_path / "d.jsonl", [sharegpt(CONVS[0])])
    msg = error(k, columns={"content": "text"})
    assert f"{k}:1: message 0: missing key 'text' (the message has keys ['from', 'value'])" in msg
    assert "data.columns.role and data.columns.content" in msg


# --- format detection ----------------------------------------------------------------------------------------------


def test_auto_detection_and_its_error(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}])
    msg = error(f)
    assert msg.startswith(f"{f}:1: missing field: cannot detect the format from the keys found, ['prompt', "
                          f"'response']")
    assert "sharegpt records have 'conversations'" in msg and "messages records have 'messages'" in msg
    assert "alpaca records have 'instruction' and 'output'" in msg and "data.columns" in msg
    assert load(f, columns={"instruction": "prompt", "output": "response"}).examples == \
        [Conversation([Turn("a", "", "b")])]
    t = write_parquet(tmp_path / "d.parquet", [{"prompt": "a", "response": "b"}])
    assert error(t).startswith(f"{t}: missing field: cannot detect the format from the keys found, ['prompt', ")


def test_json_lines_named_json_says_so(tmp_path: Path) -> None:
    f = tmp_path / "d.json"
    f.write_text("".join(json.dumps(alpaca(c)) + "\n" for c in SINGLE), encoding="utf-8")
    assert error(f).endswith(f"{f}:2:1: invalid JSON: Extra data (one record per line is JSON Lines: name the file "
                             f".jsonl)")


def test_a_byte_order_mark_opens_any_text_file(tmp_path: Path) -> None:
    """Files saved with a UTF-8 byte-order mark (Windows editors, utf-8-sig exports) read like those without."""
    recs = [alpaca(c) for c in SINGLE]
    want = load(write_jsonl(tmp_path / "plain.jsonl", recs)).examples
    for f in (write_json(tmp_path / "d.json", recs), write_jsonl(tmp_path / "d.jsonl", recs),
              write_csv(tmp_path / "d.csv", recs)):
        f.write_bytes(b"\xef\xbb\xbf" + f.read_bytes())
        assert load(f, on_bad_record="error").examples == want, f


def test_a_mapped_column_decides_the_format(tmp_path: Path) -> None:
    """role/content messages stored under ``conversations`` (sharegpt's column name): data.columns.messages names
    it, and the records read as messages, not as sharegpt (whose message keys they lack)."""
    recs = [{"conversations": messages(c)["messages"]} for c in SINGLE]
    f = write_jsonl(tmp_path / "d.jsonl", recs)
    assert "message 0: missing key 'from'" in error(f)  # unmapped, the column's name says sharegpt
    assert load(f, columns={"messages": "conversations"}).examples == [merged(c) for c in SINGLE]


def test_an_empty_tool_call_list_is_a_plain_answer(tmp_path: Path) -> None:
    """``"tool_calls": []`` on an assistant message (OpenAI-style exports write it on every answer) reads like
    no tool_calls at all."""
    plain = [messages(c) for c in SINGLE]
    listed = [{"messages": [{**m, "tool_calls": []} if m["role"] == "assistant" else m for m in r["messages"]]}
              for r in plain]
    assert load(write_jsonl(tmp_path / "a.jsonl", listed)).examples == \
        load(write_jsonl(tmp_path / "b.jsonl", plain)).examples == [merged(c) for c in SINGLE]


def parts(rec: dict) -> dict:
    """``rec`` (messages) with every content as OpenAI content parts, the longer ones split into two text parts."""
    def split(text: str) -> list[dict]:
        cut = [text[:2], text[2:]] if len(text) > 2 else [text]
        return [{"type": "text", "text": t} for t in cut]
    return {"messages": [{**m, "content": split(m["content"])} for m in rec["messages"]]}


@pytest.mark.parametrize("writer", [write_jsonl, write_parquet])
def test_openai_content_parts_read_as_text(writer: Callable[[Path, list], Path], tmp_path: Path) -> None:
    """Content as a list of text parts (OpenAI's chat and fine-tuning format) is the parts' text joined by a
    newline, as vLLM's OpenAI server serves a text-only model; in every message, pairs' answers included."""
    def joined(conv: Conversation) -> Conversation:
        def j(t: str) -> str:
            return f"{t[:2]}\n{t[2:]}" if len(t) > 2 else t
        return Conversation([Turn(j(t.instruction), "", j(t.output)) for t in conv.turns], j(conv.system))
    recs = [parts(messages(c)) for c in CONVS]
    f = writer(tmp_path / f"d{'.jsonl' if writer is write_jsonl else '.parquet'}", recs)
    assert load(f).examples == [joined(merged(c)) for c in CONVS]
    pair = {"prompt": [{"role": "user", "content": [{"type": "text", "text": "q"}]}],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "good"}]}],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "bad"}]}]}
    got = load_records(DataSection(path=str(write_jsonl(tmp_path / "p.jsonl", [pair]))), pairs=True).examples[0]
    assert (got.chosen.turns, got.rejected.turns) == ([Turn("q", "", "good")], [Turn("q", "", "bad")])


def test_role_aliases_of_sharegpt_dumps_and_openai_developer(tmp_path: Path) -> None:
    """ShareGPT dumps name the assistant chatgpt, bing or bard (one file may hold several: data.columns maps one
    name only); OpenAI's "developer" role is its system role."""
    recs = [{"conversations": [{"from": "human", "value": "a"}, {"from": "chatgpt", "value": "b"},
                               {"from": "human", "value": "c"}, {"from": "bing", "value": "d"},
                               {"from": "human", "value": "e"}, {"from": "bard", "value": "f"}]},
            {"messages": [{"role": "developer", "content": "s"}, {"role": "user", "content": "a"},
                          {"role": "assistant", "content": "b"}]}]
    got = [load(write_jsonl(tmp_path / f"{i}.jsonl", [r])).examples[0] for i, r in enumerate(recs)]
    assert got == [Conversation([Turn("a", "", "b"), Turn("c", "", "d"), Turn("e", "", "f")]),
                   Conversation([Turn("a", "", "b")], "s")]


def test_openai_weight_zero_answers_carry_no_labels(tmp_path: Path, tiny_tokenizer) -> None:
    """OpenAI's fine-tuning format marks assistant messages not to learn with ``"weight": 0``: such an answer is
    context, unlabelled; 1 (or no weight, a null in a table) trains on it; anything else is refused."""
    from ia3_dist.data.tokenize import tokenize

    def msgs(w0: object, w1: object) -> dict:
        return {"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1", "weight": w0},
                             {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2", "weight": w1}]}
    f = write_parquet(tmp_path / "d.parquet", [msgs(0, 1), msgs(None, 0), msgs(1, None)])
    r = load(f)
    assert [[t.train for t in c.turns] for c in r.examples] == [[False, True], [True, False], [True, True]]
    data = tokenize(r, tiny_tokenizer, DataSection(path=str(f)))
    eos = tiny_tokenizer.eos_token
    labelled = [tiny_tokenizer.decode([t for t in data.example(i)[2] if t != -100]) for i in range(len(data))]
    assert labelled == [f"a2{eos}", f"a1{eos}", f"a1{eos}a2{eos}"]
    assert "message 1: 'weight' must be 0 (do not train on this answer) or 1, got 0.5" in \
        error(write_jsonl(tmp_path / "bad.jsonl", [msgs(0.5, 1)]))


def test_format_is_fixed_per_file_by_its_first_record(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "d.jsonl", [alpaca(CONVS[0]), sharegpt(CONVS[1])])
    msg = error(f)
    assert msg.startswith(f"{f}:2: missing field 'instruction' (every alpaca record needs 'instruction' and "
                          f"'output'")
    assert "keys ['conversations']" in msg


@pytest.mark.parametrize("fmt,needle", [
    ("alpaca", "record 0: missing field 'instruction' (every alpaca record needs"),
    ("messages", "record 0: missing field 'messages' (every messages record needs 'messages'"),
])
def test_explicit_format_that_does_not_match(fmt: str, needle: str, tmp_path: Path) -> None:
    f = write_json(tmp_path / "d.json", [sharegpt(c) for c in CONVS])
    assert needle in error(f, format=fmt)
    t = write_parquet(tmp_path / "d.parquet", [sharegpt(c) for c in CONVS])
    assert error(t, format=fmt).startswith(f"{t}: dataset has no column(s)")


# --- malformed records: one case each, with its message --------------------------------------------------------------

U, A = {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}
BAD: dict[str, tuple[dict | str, str]] = {
    "unknown-role": ({"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]},
                     "record 0: message 1: unknown role 'bot'; accepted roles: system (system), user (user), "
                     "assistant (assistant), tool (tool), developer (system). Map other role names with data.columns "
                     "(user, assistant, tool, system_role), e.g. data.columns.assistant=bot if bot is the assistant"),
    "unknown-role-not-text": ({"conversations": [{"from": ["human"], "value": "q"}, A]},
                              "record 0: message 0: unknown role ['human']; accepted roles: system (system), "
                              "human (user), user (user), gpt (assistant), assistant (assistant)"),
    "empty-conversation": ({"conversations": []}, "record 0: empty conversation (field 'conversations' has no "
                                                  "messages)"),
    "no-assistant-turn": ({"conversations": [{"from": "system", "value": "s"}, U]},
                          "record 0: conversation has no assistant turn: nothing to train on"),
    "ends-with-user": ({"conversations": [U, A, U]},
                       "record 0: conversation ends with a user turn: no assistant turn to train on"),
    "non-string-content": ({"messages": [{"role": "user", "content": 7}, {"role": "assistant", "content": "a"}]},
                           "record 0: message 0: 'content' must be a string, got int"),
    "image-content-part": ({"messages": [{"role": "user", "content": [{"type": "text", "text": "q"},
                                                                      {"type": "image_url", "image_url": {}}]},
                                         {"role": "assistant", "content": "a"}]},
                           "record 0: message 0: 'content' part 1 is not a text part (type 'image_url'); a causal LM "
                           "trains on text only"),
    "content-part-not-text": ({"messages": [{"role": "user", "content": [{"type": "text", "text": None}]},
                                            {"role": "assistant", "content": "a"}]},
                              "record 0: message 0: 'content' part 0 'text' must be a string, got NoneType"),
    "null-content": ({"conversations": [U, {"from": "gpt", "value": None}]},
                     "record 0: message 1: 'value' must be a string, got NoneType"),
    "not-alternating": ({"conversations": [U, U, A]}, "record 0: message 1: expected an assistant message, got user "
                                                      "(roles must alternate user, assistant"),
    "starts-with-assistant": ({"conversations": [A, U, A]},
                              "record 0: message 0: expected a user message, got assistant"),
    "system-not-first": ({"conversations": [U, {"from": "system", "value": "s"}, A]},
                         "record 0: message 1: a system message may only come first"),
    "two-systems": ({"system": "top", "conversations": [{"from": "system", "value": "s"}, U, A]},
                    "record 0: both a leading system message and a top-level 'system' field; keep only one"),
    "message-not-object": ({"conversations": ["hi", A]}, "record 0: message 0: expected an object with 'from' and "
                                                         "'value', got str"),
    "message-missing-role": ({"conversations": [{"value": "q"}, A]},
                             "record 0: message 0: missing key 'from' (the message has keys ['value'])"),
    "conversations-not-list": ({"conversations": "human: q"},
                               "record 0: field 'conversations' must be a list of messages ({'from': ..., 'value': "
                               "...}), got str"),
    "history-not-list": ({"instruction": "q", "output": "a", "history": {"q0": "a0"}},
                         "record 0: field 'history' must be a list of [user, assistant] pairs of strings (the turns "
                         "before this one), got dict"),
    "history-not-json": ({"instruction": "q", "output": "a", "history": "q0 a0"},
                         "record 0: field 'history' is not valid JSON (Expecting value: line 1 column 1 (char 0)); "
                         "write it as a list of [user, assistant] pairs"),
    "history-not-pairs": ({"instruction": "q", "output": "a", "history": [["q0", "a0", "x"]]},
                          "record 0: field 'history' entry 0 must be a [user, assistant] pair of strings, got 3 items"),
    "history-not-strings": ({"instruction": "q", "output": "a", "history": [["q0", 7]]},
                            "record 0: field 'history' entry 0 assistant text must be a string, got int"),
    "missing-output": ({"instruction": "q"}, "record 0: missing field 'output' (every alpaca record needs "
                                             "'instruction' and 'output'; 'input', 'system', 'history', 'tools' "
                                             "optional); "
                                             "the record has keys ['instruction']"),
    "null-conversations": ({"conversations": None}, "record 0: field 'conversations' is null (every sharegpt record "
                                                    "needs 'conversations'"),
    "null-output": ({"instruction": "q", "input": "", "output": None},
                    "record 0: field 'output' is null (every alpaca record needs 'instruction' and 'output'"),
    "non-string-field": ({"instruction": "q", "output": "a", "system": 3},
                         "record 0: field 'system' must be a string, got int"),
    "empty-record": ({"instruction": " ", "input": "", "output": "", "history": [["", "\n"]]},
                     "record 0: empty record (no text at all"),
    "empty-chat-record": ({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": " "}]},
                          "record 0: empty record (no text at all"),
    "record-not-object": ("just text", "record 0: expected an object (a record in alpaca, sharegpt or messages "
                                       "format), got str"),
    "surrogate": ({"messages": [{"role": "user", "content": "q\ud800"}, {"role": "assistant", "content": "a"}]},
                  "record 0: message 0: 'content' holds an unpaired UTF-16 surrogate"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_record(case: str, tmp_path: Path) -> None:
    rec, needle = BAD[case]
    f = write_json(tmp_path / "d.json", [rec])
    msg = error(f)
    assert msg.startswith(f"{f}: {needle}"), msg
    assert msg.endswith("(or set data.on_bad_record=skip to drop bad records)")
    # The same record among good ones of its format: skipped and remembered.
    convert = messages if "messages" in rec else alpaca if "instruction" in rec else sharegpt
    g = write_jsonl(tmp_path / "d.jsonl", [convert(CONVS[1]), rec, convert(CONVS[2])])
    r = load(g, on_bad_record="skip")
    assert r.examples == [c if convert is alpaca else merged(c) for c in CONVS[1:3]]
    rest = msg.removeprefix(f"{f}: record 0: ").removesuffix(" (or set data.on_bad_record=skip to drop bad records)")
    if isinstance(rec, str):  # once the file's format is known, the message says what that format needs
        rest = ("expected an object (every sharegpt record needs 'conversations'; 'system', 'tools' optional), got "
                "str")
    assert r.skipped == [f"{g}:2: {rest}"]


def test_bad_record_in_a_table(tmp_path: Path) -> None:
    recs = [messages(CONVS[0]), {"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}]},
            messages(CONVS[1])]
    f = write_parquet(tmp_path / "d.parquet", recs)
    assert error(f).startswith(f"{f}: record 1: message 1: unknown role 'robot'")
    r = load(f, on_bad_record="skip")
    assert r.examples == [merged(CONVS[0]), merged(CONVS[1])] and len(r.skipped) == 1
    g = write_csv(tmp_path / "d.csv", [{"instruction": "q", "output": "a"}, {"instruction": "", "output": ""}],
                  ("instruction", "output"))
    assert error(g).startswith(f"{g}: record 1: empty record")


def test_skip_policy_counts(tmp_path: Path) -> None:
    lines = [json.dumps(messages(CONVS[0])), "{bad json", json.dumps({"messages": []}), json.dumps(messages(CONVS[1])),
             json.dumps({"messages": [{"role": "user", "content": "q"}]}), json.dumps({"instruction": "x"}),
             json.dumps(messages(CONVS[2]))]
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(lines) + "\n")
    r = load(f, on_bad_record="skip")
    assert r.examples == [merged(c) for c in CONVS[:3]] and len(r.skipped) == 4
    assert [s.split(":")[1] for s in r.skipped] == ["2", "3", "5", "6"]
    assert "missing field 'messages'" in r.skipped[3]
    assert len(load(f, on_bad_record="skip", limit=2)) == 2
    assert error(f).startswith(f"{f}:2:2: invalid JSON")
    # The first records may be undetectable: the format comes from the first one that names one.
    g = write_jsonl(tmp_path / "g.jsonl", [{}, {"x": 1}, sharegpt(CONVS[0])])
    r = load(g, on_bad_record="skip")
    assert r.examples == [merged(CONVS[0])] and r.formats == {str(g): "sharegpt"} and len(r.skipped) == 2
    h = write_jsonl(tmp_path / "h.jsonl", [{}, {"conversations": []}])
    assert error(h, on_bad_record="skip") == f"{h}: the dataset has no usable records (2 bad records skipped)"


# --- broken files ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".arrow"])
@pytest.mark.parametrize("how", ["garbage", "truncated"])
def test_broken_table_file(suffix: str, how: str, tmp_path: Path) -> None:
    f = tmp_path / f"d{suffix}"
    recs = [alpaca(c) for c in SINGLE] * 50
    {".parquet": write_parquet, ".arrow": write_arrow, ".csv": write_csv}[suffix](f, recs)
    data = f.read_bytes()
    if how == "garbage":
        f.write_bytes(b"PAR1\x00\xff not a table at all \x01\x02" * 3)
    elif suffix == ".csv":
        f.write_bytes(data + b'"an unterminated quoted cell,x\n')
    else:
        f.write_bytes(data[: len(data) // 2])
    kind = {".parquet": "Parquet", ".csv": "CSV", ".arrow": "Arrow"}[suffix]
    for policy in ("error", "skip"):
        msg = error(f, on_bad_record=policy)
        assert msg.startswith(f"{f}: cannot read the {kind} file (") and msg.endswith(
            f"check that it is a complete, valid {kind} file"), msg


def test_corruption_found_while_reading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Damage past the first block or row group shows up only as the batches are read: still a UsageError."""
    from ia3_dist.data import records

    recs = [{"instruction": f"q{i}" * 5, "input": "", "output": f"a{i}" * 5} for i in range(2000)]
    f = tmp_path / "d.parquet"
    pq.write_table(table(recs), f, row_group_size=100, compression="NONE")
    data = bytearray(f.read_bytes())
    data[len(data) // 2: len(data) // 2 + 2000] = b"\xff" * 2000  # the footer (schema) stays intact
    f.write_bytes(bytes(data))
    assert error(f, on_bad_record="skip").startswith(f"{f}: cannot read the Parquet file (")
    monkeypatch.setattr(records, "MAX_RECORD_BYTES", 1000)  # 1 MiB CSV blocks
    g = tmp_path / "d.csv"
    g.write_text("instruction,output\n" + "".join(f"{'q' * 100}{i},a{i}\n" for i in range(20_000)) + "bad,row,extra\n")
    assert g.stat().st_size > 2 << 20
    # A row of other width than the header: named by its text (pyarrow numbers no row where cells may span lines),
    # and skipped under the skip policy like any bad record.
    msg = error(g)
    assert msg.startswith(f"{g}: a row of 3 cell(s) where the header has 2: 'bad,row,extra'; quote cells that hold "
                          f"commas (or set data.on_bad_record=skip"), msg
    r = load(g, on_bad_record="skip")
    assert len(r.examples) == 20_000 and r.skipped == [f"{g}: a row of 3 cell(s) where the header has 2: "
                                                       f"'bad,row,extra'; quote cells that hold commas"]
    h = tmp_path / "first.csv"  # in the first block, which the header is read from too
    h.write_text("instruction,output\nq,a\nq,a,b\nq2,a2\n")
    assert [c.turns[0].output for c in load(h, on_bad_record="skip").examples] == ["a", "a2"]
    assert "a row of 3 cell(s) where the header has 2: 'q,a,b'" in error(h)
    # A quote inside a cell is a character (a ragged row still), a quoted cell never closed a broken file; a row
    # after a skipped one is named among the rows kept; a ragged row that is not UTF-8 says so, with no
    # "Exception ignored" traceback of pyarrow's on stderr.
    h.write_text('instruction,output\nq,a\nthe 5" screen,a,b\n"multi\nline",the 5" screen,x\nq, "hello,x\n,\n')
    r = load(h, on_bad_record="skip")
    assert len(r.examples) == 1 and len(r.skipped) == 4, r.skipped
    assert ["the 5\" screen,a,b" in r.skipped[0], "line\",the 5" in r.skipped[1], '"hello,x' in r.skipped[2]] == \
        [True] * 3, r.skipped
    assert r.skipped[3].startswith(f"{h}: record 1 (numbered among the rows kept; ragged rows were skipped): "), \
        r.skipped
    h.write_text('instruction,output\nq,a\n"never closed,a\nq2,a2\n')
    assert error(h, on_bad_record="skip").startswith(f"{h}: cannot read the CSV file (a quoted cell never closed: ")
    h.write_bytes(b"instruction,output\nq,a\nq,\xff,b\nq2,a2\n")
    assert error(h, on_bad_record="skip") == f"{h}: not UTF-8 (a row of another width than the header could not " \
        "be read as text); re-encode the file as UTF-8"


def test_columns_as_datasets_and_spark_store_them(tmp_path: Path) -> None:
    """Conversations as hub datasets declare them (``Sequence({"from": ..., "value": ...})``: datasets gives a
    struct of lists, not a list of structs), content parts the same way, and messages as Spark writes a MapType
    (``array<map<string,string>>``): each read as the list of messages it stands for."""
    from datasets import Dataset, Features, Sequence, Value

    feats = Features({"conversations": Sequence({"from": Value("string"), "value": Value("string")})})
    conv = {"from": ["human", "gpt", "human", "gpt"], "value": ["Hi!", "Hello.", "2+2?", "4."]}
    d = tmp_path / "seq"
    Dataset.from_dict({"conversations": [conv]}, features=feats).save_to_disk(str(d))
    want = Conversation([Turn("Hi!", "", "Hello."), Turn("2+2?", "", "4.")])
    assert load(d).examples == [want]
    # A member some rows lack (an optional weight) is null in those rows, not a list: read without it.
    wfeats = Features({"conversations": Sequence({"from": Value("string"), "value": Value("string"),
                                                  "weight": Value("int64")})})
    w = tmp_path / "weights"
    Dataset.from_dict({"conversations": [{**conv, "weight": [None, 0, None, 1]}, conv]},
                      features=wfeats).save_to_disk(str(w))
    weighed = Conversation([Turn("Hi!", "", "Hello.", train=False), Turn("2+2?", "", "4.")])
    assert load(w, format="messages", columns={"messages": "conversations", "role": "from", "content": "value",
                                                "user": "human", "assistant": "gpt"}).examples == [weighed, want]
    parts = Features({"messages": [{"role": Value("string"),
                                    "content": Sequence({"type": Value("string"), "text": Value("string")})}]})
    msgs = [{"role": "user", "content": {"type": ["text", "text"], "text": ["a", "b"]}},
            {"role": "assistant", "content": {"type": ["text"], "text": ["c"]}}]
    e = tmp_path / "parts"
    Dataset.from_dict({"messages": [msgs]}, features=parts).save_to_disk(str(e))
    assert load(e).examples == [Conversation([Turn("a\nb", "", "c")])]
    m = pa.array([[[("role", "user"), ("content", "hi")], [("role", "assistant"), ("content", "yo")]]],
                 type=pa.list_(pa.map_(pa.string(), pa.string())))
    f = tmp_path / "map.parquet"
    pq.write_table(pa.table({"messages": m}), f)
    assert load(f).examples == [Conversation([Turn("hi", "", "yo")])]
    g = write_arrow_file(tmp_path / "map.arrow", [{}])
    with pa.OSFile(str(g), "wb") as sink, pa.ipc.new_file(sink, pa.schema([("messages", m.type)])) as w:
        w.write_table(pa.table({"messages": m}))
    assert load(g).examples == [Conversation([Turn("hi", "", "yo")])]
    # A map holding a key twice is one bad record, named (skipped under the skip policy), not a broken file.
    dup = pa.array([[[("role", "user"), ("role", "x"), ("content", "hi")], [("role", "assistant"), ("content", "a")]],
                    [[("role", "user"), ("content", "hi")], [("role", "assistant"), ("content", "yo")]]],
                   type=m.type)
    pq.write_table(pa.table({"messages": dup}), f)
    assert error(f).startswith(f"{f}: record 0: a map holds a key twice (")
    assert load(f, on_bad_record="skip").examples == [Conversation([Turn("hi", "", "yo")])]
    # A truncated IPC file is named as broken, like a truncated stream.
    g.write_bytes(g.read_bytes()[:40])
    assert error(g).startswith(f"{g}: cannot read the Arrow file (")


def test_a_column_of_another_format_left_null_does_not_decide_the_format(tmp_path: Path) -> None:
    """A DataFrame holding several formats' columns writes null under those a record does not use
    (``to_json(orient="records", lines=True)``): the record is read in the format of the fields it fills."""
    f = write_jsonl(tmp_path / "d.jsonl", [{**alpaca(CONVS[0]), "messages": None}, {**alpaca(CONVS[2]),
                                                                                   "messages": None}])
    assert load(f).examples == [CONVS[0], CONVS[2]] and load(f).formats == {str(f): "alpaca"}
    g = write_jsonl(tmp_path / "g.jsonl", [{"instruction": "q", "output": "a", "messages": None},
                                           {"instruction": None, "output": None, "messages": [{"role": "user"}]}])
    assert error(g).startswith(f"{g}:2: field 'instruction' is null")  # the first record decided: alpaca


def test_unknown_suffix_and_missing_file(tmp_path: Path) -> None:
    f = tmp_path / "d.txt"
    f.write_text("hello")
    assert "unknown data format '.txt'; use .json, .jsonl, .parquet, .csv, .arrow" in error(f)
    assert error(tmp_path / "none.parquet") == f"data.path {tmp_path / 'none.parquet'}: file not found"
    assert error([tmp_path / "d.txt"]).startswith(f"{f}: unknown data format")
    # A path the OS will not look up (a name over 255 bytes here; EACCES under another user's 0700 home dir, which
    # root cannot be shown): exit 2 naming it, not pathlib's OSError as a traceback.
    long = tmp_path / ("x" * 300 + ".jsonl")
    assert error(long) == (f"data.path {long}: cannot access it (File name too long); check the permissions of "
                           f"the directories on its path (each needs x for you)")


# --- fuzzing: whatever the structure, only UsageError may escape ------------------------------------------------------

FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8)
values = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                      max_leaves=8)
ROLE_VALUES = ["human", "gpt", "user", "assistant", "system", "bot", "", "observation"]
message = st.dictionaries(st.sampled_from(["from", "value", "role", "content", "speaker"]),
                          st.sampled_from(ROLE_VALUES) | values, max_size=4)
good_message = st.builds(lambda r, t, k: {k[0]: r, k[1]: t}, st.sampled_from(ROLE_VALUES), st.text(max_size=6),
                         st.sampled_from([("from", "value"), ("role", "content")]))
chat = st.lists(good_message | message | values, max_size=6)
record = st.fixed_dictionaries({}, optional={"conversations": chat, "messages": chat, "system": values | st.text(),
                                             "instruction": values, "output": values, "history": values})
good_record = st.sampled_from([f(c) for c in CONVS for f in (sharegpt, messages)])


@FUZZ
@given(recs=st.lists(record | values | good_record, max_size=5),
       fmt=st.sampled_from(["auto", "alpaca", "sharegpt", "messages"]),
       policy=st.sampled_from(["error", "skip"]), suffix=st.sampled_from([".json", ".jsonl"]),
       columns=st.sampled_from([None, {"role": "role", "content": "content"}, {"user": "human", "assistant": "gpt"}]))
def test_fuzz_conversation_structures(tmp_path: Path, recs: list, fmt: str, policy: str, suffix: str,
                                      columns: dict | None) -> None:
    f = (write_json if suffix == ".json" else write_jsonl)(tmp_path / f"fuzz{suffix}", recs)
    try:
        r = load(f, format=fmt, on_bad_record=policy, columns=columns)
    except UsageError as e:
        event("rejected")
        assert "\n" not in str(e)
        return
    event("accepted")
    assert r.examples and len(r.examples) + len(r.skipped) <= len(recs)
    for conv in r.examples:
        assert conv.turns and isinstance(conv.system, str)
        assert all(isinstance(x, str) for t in conv.turns for x in (t.instruction, t.input, t.output))


valid_roles = st.builds(lambda sys, n, u, a: ["system"] * sys + [u, a] * n, st.booleans(), st.integers(1, 3),
                        st.sampled_from(["human", "user"]), st.sampled_from(["gpt", "assistant"]))


@FUZZ
@given(fmt=st.sampled_from(["sharegpt", "messages"]),
       roles=valid_roles | st.lists(st.sampled_from(ROLE_VALUES), min_size=1, max_size=6),
       texts=st.lists(st.text(max_size=4), min_size=7, max_size=7), system=st.none() | st.text(max_size=3))
def test_fuzz_valid_shapes_round_trip(tmp_path: Path, fmt: str, roles: list[str], texts: list[str],
                                      system: str | None) -> None:
    """A conversation is accepted exactly when its roles are [system] user assistant ... assistant (and it has some
    text), and then it holds the messages in order."""
    rk, ck = ("from", "value") if fmt == "sharegpt" else ("role", "content")
    texts = texts[: len(roles)]
    rec = {"conversations" if fmt == "sharegpt" else "messages": [{rk: r, ck: t} for r, t in zip(roles, texts)]}
    if system is not None:
        rec["system"] = system
    kind = {"messages": {"user": "u", "assistant": "a", "system": "s"},
            "sharegpt": {"human": "u", "user": "u", "gpt": "a", "assistant": "a", "system": "s"}}[fmt]
    kinds = "".join(kind.get(r, "?") for r in roles)
    lead = kinds.startswith("s")
    body, body_texts = (kinds[1:], texts[1:]) if lead else (kinds, texts)
    ok = ("?" not in kinds and body != "" and body == "ua" * (len(body) // 2) and not (lead and system)
          and any(t.strip() for t in [*texts, system or ""]))
    f = write_json(tmp_path / "fuzz.json", [rec])
    try:
        r = load(f, format=fmt)
    except UsageError:
        event("rejected")
        assert not ok
        return
    event("accepted")
    assert ok
    turns = [Turn(body_texts[i], "", body_texts[i + 1]) for i in range(0, len(body_texts), 2)]
    assert r.examples == [Conversation(turns, texts[0] if lead else (system or ""))]


def test_alpaca_edges_read_as_llama_factory_does() -> None:
    """An alpaca record's tools column is read (LLaMA-Factory's alpaca converter reads it; it was dropped without a
    word); an empty CSV history cell is no history; under a chat template an empty instruction with an input is
    the input alone (not a leading newline); a sharegpt file maps its tool-result role with data.columns.tool as a
    messages file does."""
    from ia3_dist.data.formats import ALPACA, SHAREGPT, Columns, to_conversation
    from ia3_dist.data.template import _messages

    tools = [{"type": "function", "function": {"name": "get_time", "description": "now", "parameters": {}}}]
    conv = to_conversation({"instruction": "q", "output": "a", "tools": tools, "history": ""}, ALPACA, Columns({}),
                           "f.csv: record 0")
    assert [t["function"]["name"] for t in conv.tools] == ["get_time"] and len(conv.turns) == 1
    empty = to_conversation({"instruction": "", "input": "x", "output": "y"}, ALPACA, Columns({}), "f.json: record 0")
    assert _messages(empty)[0][0] == {"role": "user", "content": "x"}
    both = to_conversation({"instruction": "q", "input": "x", "output": "y"}, ALPACA, Columns({}), "f.json: record 0")
    assert _messages(both)[0][0] == {"role": "user", "content": "q\nx"}
    rec = {"conversations": [{"from": "human", "value": "time?"},
                             {"from": "function_call", "value": '{"name": "get_time", "arguments": {}}'},
                             {"from": "ipython", "value": "12:00"}, {"from": "gpt", "value": "noon"}],
           "tools": json.dumps(tools)}
    conv = to_conversation(rec, SHAREGPT, Columns({"tool": "ipython"}), "f.jsonl:1")
    assert conv.turns[-1].results and conv.turns[-1].results[0]["content"] == "12:00"
