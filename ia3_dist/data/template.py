"""How a conversation becomes text with labelled spans, and the copy of that format saved beside every adapter so
inference prompts match training.

A rendered conversation is a list of *segments* ``(text, is_label)``; each segment is tokenized on its own and the
ids are concatenated, which is exactly the reference recipe for one turn:
``tok(prompt).input_ids + tok(output + eos).input_ids`` with labels on the second part only.

Two kinds:
- ``human_assistant`` (default), the reference recipe's format, turn after turn::

      [system + "\\n\\n"] + strip("Human: " + instruction + "\\n" + input) + "\\n\\nAssistant: "  -> masked
      output + eos                                                                              -> labels
      strip("Human: " + next user message) + "\\n\\nAssistant: "                                    -> masked
      ...

  (``data.prompt_template``/``strip_prompt``/``response_prefix``/``append_eos`` shape each turn; a single-turn
  record with no system prompt is byte for byte the reference recipe.) A tokenizer that puts a BOS before every
  text it encodes (Llama's, Mistral's, Gemma's; Bloom's, Qwen2's and GPT-NeoX's add none) has it once, at the start
  of the conversation: taken literally, ``tok(output + eos)`` would start every answer with a labelled BOS, and
  the model would learn to answer with one. Bloom tokenizers ship no chat template;
  this is ours, and the eos after each answer is what separates turns.
- ``chat_template``: the tokenizer's own Jinja chat template (or one read from a file). Each assistant turn's
  label span is what rendering the conversation through that turn adds to rendering it up to the generation
  prompt: the answer plus the template's end-of-turn markup, so the model learns to stop.

A chat template is a program, and one saved in an adapter dir comes from strangers: it is rendered within a budget
of steps, seconds, characters and list items (:mod:`.chat_render`), so a template that loops for ever or asks for
gigabytes stops with a UsageError naming it.
"""

from __future__ import annotations

import json
import string
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ..config import DataSection
from ..config.schema import MAX_TEXT, PROMPT_DEFAULT, _check_template, show
from ..errors import UsageError
from .chat_render import RenderLimit, compile_chat, render_chat, special_tokens
from .records import Conversation, Turn
from .tools import calls_text, results_text, tools_text

TEMPLATE_FILE = "ia3_dist.json"
HUMAN_ASSISTANT = "human_assistant"
CHAT_TEMPLATE = "chat_template"
# A chat template file is Jinja text of a few KiB; anything far larger is not one.
MAX_TEMPLATE_FILE = 1 << 20
# Real chat templates (tool calling included) are under 20 KiB. The bound also bounds the work one loop iteration
# can do between two checks of the render budget.
MAX_CHAT_TEMPLATE = 128 << 10
# Labelling every turn of a conversation under a chat template renders it once per turn up to that turn (the
# template is a program: only rendering shows where a turn's text ends), so the work grows with the square of its
# turns (data.train_on=last renders it twice).
MAX_CHAT_TURNS = 256

Segment = tuple[str, bool]
BOS_START, BOS_EVERY_PIECE = "start", "every_piece"


