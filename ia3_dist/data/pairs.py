"""Preference pairs: records with a shared prompt and a ``chosen`` and a ``rejected`` response, in the formats
people bring, read into two :class:`Conversation` s that differ only in the last answer.

- ``prompt``: ``prompt`` (a string: the user's message; or a list of messages ending with the user's, as TRL's
  conversational format), ``chosen``, ``rejected``.
- ``alpaca``: ``instruction``, optional ``input``/``system``/``history``, ``chosen``, ``rejected``.
- ``sharegpt``: LLaMA-Factory's ranking files: ``conversations`` ending with the user's message, ``chosen`` and
  ``rejected`` each one assistant message.
- ``messages``: ``messages`` ending with the user's message, ``chosen`` and ``rejected``.
- implicit prompt (TRL's, e.g. UltraFeedback binarized): ``chosen`` and ``rejected`` each a whole conversation
  (role/content or ShareGPT's from/value messages) ending with its answer; the messages they share are the
  prompt. Read so in any format (a ``prompt`` string or ``messages`` beside them are left aside, as TRL's
  ``maybe_extract_prompt`` does).

A response is a string, one assistant message (``{"role": "assistant", "content": ...}``, sharegpt's
``{"from": "gpt", "value": ...}``) or a list holding one. ``data.columns`` renames columns and message keys as for
SFT data (``prompt``, ``chosen``, ``rejected`` included). On disk a pair is two rows of the token cache, chosen then
rejected, with labels on the response only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ..config.schema import show
from ..errors import UsageError
from .formats import (
    ALPACA,
    MESSAGES,
    SHAREGPT,
    Columns,
    Conversation,
    _alpaca,
    _chat,
    _keys,
    _reasoning,
    _text,
    content_text,
    detect_in,
)
from .tools import tool_list

PROMPT = "prompt"
PAIR_FORMATS = (PROMPT, ALPACA, SHAREGPT, MESSAGES)
# The column whose presence identifies a pair format, in detection order; chosen and rejected alone: the implicit
# prompt (read as the prompt format, its prompt the messages both answers' conversations share).
PAIR_DETECT = ((SHAREGPT, "conversations"), (MESSAGES, "messages"), (PROMPT, "prompt"), (ALPACA, "instruction"),
               (PROMPT, "chosen"))
# The prompt format's "prompt" is checked per record: chosen and rejected as whole conversations carry it.
PAIR_REQUIRED = {PROMPT: ("chosen", "rejected"), ALPACA: ("instruction", "chosen", "rejected"),
                 SHAREGPT: ("conversations", "chosen", "rejected"), MESSAGES: ("messages", "chosen", "rejected")}


@dataclass
class Pair:
    """One preference record: the same conversation ending in the chosen and in the rejected answer."""

    chosen: Conversation
    rejected: Conversation
    where: str = field(default="", compare=False)
    """Where the record was read, for messages about it."""


def detect_pair(keys: Iterable[str], cols: Columns) -> str | None:
    return detect_in(PAIR_DETECT, keys, cols)


def pair_requirement(fmt: str, cols: Columns) -> str:
    if fmt == PROMPT:
        return (f"every prompt preference record needs {cols.label('prompt')}, {cols.label('chosen')} and "
                f"{cols.label('rejected')}, or {cols.label('chosen')} and {cols.label('rejected')} as whole "
                f"conversations (the prompt implicit)")
    return f"every {fmt} preference record needs {' and '.join(cols.label(c) for c in PAIR_REQUIRED[fmt])}"


def undetected_pair(keys: Iterable[Any], cols: Columns) -> str:
    need = "; ".join(pair_requirement(f, cols) for f, _ in PAIR_DETECT)
    return (f"missing field: cannot detect the preference format from the keys found, {_keys(keys)} ({need}). "
            f"Rename your columns with {cols.key} (e.g. {cols.key}.chosen=better) or set data.format")


def _response(v: Any, what: str, fmt: str, cols: Columns, where: str) -> tuple[str, str]:
    """A response as ``(text, reasoning)``: a string, one assistant message (its reasoning_content, as SFT reads
    it), or a list of one."""
    reasoning = ""
    if isinstance(v, str):
        text = _text(v, what, where)
    else:
        if isinstance(v, list | tuple):
            if len(v) != 1:
                raise UsageError(f"{where}: {what} is a list of {len(v)} messages; a response is one assistant "
                                 f"message (or a string)")
            v = v[0]
        if not isinstance(v, Mapping):
            raise UsageError(f"{where}: {what} must be a string or an assistant message, got {type(v).__name__}")
        role_key, content_key = cols.keys(SHAREGPT if fmt == SHAREGPT else MESSAGES)
        if role_key not in v or content_key not in v:
            raise UsageError(f"{where}: {what} is a message without '{role_key}' and '{content_key}' (it has keys "
                             f"{_keys(v)}); set {cols.key}.role and {cols.key}.content to the keys it uses")
        roles = cols.roles(SHAREGPT if fmt == SHAREGPT else MESSAGES)
        role = v[role_key]
        if not isinstance(role, str) or roles.get(role) != "assistant":
            raise UsageError(f"{where}: {what} has role {show(role)}; a response must be the assistant's")
        if v.get("tool_calls"):
            # Kept as text alone, the pair would prefer the answer with its calls removed.
            raise UsageError(f"{where}: {what} calls tools (tool_calls); a preference answer is compared as text "
                             f"and its calls would be dropped: give answers without tool calls or drop the pair")
        text = content_text(v[content_key], f"{what} content", where)
        reasoning = _reasoning(v, f"{where}: {what}")
    if not text.strip():
        raise UsageError(f"{where}: {what} is empty: a preference pair needs two answers to compare")
    return text, reasoning


def to_pair(rec: Any, fmt: str, cols: Columns, where: str) -> Pair:
    """One preference record of format ``fmt``; a :class:`UsageError` naming ``where`` if it is bad (missing key,
    empty response, chosen identical to rejected, a prompt that does not end with the user)."""
    if not isinstance(rec, Mapping):
        raise UsageError(f"{where}: expected an object ({pair_requirement(fmt, cols)}), got {type(rec).__name__}")
    if _implicit(rec, cols):
        return _implicit_pair(rec, cols, where)
    for ours in (*PAIR_REQUIRED[fmt], *(("prompt",) if fmt == PROMPT else ())):
        if rec.get(cols.name(ours)) is None:
            if cols.name(ours) in rec:
                raise UsageError(f"{where}: field {cols.label(ours)} is null ({pair_requirement(fmt, cols)}); give it "
                                 f"a value or drop the record")
            raise UsageError(f"{where}: missing field {cols.label(ours)} ({pair_requirement(fmt, cols)}); the "
                             f"record has keys {_keys(rec)}")
    answers = [_response(rec[cols.name(k)], f"field {cols.label(k)}", fmt, cols, where)
               for k in ("chosen", "rejected")]
    if answers[0] == answers[1]:
        raise UsageError(f"{where}: {cols.label('chosen')} and {cols.label('rejected')} are the same text: the pair "
                         f"prefers nothing; drop the record")
    # The answer's reasoning on its turn, where the template renders it (or refuses it: human_assistant).
    convs = [_conversation(rec, fmt, cols, where, text) for text, _ in answers]
    convs = [replace(c, turns=[*c.turns[:-1], replace(c.turns[-1], reasoning=r)]) if r else c
             for c, (_, r) in zip(convs, answers, strict=True)]
    return Pair(*convs)


def _implicit(rec: Mapping[str, Any], cols: Columns) -> bool:
    """``chosen`` and ``rejected`` both conversations of more than their answer: TRL's implicit prompt."""
    c, r = rec.get(cols.name("chosen")), rec.get(cols.name("rejected"))
    return isinstance(c, list | tuple) and isinstance(r, list | tuple) and len(c) > 1 and len(r) > 1


