"""Held-out eval (token-weighted over ranks), export (merged logits == adapter logits), generate/chat from an
adapter or a merged dir, and plots."""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

import pytest
import torch
from _util import check, launch, metrics

from ia3_dist.cli import main
from ia3_dist.config import load_config
from ia3_dist.data.collate import collate
from ia3_dist.data.sampler import split_eval
from ia3_dist.data.tokenize import load_or_tokenize
from ia3_dist.tools.inference import load_for_inference
from ia3_dist.train import demo

pytestmark = pytest.mark.slow
TINY = "configs/tiny-cpu.yaml"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Path:
    """2 ranks, ZeRO-3, 10% held out, eval every 10 steps."""
    out = tmp_path_factory.mktemp("trained")
    check(launch(["--config", TINY, "deepspeed.config=zero3", f"output.dir={out}", "data.eval_ratio=0.1",
                  "train.eval_every=10", "train.max_steps=30"], nproc=2))
    return out


def _reference_eval_loss(out: Path) -> tuple[float, int]:
    """Token-mean loss of the saved adapter on the held-out split, computed in one process."""
    cfg = load_config(out / "run.yaml")
    model, tok, _, _ = load_for_inference(str(out / "adapter"))
    data = load_or_tokenize(demo.data_section(cfg.data), tok)
    _, held = split_eval(data, cfg.data.eval_ratio, cfg.train.seed)
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(len(held)):
            b = collate(held, [i], tok.pad_token_id)
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
            tgt = b["labels"][:, 1:]
            keep = tgt != -100
            total += torch.nn.functional.cross_entropy(logits[keep].float(), tgt[keep], reduction="sum").item()
            n += int(keep.sum())
    return total / n, n


def test_eval_is_logged_and_token_weighted_over_ranks(trained: Path) -> None:
    recs = [r for r in metrics(trained) if "eval_loss" in r]
    assert [r["step"] for r in recs] == [10, 20, 30]
    for r in recs:
        assert math.isclose(r["eval_ppl"], math.exp(r["eval_loss"]), rel_tol=1e-4)
    assert recs[-1]["eval_loss"] < recs[0]["eval_loss"]
    ref, n = _reference_eval_loss(trained)
    assert recs[-1]["eval_tokens"] == n
    assert recs[-1]["eval_loss"] == pytest.approx(ref, rel=1e-5)
    # 40 held-out examples never appear in training, nor do their copies (the demo data repeats records): the run
    # trained on the rest.
    cfg = load_config(trained / "run.yaml")
    data = load_or_tokenize(demo.data_section(cfg.data), load_for_inference(str(trained / "adapter"))[1])
    train, held = split_eval(data, cfg.data.eval_ratio, cfg.train.seed)
    assert len(held) == 40 and train.held_copies == 20 and len(train) == 340
    assert json.loads((trained / "checkpoints" / "step30" / "meta.json").read_text())["n_examples"] == 340


def test_export_merged_logits_equal_adapter_logits(trained: Path, tmp_path: Path, capsys) -> None:
    merged = tmp_path / "merged"
    # What a killed export left there: removed by the next export (the dir counts as empty).
    left = merged / ".ia3-dist-export-staging-killed"
    left.mkdir(parents=True)
    (left / "model.safetensors").write_bytes(b"0" * 1024)
    assert main(["export", "--adapter", str(trained / "adapter"), "--out", str(merged)]) == 0
    assert (merged / "model.safetensors").is_file() and (merged / "tokenizer.json").is_file()
    assert not (merged / "adapter_config.json").exists() and not left.exists()
    assert not list(merged.glob(".ia3-dist-export-staging-*"))
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(str(merged)).eval()
    adapter_model, tok, _, _ = load_for_inference(str(trained / "adapter"))
    enc = tok(["Human: 请介绍一下猫。\n\nAssistant: ", "Human: 你知道长城吗？\n简短回答。\n\nAssistant: "],
              return_tensors="pt", padding=True)
    with torch.no_grad():
        a = adapter_model(**enc).logits
        b = plain(**enc).logits
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    with torch.no_grad(), adapter_model.disable_adapter():
        base = adapter_model(**enc).logits
    assert (base - a).abs().max() > 1e-3  # the merge carried the trained scalings
    # The training format is the exported tokenizer's chat template: transformers (and vLLM) prompt the merged model
    # as it was trained, to the token.
    from transformers import AutoTokenizer

    exported = AutoTokenizer.from_pretrained(str(merged))
    msgs = [{"role": "user", "content": "请介绍一下猫。"}]
    assert exported.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        "Human: 请介绍一下猫。\n\nAssistant: "
    assert exported.apply_chat_template(msgs, add_generation_prompt=True, return_dict=False) == \
        tok("Human: 请介绍一下猫。\n\nAssistant: ").input_ids