@dataclass
class Template:
    """The training text format (saved beside every adapter as ``ia3_dist.json``)."""

    # Not a dataclass field (no annotation): where the template came from, for error messages; never saved.
    where = "data.template"

    kind: str = HUMAN_ASSISTANT
    """``human_assistant`` or ``chat_template``."""
    prompt_template: str = DataSection.prompt_template
    strip_prompt: bool = DataSection.strip_prompt
    response_prefix: str = DataSection.response_prefix
    append_eos: bool = DataSection.append_eos
    chat_template: str | None = None
    """The Jinja text for ``chat_template`` (the tokenizer's, or the file ``data.template`` named)."""
    bos: str = BOS_START
    """Where the special tokens the tokenizer puts before every text go under ``human_assistant`` (whose pieces
    are encoded apart): ``start``, once, before the conversation's first piece; ``every_piece``, before each piece
    (the recipe's calls taken literally; adapters saved before this field existed were trained so)."""

    @classmethod
    def of(cls, cfg: DataSection, tok: Any) -> Template:
        """The template ``data.template`` names, checked against the tokenizer (UsageError naming the key)."""
        base = {"prompt_template": cfg.prompt_template, "strip_prompt": cfg.strip_prompt,
                "response_prefix": cfg.response_prefix, "append_eos": cfg.append_eos}
        if cfg.template == HUMAN_ASSISTANT:
            if cfg.append_eos and tok.eos_token is None:
                raise UsageError("the tokenizer has no eos token; set data.append_eos=false or use a tokenizer "
                                 "with one")
            return cls(HUMAN_ASSISTANT, **base)
        if cfg.template == CHAT_TEMPLATE:
            text = tokenizer_template(tok, "data.template chat_template", "save the one to train with as a Jinja "
                                                                          "file and set data.template to its path")
            if not text:
                raise UsageError("data.template chat_template: this tokenizer ships no chat template (Bloom's do "
                                 "not); use data.template=human_assistant or a path to a Jinja file")
            return cls(CHAT_TEMPLATE, chat_template=text, **base).checked("data.template chat_template (the "
                                                                          "tokenizer's)")
        p = Path(cfg.template).expanduser()
        try:
            is_file = p.is_file()
        except OSError as e:  # EACCES on a directory of its path
            raise UsageError(f"data.template {cfg.template}: cannot access it ({e.strerror or e}); check the "
                             f"permissions of the directories on its path") from None
        if not is_file:
            raise UsageError(f"data.template {cfg.template}: not human_assistant, chat_template or a Jinja file")
        try:
            with open(p, "rb") as fh:
                raw = fh.read(MAX_TEMPLATE_FILE + 1)
            if len(raw) > MAX_TEMPLATE_FILE:
                raise UsageError(f"data.template {p}: larger than {MAX_TEMPLATE_FILE} bytes; not a chat template")
            text = raw.decode("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"data.template {p}: cannot read it ({e})") from None
        return cls(CHAT_TEMPLATE, chat_template=text, **base).checked(f"data.template {p}")

    def checked(self, where: str) -> Template:
        """``self``, its fields checked as a config's template is (types, plain format fields, lengths) and a chat
        template compiled; UsageError naming ``where`` otherwise. Sets :attr:`where` for later render errors."""
        types = {"kind": str, "prompt_template": str, "strip_prompt": bool, "response_prefix": str,
                 "append_eos": bool}
        for name, want in types.items():
            if not isinstance(getattr(self, name), want):
                raise UsageError(f"{where}: unusable prompt template ({name} must be a {want.__name__}, got "
                                 f"{type(getattr(self, name)).__name__})")
        if self.kind not in (HUMAN_ASSISTANT, CHAT_TEMPLATE):
            raise UsageError(f"{where}: unknown template kind {_show(self.kind)}")
        if self.bos not in (BOS_START, BOS_EVERY_PIECE):
            raise UsageError(f"{where}: unusable prompt template (bos must be {BOS_START!r} or "
                             f"{BOS_EVERY_PIECE!r}, got {_show(self.bos)})")
        try:
            _check_template("prompt_template", self.prompt_template)
        except UsageError as e:
            raise UsageError(f"{where}: unusable prompt template ({str(e).removeprefix(_CONFIG_KEY)})") from None
        if len(self.response_prefix) > MAX_TEXT:
            raise UsageError(f"{where}: unusable prompt template (response_prefix of {len(self.response_prefix)} "
                             f"characters; at most {MAX_TEXT})")
        if self.kind == CHAT_TEMPLATE or self.chat_template is not None:
            if not isinstance(self.chat_template, str) or not self.chat_template:
                raise UsageError(f"{where}: unusable chat template (chat_template must be non-empty Jinja text, "
                                 f"got {_show(self.chat_template)})")
            if len(self.chat_template) > MAX_CHAT_TEMPLATE:
                raise UsageError(f"{where}: a chat template of {len(self.chat_template)} characters; at most "
                                 f"{MAX_CHAT_TEMPLATE} (real ones are a few KiB)")
            try:
                compile_chat(self.chat_template)
            except Exception as e:  # TemplateSyntaxError, RecursionError (deep nesting), RenderLimit...
                raise UsageError(f"{where}: the chat template does not compile ({_one_line(e)})") from None
        self.where = where
        return self

    # -- rendering ---------------------------------------------------------------------------------------------

    @property
    def add_special_tokens(self) -> bool:
        """``tok(text)`` as the reference recipe calls it; a chat template writes its own special tokens."""
        return self.kind == HUMAN_ASSISTANT

    def piece_ids(self, ids: list[int], k: int, lead: tuple[int, ...]) -> list[int]:
        """The ids of piece ``k`` of a conversation as training has them, from ``tok(piece)`` (special tokens
        added) and the tokenizer's :func:`leading_added` ``lead``: after the first piece, without ``lead``."""
        if k and lead and self.bos == BOS_START and tuple(ids[:len(lead)]) == lead:
            return ids[len(lead):]
        return ids

    def _turn_prompt(self, t: Turn, first: bool, system: str) -> str:
        if t.results:  # the tools' answers stand where the user's message would
            prompt = results_text(t.results)
        else:
            if t.input and "input" not in {f[1] for f in string.Formatter().parse(self.prompt_template)}:
                # Formatted anyway, the input would vanish from the prompt: the model learns answers to questions
                # it was never shown the rest of.
                raise UsageError(f"data.prompt_template {show(self.prompt_template)} has no {{input}} field, and "
                                 f"this record has an input; add {{input}} where it belongs (the default is "
                                 f"{show(PROMPT_DEFAULT)}), or map no column to input")
            prompt = self.prompt_template.format(instruction=t.instruction, input=t.input)
        if self.strip_prompt:
            prompt = prompt.strip()
        prompt += self.response_prefix
        return f"{system}\n\n{prompt}" if first and system else prompt

    def segments(self, conv: Conversation, tok: Any, train_on: str = "all") -> list[Segment]:
        """The conversation as ``(text, is_label)`` segments; labels on every assistant turn (its text and tool
        calls), or on the last one only (``train_on="last"``); never on tool results nor on a turn of weight 0."""
        last = len(conv.turns) - 1
        if self.kind == HUMAN_ASSISTANT:
            thought = next((k for k, t in enumerate(conv.turns) if t.reasoning), None)
            if thought is not None:
                raise UsageError(f"{self.where} human_assistant: assistant turn {thought + 1} carries reasoning "
                                 f"(reasoning_content, thinking or reasoning), which this format has no place for: "
                                 f"the model would learn the answers without the reasoning that led to them; use "
                                 f"data.template=chat_template with a template that renders it (Qwen3's), or drop "
                                 f"the field")
            eos = tok.eos_token if self.append_eos else ""
            preamble = "\n\n".join(x for x in (conv.system, tools_text(conv.tools) if conv.tools else "") if x)
            segs: list[Segment] = []
            for k, t in enumerate(conv.turns):
                segs.append((self._turn_prompt(t, k == 0, preamble), False))
                answer = "\n".join(x for x in (t.output, calls_text(t.calls)) if x) if t.calls else t.output
                segs.append((answer + eos, t.train and (train_on == "all" or k == last)))
            return segs
        if len(conv.turns) > MAX_CHAT_TURNS and train_on == "all":
            raise UsageError(f"{self.where}: a conversation of {len(conv.turns)} turns; under a chat template a "
                             f"conversation may have at most {MAX_CHAT_TURNS} (each turn's labels come from "
                             f"rendering the conversation up to it, so the cost grows with the square of the "
                             f"turns); split it into shorter conversations, set data.train_on=last (the last "
                             f"answer: two renders) or use data.template=human_assistant")
        msgs, ends = _messages(conv)
        segs, prev = [], ""
        # Only the last answer labelled: the turns before it are the context the template renders when that answer
        # is due, in two renders. Templates that render earlier turns otherwise once the conversation goes on
        # (Qwen3's drops the reasoning of turns before the last question) label their conversations this way.
        turns = [last] if train_on == "last" else range(len(ends))
        for k in turns:
            prompt_end, answer_end = ends[k]
            prompt = self._render(tok, msgs[:prompt_end], True, conv.tools)
            full = self._render(tok, msgs[:answer_end], False, conv.tools)
            if not (prompt.startswith(prev) and full.startswith(prompt)):
                raise UsageError(f"{self.where}: the chat template does not render a conversation as a prefix of "
                                 f"its continuation (turn {k + 1}), so assistant spans cannot be labelled; set "
                                 f"data.train_on=last (each conversation's last answer, after the turns before it "
                                 f"as the template renders them then: what templates such as Qwen3's expect), use "
                                 f"a prefix-stable template, or data.template=human_assistant")
            answer = full[len(prompt):]
            t = conv.turns[k]
            for c in t.calls:
                if c["function"]["name"] not in answer:
                    raise UsageError(f"{self.where}: the chat template drops the assistant's tool calls (turn "
                                     f"{k + 1}'s call of {c['function']['name']!r} is not in what it renders), so "
                                     f"the model would learn an empty answer; use a template that renders "
                                     f"tool_calls or data.template=human_assistant")
            if t.reasoning and t.reasoning.strip() not in answer:
                raise UsageError(f"{self.where}: the chat template drops the assistant's reasoning (turn {k + 1}'s "
                                 f"reasoning_content is not in what it renders), so the model would learn the answer "
                                 f"without it; use a template that renders reasoning_content (Qwen3's), or drop "
                                 f"the field")
            segs.append((prompt[len(prev):], False))
            segs.append((answer, t.train and (train_on == "all" or k == last)))
            prev = full
        # In what the model is shown before it answers: an assistant turn calling the tool names it too, and the
        # schemas would count as shown where a template renders the calls but never the tools.
        shown = "".join(text for text, _ in segs[0::2])  # (prompt, answer) pairs: the prompt pieces
        missing = [t["function"]["name"] for t in conv.tools if t["function"]["name"] not in shown]
        if missing:
            raise UsageError(f"{self.where}: the chat template does not render the record's tools ({missing[0]!r} "
                             f"is not in the prompt the model is shown before it answers), so the model would call "
                             f"tools it was never shown; use a template that renders tools or "
                             f"data.template=human_assistant")
        return segs

    def prompt_for(self, history: list[Turn], system: str, instruction: str, inp: str, tok: Any) -> str:
        """The text a model continues to answer ``instruction`` after ``history``."""
        return self.prompt_of(Conversation([*history, Turn(instruction, inp, "")], system), tok)

    def prompt_of(self, conv: Conversation, tok: Any) -> str:
        """The text a model continues to answer the last turn of ``conv`` (its user message or tool results; its
        answer is ignored), with the conversation's tools offered as in training (inference: generate, chat)."""
        return "".join(self.prompt_pieces(conv, tok))

    def prompt_pieces(self, conv: Conversation, tok: Any) -> list[str]:
        """:meth:`prompt_of` in the pieces training encodes apart: ``human_assistant`` each turn's prompt and
        answer (the reference recipe's ``tok(prompt) + tok(output + eos)``, turn after turn), a chat template the
        whole text."""
        last = conv.turns[-1]
        conv = Conversation([*conv.turns[:-1], Turn(last.instruction, last.input, "", results=last.results)],
                            conv.system, conv.tools)
        if self.kind == HUMAN_ASSISTANT:
            return [text for text, _ in self.segments(conv, tok)[:-1]]
        msgs, ends = _messages(conv)
        return [self._render(tok, msgs[:ends[-1][0]], True, conv.tools)]

    def prompt(self, instruction: str, inp: str = "") -> str:
        """The human_assistant prompt of one turn (needs no tokenizer)."""
        return self._turn_prompt(Turn(instruction, inp, ""), True, "")

    def _render(self, tok: Any, msgs: list[dict[str, Any]], generation_prompt: bool,
                tools: tuple[dict[str, Any], ...] = ()) -> str:
        if not isinstance(self.chat_template, str) or len(self.chat_template) > MAX_CHAT_TEMPLATE:
            self.checked(self.where)
        try:
            return render_chat(self.chat_template, msgs, generation_prompt, special_tokens(tok), list(tools) or None)
        except RenderLimit as e:
            raise UsageError(f"{self.where}: the chat template was stopped: {e}") from None
        except Exception as e:  # jinja2 raises TemplateError subclasses and whatever the template itself raises
            raise UsageError(f"{self.where}: the chat template fails to render ({_one_line(e)})") from None

    def jinja(self, tok: Any) -> str:
        """This template as a Jinja chat template, for tools that render prompts themselves (transformers'
        ``apply_chat_template``, vLLM, TGI) from an exported model: a chat template as it is; ``human_assistant``
        written out, the same text as :meth:`prompt_of` for any system, user and assistant messages (each user
        turn ends with the response prefix, so the generation prompt is already there), with the special tokens
        ``tok(piece)`` puts before a piece (Llama's BOS) as text where training had them, since those tools encode
        a rendered prompt without adding any. Tools and tool calls, which it cannot write as training did, raise."""
        if self.kind == CHAT_TEMPLATE:
            assert self.chat_template is not None
            return self.chat_template
        lead = leading_added(tok)
        bos = "".join(tok.convert_ids_to_tokens(list(lead))) if lead else ""

        def lit(text: str) -> str:
            # A Jinja string literal: its lexer reads backslash escapes as Python's unicode-escape does.
            return json.dumps(text, ensure_ascii=False)

        parts = []
        for literal, name, _, _ in string.Formatter().parse(self.prompt_template):
            if literal:
                parts.append(lit(literal))
            if name == "instruction":
                parts.append("m.content")
            # {input}: a chat message has none (formatted as "", as training formats a record without one).
        prompt = " ~ ".join(parts) or lit("")
        first_bos = lit(bos)
        piece_bos = lit(bos if self.bos == BOS_EVERY_PIECE else "")
        eos = lit(tok.eos_token if self.append_eos and tok.eos_token else "")
        refuse = "{{- raise_exception(%s) -}}"
        return "".join([
            "{#- ia3-dist human_assistant template, written by `ia3-dist export` -#}",
            "{%- if tools -%}" + refuse % lit("this model was trained with tools written its own way "
                                                "(ia3-dist human_assistant); prompt it with `ia3-dist generate`")
            + "{%- endif -%}",
            "{%- set ns = namespace(system='', first=true) -%}",
            "{%- for m in messages -%}",
            "{%- if m.content is not string or m.tool_calls is defined and m.tool_calls -%}",
            refuse % lit("ia3-dist human_assistant: each message needs text content (no tool calls); prompt a "
                         "model trained with tools with `ia3-dist generate`"),
            "{%- elif m.role == 'system' and loop.first -%}{%- set ns.system = m.content -%}",
            "{%- elif m.role == 'user' -%}",
            f"{{%- set p = {prompt} -%}}",
            "{%- set p = p | trim -%}" if self.strip_prompt else "",
            f"{{%- set p = p ~ {lit(self.response_prefix)} -%}}",
            "{%- if ns.first and ns.system -%}{%- set p = ns.system ~ '\n\n' ~ p -%}{%- endif -%}",
            f"{{{{- ({first_bos} if ns.first else {piece_bos}) ~ p -}}}}",
            "{%- set ns.first = false -%}",
            f"{{%- elif m.role == 'assistant' and not ns.first -%}}{{{{- {piece_bos} ~ m.content ~ {eos} -}}}}",
            "{%- else -%}",
            refuse % lit("ia3-dist human_assistant: roles are an optional first system message, then user and "
                         "assistant turns starting with user"),
            "{%- endif -%}",
            "{%- endfor -%}",
        ])

    # -- persistence -------------------------------------------------------------------------------------------

    def save(self, out_dir: Path) -> None:
        (out_dir / TEMPLATE_FILE).write_text(json.dumps(asdict(self), ensure_ascii=False, indent=1),
                                             encoding="utf-8")

    @classmethod
    def load(cls, d: Path) -> Template:
        """The template saved in ``d``; the default (the reference recipe's) when there is none."""
        f = d / TEMPLATE_FILE
        if not f.is_file():
            return cls()
        try:
            with open(f, "rb") as fh:
                raw = fh.read(MAX_TEMPLATE_FILE + 1)
            if len(raw) > MAX_TEMPLATE_FILE:
                raise ValueError(f"larger than {MAX_TEMPLATE_FILE} bytes")
            obj = json.loads(raw.decode("utf-8"))
            if not isinstance(obj, dict):
                raise ValueError(f"expected a JSON object, got a {type(obj).__name__}")
            unknown = sorted(set(obj) - {fl.name for fl in fields(cls)})
            if unknown:
                raise ValueError(f"unknown key(s) {_show(unknown)}")
            obj.setdefault("bos", BOS_EVERY_PIECE)  # saved before the key existed: trained with a BOS per piece
            t = cls(**obj)
        except (OSError, ValueError, TypeError, RecursionError) as e:
            raise UsageError(f"{f}: unreadable prompt template ({_one_line(e)})") from None
        return t.checked(str(f))


def tokenizer_template(tok: Any, where: str, fix: str) -> str | None:
    """The tokenizer's chat template, None if it ships none. Of several named ones (chat_template.jinja beside
    additional_chat_templates/, e.g. "default" and "tool_use") the one transformers renders with, "default"; a
    UsageError naming ``where``, the names and ``fix`` when there is none of that name."""
    text = getattr(tok, "chat_template", None)
    if isinstance(text, dict) and text:
        if not isinstance(text.get("default"), str):
            raise UsageError(f"{where}: this tokenizer ships named chat templates "
                             f"({', '.join(show(k) for k in sorted(map(str, text)))}) and none called 'default'; "
                             f"{fix}")
        text = text["default"]
    return text if isinstance(text, str) and text else None


def leading_added(tok: Any) -> tuple[int, ...]:
    """The special-token ids ``tok(text)`` puts before every text's own (Llama's and Mistral's BOS); () for a
    tokenizer that adds none there (Bloom, Qwen2, GPT-NeoX)."""
    probe = "Human: hello"
    full = list(tok(probe)["input_ids"])
    bare = list(tok(probe, add_special_tokens=False)["input_ids"])
    for i in range(len(full) - len(bare) + 1):
        if full[i:i + len(bare)] == bare:
            return tuple(full[:i])
    return ()


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"[:300]


_CONFIG_KEY = "config key 'prompt_template': "


def _show(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 80 else r[:77] + "..."


def _messages(conv: Conversation) -> tuple[list[dict[str, Any]], list[tuple[int, int]]]:
    """OpenAI-style messages of a conversation (as transformers' chat templates take them: tool calls with object
    arguments, ``role: tool`` results) and, per turn, where its prompt side and its answer end in them; alpaca's
    input joins its instruction on a new line."""
    msgs: list[dict[str, Any]] = [{"role": "system", "content": conv.system}] if conv.system else []
    ends = []
    for t in conv.turns:
        if t.results:
            msgs += [{"role": "tool", **r} for r in t.results]
        else:
            # Its non-empty parts on lines of their own, as LLaMA-Factory joins them (an empty instruction with an
            # input is the input alone, not a leading newline).
            msgs.append({"role": "user", "content": "\n".join(x for x in (t.instruction, t.input) if x)})
        prompt_end = len(msgs)
        answer: dict[str, Any] = {"role": "assistant", "content": t.output}
        if t.reasoning:
            # Under both of the names transformers passes it (gpt-oss's template reads "thinking").
            answer.update(reasoning_content=t.reasoning, thinking=t.reasoning)
        if t.calls:
            answer["tool_calls"] = [dict(c) for c in t.calls]
        msgs.append(answer)
        ends.append((prompt_end, len(msgs)))
    return msgs, ends
