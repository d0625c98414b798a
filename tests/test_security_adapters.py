"""Security round 2, part A: an adapter dir (what ``generate``, ``chat`` and ``export`` read) comes from strangers.
Each class of hostile content, with the input that reproduced it and its neighbours:

1. custom code named by a tokenizer or model config (``auto_map``) is never run: refused with one line, or loaded
   with the built-in class; a "run the custom code? [y/N]" question can never be answered from stdin;
2. templates saved in it (``ia3_dist.json``, chat templates, tokenizer chat templates) get the config's checks,
   and rendering a chat template is bounded in steps, seconds, characters and items;
3. ``adapter_config.json``: regexes that backtrack, foreign adapter types, weights that match no module;
4. cost: a 15.7M-character prompt is cut before it is tokenized; a 20,000-turn conversation under a chat template
   is refused at once instead of labelled in quadratic time.

Every refusal is exit 2 with one line and no traceback, in bounded time and memory, and creates nothing."""

from __future__ import annotations

import ast
import io
import json
import os
import shutil
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from _util import deadline, measured_cli

from ia3_dist.cli import main
from ia3_dist.config import DataSection
from ia3_dist.data.chat_render import RenderLimit, render_chat, special_tokens
from ia3_dist.data.records import Conversation, Records, Turn
from ia3_dist.data.template import MAX_CHAT_TURNS, Template
from ia3_dist.data.tokenize import tokenize
from ia3_dist.errors import UsageError
from ia3_dist.models.load import no_code_prompt
from ia3_dist.tools import inference

ROOT = Path(__file__).resolve().parents[1]
EVIL_PY = """import pathlib
pathlib.Path({marker!r}).write_text("custom code ran")
from transformers import PreTrainedTokenizerFast, PretrainedConfig
class EvilTokenizer(PreTrainedTokenizerFast):
    pass
class EvilConfig(PretrainedConfig):
    model_type = "evil"
"""
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Written after Qwen2.5/Qwen3's templates: namespace state, a reversed scan, tools, tojson, string methods.
QWEN_LIKE = """{%- if tools %}
    {{- '<|im_start|>system\\n' + (messages[0].content if messages[0].role == 'system' else 'You are helpful.') }}
    {%- for tool in tools %}{{- '\\n' + tool | tojson }}{%- endfor %}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and not message.content.startswith('<tool_response>') %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.role == "user" or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content | trim + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- if '</think>' in content %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {{- '<|im_start|>assistant\\n<think>\\n</think>\\n\\n' + content }}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}"""
MISC = ("{% macro r(m) %}[{{ m.role }}:{{ m.content|replace('a', 'b') }}]{% endmacro %}"
        "{% for m in messages if m.role != 'system' %}{% generation %}{{ r(m) }}{% endgeneration %}"
        "{{ loop.index }}{{ loop.last }}{% else %}none{% endfor %}{% set x %}{{ messages|length }}{% endset %}{{ x }}"
        "{{ messages|map(attribute='content')|join(', ') }}{{ '%s-%d' % ('x', 3) }}{{ '{}!'.format('y') }}"
        "{{ messages|selectattr('role', 'equalto', 'user')|list|length }}{{ dict(a=1)|tojson }}{{ bos_token }}"
        "{{ 'ab'|center(6) }}{{ 'a\nb'|indent(2, true) }}{{ raise_exception('no') if false }}"
        "{{ strftime_now('%Y')|length }}")
MSGS = [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "<think>x</think>\n你好！"}, {"role": "user", "content": "再见 a"}]

# Chat-template bombs: each asked for gigabytes or hours from the renderer (the first two are the review's).
BOMBS = {
    "nested-range": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "str-times": "{{ 'x' * 20000000 }}",
    "list-times": "{{ ([('x' * 1000000)] * 100000)|join }}",
    "namespace-doubling": ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
                           "{% endfor %}{{ ns.s }}"),
    "list-accumulation": ("{% set ns = namespace(l=[]) %}{% for i in range(100000) %}"
                          "{% set ns.l = ns.l + ['x' * 1000000] %}{% endfor %}"),
    "block-capture": "{% set x %}{% for i in range(100000) %}" + "y" * 10000 + "{% endfor %}{% endset %}",
    "branching-macro": ("{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}"
                        "{{ f(60) }}"),
    "center": "{{ 'x'|center(3000000000) }}",
    "ljust": "{{ 'x'.ljust(3000000000) }}",
    "str-format-width": "{{ '{:>3000000000}'.format('x') }}",
    "printf-width": "{{ '%3000000000s' % 'x' }}",
    "replace-empty": "{{ ('x' * 1000000)|replace('', 'yyyyyyyy') }}",
    "big-power": "{{ 7 ** 1000000000 }}",
    "to-bytes": "{{ (1).to_bytes(3000000000, 'big') }}",
    "batch-fill": "{{ range(10)|batch(3000000000, 'x')|list }}",
    "loop-of-joins": "{% for i in range(100000) %}{{ (range(100000)|list)|join }}{% endfor %}",
    "recursive-loop": "{% for x in [[1]] recursive %}{{ loop(x) }}{% endfor %}",
    "lipsum": "{{ lipsum(1000000000) }}",
}


