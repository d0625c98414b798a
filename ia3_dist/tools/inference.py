"""Loading a trained model for inference (adapter dir or merged dir) and generating with the training template."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch

from ..data.records import Conversation, Turn
from ..data.template import CHAT_TEMPLATE, TEMPLATE_FILE, Template
from ..errors import UsageError
from ..models.files import (
    check_model_dir,
    check_vocab,
    check_weight_file,
    error_line,
    has_tokenizer_files,
    looks_local,
    read_small_json,
)
from ..models.load import DTYPES

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # PEFT's order of preference
# Config fields that bound a model's positions (absolute or rotary embeddings), in the order they are tried.
CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "seq_length", "max_sequence_length", "n_ctx")
# For a model with no position limit (Bloom's ALiBi) and a tokenizer with none either: a prompt past this costs
# attention memory quadratic in its length for no gain, since no such model was trained on longer text.
DEFAULT_CONTEXT = 2048
# tokenizers without a limit report model_max_length as 1e30; anything past this is such a placeholder.
MAX_SANE_CONTEXT = 1 << 20
# One prompt line, and all prompt lines of a file or stdin together: lines are read with a bounded readline, so a
# stream with no newline (/dev/zero) fails fast instead of filling memory.
MAX_PROMPT_CHARS = 16 << 20
MAX_PROMPTS_CHARS = 1 << 30


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def read_adapter_config(d: Path) -> dict[str, Any]:
    """The adapter dir's adapter_config.json, checked for what PEFT and the base lookup need (UsageError naming the
    file otherwise, not a KeyError from inside PEFT)."""
    from peft import PeftType

    f = d / ADAPTER_CONFIG
    cfg = read_small_json(f, "adapter config")
    if not isinstance(cfg, dict):
        raise UsageError(f"{f}: expected a JSON object (PEFT's adapter config), got a {type(cfg).__name__}; "
                         f"re-save the adapter")
    peft_type = cfg.get("peft_type")
    if peft_type not in {t.value for t in PeftType}:
        raise UsageError(f"{f}: 'peft_type' is {_short(peft_type)}, not a PEFT adapter type such as \"IA3\"; "
                         f"re-save the adapter")
    base = cfg.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise UsageError(f"{f}: 'base_model_name_or_path' must be a string, got {type(base).__name__}; fix it or "
                         f"pass --base")
    return cfg


def _check_local_model(path: str, what: str) -> None:
    if looks_local(path):
        check_model_dir(path, what)


def _from_pretrained(path: str, dtype: torch.dtype, what: str) -> Any:
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except Exception as e:  # transformers raises many types for bad dirs and hub names; all mean "cannot load it"
        raise UsageError(f"{what} {path}: cannot load it ({error_line(e)})") from None


def load_for_inference(path: str, base: str | None = None, dtype: str = "fp32") -> tuple[Any, Any, Template, bool]:
    """``(model, tokenizer, template, is_adapter)`` from an adapter dir (base from its adapter_config.json unless
    ``base`` is given) or a merged model dir. The template is the one saved beside the weights (training's), else
    :func:`default_template`. Every file is checked before it is loaded: bad input is a UsageError naming the
    file."""
    from transformers import AutoTokenizer

    d = Path(path).expanduser()
    if not d.is_dir():
        raise UsageError(f"{path}: no such directory (give an adapter dir, e.g. runs/x/adapter, or a merged dir)")
    torch_dtype = DTYPES[dtype]
    is_adapter = (d / ADAPTER_CONFIG).is_file()
    template = _load_template(d)
    if is_adapter:
        from peft import PeftModel

        cfg = read_adapter_config(d)
        base_path = base or cfg.get("base_model_name_or_path")
        if not base_path:
            raise UsageError(f"{d / ADAPTER_CONFIG} names no base model; pass --base")
        weights = next((d / w for w in ADAPTER_WEIGHTS if (d / w).is_file()), None)
        if weights is None:
            raise UsageError(f"{d}: no adapter weights ({' or '.join(ADAPTER_WEIGHTS)}); the adapter was not saved "
                             f"completely")
        check_weight_file(weights)
        what = "base model" + ("" if base else f" (from {d / ADAPTER_CONFIG}; --base overrides it)")
        _check_local_model(base_path, what)
        model = _from_pretrained(base_path, torch_dtype, what)
        try:
            model = PeftModel.from_pretrained(model, str(d))
        except Exception as e:  # PEFT raises many types (KeyError, TypeError, ValueError...) for one cause
            raise UsageError(f"{d}: cannot load the adapter onto {base_path} ({error_line(e)}); was it trained on "
                             f"this base model?") from None
        tok_src = str(d) if has_tokenizer_files(d) else base_path
    elif (d / "config.json").is_file():
        check_model_dir(str(d), "merged model")
        model = _from_pretrained(str(d), torch_dtype, "merged model")
        tok_src = str(d)
    else:
        raise UsageError(f"{d}: neither an adapter dir (adapter_config.json) nor a model dir (config.json)")
    try:
        tok = AutoTokenizer.from_pretrained(tok_src)
    except Exception as e:  # tokenizers raise many types for corrupt files
        raise UsageError(f"tokenizer {tok_src}: cannot load it ({error_line(e)})") from None
    check_vocab(tok, model.config, f"tokenizer {tok_src}")
    if not (d / TEMPLATE_FILE).is_file():
        template = default_template(tok)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise UsageError(f"tokenizer {tok_src}: no pad or eos token, so prompts cannot be batched; add an eos "
                             f"token to its special_tokens_map.json")
        tok.pad_token = tok.eos_token
    return model.eval(), tok, template, is_adapter


def default_template(tok: Any) -> Template:
    """The format for a model or adapter that saved none (not trained by ia3-dist, or a plain hub model): the
    tokenizer's own chat template when it ships one (Llama 3, Qwen2.5, Mistral instruct models), the model's
    native format; else the reference recipe's ``Human: ... Assistant:``."""
    text = getattr(tok, "chat_template", None)
    if isinstance(text, str) and text:
        return Template(CHAT_TEMPLATE, chat_template=text)
    return Template()


def _load_template(d: Path) -> Template:
    """The saved template, tried once so a broken one fails here naming its file, not mid-generation."""
    t = Template.load(d)
    try:
        t.prompt("", "")
        if not isinstance(t.response_prefix, str):
            raise TypeError(f"response_prefix is a {type(t.response_prefix).__name__}")
    except Exception as e:  # str.format raises KeyError/IndexError/ValueError/AttributeError for bad templates
        raise UsageError(f"{d / TEMPLATE_FILE}: unusable prompt template ({error_line(e)}); fields may use only "
                         f"{{instruction}} and {{input}}") from None
    return t


def context_limit(model: Any, tok: Any) -> tuple[int, bool]:
    """``(tokens, hard)``: the model's position limit from its config, else (no limit, e.g. ALiBi) the tokenizer's
    ``model_max_length`` when it is a real one, else :data:`DEFAULT_CONTEXT`. ``hard`` when it came from the
    config: positions past it do not exist."""
    cfg = getattr(model, "config", None)
    for name in CONTEXT_FIELDS:
        v = getattr(cfg, name, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v, True
    m = getattr(tok, "model_max_length", None)
    if isinstance(m, int) and 0 < m <= MAX_SANE_CONTEXT:
        return m, False
    return DEFAULT_CONTEXT, False


def prompt_budget(model: Any, tok: Any, max_new_tokens: int) -> tuple[int, int]:
    """``(prompt tokens, context)``: how many prompt tokens fit beside ``max_new_tokens`` new ones."""
    ctx, hard = context_limit(model, tok)
    budget = ctx - max_new_tokens
    if hard and budget < 1:
        raise UsageError(f"--max-new-tokens {max_new_tokens} leaves no room for the prompt in the model's context "
                         f"of {ctx} tokens; use at most {ctx - 1}")
    # With no hard limit a long generation may run past ctx; the prompt still keeps a useful share of it.
    return (budget if hard else max(budget, ctx // 2)), ctx


def read_prompt_lines(fh: TextIO, src: str) -> list[tuple[int, str]]:
    """``(line number, line)`` of each non-blank line of a prompts stream, read a bounded line at a time;
    UsageError naming ``src`` and the line for an over-long line, undecodable text or a read error."""
    out: list[tuple[int, str]] = []
    n = total = 0
    while True:
        try:
            line = fh.readline(MAX_PROMPT_CHARS + 1)
        except UnicodeDecodeError as e:
            raise UsageError(f"{src}:{n + 1}: not UTF-8 ({e.reason}); re-encode it as UTF-8") from None
        except OSError as e:
            raise UsageError(f"{src}: cannot read it ({e.strerror or e})") from None
        if not line:
            return out
        n += 1
        if len(line) > MAX_PROMPT_CHARS and not line.endswith(("\n", "\r")):
            raise UsageError(f"{src}:{n}: line longer than {MAX_PROMPT_CHARS} characters, the limit for one prompt "
                             f"(prompts are one per line)")
        total += len(line)
        if total > MAX_PROMPTS_CHARS:
            raise UsageError(f"{src}: more than {MAX_PROMPTS_CHARS} characters of prompts; split it into smaller "
                             f"files")
        if line.strip():
            out.append((n, line))


@dataclass
class GenOptions:
    max_new_tokens: int = 128
    sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    seed: int = 0
    repetition_penalty: float = 1.0


def _n_truncated(tok: Any, prompts: list[str], enc: Any, budget: int) -> int:
    """How many of ``prompts`` the tokenizer cut: a fast tokenizer records the overflow, a slow one is asked
    again (tokenizing a megabyte prompt takes seconds; twice only where there is no other way)."""
    encodings = getattr(enc, "encodings", None)
    if encodings is not None:
        return sum(bool(e.overflowing) for e in encodings)
    return sum(len(ids) > budget for ids in tok(prompts)["input_ids"])


def generate(model: Any, tok: Any, template: Template, requests: list[Conversation], opts: GenOptions,
             batch_size: int = 8) -> list[str]:
    """The answer to the last turn of each conversation (its output is ignored), formatted with the training
    template after the earlier turns. A prompt longer than the model's context (minus ``max_new_tokens``) keeps its
    last tokens, where the response prefix is, and stderr says so once per call."""
    torch.manual_seed(opts.seed)
    budget, ctx = prompt_budget(model, tok, opts.max_new_tokens)
    side, trunc_side = tok.padding_side, tok.truncation_side
    tok.padding_side = "left"  # decoder-only generation continues from the right edge
    tok.truncation_side = "left"  # the response prefix ends the prompt; the model must see it
    outs: list[str] = []
    cut = 0
    try:
        for i in range(0, len(requests), batch_size):
            prompts = [template.prompt_for(c.turns[:-1], c.system, c.turns[-1].instruction, c.turns[-1].input, tok)
                       for c in requests[i:i + batch_size]]
            enc = tok(prompts, return_tensors="pt", padding=True, truncation=True, max_length=budget,
                      add_special_tokens=template.add_special_tokens)
            cut += _n_truncated(tok, prompts, enc, budget)
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
        tok.padding_side, tok.truncation_side = side, trunc_side
    if cut:
        print(f"note: {cut} prompt(s) longer than {budget} tokens were cut to their last {budget} (the context of "
              f"{ctx} tokens less --max-new-tokens {opts.max_new_tokens})", file=sys.stderr, flush=True)
    return outs


def _text(v: Any, where: str, what: str) -> str:
    if not isinstance(v, str):
        raise UsageError(f"{where}: {what} must be a string, got {type(v).__name__}")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:  # undecodable argv bytes or a JSON \ud800 escape; tokenizers reject them
        raise UsageError(f"{where}: not valid Unicode text (undecodable bytes or an unpaired \\uD800-\\uDFFF "
                         f"escape)") from None
    return v


ROLE_ALIASES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}


def _from_messages(msgs: Any, where: str, role_key: str, content_key: str) -> Conversation:
    """A conversation that ends with the user's turn to answer: [system], user, assistant, ..., user."""
    if not isinstance(msgs, list) or not msgs:
        raise UsageError(f"{where}: expected a non-empty list of messages")
    system = ""
    turns: list[Turn] = []
    pending: str | None = None
    for k, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise UsageError(f"{where}: message {k} is not an object")
        role = ROLE_ALIASES.get(m.get(role_key))  # type: ignore[arg-type]
        content = _text(m.get(content_key), where, f"message {k} {content_key}")
        if role is None:
            raise UsageError(f"{where}: message {k} has role {m.get(role_key)!r}; use system, user or assistant")
        if role == "system" and k == 0:
            system = content
        elif role == "user" and pending is None:
            pending = content
        elif role == "assistant" and pending is not None:
            turns.append(Turn(pending, "", content))
            pending = None
        else:
            raise UsageError(f"{where}: message {k} ({role}) is out of order; messages alternate user and "
                             f"assistant after an optional system message")
    if pending is None:
        raise UsageError(f"{where}: the last message must be the user's (the one to answer)")
    return Conversation([*turns, Turn(pending, "", "")], system)


def parse_request(line: str, where: str) -> Conversation:
    """A prompt line: plain text, or JSON as the training data spells it: ``{"instruction", "input", "system",
    "history"}``, ``{"messages": [{role, content}...]}`` or ``{"conversations": [{from, value}...]}``, ending with
    the user's turn to answer."""
    s = line.strip()
    if not s.startswith("{"):
        return Conversation([Turn(_text(s, where, "the prompt"), "", "")])
    try:
        obj = json.loads(s)
    except json.JSONDecodeError as e:
        raise UsageError(f"{where}: invalid JSON ({e.msg})") from None
    except ValueError as e:  # an integer literal past Python's digit limit
        raise UsageError(f"{where}: invalid JSON ({e})") from None
    except RecursionError:
        raise UsageError(f"{where}: invalid JSON (nested too deeply)") from None
    if "messages" in obj:
        return _from_messages(obj["messages"], where, "role", "content")
    if "conversations" in obj:
        conv = _from_messages(obj["conversations"], where, "from", "value")
        if "system" in obj:
            conv.system = _text(obj["system"], where, "system")
        return conv
    if "instruction" not in obj:
        raise UsageError(f"{where}: a JSON prompt needs 'instruction' (and optional 'input', 'system', 'history'), "
                         f"'messages' or 'conversations'")
    history = obj.get("history", [])
    if not isinstance(history, list) or not all(isinstance(h, list) and len(h) == 2 for h in history):
        raise UsageError(f"{where}: history must be a list of [user, assistant] pairs")
    turns = [Turn(_text(u, where, "history"), "", _text(a, where, "history")) for u, a in history]
    turns.append(Turn(_text(obj["instruction"], where, "instruction"), _text(obj.get("input", ""), where, "input"),
                      ""))
    return Conversation(turns, _text(obj.get("system", ""), where, "system"))
