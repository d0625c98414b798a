"""Tool calling in conversations: the tools a record declares, the assistant's calls and the tools' results, read
from the shapes people bring into the one transformers' chat templates take, and the plain-text form the
``human_assistant`` template writes them in.

Shapes read:
- tools: a list (or, as LLaMA-Factory's ``glaive_toolcall`` stores it, a JSON string of a list) of function
  schemas, bare ``{"name", "description", "parameters"}`` or wrapped ``{"type": "function", "function": {...}}``;
  kept wrapped, as ``transformers.utils.get_json_schema`` writes them.
- calls: sharegpt's ``function_call`` turn, a JSON object ``{"name", "arguments"}`` or a list of them; messages'
  ``tool_calls``, each ``{"type": "function", "function": {"name", "arguments"}}`` (OpenAI) or bare; arguments a
  JSON object or a string holding one (OpenAI's). Kept as ``{"type": "function", "function": {"name", "arguments":
  dict}}``: chat templates write the arguments with ``tojson`` and would quote a string twice.
- results: sharegpt's ``observation`` turns, messages' ``role: tool`` (with ``tool_call_id``/``name`` if given).

The ``human_assistant`` form (documented in the README): the tools, one JSON schema per line after ``Tools:``, go
before the first prompt (after the system text); a call is ``<tool_call>{"name": ..., "arguments": ...}
</tool_call>`` after the assistant's text, labelled like it; results are ``Observation: <content>`` lines where
the user's message would be, never labelled.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ..config.schema import show
from ..errors import UsageError

TOOLS_HEADER = "Tools:"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
OBSERVATION = "Observation: "
# A record's tool schemas and calls nest a few levels (JSON-schema properties of objects of arrays...).
MAX_DEPTH = 32


CALL_SHAPE = 'a JSON object {"name": ..., "arguments": {...}}'
"""How a tool call is written."""


def _json(text: str, what: str, where: str, shape: str = CALL_SHAPE) -> Any:
    """``text`` parsed as JSON, or a UsageError saying it is not and how ``shape`` it should be written."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise UsageError(f"{where}: not valid JSON in {what} ({str(e)[:120]}); write it as {shape}") from None


def _depth(v: Any, limit: int = MAX_DEPTH) -> int:
    stack, deepest = [(v, 1)], 0
    while stack:
        x, d = stack.pop()
        deepest = max(deepest, d)
        if d > limit:
            return d
        if isinstance(x, Mapping):
            stack += [(y, d + 1) for y in x.values()]
        elif isinstance(x, list | tuple):
            stack += [(y, d + 1) for y in x]
    return deepest


def _encodable(v: Any, what: str, where: str) -> None:
    """Every string in ``v`` (keys too) is valid UTF-8: a lone surrogate from a JSON \\ud800 escape would reach
    the tokenizer, which raises a TypeError naming no record (and no data.on_bad_record=skip could drop it)."""
    stack = [v]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            if not x.isascii():
                try:
                    x.encode("utf-8")
                except UnicodeEncodeError:
                    raise UsageError(f"{where}: {what} holds an unpaired UTF-16 surrogate (a \\uD800-\\uDFFF escape "
                                     f"without its pair); fix the escape") from None
        elif isinstance(x, Mapping):
            stack += [*x.keys(), *x.values()]
        elif isinstance(x, list | tuple):
            stack += list(x)


def tool_list(value: Any, what: str, where: str) -> tuple[dict[str, Any], ...]:
    """A record's ``tools`` (None, a list, or a JSON string of one) as wrapped function schemas."""
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        value = _json(value, what, where, 'a JSON list of function schemas: [{"name": ..., "description": ..., '
                      '"parameters": {...}}]')
    if not isinstance(value, list | tuple):
        raise UsageError(f"{where}: {what} must be a list of function schemas (or a JSON string of one), got "
                         f"{type(value).__name__}")
    if _depth(value) > MAX_DEPTH:
        raise UsageError(f"{where}: {what} nests deeper than {MAX_DEPTH} levels")
    _encodable(value, what, where)
    out = []
    for i, t in enumerate(value):
        fn = t.get("function") if isinstance(t, Mapping) and t.get("type") == "function" else t
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise UsageError(f"{where}: {what} entry {i} is not a function schema (a name, description and "
                             f"parameters, optionally wrapped as {{\"type\": \"function\", \"function\": ...}}): "
                             f"{show(t)}")
        out.append({"type": "function", "function": dict(fn)})
    return tuple(out)


