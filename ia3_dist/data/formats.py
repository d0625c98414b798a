"""Instruction-record formats (alpaca, sharegpt, messages, as LLaMA-Factory defines them) -> one representation,
:class:`Conversation`; every malformed record is a :class:`UsageError` naming the record and how to fix it.

- ``alpaca``: ``instruction``, ``output`` (strings), optional ``input``, ``system`` (strings) and ``history`` (a list
  of ``[user, assistant]`` string pairs that come before this turn).
- ``sharegpt``: ``conversations``: a list of ``{"from": ..., "value": ...}``, roles ``human``/``gpt``/``system``
  (``user``/``assistant`` accepted too), optional top-level ``system``.
- ``messages``: ``messages``: a list of ``{"role": ..., "content": ...}``, roles ``system``/``user``/``assistant``,
  optional top-level ``system``.

Conversations may open with one system message, then alternate user and assistant and end with an assistant
message. ``data.columns`` renames columns, message keys and role values (ours -> the data's).

Tool calling (see :mod:`.tools`): sharegpt's ``function_call`` / ``observation`` turns (LLaMA-Factory's
``glaive_toolcall``), messages' assistant ``tool_calls`` and ``role: tool`` results, and a per-record ``tools``
list. An assistant turn may call tools (with or without text); the next turn may then open with the tools'
results instead of a user message.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..config.schema import brief, show
from ..errors import UsageError
from .tools import _json, check_calls, tool_calls, tool_list

ALPACA, SHAREGPT, MESSAGES = "alpaca", "sharegpt", "messages"
FORMATS = (ALPACA, SHAREGPT, MESSAGES)
# The column whose presence identifies a format, in detection order.
DETECT = ((SHAREGPT, "conversations"), (MESSAGES, "messages"), (ALPACA, "instruction"))
REQUIRED = {ALPACA: ("instruction", "output"), SHAREGPT: ("conversations",), MESSAGES: ("messages",)}
OPTIONAL = {ALPACA: ("input", "system", "history", "tools"), SHAREGPT: ("system", "tools"),
            MESSAGES: ("system", "tools")}
# Message keys and role values when data.columns does not rename them.
MESSAGE_KEYS = {SHAREGPT: ("from", "value"), MESSAGES: ("role", "content")}
# ShareGPT dumps name the assistant after the product it came from (FastChat's cleaning reads chatgpt, bing and
# bard as gpt); data.columns.assistant takes one name only, so a file mixing them could not be mapped.
# A tool's result: sharegpt's "observation"; "tool" too, so that data.columns.tool (the messages name) maps it there.
ROLES = {SHAREGPT: {"user": ("human", "user"), "assistant": ("gpt", "assistant", "chatgpt", "bing", "bard"),
                    "function_call": ("function_call",), "observation": ("observation",), "tool": ("tool",)},
         MESSAGES: {"user": ("user",), "assistant": ("assistant",), "tool": ("tool",)}}
SYSTEM_ROLE = "system"
# OpenAI renamed the system role "developer" (o1 and later); data.columns has no key that maps a system role.
SYSTEM_ALIASES = {MESSAGES: ("developer",), SHAREGPT: ()}
# Message kinds: who speaks. A call is the assistant's (sharegpt's function_call turn); a result the tools'.
USER, ASSISTANT, CALL, RESULT = "user", "assistant", "function_call", "tool"
KIND = {"user": USER, "assistant": ASSISTANT, "function_call": CALL, "observation": RESULT, "tool": RESULT,
        SYSTEM_ROLE: SYSTEM_ROLE}


@dataclass(frozen=True)
class Turn:
    instruction: str
    """The user's message (alpaca: its instruction); "" when the turn opens with tool results."""
    input: str
    """Alpaca's ``input`` field for that turn; "" in every other format."""
    output: str
    """The assistant's answer (its text; "" for a turn that only calls tools)."""
    calls: tuple[dict[str, Any], ...] = ()
    """The assistant's tool calls, each ``{"type": "function", "function": {"name": str, "arguments": dict}}``
    (plus ``id`` when the data gives one): what transformers' chat templates take."""
    results: tuple[dict[str, Any], ...] = ()
    """Tool results that open this turn instead of a user message, each ``{"content": str}`` (plus ``name`` /
    ``tool_call_id`` when the data gives them), answering the previous turn's calls."""
    train: bool = True
    """Whether the answer is labelled: False for an assistant message of ``"weight": 0`` (OpenAI's fine-tuning
    format marks the answers not to learn that way); ``data.train_on`` applies on top."""
    reasoning: str = ""
    """The assistant's reasoning before its answer (a message's ``reasoning_content``, or ``thinking`` /
    ``reasoning``, as transformers reads them): a chat template that renders it (Qwen3's) puts it in the labels."""


