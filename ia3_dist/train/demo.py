"""The embedded default: a tiny Bloom, a byte-level BPE tokenizer and synthetic Chinese instruction records, all
made by this module, deterministically, once per cache dir (no network, no files needed).

IA3 only rescales features the base model already has, so on a random base it barely moves the loss. The demo
therefore first pretrains the tiny base briefly on answers in three styles (the target style is rare), then the
IA3 run teaches it to prefer the target style: a visible loss drop from a few hundred thousand scalings.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..config import DataSection
from ..data.cache import cache_root, file_lock, publish_once
from ..data.collate import collate
from ..data.records import Conversation, Records, Turn
from ..data.tokenize import tokenize
from ..errors import UsageError

ASSET_VERSION = 1
MODEL_NAME = "demo:tiny-bloom"
DATA_NAME = "demo:zh-styles"
PAIRS_NAME = "demo:zh-pairs"

# The run ``python launch.py`` does with no arguments; configs/tiny-cpu.yaml is this, written out.
DEMO_RUN: dict[str, Any] = {
    "model": {"path": MODEL_NAME},
    # The demo's answers all have near-identical lengths: grouping would only correlate the batches.
    "data": {"path": DATA_NAME, "max_length": 256, "group_by_length": False},
    "train": {"micro_batch_size": 4, "grad_accum": 2, "lr": 3e-2, "epochs": 3, "seed": 42, "precision": "fp32",
              "log_every": 10},
    "deepspeed": {"config": "zero2"},
    "checkpoint": {"every": 0, "keep": 1},
    # A demo is run again and again: each run starts over in its own output dir.
    "output": {"dir": "runs/demo", "overwrite": True},
}

SUBJECTS = ["猫", "狗", "长城", "太阳", "月亮", "大海", "森林", "火车", "电脑", "茶", "米饭", "熊猫", "北京", "上海",
            "黄河", "长江", "春天", "夏天", "秋天", "冬天", "雨", "雪", "风", "高山", "小河", "花园", "大树", "小鸟",
            "金鱼", "图书", "音乐", "电影", "足球", "篮球", "医生", "老师", "学生", "朋友", "家庭", "城市", "农村",
            "飞机", "汽车", "自行车", "手机", "咖啡", "面条", "饺子", "月饼", "星星"]
TRAITS = ["很可爱", "很忠诚", "很雄伟", "很温暖", "很明亮", "很辽阔", "很安静", "很快", "很聪明", "很清香",
          "很香甜", "很珍贵", "很热闹", "很繁华", "很古老", "很漫长", "很美丽", "很炎热", "很凉爽", "很寒冷"]
ASKS = ["请介绍一下{x}。", "{x}有什么特点？", "用一句话描述{x}。", "你知道{x}吗？", "说说你对{x}的看法。"]
INPUTS = ["", "", "简短回答。", "请认真回答。"]
# Style 0 is the one the IA3 run teaches; the base sees it in only 10% of its pretraining answers.
STYLES = [
    "{x}的特点是{t}。总的来说，{x}{t}。",
    "哈哈，{x}嘛，就是{t}啦！",
    "关于{x}：一，{t}；二，没了。",
]
STYLE_WEIGHTS = [0.1, 0.45, 0.45]


def _trait(x: str) -> str:
    return TRAITS[sum(ord(c) for c in x) % len(TRAITS)]


def make_records(n: int, seed: int, style: int | None) -> list[dict[str, str]]:
    """``n`` records; ``style`` None draws the style per record with :data:`STYLE_WEIGHTS`."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        x = rng.choice(SUBJECTS)
        s = style if style is not None else rng.choices(range(len(STYLES)), STYLE_WEIGHTS)[0]
        out.append({"instruction": rng.choice(ASKS).format(x=x), "input": rng.choice(INPUTS),
                    "output": STYLES[s].format(x=x, t=_trait(x))})
    return out


def asset_root(cache_dir: str | None, pretrained: bool = True) -> Path:
    name = f"v{ASSET_VERSION}" + ("" if pretrained else "-random")
    return cache_root(DataSection(cache_dir=cache_dir)) / "demo" / name


def _train_tokenizer(texts: list[str], out: Path) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    trainer = trainers.BpeTrainer(vocab_size=1200, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", padding_side="left")
    tok.save_pretrained(str(out))
    # transformers 5 has no BloomTokenizerFast class; the name maps to the fast backend, as for real Bloom dirs.
    cfg_path = out / "tokenizer_config.json"
    tc = json.loads(cfg_path.read_text())
    tc["tokenizer_class"] = "BloomTokenizerFast"
    cfg_path.write_text(json.dumps(tc, ensure_ascii=False, indent=2))
    return tok


def _pretrain(model: Any, tok: Any, records: list[dict[str, str]], steps: int, seed: int) -> list[float]:
    convs = [Conversation([Turn(r["instruction"], r["input"], r["output"])]) for r in records]
    # 3,000 short records: worker processes would cost more than they save.
    data = tokenize(Records(convs, "demo", "demo", [], {}), tok, DataSection(path="demo", num_proc=1))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    rng = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(data), (16,), generator=rng).tolist()
        b = collate(data, idx, tok.pad_token_id, "left")
        loss = model(**b).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


