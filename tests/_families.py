"""Tiny random models of each tested family besides Bloom, built once per test cache with ``save_pretrained``
(plain construction in the test process, never under ``deepspeed.zero.Init``) and loaded from disk by every test.
They share the demo's byte-level BPE tokenizer; Llama's and Qwen2's tokenizers get a chat template in their
family's format (with its markers as special tokens), as the real instruct models ship one; Mistral's and
GPT-NeoX's have none, so both inference paths are covered. Mistral's puts a BOS before every text it encodes, as
the real one (and Llama 2's) does."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

VERSION = 2  # 2: Mistral's tokenizer adds a BOS
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' "
          "+ m['content'] + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
# model_type: (chat template or None, its special tokens)
CHAT = {"llama": (LLAMA3, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
        "qwen2": (CHATML, ["<|im_start|>", "<|im_end|>"]), "mistral": (None, []), "gpt_neox": (None, [])}
FAMILY_TYPES = tuple(CHAT)
ADDS_BOS = {"mistral"}


def _config(model_type: str, tok: Any) -> Any:
    from transformers import AutoConfig

    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
           "vocab_size": len(tok), "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
           "max_position_embeddings": 512}
    if model_type == "gpt_neox":
        return AutoConfig.for_model("gpt_neox", intermediate_size=256, **ids)
    # GQA: 4 query heads share 2 key/value heads. Qwen2's q/k/v projections carry biases (its own default) and its
    # small members tie the LM head to the embeddings, as Qwen2.5-0.5B does.
    return AutoConfig.for_model(model_type, intermediate_size=128, num_key_value_heads=2,
                                tie_word_embeddings=model_type == "qwen2", **ids)


def build(model_type: str, tokenizer_dir: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    template, specials = CHAT[model_type]
    if specials:
        tok.add_special_tokens({"additional_special_tokens": specials})
    if template:
        tok.chat_template = template
    if model_type in ADDS_BOS:
        from tokenizers import processors

        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.bos_token_id)])
    torch.manual_seed(sum(map(ord, model_type)))
    model = AutoModelForCausalLM.from_config(_config(model_type, tok))
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    cfg = tmp / "tokenizer_config.json"
    tc = json.loads(cfg.read_text())
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"  # not Bloom's: the family's own tokenizer stands in here
    cfg.write_text(json.dumps(tc, ensure_ascii=False, indent=2))
    os.replace(tmp, out)


def ensure(root: Path, tokenizer_dir: Path) -> dict[str, Path]:
    """``{model_type: model dir}``, built once under ``root`` (concurrent sessions wait on a file lock)."""
    from ia3_dist.data.cache import file_lock

    base = root / f"families-v{VERSION}"
    out = {}
    with file_lock(root / f"families-v{VERSION}.lock"):
        for t in FAMILY_TYPES:
            if not (base / t / "config.json").exists():
                base.mkdir(parents=True, exist_ok=True)
                build(t, tokenizer_dir, base / t)
            out[t] = base / t
    return out