@dataclass
class Conversation:
    turns: list[Turn]
    """At least one; each a user message (or tool results) and the assistant's answer, in order."""
    system: str = ""
    tools: tuple[dict[str, Any], ...] = ()
    """The tools the assistant may call, each ``{"type": "function", "function": {name, description,
    parameters}}`` (a JSON schema, as transformers passes ``tools`` to a chat template)."""
    where: str = field(default="", compare=False)
    """Where the record was read (``file:line``, ``file: record i``), for messages about it; "" when built in code."""


class Columns:
    """``data.columns`` (ours -> the data's names) resolved per format."""

    def __init__(self, mapping: Mapping[str, str] | None, key: str = "data.columns") -> None:
        self.mapping = dict(mapping or {})
        self.key = key
        """The config key the mapping comes from (``data.sources[1].columns`` for a source's own), for messages."""

    def name(self, ours: str) -> str:
        return self.mapping.get(ours, ours)

    def label(self, ours: str) -> str:
        """The data's name quoted, saying which of ours it stands for when data.columns renames it."""
        theirs = self.name(ours)
        return f"'{brief(theirs)}'" if theirs == ours else f"'{brief(theirs)}' ({self.key}.{ours})"

    def keys(self, fmt: str) -> tuple[str, str]:
        role, content = MESSAGE_KEYS[fmt]
        return self.mapping.get("role", role), self.mapping.get("content", content)

    def roles(self, fmt: str) -> dict[str, str]:
        """Role value -> ``user``/``assistant``/``system``."""
        out = {SYSTEM_ROLE: SYSTEM_ROLE}
        if "system_role" in self.mapping:
            out[self.mapping["system_role"]] = SYSTEM_ROLE
        for ours, defaults in ROLES[fmt].items():
            for value in (self.mapping[ours],) if ours in self.mapping else defaults:
                out[value] = ours
        for value in SYSTEM_ALIASES[fmt]:
            out.setdefault(value, SYSTEM_ROLE)  # a role data.columns maps to that name keeps its mapping
        return out

    def mapped_optional(self, fmt: str) -> list[str]:
        """Optional columns of ``fmt`` that data.columns renames: the data must have them."""
        return [ours for ours in OPTIONAL[fmt] if ours in self.mapping]


def _keys(keys: Iterable[Any]) -> str:
    return show(list(keys))


def detect(keys: Iterable[str], cols: Columns) -> str | None:
    """The format whose identifying column (after renaming) is among ``keys``, or None."""
    return detect_in(DETECT, keys, cols)


def detect_in(table: Iterable[tuple[str, str]], keys: Iterable[str], cols: Columns) -> str | None:
    """The first ``(format, identifying column)`` of ``table`` whose column (after renaming) is among ``keys``. A
    column data.columns maps explicitly decides first: ``data.columns.messages=conversations`` reads role/content
    messages stored under ``conversations``, which the detection order alone would take for sharegpt."""
    keys, table = set(keys), list(table)
    for fmt, ours in (*[d for d in table if d[1] in cols.mapping], *table):
        if cols.name(ours) in keys:
            return fmt
    return None


def undetected(keys: Iterable[Any], cols: Columns) -> str:
    """Why no format matched ``keys`` and what to do about it."""
    need = "; ".join(f"{fmt} records have {' and '.join(cols.label(c) for c in REQUIRED[fmt])}" for fmt, _ in DETECT)
    return (f"missing field: cannot detect the format from the keys found, {_keys(keys)} ({need}). Rename your "
            f"columns with {cols.key} (e.g. {cols.key}.instruction=question) or set data.format")