BUILD_THREADS = 2
"""Threads the demo model is built with, whatever the caller's share of the cores: sums split across threads round
differently, so a model built inside a 2-rank run (a thread per rank) differed from one built by one process (two
threads on 2 cores), and so did every number the demo prints."""


def build_assets(root: Path, pretrain_steps: int = 800) -> None:
    """Tokenizer, tiny Bloom (pretrained for ``pretrain_steps``; 0 leaves it random, for fast unit tests) and the
    target-style records, written to a temp dir and renamed into place."""
    threads = torch.get_num_threads()
    torch.set_num_threads(BUILD_THREADS)
    try:
        _build_assets(root, pretrain_steps)
    finally:
        torch.set_num_threads(threads)


def _build_assets(root: Path, pretrain_steps: int) -> None:
    from transformers import BloomConfig, BloomForCausalLM

    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "model").mkdir(parents=True)
    pre = make_records(3000, seed=1, style=None)
    texts = [r["instruction"] + r["input"] + r["output"] for r in pre]
    tok = _train_tokenizer(texts, tmp / "model")
    torch.manual_seed(0)
    cfg = BloomConfig(vocab_size=len(tok), hidden_size=128, n_layer=4, n_head=4, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = BloomForCausalLM(cfg)
    _pretrain(model, tok, pre, steps=pretrain_steps, seed=0)
    model.save_pretrained(str(tmp / "model"), safe_serialization=True)
    (tmp / "README.txt").write_text("Built by ia3_dist.demo: a tiny Bloom pretrained on synthetic records in three "
                                    "answer styles.\n")
    os.replace(tmp, root)


def ensure_assets(cache_dir: str | None, pretrained: bool = True) -> Path:
    """The demo assets under the cache dir, built once (concurrent ranks wait on a file lock). ``pretrained``
    False gives the same tokenizer and shapes with random weights, in about a second."""
    root = asset_root(cache_dir, pretrained)
    with file_lock(root.parent / f"{root.name}.lock"):
        if not (root / "model" / "config.json").exists():
            build_assets(root, 800 if pretrained else 0)
    return root


def ensure_model(name: str, cache_dir: str | None) -> Path:
    if name != MODEL_NAME:
        raise UsageError(f"model.path {name}: unknown demo model; the embedded one is {MODEL_NAME}")
    return ensure_assets(cache_dir) / "model"


def model_path(path: str, cache_dir: str | None) -> str:
    """``demo:tiny-bloom`` -> the cached demo model dir (built on first use); any other path unchanged."""
    return str(ensure_model(path, cache_dir)) if path.startswith("demo:") else path


def data_section(cfg: DataSection, pairs: bool = False) -> DataSection:
    """``cfg`` with ``data.path: demo:zh-styles`` (``demo:zh-pairs`` for preference objectives) replaced by the
    cached demo records (built on first use)."""
    if isinstance(cfg.path, list) or not cfg.path.startswith("demo:"):
        return cfg
    name = PAIRS_NAME if pairs else DATA_NAME
    if cfg.path != name:
        other = "a preference objective (train.objective)" if pairs else "train.objective: sft"
        raise UsageError(f"data.path {cfg.path}: unknown demo data; the embedded set for {other} is {name}")
    return replace(cfg, path=str(ensure_pairs(cfg.cache_dir) if pairs else ensure_data(cfg.cache_dir)))


def make_pairs(n: int, seed: int) -> list[dict[str, str]]:
    """``n`` preference records: the target style (0) chosen over one of the two styles the demo base prefers."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        x = rng.choice(SUBJECTS)
        out.append({"prompt": rng.choice(ASKS).format(x=x), "chosen": STYLES[0].format(x=x, t=_trait(x)),
                    "rejected": STYLES[rng.choice((1, 2))].format(x=x, t=_trait(x))})
    return out


def _ensure_json(cache_dir: str | None, name: str, make: Callable[[], list[dict[str, str]]]) -> Path:
    """``make()`` as a JSON file beside the demo model, written once and atomically: concurrent ranks, nodes or
    test workers each write a temporary file and the first to link it in place wins; the file is never replaced
    once there (a rename over it would change the file another rank is hashing and tokenizing: "changed while it
    was tokenized")."""
    f = asset_root(cache_dir).with_name(f"{name}-v{ASSET_VERSION}.json")
    if not f.exists():
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_name(f"{f.name}.tmp{os.getpid()}.{secrets.token_hex(4)}")
        tmp.write_text(json.dumps(make(), ensure_ascii=False, indent=1), encoding="utf-8")
        try:
            publish_once(tmp, f)
        finally:
            tmp.unlink(missing_ok=True)
    return f


def ensure_pairs(cache_dir: str | None) -> Path:
    """The preference demo's 400 pairs as a JSON file (needs no model)."""
    return _ensure_json(cache_dir, "zh-pairs", lambda: make_pairs(400, seed=5))


def ensure_data(cache_dir: str | None) -> Path:
    """The demo's 400 target-style records as a JSON file (needs no model)."""
    return _ensure_json(cache_dir, "zh-styles", lambda: make_records(400, seed=2, style=0))