def test_export_onto_its_own_base_and_a_lax_generation_config(trained: Path, tmp_path: Path, demo_model: Path,
                                                               capsys) -> None:
    """A base whose generation_config.json sets sampling values without do_sample (as several hub models do) is
    exported (transformers checked the changed config strictly and refused it after the merge, leaving an empty
    --out); the merged model keeps those values. Exporting over the base the adapter merges onto (an earlier
    export updated with --force) is refused, the base untouched."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(demo_model, base)
    gen = json.loads((base / "generation_config.json").read_text()) if (base / "generation_config.json").is_file() \
        else {}
    (base / "generation_config.json").write_text(json.dumps({**gen, "temperature": 0.6, "top_p": 0.9}))
    out = tmp_path / "m1"
    assert main(["export", "--adapter", str(trained / "adapter"), "--base", str(base), "--out", str(out)]) == 0
    saved = json.loads((out / "generation_config.json").read_text())
    assert saved["temperature"] == 0.6 and saved["top_p"] == 0.9 and saved.get("do_sample") in (None, False)
    before = (out / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["export", "--adapter", str(trained / "adapter"), "--base", str(out), "--out", str(out),
                 "--force"]) == 2
    assert "is the base model the adapter merges onto" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == before


def _generate(args: list[str], capsys, stdin: str | None = None, monkeypatch=None) -> list[dict]:
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    assert main(["generate", *args]) == 0
    return [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if ln.strip()]


def test_generate_from_adapter_and_merged_dir(trained: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    merged = tmp_path / "m"
    assert main(["export", "--adapter", str(trained / "adapter"), "--out", str(merged)]) == 0
    capsys.readouterr()
    prompts = ["请介绍一下猫。", "你知道长城吗？"]
    a = _generate(["--adapter", str(trained / "adapter"), "--max-new-tokens", "20", *prompts], capsys)
    b = _generate(["--adapter", str(merged), "--max-new-tokens", "20", *prompts], capsys)
    assert [r["instruction"] for r in a] == prompts
    assert [r["response"] for r in a] == [r["response"] for r in b]
    assert all(r["response"] for r in a)
    # stdin (plain and JSON lines) and --file give the same answers for the same prompts.
    c = _generate(["--adapter", str(merged), "--max-new-tokens", "20"], capsys,
                  stdin='请介绍一下猫。\n{"instruction": "你知道长城吗？", "input": ""}\n', monkeypatch=monkeypatch)
    f = tmp_path / "p.txt"
    f.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    out = tmp_path / "o.jsonl"
    assert main(["generate", "--adapter", str(merged), "--max-new-tokens", "20", "--file", str(f),
                 "--out", str(out)]) == 0
    d = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert [r["response"] for r in c] == [r["response"] for r in d] == [r["response"] for r in a]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # as any file written here, not a temp file's 0600
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    # Sampling: reproducible from its seed, and differs from greedy somewhere over a few seeds.
    s1 = _generate(["--adapter", str(merged), "--max-new-tokens", "20", "--sample", "--temperature", "1.5",
                    "--seed", "3", *prompts], capsys)
    s2 = _generate(["--adapter", str(merged), "--max-new-tokens", "20", "--sample", "--temperature", "1.5",
                    "--seed", "3", *prompts], capsys)
    assert s1 == s2
    # Each prompt draws from its own seed (--seed + its index): alone it gets the answer it got among the others.
    for k in (0, 1):
        alone = _generate(["--adapter", str(merged), "--max-new-tokens", "20", "--sample", "--temperature", "1.5",
                           "--seed", str(3 + k), prompts[k]], capsys)
        assert alone[0]["response"] == s1[k]["response"]
    outs = {r["response"] for seed in range(4) for r in _generate(
        ["--adapter", str(merged), "--max-new-tokens", "20", "--sample", "--temperature", "1.5", "--seed",
         str(seed), prompts[0]], capsys)}
    assert len(outs) > 1


def test_generate_errors(trained: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    assert main(["generate", "--adapter", str(tmp_path / "none"), "x"]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert main(["generate", "--adapter", str(trained / "adapter"), "--top-p", "0", "x"]) == 2
    assert main(["generate", "--adapter", str(trained / "adapter"), '{"instruction": 3}']) == 2
    assert "prompt 1: field 'instruction' must be a string, got int" in capsys.readouterr().err
    # An --out where nothing can be written is found before the model loads, not after the generation.
    from ia3_dist.tools import inference

    monkeypatch.setattr(inference, "load_for_inference", lambda *a: pytest.fail("loaded the model"))
    assert main(["generate", "--adapter", str(trained / "adapter"), "--out", "/proc/answers.jsonl", "x"]) == 2
    assert "--out /proc/answers.jsonl: cannot write there" in capsys.readouterr().err
    # Bloom has no position limit: a count past any context ran until it was killed.
    for cmd in ("generate", "chat"):
        assert main([cmd, "--adapter", str(trained / "adapter"), "--max-new-tokens", "99999999999999999999",
                     *(["x"] if cmd == "generate" else [])]) == 2
        assert "--max-new-tokens 99999999999999999999: at most 1048576" in capsys.readouterr().err


def test_a_base_dir_replaced_since_training_is_refused(trained: Path, tmp_path: Path, demo_model: Path,
                                                       capsys) -> None:
    """The adapter records the fingerprint of the weights it was trained on: where the base dir its
    adapter_config.json names holds other weights of the same architecture now, generate, export and eval exit 2
    naming both fingerprints, before anything loads; --base (the same dir) loads onto them, as asked."""
    import shutil

    from safetensors.torch import load_file, save_file

    base = tmp_path / "base"
    shutil.copytree(demo_model, base)
    run = tmp_path / "run"
    shutil.copytree(trained, run, symlinks=True)
    adapter = run / "adapter"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": str(base)}))
    assert main(["generate", "--adapter", str(adapter), "--max-new-tokens", "2", "x"]) == 0  # the same weights
    capsys.readouterr()
    tensors = load_file(base / "model.safetensors")
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] * 1.01
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    before = sorted(run.rglob("*"))
    for args in (["generate", "--adapter", str(adapter), "x"], ["export", "--adapter", str(adapter), "--out",
                                                                 str(tmp_path / "merged")],
                 ["eval", str(run)]):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert f"{adapter}: trained on other weights than {base} holds now" in err, err
        assert f"--base {base} to load it onto these anyway" in err, err
    assert not (tmp_path / "merged").exists() and sorted(run.rglob("*")) == before
    assert main(["generate", "--adapter", str(adapter), "--base", str(base), "--max-new-tokens", "2", "x"]) == 0


def test_chat_answers_each_line_with_the_conversation_so_far(trained: Path, capsys, monkeypatch) -> None:
    """Chat is multi-turn: its second answer is generate's answer to the second question after the first turn."""
    monkeypatch.setattr("sys.stdin", io.StringIO("请介绍一下猫。\n你知道长城吗？\n/quit\n"))
    assert main(["chat", "--adapter", str(trained / "adapter"), "--max-new-tokens", "20"]) == 0
    got = [ln.split("Assistant: ", 1)[1] for ln in capsys.readouterr().out.splitlines() if "Assistant: " in ln]
    first = _generate(["--adapter", str(trained / "adapter"), "--max-new-tokens", "20", "请介绍一下猫。"], capsys)
    second = _generate(["--adapter", str(trained / "adapter"), "--max-new-tokens", "20", json.dumps(
        {"instruction": "你知道长城吗？", "history": [["请介绍一下猫。", first[0]["response"]]]})], capsys)
    assert got == [first[0]["response"], second[0]["response"]]


def test_plots(trained: Path, tmp_path: Path, capsys) -> None:
    png = trained / "metrics.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    out = tmp_path / "p.png"
    assert main(["plot", str(trained), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(tmp_path)]) == 2
