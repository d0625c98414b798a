"""Loading a trained model for inference (adapter dir or merged dir) and generating with the training template."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data.template import Template
from ..errors import UsageError
from ..models.files import has_tokenizer_files
from ..models.load import DTYPES


def load_for_inference(path: str, base: str | None = None, dtype: str = "fp32") -> tuple[Any, Any, Template, bool]:
    """``(model, tokenizer, template, is_adapter)`` from an adapter dir (base from its adapter_config.json unless
    ``base`` is given) or a merged model dir."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = Path(path).expanduser()
    if not d.is_dir():
        raise UsageError(f"{path}: no such directory (give an adapter dir, e.g. runs/x/adapter, or a merged dir)")
    torch_dtype = DTYPES[dtype]
    is_adapter = (d / "adapter_config.json").is_file()
    if is_adapter:
        from peft import PeftModel

        base_path = base or json.loads((d / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base_path:
            raise UsageError(f"{d}/adapter_config.json names no base model; pass --base")
        try:
            model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch_dtype)
        except OSError as e:
            raise UsageError(f"base model {base_path}: cannot load it ({e}); pass --base") from None
        model = PeftModel.from_pretrained(model, str(d))
        tok_src = str(d) if has_tokenizer_files(d) else base_path
    elif (d / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch_dtype)
        tok_src = str(d)
    else:
        raise UsageError(f"{d}: neither an adapter dir (adapter_config.json) nor a model dir (config.json)")
    tok = AutoTokenizer.from_pretrained(tok_src)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model.eval(), tok, Template.load(d), is_adapter


@dataclass
class GenOptions:
    max_new_tokens: int = 128
    sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    seed: int = 0
    repetition_penalty: float = 1.0


def generate(model: Any, tok: Any, template: Template, requests: list[tuple[str, str]], opts: GenOptions,
             batch_size: int = 8) -> list[str]:
    """Responses to ``(instruction, input)`` requests, formatted with the training template."""
    torch.manual_seed(opts.seed)
    side = tok.padding_side
    tok.padding_side = "left"  # decoder-only generation continues from the right edge
    outs: list[str] = []
    try:
        for i in range(0, len(requests), batch_size):
            prompts = [template.prompt(ins, inp) for ins, inp in requests[i:i + batch_size]]
            enc = tok(prompts, return_tensors="pt", padding=True)
            kw: dict[str, Any] = {"max_new_tokens": opts.max_new_tokens, "do_sample": opts.sample,
                                  "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id,
                                  "repetition_penalty": opts.repetition_penalty}
            if opts.sample:
                kw.update(temperature=opts.temperature, top_p=opts.top_p, top_k=opts.top_k)
            with torch.no_grad():
                ids = model.generate(**enc, **kw)
            new = ids[:, enc["input_ids"].shape[1]:]
            outs += [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
    finally:
        tok.padding_side = side
    return outs
