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
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..config.schema import brief, show
from ..errors import UsageError

ALPACA, SHAREGPT, MESSAGES = "alpaca", "sharegpt", "messages"
FORMATS = (ALPACA, SHAREGPT, MESSAGES)
# The column whose presence identifies a format, in detection order.
DETECT = ((SHAREGPT, "conversations"), (MESSAGES, "messages"), (ALPACA, "instruction"))
REQUIRED = {ALPACA: ("instruction", "output"), SHAREGPT: ("conversations",), MESSAGES: ("messages",)}
OPTIONAL = {ALPACA: ("input", "system", "history"), SHAREGPT: ("system",), MESSAGES: ("system",)}
# Message keys and role values when data.columns does not rename them.
MESSAGE_KEYS = {SHAREGPT: ("from", "value"), MESSAGES: ("role", "content")}
ROLES = {SHAREGPT: {"user": ("human", "user"), "assistant": ("gpt", "assistant")},
         MESSAGES: {"user": ("user",), "assistant": ("assistant",)}}
SYSTEM_ROLE = "system"


@dataclass(frozen=True)
class Turn:
    instruction: str
    """The user's message (alpaca: its instruction)."""
    input: str
    """Alpaca's ``input`` field for that turn; "" in every other format."""
    output: str
    """The assistant's answer."""


@dataclass
class Conversation:
    turns: list[Turn]
    """At least one; user/assistant pairs in order."""
    system: str = ""


class Columns:
    """``data.columns`` (ours -> the data's names) resolved per format."""

    def __init__(self, mapping: Mapping[str, str] | None) -> None:
        self.mapping = dict(mapping or {})

    def name(self, ours: str) -> str:
        return self.mapping.get(ours, ours)

    def label(self, ours: str) -> str:
        """The data's name quoted, saying which of ours it stands for when data.columns renames it."""
        theirs = self.name(ours)
        return f"'{brief(theirs)}'" if theirs == ours else f"'{brief(theirs)}' (data.columns.{ours})"

    def keys(self, fmt: str) -> tuple[str, str]:
        role, content = MESSAGE_KEYS[fmt]
        return self.mapping.get("role", role), self.mapping.get("content", content)

    def roles(self, fmt: str) -> dict[str, str]:
        """Role value -> ``user``/``assistant``/``system``."""
        out = {SYSTEM_ROLE: SYSTEM_ROLE}
        for ours, defaults in ROLES[fmt].items():
            for value in (self.mapping[ours],) if ours in self.mapping else defaults:
                out[value] = ours
        return out

    def mapped_optional(self, fmt: str) -> list[str]:
        """Optional columns of ``fmt`` that data.columns renames: the data must have them."""
        return [ours for ours in OPTIONAL[fmt] if ours in self.mapping]


def _keys(keys: Iterable[Any]) -> str:
    return show(list(keys))


def detect(keys: Iterable[str], cols: Columns) -> str | None:
    """The format whose identifying column (after renaming) is among ``keys``, or None."""
    keys = set(keys)
    for fmt, ours in DETECT:
        if cols.name(ours) in keys:
            return fmt
    return None


def undetected(keys: Iterable[Any], cols: Columns) -> str:
    """Why no format matched ``keys`` and what to do about it."""
    need = "; ".join(f"{fmt} records have {' and '.join(cols.label(c) for c in REQUIRED[fmt])}" for fmt, _ in DETECT)
    return (f"missing field: cannot detect the format from the keys found, {_keys(keys)} ({need}). Rename your "
            f"columns with data.columns (e.g. data.columns.instruction=question) or set data.format")


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


def _required(rec: Mapping[str, Any], ours: str, fmt: str, cols: Columns, where: str) -> Any:
    v = rec.get(cols.name(ours))
    if v is None:
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
    hist = rec.get(cols.name("history"))
    turns = []
    if hist is not None:
        field = f"field {cols.label('history')}"
        how = "a list of [user, assistant] pairs of strings (the turns before this one)"
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
    return Conversation(turns, system)


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
    roles = cols.roles(fmt)
    parsed: list[tuple[str, str]] = []
    rename = "set data.columns.role and data.columns.content to the keys your messages use"
    for i, m in enumerate(msgs):
        at = f"{where}: message {i}"
        if not isinstance(m, Mapping):
            raise UsageError(f"{at}: expected an object with '{brief(role_key)}' and '{brief(content_key)}', got "
                             f"{type(m).__name__}")
        for key in (role_key, content_key):
            if key not in m:
                raise UsageError(f"{at}: missing key '{brief(key)}' (the message has keys {_keys(m)}); {rename}")
        role = m[role_key]
        kind = roles.get(role) if isinstance(role, str) else None
        if kind is None:
            accepted = ", ".join(f"{brief(v)} ({k})" for v, k in roles.items())
            raise UsageError(f"{at}: unknown role {show(role)}; accepted roles: {accepted}. Map other role names "
                             f"with data.columns.user / data.columns.assistant")
        parsed.append((kind, _text(m[content_key], f"'{brief(content_key)}'", at)))
    system = top_system
    if parsed[0][0] == SYSTEM_ROLE:
        if top_system:
            raise UsageError(f"{where}: both a leading system message and a top-level {cols.label('system')} "
                             f"field; keep only one of them")
        system = parsed.pop(0)[1]
    offset = len(msgs) - len(parsed)
    if not any(kind == "assistant" for kind, _ in parsed):
        raise UsageError(f"{where}: conversation has no assistant turn: nothing to train on; add the assistant's "
                         f"answer or drop the record")
    for k, (kind, _) in enumerate(parsed):
        expected = "user" if k % 2 == 0 else "assistant"
        if kind == SYSTEM_ROLE:
            raise UsageError(f"{where}: message {k + offset}: a system message may only come first")
        if kind != expected:
            article = "a" if expected == "user" else "an"
            raise UsageError(f"{where}: message {k + offset}: expected {article} {expected} message, got {kind} (roles "
                             f"must alternate user, assistant, user, assistant, ... after an optional system message)")
    if len(parsed) % 2:
        raise UsageError(f"{where}: conversation ends with a user turn: no assistant turn to train on; drop the last "
                         f"message or add the answer")
    turns = [Turn(parsed[k][1], "", parsed[k + 1][1]) for k in range(0, len(parsed), 2)]
    return Conversation(turns, system)


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
    """Characters of text in ``conv``."""
    return len(conv.system) + sum(len(t.instruction) + len(t.input) + len(t.output) for t in conv.turns)