def _run(args: list[str], capsys: pytest.CaptureFixture, stdin: str | None = None,
         monkeypatch: pytest.MonkeyPatch | None = None) -> tuple[int, str, str]:
    if stdin is not None and monkeypatch is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    rc = main(args)
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return rc, out, err


def _refused(rc: int, err: str, *needles: str) -> None:
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1, err
    for n in needles:
        assert n in err, err


@pytest.fixture(scope="module")
def adapter(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An IA3 adapter of the tiny model as training writes it: PEFT files, tokenizer files, ia3_dist.json."""
    from peft import IA3Config, get_peft_model
    from transformers import AutoModelForCausalLM

    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_model)),
                        IA3Config(task_type="CAUSAL_LM", target_modules=["query_key_value", "dense_4h_to_h"],
                                  feedforward_modules=["dense_4h_to_h"]))
    d = tmp_path_factory.mktemp("adapter") / "adapter"
    pm.save_pretrained(str(d))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model / f, d / f)
    Template().save(d)
    return d


def _copy(src: Path, dst: Path, config: dict[str, Any] | None = None) -> Path:
    shutil.copytree(src, dst)
    if config is not None:
        c = json.loads((dst / "adapter_config.json").read_text())
        c.update(config)
        (dst / "adapter_config.json").write_text(json.dumps({k: v for k, v in c.items() if v is not ...}))
    return dst


@pytest.mark.parametrize("where, name, make", [
    ("adapter", "tokenizer.json", "fifo"),
    ("adapter", "tokenizer_config.json", "fifo"),
    ("adapter", "special_tokens_map.json", "fifo"),
    ("adapter", "tokenizer.json", "dangling"),
    ("base", "tokenizer.json", "fifo"),
    ("base", "config.json", "fifo"),
    ("merged", "tokenizer_config.json", "fifo"),
])
def test_a_fifo_or_dangling_link_in_a_dir_is_refused_before_any_load(where: str, name: str, make: str,
                                                                    adapter: Path, tiny_model: Path, tmp_path: Path,
                                                                    capsys) -> None:
    """A FIFO with no writer named like a tokenizer or config file would block the library loader that opens it
    for ever; a dangling link fails there with a traceback. Either is exit 2 naming it, before anything loads."""
    if where == "merged":
        d = shutil.copytree(tiny_model, tmp_path / "merged")
        args = ["generate", "--adapter", str(d), "x"]
    elif where == "base":
        d = shutil.copytree(tiny_model, tmp_path / "base")
        ad = _copy(adapter, tmp_path / "ad")
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (ad / f).unlink()  # the tokenizer then comes from the base
        args = ["generate", "--adapter", str(ad), "--base", str(d), "x"]
    else:
        d = _copy(adapter, tmp_path / "ad")
        args = ["generate", "--adapter", str(d), "x"]
    f = d / name
    f.unlink(missing_ok=True)
    if make == "fifo":
        os.mkfifo(f)
    else:
        f.symlink_to(tmp_path / "nowhere")
    with deadline(60):
        rc, _, err = _run(args, capsys)
    _refused(rc, err, name, "named pipe" if make == "fifo" else "dangling symlink")


@pytest.mark.parametrize("link", ["chat_template.jinja", "additional_chat_templates"])
@pytest.mark.parametrize("command", ["generate", "export"])
def test_a_link_out_of_an_adapter_dir_is_refused(link: str, command: str, adapter: Path, tmp_path: Path, capsys,
                                                 monkeypatch) -> None:
    """A shared adapter whose chat template links to a file of the user's (a key, a private note) would read it
    into every prompt and into the export the user publishes: refused, naming the link, before anything is read."""
    secret = tmp_path / "private" / "id_rsa"
    secret.parent.mkdir()
    secret.write_text("SECRET-KEY {{ messages }}")
    secret.chmod(0o600)
    d = _copy(adapter, tmp_path / "a")
    (d / "chat_template.jinja").unlink(missing_ok=True)
    if link == "chat_template.jinja":
        (d / link).symlink_to(secret)
    else:
        (d / link).symlink_to(secret.parent, target_is_directory=True)
    args = ["--adapter", str(d)] + (["--out", str(tmp_path / "out")] if command == "export"
                                    else ["--max-new-tokens", "1", "hi"])
    rc, out, err = _run([command, *args], capsys, monkeypatch=monkeypatch)
    _refused(rc, err, f"{d / link}: a symlink to {secret if link == 'chat_template.jinja' else secret.parent}, "
                      f"outside the dir", "cp -L")
    assert "SECRET" not in out and not (tmp_path / "out").exists()


def test_links_inside_a_dir_or_into_its_hub_blobs_are_followed(tmp_path: Path) -> None:
    """A link within the dir, and a hub cache snapshot (every file a link to ../../blobs/<hash>), load as before."""
    from ia3_dist.runtime.safe_io import check_links_inside

    d = tmp_path / "a"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "t.json").write_text("{}")
    (d / "tokenizer.json").symlink_to("sub/t.json")
    (d / "again").symlink_to("sub", target_is_directory=True)
    check_links_inside(d, "adapter or model dir")
    repo = tmp_path / "hub" / "models--someone--adapter"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "abc123").write_text("{}")
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    (snap / "adapter_config.json").symlink_to("../../blobs/abc123")
    check_links_inside(snap, "adapter or model dir")
    sub = snap / "checkpoint-500"  # an adapter in a subfolder of a repo
    sub.mkdir()
    (sub / "adapter_config.json").symlink_to("../../../blobs/abc123")
    check_links_inside(sub, "adapter or model dir")
    local = tmp_path / "local-dir"  # an older `huggingface-cli download --local-dir`: big files link into the cache
    local.mkdir()
    (local / "adapter_config.json").symlink_to(repo / "blobs" / "abc123")
    check_links_inside(local, "adapter or model dir")
    (snap / "x.json").symlink_to(tmp_path / "a" / "sub" / "t.json")  # the user's own file
    with pytest.raises(UsageError, match="x.json: a symlink to .*outside the dir"):
        check_links_inside(snap, "adapter or model dir")


def _edit_json(f: Path, **change: Any) -> None:
    c = json.loads(f.read_text())
    c.update(change)
    f.write_text(json.dumps(c))


def _modules_cache_files() -> set[str]:
    from transformers.utils import HF_MODULES_CACHE

    return {p.name for p in Path(HF_MODULES_CACHE).rglob("*.py")} if Path(HF_MODULES_CACHE).exists() else set()


# --- 1. custom code ------------------------------------------------------------------------------------------


def _evil_tokenizer(d: Path, marker: Path, known_class: bool) -> None:
    (d / "evil.py").write_text(EVIL_PY.format(marker=str(marker)))
    _edit_json(d / "tokenizer_config.json", auto_map={"AutoTokenizer": [None, "evil.EvilTokenizer"]},
               tokenizer_class="BloomTokenizerFast" if known_class else "EvilTokenizer")


def _evil_config(d: Path, marker: Path) -> None:
    (d / "evil.py").write_text(EVIL_PY.format(marker=str(marker)))
    _edit_json(d / "config.json", model_type="evil", auto_map={"AutoConfig": "evil.EvilConfig",
                                                               "AutoModelForCausalLM": "evil.EvilConfig"})


@pytest.mark.parametrize("case", ["adapter-tokenizer", "merged-tokenizer", "merged-config", "adapter-base-config"])
@pytest.mark.parametrize("command", ["chat", "export"])
def test_custom_code_in_a_dir_is_refused_and_never_run(case: str, command: str, adapter: Path, tiny_model: Path,
                                                       tmp_path: Path, capsys, monkeypatch) -> None:
    """The review's example (tokenizer files naming custom code, chat's piped first line answering transformers'
    question) and the other places a dir can name code: a merged model's tokenizer or config.json, and the base
    model an adapter's config points at. stdin says "y" to every question; none may be asked."""
    marker = tmp_path / "PWNED"
    if case == "adapter-tokenizer":
        d = _copy(adapter, tmp_path / "a")
        _evil_tokenizer(d, marker, known_class=False)
        needle = f"{d}/tokenizer_config.json names (auto_map"
    elif case == "merged-tokenizer":
        d = _copy(tiny_model, tmp_path / "m")
        _evil_tokenizer(d, marker, known_class=False)
        needle = "tokenizer_config.json names (auto_map"
    elif case == "merged-config":
        d = _copy(tiny_model, tmp_path / "m")
        _evil_config(d, marker)
        needle = "config.json names (auto_map"
    else:
        base = _copy(tiny_model, tmp_path / "base")
        _evil_config(base, marker)
        d = _copy(adapter, tmp_path / "a", {"base_model_name_or_path": str(base)})
        needle = f"base model (from {d}/adapter_config.json"
    before = _modules_cache_files()
    args = ["--adapter", str(d)] + (["--out", str(tmp_path / "out")] if command == "export" else [])
    rc, _, err = _run([command, *args], capsys, stdin="y\ny\nyes\n你好\n", monkeypatch=monkeypatch)
    if command == "export" and case.startswith("merged"):  # refused before anything of it is read
        _refused(rc, err, f"--adapter {d}: not an adapter dir")
    else:
        _refused(rc, err, needle, "ia3-dist never runs code")
    assert not marker.exists()
    assert _modules_cache_files() == before  # the .py was not even copied into transformers' module cache
    assert not (tmp_path / "out").exists()