def tool_calls(value: Any, where: str) -> tuple[dict[str, Any], ...]:
    """The assistant's calls (one call or a list of them, in the shapes the module doc lists), each with its
    arguments as an object."""
    calls = value if isinstance(value, list | tuple) else [value]
    if not calls:
        raise UsageError(f"{where}: an empty list of tool calls; drop the key or give the calls")
    out = []
    for i, c in enumerate(calls):
        what = f"tool call {i}" if len(calls) > 1 else "tool call"
        fn = c.get("function") if isinstance(c, Mapping) and isinstance(c.get("function"), Mapping) else c
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise UsageError(f"{where}: malformed {what}: expected {{\"name\": ..., \"arguments\": {{...}}}} (or "
                             f"OpenAI's {{\"type\": \"function\", \"function\": ...}}), got {show(c)}")
        args = fn.get("arguments", fn.get("parameters", {}))
        if isinstance(args, str):
            args = _json(args, f"{what} arguments", where) if args.strip() else {}
        if not isinstance(args, Mapping):
            raise UsageError(f"{where}: malformed {what} arguments: expected a JSON object, got {show(args)}")
        if _depth(args) > MAX_DEPTH:
            raise UsageError(f"{where}: {what} arguments nest deeper than {MAX_DEPTH} levels")
        _encodable([fn["name"], args, c.get("id") if isinstance(c, Mapping) else None], what, where)
        call: dict[str, Any] = {"type": "function", "function": {"name": fn["name"], "arguments": dict(args)}}
        if isinstance(c, Mapping) and isinstance(c.get("id"), str):
            call["id"] = c["id"]
        out.append(call)
    return tuple(out)


def check_calls(turns: list[Any], tools: tuple[dict[str, Any], ...], where: str) -> None:
    """With a ``tools`` list, every call names one of its tools."""
    if not tools:
        return
    names = {t["function"]["name"] for t in tools}
    for k, t in enumerate(turns):
        for c in t.calls:
            if c["function"]["name"] not in names:
                raise UsageError(f"{where}: turn {k + 1} calls tool {show(c['function']['name'])}, which the "
                                 f"record's tools do not declare ({', '.join(sorted(names))}); add its schema to "
                                 f"tools or fix the name")


# -- the human_assistant form ---------------------------------------------------------------------------------

def tools_text(tools: tuple[dict[str, Any], ...]) -> str:
    return "\n".join([TOOLS_HEADER, *(json.dumps(t["function"], ensure_ascii=False) for t in tools)])


def calls_text(calls: tuple[dict[str, Any], ...]) -> str:
    return "\n".join(f"{CALL_OPEN}{json.dumps(c['function'], ensure_ascii=False)}{CALL_CLOSE}" for c in calls)


def results_text(results: tuple[dict[str, Any], ...]) -> str:
    return "\n".join(OBSERVATION + r["content"] for r in results)


def text_without_calls(text: str) -> str:
    """A model's answer with the tool calls :func:`parse_calls` found taken out (what stays is its text): a
    conversation keeps the calls apart, and its template writes them back."""
    if CALL_OPEN in text:
        return text.split(CALL_OPEN, 1)[0].strip()
    return "" if parse_calls(text) else text


def parse_calls(text: str) -> list[dict[str, Any]]:
    """The tool calls a model wrote (``<tool_call>{...}</tool_call>``, the form both this template and Qwen's
    use; or a bare JSON object ``{"name": ..., "parameters"/"arguments": ...}``, Llama 3.1's), for display."""
    found = []
    rest = text
    while CALL_OPEN in rest:
        head, _, rest = rest.partition(CALL_OPEN)
        body, _, rest = rest.partition(CALL_CLOSE)
        try:
            found.append(json.loads(body.strip()))
        except ValueError:
            continue
    if not found and text.strip().startswith("{"):
        try:
            obj = json.loads(text.strip())
        except ValueError:
            return []
        if isinstance(obj, dict) and "name" in obj:
            found.append(obj)
    return [c for c in found if isinstance(c, dict) and isinstance(c.get("name"), str)]