def _implicit_pair(rec: Mapping[str, Any], cols: Columns, where: str) -> Pair:
    """The pair of two whole conversations: the messages they share, from the start, are the prompt (TRL's
    ``extract_prompt``); what follows must be one answer on each side."""
    c, r = list(rec[cols.name("chosen")]), list(rec[cols.name("rejected")])
    k = 0
    while k < min(len(c), len(r)) and c[k] == r[k]:
        k += 1
    if len(c) - k != 1 or len(r) - k != 1:
        raise UsageError(f"{where}: {cols.label('chosen')} and {cols.label('rejected')} are conversations that share "
                         f"their first {k} message(s), then differ in {len(c) - k} and {len(r) - k}; an implicit-"
                         f"prompt pair is one conversation ending in two different answers (the last message of "
                         f"each)")
    prompt_only = {key: v for key, v in rec.items()
                   if key not in {cols.name(o) for o in ("prompt", "messages", "conversations", "instruction")}}
    sharegpt_role = cols.keys(SHAREGPT)[0]
    if isinstance(c[0], Mapping) and sharegpt_role in c[0] and cols.keys(MESSAGES)[0] not in c[0]:
        # ShareGPT's from/value messages: read as LLaMA-Factory's ranking records.
        return to_pair({**prompt_only, cols.name("conversations"): c[:k], cols.name("chosen"): c[k],
                        cols.name("rejected"): r[k]}, SHAREGPT, cols, where)
    return to_pair({**prompt_only, cols.name("prompt"): c[:k], cols.name("chosen"): c[k],
                    cols.name("rejected"): r[k]}, PROMPT, cols, where)


