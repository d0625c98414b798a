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
  record with no system prompt is byte for byte the reference recipe.) Bloom tokenizers ship no chat template;
  this is ours, and the eos after each answer is what separates turns.
- ``chat_template``: the tokenizer's own Jinja chat template (or one read from a file). Each assistant turn's
  label span is what rendering the conversation through that turn adds to rendering it up to the generation
  prompt: the answer plus the template's end-of-turn markup, so the model learns to stop.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..config import DataSection
from ..errors import UsageError
from .records import Conversation, Turn

TEMPLATE_FILE = "ia3_dist.json"
HUMAN_ASSISTANT = "human_assistant"
CHAT_TEMPLATE = "chat_template"
# A chat template file is Jinja text of a few KiB; anything far larger is not one.
MAX_TEMPLATE_FILE = 1 << 20

Segment = tuple[str, bool]


@dataclass
class Template:
    """The training text format (saved beside every adapter as ``ia3_dist.json``)."""

    kind: str = HUMAN_ASSISTANT
    """``human_assistant`` or ``chat_template``."""
    prompt_template: str = DataSection.prompt_template
    strip_prompt: bool = DataSection.strip_prompt
    response_prefix: str = DataSection.response_prefix
    append_eos: bool = DataSection.append_eos
    chat_template: str | None = None
    """The Jinja text for ``chat_template`` (the tokenizer's, or the file ``data.template`` named)."""

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
            text = getattr(tok, "chat_template", None)
            if not isinstance(text, str) or not text:
                raise UsageError("data.template chat_template: this tokenizer ships no chat template (Bloom's do "
                                 "not); use data.template=human_assistant or a path to a Jinja file")
            return cls(CHAT_TEMPLATE, chat_template=text, **base)
        p = Path(cfg.template).expanduser()
        if not p.is_file():
            raise UsageError(f"data.template {cfg.template}: not human_assistant, chat_template or a Jinja file")
        try:
            with open(p, "rb") as fh:
                raw = fh.read(MAX_TEMPLATE_FILE + 1)
            if len(raw) > MAX_TEMPLATE_FILE:
                raise UsageError(f"data.template {p}: larger than {MAX_TEMPLATE_FILE} bytes; not a chat template")
            text = raw.decode("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"data.template {p}: cannot read it ({e})") from None
        return cls(CHAT_TEMPLATE, chat_template=text, **base)

    # -- rendering ---------------------------------------------------------------------------------------------

    @property
    def add_special_tokens(self) -> bool:
        """``tok(text)`` as the reference recipe calls it; a chat template writes its own special tokens."""
        return self.kind == HUMAN_ASSISTANT

    def _turn_prompt(self, t: Turn, first: bool, system: str) -> str:
        prompt = self.prompt_template.format(instruction=t.instruction, input=t.input)
        if self.strip_prompt:
            prompt = prompt.strip()
        prompt += self.response_prefix
        return f"{system}\n\n{prompt}" if first and system else prompt

    def segments(self, conv: Conversation, tok: Any, train_on: str = "all") -> list[Segment]:
        """The conversation as ``(text, is_label)`` segments; labels on every assistant turn, or on the last one
        only (``train_on="last"``)."""
        last = len(conv.turns) - 1
        if self.kind == HUMAN_ASSISTANT:
            eos = tok.eos_token if self.append_eos else ""
            segs: list[Segment] = []
            for k, t in enumerate(conv.turns):
                segs.append((self._turn_prompt(t, k == 0, conv.system), False))
                segs.append((t.output + eos, train_on == "all" or k == last))
            return segs
        msgs = _messages(conv)
        segs, prev = [], ""
        for k in range(len(conv.turns)):
            upto_user = 2 * k + 1 + (1 if conv.system else 0)
            prompt = self._render(tok, msgs[:upto_user], generation_prompt=True)
            full = self._render(tok, msgs[:upto_user + 1], generation_prompt=False)
            if not (prompt.startswith(prev) and full.startswith(prompt)):
                raise UsageError(f"data.template: the chat template does not render a conversation as a prefix of "
                                 f"its continuation (turn {k + 1}), so assistant spans cannot be labelled; use a "
                                 f"prefix-stable template or data.template=human_assistant")
            segs.append((prompt[len(prev):], False))
            segs.append((full[len(prompt):], train_on == "all" or k == last))
            prev = full
        return segs

    def prompt_for(self, history: list[Turn], system: str, instruction: str, inp: str, tok: Any) -> str:
        """The text a model continues to answer ``instruction`` after ``history`` (inference: generate, chat)."""
        turns = [*history, Turn(instruction, inp, "")]
        if self.kind == HUMAN_ASSISTANT:
            segs = self.segments(Conversation(turns, system), tok)
            return "".join(text for text, _ in segs[:-1])
        msgs = _messages(Conversation(turns, system))[:-1]
        return self._render(tok, msgs, generation_prompt=True)

    def prompt(self, instruction: str, inp: str = "") -> str:
        """The human_assistant prompt of one turn (needs no tokenizer)."""
        return self._turn_prompt(Turn(instruction, inp, ""), True, "")

    def _render(self, tok: Any, msgs: list[dict[str, str]], generation_prompt: bool) -> str:
        try:
            return tok.apply_chat_template(msgs, chat_template=self.chat_template, tokenize=False,
                                           add_generation_prompt=generation_prompt)
        except Exception as e:  # jinja2 raises TemplateError subclasses and whatever the template itself raises
            raise UsageError(f"data.template: the chat template fails to render ({type(e).__name__}: "
                             f"{str(e)[:200]})") from None

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
            t = cls(**json.loads(raw.decode("utf-8")))
        except (OSError, ValueError, TypeError) as e:
            raise UsageError(f"{f}: unreadable prompt template ({e})") from None
        if t.kind not in (HUMAN_ASSISTANT, CHAT_TEMPLATE) or (t.kind == CHAT_TEMPLATE and not t.chat_template):
            raise UsageError(f"{f}: unknown template kind {t.kind!r}")
        return t


def _messages(conv: Conversation) -> list[dict[str, str]]:
    """OpenAI-style messages of a conversation; alpaca's input joins its instruction on a new line."""
    msgs = [{"role": "system", "content": conv.system}] if conv.system else []
    for t in conv.turns:
        msgs.append({"role": "user", "content": f"{t.instruction}\n{t.input}" if t.input else t.instruction})
        msgs.append({"role": "assistant", "content": t.output})
    return msgs
