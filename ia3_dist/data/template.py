"""The prompt format: how a record becomes the prompt the model continues after (the reference recipe's
``"\\n".join(["Human: " + instruction, input]).strip() + "\\n\\nAssistant: "`` by default), and the copy of it
saved beside every adapter so inference prompts match training."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ..config import DataSection
from ..errors import UsageError

TEMPLATE_FILE = "ia3_dist.json"


def build_prompt(cfg: DataSection, instruction: str, inp: str) -> str:
    prompt = cfg.prompt_template.format(instruction=instruction, input=inp)
    if cfg.strip_prompt:
        prompt = prompt.strip()
    return prompt + cfg.response_prefix


@dataclass
class Template:
    """The training prompt format, saved beside every adapter so inference prompts match training."""

    prompt_template: str = DataSection.prompt_template
    strip_prompt: bool = DataSection.strip_prompt
    response_prefix: str = DataSection.response_prefix

    @classmethod
    def of(cls, cfg: DataSection) -> Template:
        return cls(cfg.prompt_template, cfg.strip_prompt, cfg.response_prefix)

    def prompt(self, instruction: str, inp: str = "") -> str:
        return build_prompt(DataSection(prompt_template=self.prompt_template, strip_prompt=self.strip_prompt,
                                        response_prefix=self.response_prefix), instruction, inp)

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
            return cls(**json.loads(f.read_text(encoding="utf-8")))
        except (ValueError, TypeError) as e:
            raise UsageError(f"{f}: unreadable prompt template ({e})") from None