def requirement(fmt: str, cols: Columns) -> str:
    req = " and ".join(cols.label(c) for c in REQUIRED[fmt])
    opt = ", ".join(cols.label(c) for c in OPTIONAL[fmt])
    return f"every {fmt} record needs {req}; {opt} optional"


def _text(value: Any, what: str, where: str) -> str:
    if not isinstance(value, str):
        raise UsageError(f"{where}: {what} must be a string, got {type(value).__name__}")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate from a JSON \ud800 escape; tokenizers reject it
            raise UsageError(f"{where}: {what} holds an unpaired UTF-16 surrogate (a \\uD800-\\uDFFF escape "
                             f"without its pair); fix the escape") from None
    return value


# Content parts joined into one text: what vLLM's OpenAI server does with a text-only model's parts, so a model
# trained here reads a multi-part message as it will be served.
PART_SEP = "\n"


def content_text(value: Any, what: str, where: str) -> str:
    """A message's content: a string, or OpenAI's list of content parts (``[{"type": "text", "text": ...}]``, as
    chat exports and the fine-tuning API write them) of which only text parts can be trained on."""
    if not isinstance(value, list | tuple):
        return _text(value, what, where)
    texts = []
    for j, part in enumerate(value):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind != "text":
            got = f"type {show(kind)}" if isinstance(part, Mapping) else type(part).__name__
            raise UsageError(f"{where}: {what} part {j} is not a text part ({got}); a causal LM trains on text only: "
                             f"keep the {{\"type\": \"text\", \"text\": ...}} parts, or drop the record")
        texts.append(_text(part.get("text"), f"{what} part {j} 'text'", where))
    return PART_SEP.join(texts)


def _weight(value: Any, where: str) -> bool:
    """An assistant message's ``weight`` (OpenAI's fine-tuning format): 1 or absent trains on it, 0 does not."""
    if value is None:
        return True
    if isinstance(value, bool) or not isinstance(value, int | float) or value not in (0, 1):
        raise UsageError(f"{where}: 'weight' must be 0 (do not train on this answer) or 1, got {show(value)}")
    return bool(value)


def _required(rec: Mapping[str, Any], ours: str, fmt: str, cols: Columns, where: str) -> Any:
    v = rec.get(cols.name(ours))
    if v is None:
        if cols.name(ours) in rec:
            raise UsageError(f"{where}: field {cols.label(ours)} is null ({requirement(fmt, cols)}); give it a value "
                             f"or drop the record")
        raise UsageError(f"{where}: missing field {cols.label(ours)} ({requirement(fmt, cols)}); the record has "
                         f"keys {_keys(rec)}")
    return v


def _optional_text(rec: Mapping[str, Any], ours: str, cols: Columns, where: str) -> str:
    v = rec.get(cols.name(ours))
    return "" if v is None else _text(v, f"field {cols.label(ours)}", where)


def _alpaca(rec: Mapping[str, Any], cols: Columns, where: str) -> Conversation:
    ins = _text(_required(rec, "instruction", ALPACA, cols, where), f"field {cols.label('instruction')}", where)
    inp = _optional_text(rec, "input", cols, where)
    out = _text(_required(rec, "output", ALPACA, cols, where), f"field {cols.label('output')}", where)
    system = _optional_text(rec, "system", cols, where)
    tools = tool_list(rec.get(cols.name("tools")), f"field {cols.label('tools')}", where)
    hist = rec.get(cols.name("history"))
    if hist == "":  # an empty CSV cell: no history (as an empty tools cell is no tools)
        hist = None
    turns = []
    if hist is not None:
        field = f"field {cols.label('history')}"
        how = "a list of [user, assistant] pairs of strings (the turns before this one)"
        if isinstance(hist, str):  # a CSV cell is text: a JSON list there, as tools takes one
            try:
                hist = json.loads(hist)
            except (ValueError, RecursionError) as e:
                raise UsageError(f"{where}: {field} is not valid JSON ({str(e)[:120]}); write it as {how}, e.g. "
                                 f'[["hi", "hello!"]]') from None
        if not isinstance(hist, list | tuple):
            raise UsageError(f"{where}: {field} must be {how}, got {type(hist).__name__}")
        for j, pair in enumerate(hist):
            if not isinstance(pair, list | tuple) or len(pair) != 2:
                got = f"{len(pair)} items" if isinstance(pair, list | tuple) else type(pair).__name__
                raise UsageError(f"{where}: {field} entry {j} must be a [user, assistant] pair of strings, got "
                                 f"{got}; history must be {how}")
            turns.append(Turn(_text(pair[0], f"{field} entry {j} user text", where), "",
                              _text(pair[1], f"{field} entry {j} assistant text", where)))
    turns.append(Turn(ins, inp, out))
    return Conversation(turns, system, tools)


REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")
"""Where an assistant message carries its reasoning, the first given (None counts as absent): transformers'
names, in the order its apply_chat_template reads them."""


def _reasoning(m: Mapping[str, Any], at: str) -> str:
    key = next((k for k in REASONING_KEYS if m.get(k) is not None), None)
    text = "" if key is None else content_text(m[key], f"'{key}'", at)
    return text if text.strip() else ""  # blank: none (Qwen3's template renders both as an empty think block)


def _chat(rec: Mapping[str, Any], fmt: str, cols: Columns, where: str) -> Conversation:
    ours = "conversations" if fmt == SHAREGPT else "messages"
    field = f"field {cols.label(ours)}"
    msgs = _required(rec, ours, fmt, cols, where)
    role_key, content_key = cols.keys(fmt)
    if not isinstance(msgs, list | tuple):
        shape = f"{{'{brief(role_key)}': ..., '{brief(content_key)}': ...}}"
        raise UsageError(f"{where}: {field} must be a list of messages ({shape}), got {type(msgs).__name__}")
    if not msgs:
        raise UsageError(f"{where}: empty conversation ({field} has no messages)")
    top_system = _optional_text(rec, "system", cols, where)
    tools = tool_list(rec.get(cols.name("tools")), f"field {cols.label('tools')}", where)
    roles = cols.roles(fmt)
    parsed: list[tuple[str, Any]] = []
    def rename(m: Mapping[str, Any]) -> str:
        if fmt == SHAREGPT and "role" in m and "content" in m:
            # Mapped as sharegpt's from/value (the hint it gave), their tool_calls and weight would be ignored.
            return (f"these are role/content messages: set data.format=messages and {cols.key}.messages="
                    f"{brief(cols.name(ours))}, which reads them with their tool_calls and weight")
        return f"set {cols.key}.role and {cols.key}.content to the keys your messages use"

    for i, m in enumerate(msgs):
        at = f"{where}: message {i}"
        if not isinstance(m, Mapping):
            raise UsageError(f"{at}: expected an object with '{brief(role_key)}' and '{brief(content_key)}', got "
                             f"{type(m).__name__}")
        if role_key not in m:
            raise UsageError(f"{at}: missing key '{brief(role_key)}' (the message has keys {_keys(m)}); {rename(m)}")
        role = m[role_key]
        kind = KIND.get(roles.get(role, "")) if isinstance(role, str) else None
        if kind is None:
            accepted = ", ".join(f"{brief(v)} ({k})" for v, k in roles.items())
            mappable = ", ".join([*ROLES[fmt], "system_role"])
            raise UsageError(f"{at}: unknown role {show(role)}; accepted roles: {accepted}. Map other role names "
                             f"with {cols.key} ({mappable})"
                             + (f", e.g. {cols.key}.assistant={brief(role)} if {brief(role)} is the assistant"
                                if isinstance(role, str) else ""))
        calls = m.get("tool_calls") if fmt == MESSAGES and kind == ASSISTANT else None
        if isinstance(calls, list | tuple) and not calls:
            calls = None  # "tool_calls": [] (what OpenAI-style exporters write on a plain answer): no calls
        content = m.get(content_key)
        if content_key not in m and not calls:
            raise UsageError(f"{at}: missing key '{brief(content_key)}' (the message has keys {_keys(m)}); "
                             f"{rename(m)}")
        text = "" if content is None and calls else content_text(content, f"'{brief(content_key)}'", at)
        if kind == CALL:  # sharegpt: the call is the message's text, JSON
            parsed.append((ASSISTANT, ("", tool_calls(_json(text, "function_call", at), at), True, "")))
        elif kind == ASSISTANT:
            parsed.append((ASSISTANT, (text, tool_calls(calls, at) if calls is not None else (),
                                       _weight(m.get("weight"), at) if fmt == MESSAGES else True, _reasoning(m, at))))
        elif kind == RESULT:
            result = {"content": text}
            for extra in ("name", "tool_call_id"):
                if isinstance(m.get(extra), str):
                    result[extra] = m[extra]
            parsed.append((RESULT, result))
        else:
            parsed.append((kind, text))
    system = top_system
    if parsed[0][0] == SYSTEM_ROLE:
        if top_system:
            raise UsageError(f"{where}: both a leading system message and a top-level {cols.label('system')} "
                             f"field; keep only one of them")
        system = parsed.pop(0)[1]
    offset = len(msgs) - len(parsed)
    if not any(kind == ASSISTANT for kind, _ in parsed):
        raise UsageError(f"{where}: conversation has no assistant turn: nothing to train on; add the assistant's "
                         f"answer or drop the record")
    for k, (kind, _) in enumerate(parsed):
        if kind == SYSTEM_ROLE:
            raise UsageError(f"{where}: message {k + offset}: a system message may only come first")
    turns: list[Turn] = []
    k = 0
    while k < len(parsed):
        kind, payload = parsed[k]
        at = f"{where}: message {k + offset}"
        if kind == ASSISTANT:
            raise UsageError(f"{at}: expected a user message, got assistant (roles must alternate user, assistant, "
                             f"user, assistant, ... after an optional system message; tool results may stand for a "
                             f"user message after the assistant's tool call)")
        if kind == USER:
            user, results = payload, ()
            k += 1
        else:
            if not turns or not turns[-1].calls:
                raise UsageError(f"{at}: a tool result with no preceding call (the message before it is not an "
                                 f"assistant's tool call); put the call first or drop the result")
            group = []
            while k < len(parsed) and parsed[k][0] == RESULT:
                group.append(parsed[k][1])
                k += 1
            user, results = "", tuple(group)
        if k == len(parsed):
            what = "a tool result" if results else "a user turn"
            raise UsageError(f"{where}: conversation ends with {what}: no assistant turn to train on; drop the last "
                             f"message or add the answer")
        if parsed[k][0] == RESULT:
            raise UsageError(f"{where}: message {k + offset}: a tool result with no preceding call (the message "
                             f"before it is not an assistant's tool call); put the call first or drop the result")
        if parsed[k][0] != ASSISTANT:
            raise UsageError(f"{where}: message {k + offset}: expected an assistant message, got {parsed[k][0]} "
                             f"(roles must alternate user, assistant, user, assistant, ... after an optional system "
                             f"message)")
        text, calls, train, reasoning = parsed[k][1]
        turns.append(Turn(user, "", text, calls=calls, results=results, train=train, reasoning=reasoning))
        k += 1
    if any(t.calls for t in turns) or tools:
        check_calls(turns, tools, where)
    return Conversation(turns, system, tools)


def to_conversation(rec: Any, fmt: str, cols: Columns, where: str) -> Conversation:
    """One record of format ``fmt`` as a :class:`Conversation`; a :class:`UsageError` naming ``where`` if bad."""
    if not isinstance(rec, Mapping):
        raise UsageError(f"{where}: expected an object ({requirement(fmt, cols)}), got {type(rec).__name__}")
    conv = _alpaca(rec, cols, where) if fmt == ALPACA else _chat(rec, fmt, cols, where)
    if not conv.system.strip() and not any(t.instruction.strip() or t.input.strip() or t.output.strip()
                                           for t in conv.turns):
        raise UsageError(f"{where}: empty record (no text at all: every field is empty or blank)")
    return conv


def text_length(conv: Conversation) -> int:
    """Characters of text in ``conv`` (tool schemas, calls and results included, as JSON)."""
    n = len(conv.system) + sum(len(t.instruction) + len(t.input) + len(t.output) + len(t.reasoning)
                               for t in conv.turns)
    if conv.tools or any(t.calls or t.results for t in conv.turns):
        n += len(json.dumps([conv.tools, [(t.calls, t.results) for t in conv.turns]], ensure_ascii=False))
    return n