def test_custom_code_beside_a_known_class_is_ignored(adapter: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    """auto_map next to a tokenizer class transformers ships: the adapter loads with the built-in class."""
    marker = tmp_path / "PWNED"
    d = _copy(adapter, tmp_path / "a")
    _evil_tokenizer(d, marker, known_class=True)
    rc, out, err = _run(["chat", "--adapter", str(d), "--max-new-tokens", "2"], capsys, stdin="y\n你好\n",
                        monkeypatch=monkeypatch)
    assert rc == 0 and out.count("Assistant: ") == 2, err  # "y" is just the first message
    assert not marker.exists()


def test_export_drops_code_references_the_adapter_or_base_carried(adapter: Path, tiny_model: Path, tmp_path: Path,
                                                                   capsys, monkeypatch) -> None:
    """auto_map beside classes transformers ships (a local .py, or a hub repo's ``repo--module.Class``) loads with
    the built-in classes, and the export, saved by them, carries no pointer to code it never ran: whoever loads it
    with trust_remote_code (vLLM, a downstream user) would run code the adapter's author chose."""
    marker = tmp_path / "PWNED"
    base = _copy(tiny_model, tmp_path / "base")
    _edit_json(base / "config.json", auto_map={"AutoModelForCausalLM": "someone/evil--modeling.EvilModel"},
               custom_pipelines={"x": {"impl": "evil.Pipe"}})
    d = _copy(adapter, tmp_path / "a", {"base_model_name_or_path": str(base)})
    _evil_tokenizer(d, marker, known_class=True)
    rc, _, err = _run(["export", "--adapter", str(d), "--out", str(tmp_path / "out")], capsys,
                      monkeypatch=monkeypatch)
    assert rc == 0, err
    for name in ("config.json", "tokenizer_config.json"):
        body = json.loads((tmp_path / "out" / name).read_text())
        assert "auto_map" not in body and "custom_pipelines" not in body, name
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "bloom"
    assert not marker.exists()


def test_a_load_that_forgets_the_flag_still_cannot_ask(tiny_model: Path, tmp_path: Path, monkeypatch) -> None:
    """The backstop around every load: even with trust_remote_code unset, stdin's "y" answers nothing."""
    from transformers import AutoTokenizer

    marker = tmp_path / "PWNED"
    d = _copy(tiny_model, tmp_path / "m")
    _evil_tokenizer(d, marker, known_class=False)
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n"))
    with pytest.raises(ValueError, match="custom code"), no_code_prompt():
        AutoTokenizer.from_pretrained(str(d))
    assert not marker.exists()
    assert sys.stdin.read() == "y\n"  # restored, unread


def test_every_transformers_load_passes_trust_remote_code() -> None:
    """Each Auto*.from_pretrained / from_config call in the package names trust_remote_code (a reviewer's grep,
    kept as a test so a new call cannot forget it)."""
    missing = []
    for f in sorted((ROOT / "ia3_dist").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("from_pretrained", "from_config")
                    and isinstance(node.func.value, ast.Name) and node.func.value.id.startswith("Auto")
                    and not any(k.arg == "trust_remote_code" for k in node.keywords)):
                missing.append(f"{f.relative_to(ROOT)}:{node.lineno}")
    assert not missing, missing


def test_no_model_load_swaps_in_hub_kernels(tiny_model: Path, family_models: dict) -> None:
    """Every AutoModelForCausalLM.from_pretrained of the package and the benchmarks passes use_kernels: transformers
    5 otherwise swaps hub kernels into Llama-type modules for the device at every train()/eval() switch, which on
    a GPU (the first evaluation after DeepSpeed moved the model) failed offline and ran other code online. The
    loaded models (training's and the inference tools') have them off."""
    from ia3_dist.config import ModelSection
    from ia3_dist.models.load import load_base_model
    from ia3_dist.tools.inference import _from_pretrained

    missing = []
    for f in sorted([*(ROOT / "ia3_dist").rglob("*.py"), *(ROOT / "bench").glob("*.py")]):
        for node in ast.walk(ast.parse(f.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "from_pretrained" and isinstance(node.func.value, ast.Name)
                    and node.func.value.id.startswith("AutoModel")
                    and not any(k.arg == "use_kernels" for k in node.keywords)):
                missing.append(f"{f.relative_to(ROOT)}:{node.lineno}")
    assert not missing, missing
    llama = str(family_models["llama"])
    assert not load_base_model(ModelSection(path=llama), llama, "fp32").use_kernels
    assert not _from_pretrained(llama, "auto", "base model").use_kernels


# --- 2. templates saved in the adapter ----------------------------------------------------------------------


SAVED = {
    "format-spec": ({"prompt_template": "{instruction:>50000000}"}, "unusable prompt template"),
    "attribute": ({"prompt_template": "{instruction.__class__}"}, "unusable prompt template"),
    "index": ({"prompt_template": "{0}"}, "unusable prompt template"),
    "too-long": ({"prompt_template": "x" * 5000}, "unusable prompt template"),
    "prefix-too-long": ({"response_prefix": "x" * 5000}, "response_prefix of 5000"),
    "not-bool": ({"strip_prompt": "yes"}, "strip_prompt must be a bool"),
    "unknown-key": ({"shell": "rm -rf /"}, "unknown key(s)"),
    "huge-chat": ({"kind": "chat_template", "chat_template": "{{ 1 }}" * 30000}, "at most 131072"),
    "syntax": ({"kind": "chat_template", "chat_template": "{% for %}"}, "does not compile"),
    "empty-chat": ({"kind": "chat_template", "chat_template": ""}, "chat_template must be non-empty Jinja text"),
    **{f"chat-{k}": ({"kind": "chat_template", "chat_template": v}, "chat template") for k, v in BOMBS.items()},
}


@pytest.mark.parametrize("case", sorted(SAVED))
def test_hostile_saved_template_is_refused_quickly(case: str, adapter: Path, tmp_path: Path, capsys) -> None:
    change, needle = SAVED[case]
    d = _copy(adapter, tmp_path / "a")
    _edit_json(d / "ia3_dist.json", **change)
    t0 = time.monotonic()
    rc, out, err = _run(["generate", "--adapter", str(d), "--max-new-tokens", "2", "你好"], capsys)
    _refused(rc, err, f"{d}/ia3_dist.json", needle)
    assert time.monotonic() - t0 < 15, case
    assert not out


def test_tokenizer_chat_template_of_an_adapter_is_bounded_too(adapter: Path, tmp_path: Path, capsys) -> None:
    """No ia3_dist.json: the adapter's tokenizer chat template is the format, with the same bounds."""
    d = _copy(adapter, tmp_path / "a")
    (d / "ia3_dist.json").unlink()
    _edit_json(d / "tokenizer_config.json", chat_template=BOMBS["str-times"])
    rc, _, err = _run(["generate", "--adapter", str(d), "x"], capsys)
    _refused(rc, err, f"tokenizer {d} chat_template: the chat template was stopped", "20000000")


def test_template_that_bombs_on_some_inputs_only(adapter: Path, tmp_path: Path, capsys) -> None:
    """It passes the probe at load, then fails on the conversation that triggers it: still one line naming the
    file, nothing generated."""
    d = _copy(adapter, tmp_path / "a")
    _edit_json(d / "ia3_dist.json", kind="chat_template",
               chat_template=CHATML + "{% if messages|length > 2 %}{{ 'x' * 20000000 }}{% endif %}")
    prompt = json.dumps({"instruction": "三", "history": [["一", "二"]]}, ensure_ascii=False)
    rc, out, err = _run(["generate", "--adapter", str(d), "--max-new-tokens", "2", prompt], capsys)
    _refused(rc, err, f"{d}/ia3_dist.json: the chat template was stopped: a repeated string of 20000000")
    assert not out


@pytest.mark.parametrize("text", [CHATML, QWEN_LIKE, MISC])
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_bounded_renderer_renders_as_transformers_does(text: str, generation_prompt: bool, tiny_tokenizer) -> None:
    want = tiny_tokenizer.apply_chat_template(MSGS, chat_template=text, tokenize=False,
                                              add_generation_prompt=generation_prompt)
    assert render_chat(text, MSGS, generation_prompt, special_tokens(tiny_tokenizer)) == want


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_chat_template_bombs_stop_in_bounded_time_and_memory(name: str, tiny_tokenizer) -> None:
    error: Exception | None = None
    tracemalloc.start()
    t0 = time.monotonic()
    try:
        render_chat(BOMBS[name], MSGS, True, special_tokens(tiny_tokenizer))
    except Exception as e:  # RenderLimit, or Jinja's own error for what the renderer does not offer
        error = e
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert time.monotonic() - t0 < 10, name
    assert peak < 64 << 20, (name, peak)
    jinja_own = {"recursive-loop": "TemplateSyntaxError", "lipsum": "UndefinedError"}
    if name in jinja_own:
        assert type(error).__name__ == jinja_own[name], error
    else:
        assert isinstance(error, RenderLimit), error


# --- 3. adapter_config.json ---------------------------------------------------------------------------------


CONFIGS = {
    "redos-target": ({"target_modules": "(a+)+b"}, "'target_modules' is not an accepted regular expression"),
    "redos-group-star": ({"target_modules": "(.*)*x"}, "a repeated group"),
    "polynomial": ({"target_modules": ".*.*.*.*.*.*.*.*.*.*x"}, "10 repetitions, at most 2"),
    # Optional parts and overlapping alternations: each multiplies the ways a failed match tries (".?" x 100 ran
    # for ever in PEFT's fullmatch over the module names; its repeats have no upper bound above 1, so they were
    # not counted).
    "redos-optionals": ({"target_modules": ".?" * 100 + "X"}, "over a million ways to try, at most 16"),
    "redos-empty-branch": ({"target_modules": "(?:.|)" * 40 + "X"}, "over a million ways to try, at most 16"),
    "redos-overlapping-branches": ({"feedforward_modules": "(a|ab)(c|cd)(e|ef)(g|gh)(i|ij)x"},
                                   "32 ways to try, at most 16"),
    "redos-case-folded-branches": ({"target_modules": "(?i)" + "(?:ab|Ab)" * 28}, "ways to try, at most 16"),
    "backreference": ({"target_modules": r"(a)\1"}, "back-references and lookarounds"),
    "lookahead": ({"target_modules": "(?=a)a"}, "back-references and lookarounds"),
    "long-pattern": ({"target_modules": "a" * 300}, "300 characters, at most 256"),
    "bad-regex": ({"target_modules": "(("}, "does not compile"),
    "redos-feedforward": ({"feedforward_modules": "(x+x+)+y"}, "'feedforward_modules'"),
    "redos-exclude": ({"exclude_modules": "(a|aa)+$"}, "'exclude_modules'"),
    "modules-to-save-regex": ({"modules_to_save": ["(a+)+"]}, "'modules_to_save' names"),
    "list-of-ints": ({"target_modules": [1, 2]}, "must be a list of module names"),
    "bool-as-string": ({"fan_in_fan_out": "yes"}, "'fan_in_fan_out' must be true or false"),
    "lora": ({"peft_type": "LORA"}, "'peft_type' is 'LORA'; ia3-dist loads IA3 adapters only"),
    "prompt-tuning": ({"peft_type": "PROMPT_TUNING"}, "loads IA3 adapters only"),
    "seq-cls": ({"task_type": "SEQ_CLS"}, "'task_type' is 'SEQ_CLS', not \"CAUSAL_LM\""),
    "no-task": ({"task_type": ...}, "'task_type' is None"),
}


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_hostile_adapter_config_is_refused_before_peft(case: str, adapter: Path, tmp_path: Path, capsys) -> None:
    change, needle = CONFIGS[case]
    d = _copy(adapter, tmp_path / "a", change)
    t0 = time.monotonic()
    rc, _, err = _run(["export", "--adapter", str(d), "--out", str(tmp_path / "out")], capsys)
    _refused(rc, err, str(d), needle)
    assert time.monotonic() - t0 < 10
    assert not (tmp_path / "out").exists()


def test_accepted_regex_targets_still_load(adapter: Path, tmp_path: Path, capsys) -> None:
    d = _copy(adapter, tmp_path / "a", {"target_modules": r".*\.(query_key_value|dense_4h_to_h)",
                                        "feedforward_modules": r".*dense_4h_to_h",
                                        "exclude_modules": r"(lm_head|embed)s?_?(out)?"})
    rc, out, err = _run(["generate", "--adapter", str(d), "--max-new-tokens", "2", "你好"], capsys)
    assert rc == 0, err


def test_checked_load_is_peft_load(adapter: Path, tiny_model: Path, tmp_path: Path, capsys) -> None:
    """The load that keeps PEFT's load result gives the model PeftModel.from_pretrained gives, and export merges
    it: vectors drawn away from 1, so an adapter that silently did not load would show."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    d = _copy(adapter, tmp_path / "a")
    f = d / "adapter_model.safetensors"
    torch.manual_seed(0)
    save_file({k: torch.empty_like(v).uniform_(0.5, 1.5) for k, v in load_file(str(f)).items()}, str(f))
    ours, tok, _, _ = inference.load_for_inference(str(d))
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model)), str(d)).eval()
    enc = tok(["Human: 你好\n\nAssistant: "], return_tensors="pt")
    assert main(["export", "--adapter", str(d), "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    with torch.no_grad():
        a, b, m = ours(**enc).logits, theirs(**enc).logits, merged(**enc).logits
        with ours.disable_adapter():
            base = ours(**enc).logits
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(m, a, rtol=1e-5, atol=1e-5)
    assert (base - a).abs().max() > 1e-3


@pytest.mark.parametrize("case", ["no-tensors", "renamed", "extra-layer", "half", "nan", "shape"])
def test_weights_that_do_not_fit_the_base_are_refused(case: str, adapter: Path, tmp_path: Path, capsys) -> None:
    """PEFT only warns "missing adapter keys" and would export the base unchanged; here it is exit 2."""
    import torch
    from safetensors.torch import load_file, save_file

    d = _copy(adapter, tmp_path / "a")
    f = d / "adapter_model.safetensors"
    sd = load_file(str(f))
    if case == "no-tensors":
        sd = {}
    elif case == "renamed":
        sd = {k.replace("transformer.", "model."): v for k, v in sd.items()}
    elif case == "extra-layer":
        sd["base_model.model.transformer.h.99.self_attention.query_key_value.ia3_l"] = torch.ones(384, 1)
    elif case == "nan":  # a damaged file: every output would be NaN (an empty generation, a NaN merged model)
        k = next(iter(sd))
        sd[k] = torch.full_like(sd[k], float("nan"))
    elif case == "shape":
        k = next(iter(sd))
        sd[k] = torch.ones(7)
    else:
        sd = dict(list(sd.items())[: len(sd) // 2])
    save_file(sd, str(f))
    rc, _, err = _run(["export", "--adapter", str(d), "--out", str(tmp_path / "out")], capsys)
    if case == "shape":  # the tensor and both shapes named (it said only "Error(s) in loading state_dict")
        _refused(rc, err, f"{d}: cannot load the adapter onto", f"size mismatch for {k}.default", "torch.Size([7])")
    elif case == "nan":
        _refused(rc, err, f"{d}: ", "holds non-finite values (NaN or inf)")
        rc, _, err = _run(["generate", "--adapter", str(d), "--max-new-tokens", "2", "hi"], capsys)
        _refused(rc, err, f"{d}: ", "holds non-finite values (NaN or inf)")
    else:
        needle = "match no module" if case == "extra-layer" else "IA3 vector(s) of the model are not in its weights"
        _refused(rc, err, f"{d}: cannot load the adapter onto", needle, "was it trained on this base model?")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change", [{"penalty_alpha": 0.6, "top_k": 4}, {"dola_layers": "high"},
                                    {"num_beams": 4, "num_return_sequences": 4}])
def test_generation_config_of_the_dir_is_not_followed(change: dict[str, Any], tiny_model: Path, tmp_path: Path,
                                                      capsys) -> None:
    """A merged dir's generation_config.json asking for a decoding mode that only custom code has (transformers
    then raised mid-generate), or four answers per prompt (the output pairing crashed), is not read: decoding is
    what the command line says."""
    d = _copy(tiny_model, tmp_path / "m")
    _edit_json(d / "generation_config.json", **change)
    rc, out, err = _run(["generate", "--adapter", str(d), "--max-new-tokens", "2", "你好"], capsys)
    assert rc == 0, err
    assert [json.loads(line)["instruction"] for line in out.splitlines()] == ["你好"]


# --- 4. cost bounds -----------------------------------------------------------------------------------------


def test_long_prompt_is_cut_before_it_is_tokenized(tiny_tokenizer, monkeypatch) -> None:
    """The tail kept has the same last tokens as the whole text, and only a small multiple of the budget is ever
    given to the tokenizer."""
    tok = tiny_tokenizer
    text = "".join(f"第{i}段：猫很可爱, the cat sat on the mat {i}. " for i in range(5000))
    budget = 300
    seen: list[int] = []
    real = type(tok).__call__

    def spy(self: Any, texts: Any, *a: Any, **k: Any) -> Any:
        seen.append(len(texts) if isinstance(texts, str) else sum(map(len, texts)))
        return real(self, texts, *a, **k)

    monkeypatch.setattr(type(tok), "__call__", spy)
    tail = inference.cut_to_tail(tok, text, budget)
    assert max(seen) <= 4 * inference.TAIL_CHARS_PER_TOKEN * budget < len(text) // 10
    monkeypatch.undo()
    assert text.endswith(tail) and len(tail) < len(text)
    assert tok(tail)["input_ids"][-budget:] == tok(text)["input_ids"][-budget:]
    assert inference.cut_to_tail(tok, "短", budget) == "短"


def test_context_from_a_hostile_config_is_clamped() -> None:
    from types import SimpleNamespace

    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=10**18))
    assert inference.context_limit(model, SimpleNamespace()) == (inference.MAX_SANE_CONTEXT, True)


def test_thousands_of_turns_under_a_chat_template(tiny_tokenizer, tmp_path: Path) -> None:
    """Training labels each turn by rendering the conversation up to it: 20,000 turns are refused at once (the
    review measured 9 s at 1,000 turns); inference renders a conversation once, so it stays linear."""
    tok = tiny_tokenizer
    f = tmp_path / "chatml.jinja"
    f.write_text(CHATML, encoding="utf-8")
    turns = [Turn(f"问{i}", "", f"答{i}") for i in range(20000)]
    t0 = time.monotonic()
    with pytest.raises(UsageError, match=f"a conversation of 20000 turns; .* at most {MAX_CHAT_TURNS}"):
        tokenize(Records([Conversation(turns)], "t", "fp", [], {}), tok, DataSection(path="x", template=str(f)))
    assert time.monotonic() - t0 < 5
    t = Template("chat_template", chat_template=CHATML)
    t0 = time.monotonic()
    text = t.prompt_for(turns, "", "最后", "", tok)
    assert time.monotonic() - t0 < 10 and text.endswith("<|im_start|>user\n最后<|im_end|>\n<|im_start|>assistant\n")
    ok = [Turn(f"问{i}", "", f"答{i}") for i in range(MAX_CHAT_TURNS)]
    assert len(t.segments(Conversation(ok), tok)) == 2 * MAX_CHAT_TURNS


# --- real processes: what hung or blew up a real CLI --------------------------------------------------------


def _cli(args: list[str], stdin: str, tmp: Path, timeout: float,
         env: dict[str, str] | None = None) -> tuple[int, str, float, float]:
    """``python -m ia3_dist ARGS`` with ``stdin``: (exit code, stderr, seconds, peak RSS in GiB of that process
    alone)."""
    m = measured_cli(args, timeout, stdin=stdin, env=env, address_space=None)
    return m.rc, m.err, m.seconds, m.peak_rss_mib / 1024


@pytest.mark.slow
def test_piped_chat_cannot_answer_the_custom_code_question(adapter: Path, tmp_path: Path) -> None:
    """The review's reproduction, as a user runs it: `printf 'y\\n...' | ia3-dist chat --adapter EVIL`."""
    marker = tmp_path / "PWNED"
    d = _copy(adapter, tmp_path / "a")
    _evil_tokenizer(d, marker, known_class=False)
    mods = tmp_path / "modules"
    rc, err, secs, _ = _cli(["chat", "--adapter", str(d), "--max-new-tokens", "2"], "y\n你好\n", tmp_path, 120,
                            {"HF_MODULES_CACHE": str(mods)})
    _refused(rc, err, "tokenizer_config.json names (auto_map", "ia3-dist never runs code")
    assert "Traceback" not in err
    assert not marker.exists() and not list(mods.rglob("*.py"))


@pytest.mark.slow
def test_huge_prompt_costs_bounded_memory(tiny_model: Path, tmp_path: Path) -> None:
    """15.7M characters (under the 16 MiB line limit): 5.4 GiB and a minute before the cut moved ahead of the
    tokenizer; now well under 2 GiB, the process's own peak RSS."""
    rc, err, secs, rss = _cli(["generate", "--adapter", str(tiny_model), "--max-new-tokens", "2"],
                              "天" * 15_700_000 + "\n", tmp_path, 300)
    assert rc == 0, err
    assert "1 prompt(s) longer than 2046 tokens were cut" in err
    assert rss < 2.0, rss
    assert secs < 120


@pytest.mark.slow
def test_chat_template_bomb_in_a_real_generate(adapter: Path, tmp_path: Path) -> None:
    """The review's 4 GB case, `{{ 'x' * 20000000 }}`, and a nested loop, through the real CLI."""
    for name in ("str-times", "nested-range"):
        d = _copy(adapter, tmp_path / name)
        _edit_json(d / "ia3_dist.json", kind="chat_template", chat_template=BOMBS[name])
        rc, err, secs, rss = _cli(["generate", "--adapter", str(d), "x"], "", tmp_path, 120)
        _refused(rc, err, f"{d}/ia3_dist.json: the chat template was stopped")
        assert rss < 2.0, (name, rss)


def _earlier_export(o: Path) -> None:
    from ia3_dist.tools.inference import EXPORT_MARKER as MARKER

    o.mkdir()
    (o / "config.json").write_text("{}")
    (o / MARKER).write_text(json.dumps({"tool": "ia3-dist export", "files": ["config.json"]}))


def _staged(tmp_path: Path) -> Path:
    st = tmp_path / "staging"
    st.mkdir()
    for n in ("config.json", "model.safetensors", "tokenizer.json"):
        (st / n).write_text(n)
    return st


def test_export_never_writes_its_marker_through_a_planted_link(tmp_path: Path) -> None:
    from ia3_dist.tools.export import _publish, check_target
    from ia3_dist.tools.inference import EXPORT_MARKER as MARKER

    o = tmp_path / "out"
    _earlier_export(o)
    victim = tmp_path / "victim"
    victim.write_text("precious")
    os.symlink(victim, o / (MARKER + ".tmp"))
    _publish(_staged(tmp_path), o, check_target(str(o), True), {})
    assert victim.read_text() == "precious"
    assert not (o / MARKER).is_symlink()
    assert json.loads((o / MARKER).read_text())["files"] == ["config.json", "model.safetensors", "tokenizer.json"]


@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize("make", ["fifo", "zero-link"])
def test_a_fifo_or_endless_marker_is_no_earlier_export(make: str, force: bool, tmp_path: Path) -> None:
    from ia3_dist.tools.export import check_target
    from ia3_dist.tools.inference import EXPORT_MARKER as MARKER

    o = tmp_path / "out"
    o.mkdir()
    if make == "fifo":
        os.mkfifo(o / MARKER)
    else:
        os.symlink("/dev/zero", o / MARKER)
    with deadline(5), pytest.raises(UsageError, match="--out .*(not empty|did not write)"):
        check_target(str(o), force)


def test_an_interrupted_export_is_replaced_by_the_next_with_force(tmp_path: Path, monkeypatch) -> None:
    from ia3_dist.tools import export
    from ia3_dist.tools.inference import EXPORT_MARKER

    o = tmp_path / "out"
    o.mkdir()
    st = _staged(tmp_path)
    real = os.replace

    def dying(a, b):  # killed after the first staged file is moved in
        if Path(a).parent == st and any(p.parent == o and p.name != EXPORT_MARKER for p in o.iterdir()):
            raise KeyboardInterrupt("killed mid-publish")
        return real(a, b)

    monkeypatch.setattr(os, "replace", dying)
    with pytest.raises(KeyboardInterrupt):
        export._publish(st, o, export.check_target(str(o), False), {})
    monkeypatch.setattr(os, "replace", real)
    assert (o / "config.json").is_file()
    assert export.check_target(str(o), True) == ["config.json"]


@pytest.mark.parametrize("case", ["export-of-a-model-dir", "corrupt-adapter-tokenizer"])
def test_bad_export_input_is_refused_before_the_model_loads(case: str, adapter: Path, tiny_model: Path,
                                                              tmp_path: Path, capsys, monkeypatch) -> None:
    def never(*a: Any) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(inference, "_from_pretrained", never)
    if case == "export-of-a-model-dir":
        src, needle = tiny_model, "not an adapter dir (no adapter_config.json)"
    else:
        src = _copy(adapter, tmp_path / "a")
        (src / "tokenizer.json").write_text("{not json")
        needle = "tokenizer"
    rc, _, err = _run(["export", "--adapter", str(src), "--out", str(tmp_path / "out")], capsys)
    _refused(rc, err, str(src), needle)