def _conversation(rec: Mapping[str, Any], fmt: str, cols: Columns, where: str, answer: str) -> Conversation:
    """The record's prompt followed by ``answer`` as the last assistant turn, parsed by the SFT format readers."""
    if fmt == ALPACA:
        _no_tools(rec, cols, where, "an alpaca record")
        return _alpaca({**rec, cols.name("output"): answer}, cols, where)
    if fmt == PROMPT:
        prompt = rec[cols.name("prompt")]
        if isinstance(prompt, str):
            _no_tools(rec, cols, where, f"a string {cols.label('prompt')}")
            one = {cols.name("instruction"): _text(prompt, f"field {cols.label('prompt')}", where),
                   cols.name("output"): answer}
            if rec.get(cols.name("system")) is not None:
                one[cols.name("system")] = rec[cols.name("system")]
            return _alpaca(one, cols, where)
        if not isinstance(prompt, list | tuple):
            raise UsageError(f"{where}: field {cols.label('prompt')} must be a string or a list of messages, got "
                             f"{type(prompt).__name__}")
        key, chat_fmt = cols.name("messages"), MESSAGES
        msgs = list(prompt)
    else:
        key, chat_fmt = cols.name("conversations" if fmt == SHAREGPT else "messages"), fmt
        msgs = rec[key]
        if not isinstance(msgs, list | tuple):
            raise UsageError(f"{where}: field {cols.label('conversations' if fmt == SHAREGPT else 'messages')} must "
                             f"be a list of messages, got {type(msgs).__name__}")
        msgs = list(msgs)
    role_key, content_key = cols.keys(chat_fmt)
    assistant = cols.name("assistant") if "assistant" in cols.mapping else ("gpt" if chat_fmt == SHAREGPT
                                                                            else "assistant")
    roles = cols.roles(chat_fmt)
    last_role = msgs[-1].get(role_key) if msgs and isinstance(msgs[-1], Mapping) else None
    if isinstance(last_role, str) and roles.get(last_role) == "assistant":
        raise UsageError(f"{where}: the prompt ends with an assistant message; a preference prompt ends with the "
                         f"user's message and the two answers are in {cols.label('chosen')} and "
                         f"{cols.label('rejected')}")
    full = {key: [*msgs, {role_key: assistant, content_key: answer}]}
    # The rebuilt record is all _chat sees: without the tool schemas a chat template would not render them and
    # check_calls would not refuse a call to an undeclared tool, as it does for the same record in SFT.
    for ours in ("system", "tools"):
        if cols.name(ours) in rec:
            full[cols.name(ours)] = rec[cols.name(ours)]
    return _chat(full, chat_fmt, cols, where)


def _no_tools(rec: Mapping[str, Any], cols: Columns, where: str, what: str) -> None:
    """Refuse a record declaring tools in a form whose prompt is plain text: the tools would be silently dropped
    and the pair trained without the schemas its answers may rely on."""
    if tool_list(rec.get(cols.name("tools")), f"field {cols.label('tools')}", where):
        raise UsageError(f"{where}: field {cols.label('tools')} declares tools, but {what} is plain text and cannot "
                         f"carry them; give the prompt as a list of messages (the messages or sharegpt pair formats, "
                         f"or 'prompt' as a message list) or drop the tools")


def split_pair(chosen: list[tuple[list[int], bool]], rejected: list[tuple[list[int], bool]], where: str,
               chosen_text: list[tuple[str, bool]] | None = None, rejected_text: list[tuple[str, bool]] | None = None
               ) -> tuple[list[int], list[int], list[int]]:
    """``(prompt ids, chosen ids, rejected ids)`` from the two rendered, tokenized conversations (runs with labels
    on the last answer only) and, where given, their rendered text segments. The prompt must render the same on
    both sides; it is the tokens the two sides share (a conversation encoded whole may merge the prompt's last
    characters into the answer's first token differently on each side: those tokens go with the answer, as TRL's
    common prefix does)."""
    same_text = chosen_text is None or rejected_text is None or \
        [t for t, lab in chosen_text if not lab] == [t for t, lab in rejected_text if not lab]
    if not chosen[-1][1] or not rejected[-1][1]:
        raise UsageError(f"{where}: the template renders no answer text on a side of the pair (an answer it drops or "
                         f"empties); use a template that renders the assistant's answer")
    pc = [t for ids, lab in chosen[:-1] for t in ids]
    pr = [t for ids, lab in rejected[:-1] for t in ids]
    if not same_text or (chosen_text is None and pc != pr):
        raise UsageError(f"{where}: the template renders the prompt differently before the two answers; use a "
                         f"template whose prompt does not depend on the answer")
    k = 0
    for a, b in zip(pc, pr):
        if a != b:
            break
        k += 1
    return pc[:k], pc[k:] + list(chosen[-1][0]), pr[k:] + list(rejected[-1][0])


def truncate_pair(prompt: list[int], chosen: list[int], rejected: list[int], max_length: int, mode: str,
                  head: int = 0) -> tuple[list[int], list[int], list[int], bool]:
    """Fit both sequences into ``max_length`` with the prompt the same on both sides: ``right`` cuts each
    sequence's end (the responses first, as TRL's ``keep_start``); ``prompt`` first cuts the oldest prompt tokens
    after its first ``head`` (a BOS; the same ones on both sides) so the longer answer fits, then the answers'
    ends. Returns the parts and whether anything was cut."""
    longest = len(prompt) + max(len(chosen), len(rejected))
    if longest <= max_length:
        return prompt, chosen, rejected, False
    if mode == "prompt":
        head = head if head < max_length else 0
        prompt = prompt[:head] + prompt[head + min(len(prompt) - head, longest - max_length):]
    prompt = prompt[:max_length]
    room = max_length - len(prompt)
    return prompt, chosen[:room], rejected[:room], True
