"""Hostile inputs from a security review, each with the input that reproduced it: unbounded reads (a .json with no
newline, a huge .jsonl line, ``generate --file /dev/zero``), unreadable data files, megabyte prompts, truncated
safetensors, pickles that would run code, garbage adapter dirs. Each must end in a one-line UsageError (exit 2
from the CLI) naming the file, quickly and without the memory the input asks for."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import time
import tracemalloc
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from ia3_dist.cli import main
from ia3_dist.config import DataSection
from ia3_dist.data import records
from ia3_dist.data.records import Conversation, Turn, load_records
from ia3_dist.errors import UsageError
from ia3_dist.models.files import check_model_dir, safetensors_header
from ia3_dist.models.zero3_load import SafetensorsFile, TorchBinFile
from ia3_dist.tools import inference
from ia3_dist.tools.inference import GenOptions, context_limit, generate, load_for_inference, prompt_budget

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny-cpu.yaml")
REC = {"instruction": "问题", "input": "", "output": "回答。"}
LINE = json.dumps(REC, ensure_ascii=False)


def _records(path: Path, policy: str = "error") -> records.Records:
    return load_records(DataSection(path=str(path), on_bad_record=policy))


def _run(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    rc = main(args)
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, out, err


def _check(capsys: pytest.CaptureFixture, tmp: Path, *extra: str) -> str:
    """``ia3-dist check`` must exit 2; returns stderr."""
    rc, _, err = _run(["check", "--config", TINY, *extra, f"output.dir={tmp / 'out'}"], capsys)
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1, err
    return err


def _sparse(path: Path, size: int) -> Path:
    """A file of ``size`` zero bytes that takes no disk space."""
    with open(path, "wb") as fh:
        fh.truncate(size)
    return path


# --- 1. unbounded reads ------------------------------------------------------------------------------------------


def test_json_without_newline_of_many_gb_is_refused_unread(tmp_path: Path, tiny_model: Path, capsys) -> None:
    f = _sparse(tmp_path / "big.json", 5 << 30)
    t = time.monotonic()
    with pytest.raises(UsageError, match=r"big\.json: 5368709120 bytes; a \.json list .* at most 1073741824.*"
                                         r"\.jsonl"):
        _records(f)
    assert time.monotonic() - t < 5  # refused from its size, not hashed or read
    assert "big.json" in _check(capsys, tmp_path, f"model.path={tiny_model}", f"data.path={f}")


def test_json_list_over_a_small_limit(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(records, "MAX_JSON_BYTES", 1000)
    f = tmp_path / "d.json"
    f.write_text(json.dumps([REC] * 40, ensure_ascii=False))
    with pytest.raises(UsageError, match=r"d\.json: \d+ bytes; .* at most 1000 bytes.*jsonl"):
        _records(f)
    f.write_text(json.dumps([REC] * 5, ensure_ascii=False))
    assert len(_records(f)) == 5


def test_jsonl_line_of_hundreds_of_mb_is_not_read_whole(tmp_path: Path) -> None:
    f = _sparse(tmp_path / "big.jsonl", 400 << 20)  # one 400 MB line of NUL bytes, no newline
    tracemalloc.start()
    try:
        with pytest.raises(UsageError, match=r"big\.jsonl:1: line longer than 16777216 bytes.*on_bad_record=skip"):
            _records(f)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, peak


def test_jsonl_over_long_line_error_and_skip(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(records, "MAX_RECORD_BYTES", 200)
    long = json.dumps({**REC, "output": "x" * 500})
    at_limit = json.dumps({**REC, "output": "y" * (200 - len(json.dumps({**REC, "output": ""})))})
    assert len(at_limit) == 200
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join([LINE, long, at_limit, "{bad", long]) + "\n")  # no final newline after the last long one
    with pytest.raises(UsageError, match=r"d\.jsonl:2: line longer than 200 bytes"):
        _records(f)
    r = _records(f, "skip")
    assert len(r) == 2 and r.examples[1].turns[-1].output == "y" * (200 - len(json.dumps({**REC, "output": ""})))
    assert [s.split(":")[1] for s in r.skipped] == ["2", "4", "5"]
    # The same without a trailing newline: the last, over-long line still counts as line 5.
    f.write_text("\n".join([LINE, long, at_limit, "{bad", long]))
    assert [s.split(":")[1] for s in _records(f, "skip").skipped] == ["2", "4", "5"]


def test_record_over_the_limit_from_a_json_list(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(records, "MAX_RECORD_BYTES", 100)
    f = tmp_path / "d.json"
    f.write_text(json.dumps([REC, {**REC, "input": "z" * 200}]))
    with pytest.raises(UsageError, match=r"record 1: record of 205 characters, more than the limit of 100"):
        _records(f)


def test_generate_file_dev_zero_exits_2_fast(tmp_path: Path, capsys) -> None:
    t = time.monotonic()
    rc, _, err = _run(["generate", "--adapter", str(tmp_path / "none"), "--file", "/dev/zero"], capsys)
    assert rc == 2 and "--file /dev/zero:1: line longer than 16777216 characters" in err, err
    assert time.monotonic() - t < 20


def test_generate_prompt_lines_are_bounded(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(inference, "MAX_PROMPT_CHARS", 50)
    f = tmp_path / "p.txt"
    f.write_text("short\n" + "x" * 51 + "\nshort\n")
    rc, _, err = _run(["generate", "--adapter", str(tmp_path / "none"), "--file", str(f)], capsys)
    assert rc == 2 and f"--file {f}:2: line longer than 50 characters" in err, err
    monkeypatch.setattr("sys.stdin", io.StringIO("ok\n" + "y" * 80))
    rc, _, err = _run(["generate", "--adapter", str(tmp_path / "none")], capsys)
    assert rc == 2 and "stdin:2: line longer than 50" in err, err
    monkeypatch.setattr(inference, "MAX_PROMPTS_CHARS", 100)
    monkeypatch.setattr("sys.stdin", io.StringIO("ok\n" * 60))
    rc, _, err = _run(["generate", "--adapter", str(tmp_path / "none")], capsys)
    assert rc == 2 and "stdin: more than 100 characters of prompts" in err, err


def test_a_prompts_file_with_a_bom_reads_as_without(tmp_path: Path, tiny_model: Path, capsys) -> None:
    """A byte-order mark before the first line (Windows editors write one) is not part of the first prompt: its
    JSON request was read as the plain text of a prompt, mark and braces included, with exit 0."""
    rows = []
    for name, head in (("plain", b""), ("bom", b"\xef\xbb\xbf")):
        f = tmp_path / f"{name}.jsonl"
        f.write_bytes(head + b'{"instruction": "hi there", "input": ""}\nsecond\n')
        rc, out, err = _run(["generate", "--adapter", str(tiny_model), "--max-new-tokens", "2", "--file", str(f)],
                            capsys)
        assert rc == 0, err
        rows.append([json.loads(line) for line in out.splitlines()])
    assert rows[1] == rows[0] and rows[0][0]["instruction"] == "hi there" and rows[0][1]["instruction"] == "second"


def test_chat_piped_line_is_bounded(tiny_model: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(inference, "MAX_PROMPT_CHARS", 50)
    monkeypatch.setattr("sys.stdin", io.StringIO("z" * 200))
    rc, _, err = _run(["chat", "--adapter", str(tiny_model), "--max-new-tokens", "2"], capsys)
    assert rc == 2 and "stdin:1: line longer than 50 characters" in err, err


# --- 2. unreadable data files ---------------------------------------------------------------------------------------


def test_unreadable_data_file_names_it(tmp_path: Path, tiny_model: Path, capsys, monkeypatch) -> None:
    f, j = tmp_path / "x.jsonl", tmp_path / "x.json"
    f.write_text(LINE + "\n")
    j.write_text(json.dumps([REC]))
    real_open = open

    def deny(path, *a, **k):
        if Path(path) in (f, j):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(records, "open", deny, raising=False)
    with pytest.raises(UsageError, match=r"x\.jsonl: cannot open the data file \(Permission denied\)"):
        _records(f)
    with pytest.raises(UsageError, match=r"x\.json: cannot open the data file"):
        _records(j)
    err = _check(capsys, tmp_path, f"model.path={tiny_model}", f"data.path={j}")
    assert "x.json: cannot open the data file" in err


def test_data_path_that_is_not_a_regular_file(tmp_path: Path) -> None:
    d = tmp_path / "x.jsonl"
    d.mkdir()
    with pytest.raises(UsageError, match=r"x\.jsonl: directory is not a datasets save_to_disk dataset"):
        _records(d)
    fifo = tmp_path / "p.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(UsageError, match=r"p\.jsonl: not a regular file or directory"):
        _records(fifo)  # must not block opening a pipe nobody writes to
    with pytest.raises(UsageError, match="not a regular file"):
        _records(Path("/dev/zero"))


def test_hostile_json_values(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text(LINE + '\n{"instruction": "a", "output": ' + "9" * 5000 + "}\n")
    with pytest.raises(UsageError, match=r"d\.jsonl:2: invalid JSON: Exceeds the limit"):
        _records(f)
    assert len(_records(f, "skip")) == 1
    j = tmp_path / "d.json"
    j.write_text("[" + "9" * 5000 + "]")
    with pytest.raises(UsageError, match=r"d\.json: invalid JSON: Exceeds the limit"):
        _records(j)
    # A lone surrogate escape decodes to a str that every tokenizer rejects with a TypeError.
    f.write_text('{"instruction": "a\\ud800", "output": "b"}\n')
    with pytest.raises(UsageError, match=r"d\.jsonl:1: field 'instruction' holds an unpaired UTF-16 surrogate"):
        _records(f)


# --- 3. prompts longer than the context ---------------------------------------------------------------------------


def test_context_limit_sources(tiny_model: Path, tiny_tokenizer) -> None:
    tok = SimpleNamespace(model_max_length=int(1e30))
    assert context_limit(SimpleNamespace(config=SimpleNamespace(n_positions=1024)), tok) == (1024, True)
    assert context_limit(SimpleNamespace(config=SimpleNamespace(max_position_embeddings=4096)), tok) == (4096, True)
    assert context_limit(SimpleNamespace(config=SimpleNamespace()), SimpleNamespace(model_max_length=512)) == \
        (512, False)
    assert context_limit(SimpleNamespace(config=SimpleNamespace()), tok) == (inference.DEFAULT_CONTEXT, False)
    hard = SimpleNamespace(config=SimpleNamespace(n_positions=1024))
    assert prompt_budget(hard, tok, 24) == (1000, 1024)
    with pytest.raises(UsageError, match="--max-new-tokens 1024 leaves no room .* context of 1024 tokens; use at "
                                         "most 1023"):
        prompt_budget(hard, tok, 1024)
    # No hard limit (Bloom's ALiBi): a long generation still leaves the prompt half the default context.
    assert prompt_budget(SimpleNamespace(config=SimpleNamespace()), tok, 5000) == (1024, 2048)


@pytest.mark.slow  # a real 1 MB prompt through the tokenizer and generate: seconds, not unit-tier time
def test_megabyte_prompt_keeps_its_end(tiny_model: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(inference, "DEFAULT_CONTEXT", 256)  # generating after 2044 tokens takes seconds on a CPU
    model, tok, template, _ = load_for_inference(str(tiny_model))
    sides = tok.truncation_side, tok.padding_side
    seen: list[torch.Tensor] = []
    real = model.generate

    def spy(**kw):
        seen.append(kw["input_ids"])
        return real(**kw)

    monkeypatch.setattr(model, "generate", spy)
    prompt = "天" * (1 << 20)  # ~1 MB: the attention for it alone would need hundreds of GB
    reqs = [Conversation([Turn(prompt, "", "")]), Conversation([Turn("短", "", "")])]
    outs = generate(model, tok, template, reqs, GenOptions(max_new_tokens=4))
    assert len(outs) == 2
    budget = inference.DEFAULT_CONTEXT - 4
    assert seen[0].shape == (2, budget)
    tail = tok.decode(seen[0][0][-20:])
    assert tail.endswith(template.response_prefix), tail
    short = tok(template.prompt("短", ""))["input_ids"]
    assert seen[0][1][-len(short):].tolist() == short  # the short prompt is untouched (left padding)
    err = capsys.readouterr().err
    assert err.count("were cut") == 1 and f"1 prompt(s) longer than {budget} tokens" in err, err
    assert (tok.truncation_side, tok.padding_side) == sides


def test_long_prompt_through_generate_and_chat(tiny_model: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(inference, "DEFAULT_CONTEXT", 64)
    big = "天" * (64 << 10)  # the tokenizer takes seconds per megabyte: the 1 MB case is the test above
    rc, out, err = _run(["generate", "--adapter", str(tiny_model), "--max-new-tokens", "3", big], capsys)
    assert rc == 0 and "cut to their last 61" in err, err
    assert json.loads(out)["instruction"] == big
    monkeypatch.setattr("sys.stdin", io.StringIO(big + "\n/quit\n"))
    rc, out, err = _run(["chat", "--adapter", str(tiny_model), "--max-new-tokens", "3"], capsys)
    assert rc == 0 and "Assistant: " in out and "cut to their last 61" in err, err


def test_bad_generate_options_and_prompts(tmp_path: Path, tiny_model: Path, capsys, monkeypatch) -> None:
    none = str(tmp_path / "none")
    for opt in (["--temperature", "nan"], ["--repetition-penalty", "0"], ["--repetition-penalty", "inf"]):
        rc, _, err = _run(["generate", "--adapter", none, *opt, "x"], capsys)
        assert rc == 2 and "finite --temperature" in err, err
    for prompt, needle in (('{"instruction": ' + "1" * 5000 + "}", "prompt 1: invalid JSON: Exceeds"),
                           ('{"instruction": ' + "[" * 100000 + "}", "prompt 1: JSON nested too deeply"),
                           ('{"instruction": "\\ud800"}', "prompt 1: field 'instruction' holds an unpaired UTF-16"),
                           # A field the template does not read, written back with the response: refused before the
                           # model loads (it failed writing the output, every answer generated and lost).
                           ('{"instruction": "hi", "id": "\\ud800"}', "prompt 1: holds an unpaired UTF-16"),
                           ("a\udcff", "prompt 1: not valid Unicode")):
        rc, _, err = _run(["generate", "--adapter", none, prompt], capsys)
        assert rc == 2 and needle in err, err
    # Sampling at a temperature that overflows the scaled logits failed mid-generation (and ended a chat).
    rc, _, err = _run(["generate", "--adapter", none, "--sample", "--temperature", "1e-38", "x"], capsys)
    assert rc == 2 and "--temperature 1e-38: sampling needs at least 0.0001" in err, err
    rc, _, err = _run(["generate", "--adapter", str(tiny_model), "--out", str(tmp_path / "no" / "o.jsonl"), "x"],
                      capsys)
    assert rc == 2 and "not a file in an existing directory" in err
    d = tmp_path / "x.txt"
    d.mkdir()
    rc, _, err = _run(["generate", "--adapter", none, "--file", str(d)], capsys)
    assert rc == 2 and f"--file {d}: cannot open it" in err
    # Plain text that starts with "{" is read as JSON: the error says how to ask it as text.
    rc, _, err = _run(["generate", "--adapter", none, "{x:1} explain"], capsys)
    assert rc == 2 and 'to ask it as plain text, send it as {"instruction": "..."}' in err, err
    # Prompts as arguments and a --file: the file was silently ignored.
    rc, _, err = _run(["generate", "--adapter", none, "--file", str(d), "x"], capsys)
    assert rc == 2 and f"prompts given both as arguments and with --file {d}; give them one way" in err, err
    # chat: a bad JSON line is reported and the session goes on.
    monkeypatch.setattr("sys.stdin", io.StringIO('{"instruction": 3}\n你好\n'))
    rc, out, err = _run(["chat", "--adapter", str(tiny_model), "--max-new-tokens", "2"], capsys)
    assert rc == 0 and "input 1: field 'instruction' must be a string, got int" in err and out.count("Assistant: ") == 1


# --- 4. truncated or corrupt safetensors ---------------------------------------------------------------------------


def _copy(tiny_model: Path, dst: Path) -> Path:
    shutil.copytree(tiny_model, dst)
    return dst


def _header_len(f: Path) -> int:
    return struct.unpack("<Q", f.read_bytes()[:8])[0]


@pytest.mark.parametrize("cut", ["header-only", "mid-tensor", "one-byte-short"])
def test_truncated_safetensors_fails_preflight(cut: str, tmp_path: Path, tiny_model: Path, capsys) -> None:
    d = _copy(tiny_model, tmp_path / "m")
    f = d / "model.safetensors"
    full, n = f.stat().st_size, _header_len(f)
    keep = {"header-only": 8 + n, "mid-tensor": (8 + n + full) // 2, "one-byte-short": full - 1}[cut]
    os.truncate(f, keep)
    msg = rf"model\.safetensors: truncated: {keep} bytes, header needs {full}"
    with pytest.raises(UsageError, match=msg):
        check_model_dir(str(d))
    with pytest.raises(UsageError, match=msg):
        SafetensorsFile(f)
    assert "truncated" in _check(capsys, tmp_path, f"model.path={d}")
    rc, _, err = _run(["generate", "--adapter", str(d), "x"], capsys)
    assert rc == 2 and "model.safetensors: truncated" in err, err


def _rewrite_header(f: Path, header: bytes, length: int | None = None) -> None:
    data = f.read_bytes()
    n = _header_len(f)
    f.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + data[8 + n:])


@pytest.mark.parametrize("case,header,length,needle", [
    ("not-json", b"\x00garbage" * 4, None, "corrupt safetensors header (not JSON"),
    ("length-past-eof", b"{}", 1 << 40, "length field says 1099511627776 bytes"),
    ("list", b"[1, 2]", None, "a JSON list, not an object"),
    ("bad-offsets", json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}).encode(), None,
     "'data_offsets' is not [begin, end]"),
    ("offsets-vs-shape", json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}).encode(), None,
     "data_offsets span 4 bytes, shape [2] of F32 needs 8"),
    ("no-dtype", json.dumps({"w": {"shape": [2], "data_offsets": [0, 8]}}).encode(), None, "no string 'dtype'"),
    ("huge-int", b'{"w": ' + b"1" * 5000 + b"}", None, "corrupt safetensors header (not JSON"),
])
def test_corrupt_safetensors_header(case: str, header: bytes, length: int | None, needle: str, tmp_path: Path,
                                    tiny_model: Path, capsys) -> None:
    d = _copy(tiny_model, tmp_path / "m")
    _rewrite_header(d / "model.safetensors", header, length)
    with pytest.raises(UsageError) as e:
        check_model_dir(str(d))
    assert "model.safetensors" in str(e.value) and needle in str(e.value)
    assert needle in _check(capsys, tmp_path, f"model.path={d}")


def test_short_and_padded_safetensors(tmp_path: Path, tiny_model: Path) -> None:
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"abc")
    with pytest.raises(UsageError, match=r"w\.safetensors: not a safetensors file \(3 bytes"):
        safetensors_header(f)
    shutil.copy(tiny_model / "model.safetensors", f)
    full = f.stat().st_size
    with open(f, "ab") as fh:
        fh.write(b"\0" * 10)
    with pytest.raises(UsageError, match=rf"corrupt: {full + 10} bytes, header accounts for {full}"):
        safetensors_header(f)


def test_shard_index_must_stay_inside_the_model_dir(tmp_path: Path, tiny_model: Path) -> None:
    d = _copy(tiny_model, tmp_path / "m")
    idx = d / "model.safetensors.index.json"
    idx.write_text(json.dumps({"weight_map": {"a": "../../etc/passwd"}}))
    with pytest.raises(UsageError, match="points outside the model dir"):
        check_model_dir(str(d))
    idx.write_text(json.dumps({"weight_map": {"a": 5}}))
    with pytest.raises(UsageError, match="unreadable weight index"):
        check_model_dir(str(d))
    idx.write_text(json.dumps([1]))
    with pytest.raises(UsageError, match="unreadable weight index"):
        check_model_dir(str(d))


# --- 5. pickles in .bin weights ------------------------------------------------------------------------------------


class _Evil:
    """Unpickling this creates the marker file: what a malicious checkpoint would do with a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _bin_model(tiny_model: Path, dst: Path, payload: object) -> Path:
    d = _copy(tiny_model, dst)
    (d / "model.safetensors").unlink()
    torch.save(payload, d / "pytorch_model.bin")
    return d


def test_malicious_bin_is_refused_unloaded(tmp_path: Path, tiny_model: Path, capsys) -> None:
    marker = tmp_path / "pwned"
    d = _bin_model(tiny_model, tmp_path / "m", {"transformer.word_embeddings.weight": torch.zeros(2), "x":
                                                _Evil(marker)})
    needle = "holds non-tensor objects"
    with pytest.raises(UsageError, match=needle) as e:
        check_model_dir(str(d))
    assert "pytorch_model.bin" in str(e.value) and "weights_only=False" not in str(e.value)
    with pytest.raises(UsageError, match=needle):
        TorchBinFile(d / "pytorch_model.bin")
    err = _check(capsys, tmp_path, f"model.path={d}")
    assert needle in err and "pytorch_model.bin" in err
    rc, _, err = _run(["generate", "--adapter", str(d), "x"], capsys)
    assert rc == 2 and needle in err, err
    assert not marker.exists()


def test_malicious_bin_past_the_checks_still_gives_a_usage_error(tmp_path: Path, tiny_model: Path, capsys,
                                                                  monkeypatch) -> None:
    """Should a .bin reach transformers unchecked (a hub download), its weights-only refusal is still a UsageError,
    without torch's advice to load it with weights_only=False."""
    marker = tmp_path / "pwned"
    d = _bin_model(tiny_model, tmp_path / "m", {"x": _Evil(marker)})
    monkeypatch.setattr(inference, "check_model_dir", lambda *a, **k: None)
    rc, _, err = _run(["generate", "--adapter", str(d), "x"], capsys)
    assert rc == 2 and "holds non-tensor objects" in err and "weights_only" not in err, err
    assert len(err.strip().splitlines()) == 1 and not marker.exists()


def test_bin_weights_good_legacy_and_odd(tmp_path: Path, tiny_model: Path) -> None:
    from safetensors.torch import load_file

    sd = load_file(str(tiny_model / "model.safetensors"))
    check_model_dir(str(_bin_model(tiny_model, tmp_path / "good", sd)))
    legacy = _copy(tiny_model, tmp_path / "legacy")
    (legacy / "model.safetensors").unlink()
    torch.save(sd, legacy / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    check_model_dir(str(legacy))  # from_pretrained reads these (unmapped); ZeRO-3's loader cannot
    with pytest.raises(UsageError, match="cannot memory-map this checkpoint"):
        TorchBinFile(legacy / "pytorch_model.bin")
    with pytest.raises(UsageError, match="not a state dict"):
        check_model_dir(str(_bin_model(tiny_model, tmp_path / "list", [1, 2])))
    with pytest.raises(UsageError, match="entry 'a' is a int, not a tensor"):
        check_model_dir(str(_bin_model(tiny_model, tmp_path / "ints", {"a": 1})))
    junk = _bin_model(tiny_model, tmp_path / "junk", {})
    (junk / "pytorch_model.bin").write_bytes(b"hello world" * 10)
    with pytest.raises(UsageError, match=r"pytorch_model\.bin: (not a PyTorch|cannot read this PyTorch) checkpoint"):
        check_model_dir(str(junk))
    cut = _bin_model(tiny_model, tmp_path / "cut", sd)
    os.truncate(cut / "pytorch_model.bin", (cut / "pytorch_model.bin").stat().st_size // 2)
    with pytest.raises(UsageError, match="cannot read this PyTorch checkpoint") as e:
        check_model_dir(str(cut))
    assert "\n" not in str(e.value)


# --- 6. adapter dirs ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from peft import IA3Config, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    pm = get_peft_model(model, IA3Config(task_type="CAUSAL_LM", target_modules=["query_key_value", "dense_4h_to_h"],
                                         feedforward_modules=["dense_4h_to_h"]))
    d = tmp_path_factory.mktemp("adapter") / "adapter"
    pm.save_pretrained(str(d))
    return d


def _adapter_copy(adapter: Path, dst: Path, config: str | None = None) -> Path:
    shutil.copytree(adapter, dst)
    if config is not None:
        (dst / "adapter_config.json").write_text(config)
    return dst


def test_good_adapter_generates(adapter: Path, capsys) -> None:
    rc, out, err = _run(["generate", "--adapter", str(adapter), "--max-new-tokens", "2", "你好"], capsys)
    assert rc == 0, err
    assert json.loads(out)["instruction"] == "你好"


def _cfg(adapter: Path, **change: object) -> str:
    c = json.loads((adapter / "adapter_config.json").read_text())
    c.update(change)
    return json.dumps({k: v for k, v in c.items() if v is not ...})


@pytest.mark.parametrize("case", ["not-json", "list", "empty", "no-peft-type", "peft-type-int", "base-int",
                                  "base-list", "no-base", "target-int", "target-missing", "huge-int"])
def test_garbage_adapter_config(case: str, adapter: Path, tmp_path: Path, capsys) -> None:
    config, needle = {
        "not-json": ("garbage", "adapter config is not valid JSON"),
        "list": ("[1, 2]", "expected a JSON object (PEFT's adapter config), got a list"),
        "empty": ("{}", "'peft_type' is None"),
        "no-peft-type": (_cfg(adapter, peft_type=...), "'peft_type' is None"),
        "peft-type-int": (_cfg(adapter, peft_type=5), "'peft_type' is 5"),
        "base-int": (_cfg(adapter, base_model_name_or_path=5), "'base_model_name_or_path' must be a string"),
        "base-list": (_cfg(adapter, base_model_name_or_path=["a"]), "'base_model_name_or_path' must be a string"),
        "no-base": (_cfg(adapter, base_model_name_or_path=...), "names no base model; pass --base"),
        "target-int": (_cfg(adapter, target_modules=5), "cannot load the adapter onto"),
        "target-missing": (_cfg(adapter, target_modules=["nope"]), "cannot load the adapter onto"),
        "huge-int": ('{"peft_type": ' + "7" * 5000 + "}", "adapter config is not valid JSON"),
    }[case]
    d = _adapter_copy(adapter, tmp_path / "a", config)
    rc, _, err = _run(["generate", "--adapter", str(d), "x"], capsys)
    assert rc == 2 and needle in err, err
    assert str(d) in err and len(err.strip().splitlines()) == 1, err


def test_adapter_weights_and_base_checked(adapter: Path, tiny_model: Path, tmp_path: Path, capsys) -> None:
    d = _adapter_copy(adapter, tmp_path / "cut")
    f = d / "adapter_model.safetensors"
    os.truncate(f, f.stat().st_size - 1)
    rc, _, err = _run(["generate", "--adapter", str(d), "x"], capsys)
    assert rc == 2 and f"{f}: truncated" in err, err

    marker = tmp_path / "pwned"
    d = _adapter_copy(adapter, tmp_path / "evil")
    (d / "adapter_model.safetensors").unlink()
    torch.save({"x": _Evil(marker)}, d / "adapter_model.bin")
    rc, _, err = _run(["generate", "--adapter", str(d), "x"], capsys)
    assert rc == 2 and "adapter_model.bin: holds non-tensor objects" in err, err
    assert not marker.exists()

    d = _adapter_copy(adapter, tmp_path / "noweights")
    (d / "adapter_model.safetensors").unlink()
    rc, _, err = _run(["generate", "--adapter", str(d), "x"], capsys)
    assert rc == 2 and "no adapter weights" in err, err

    base = _copy(tiny_model, tmp_path / "base")
    os.truncate(base / "model.safetensors", 100)
    d = _adapter_copy(adapter, tmp_path / "badbase", _cfg(adapter, base_model_name_or_path=str(base)))
    rc, _, err = _run(["generate", "--adapter", str(d), "x"], capsys)
    assert rc == 2 and f"{base}/model.safetensors: corrupt safetensors header" in err, err
    rc, _, err = _run(["generate", "--adapter", str(d), "--base", str(tmp_path / "nobase"), "x"], capsys)
    assert rc == 2 and "base model" in err and "no such directory" in err, err


def test_adapter_cut_off_while_written(adapter: Path, tmp_path: Path, capsys) -> None:
    """A run stopped between writing ``adapter.new`` and renaming it: the message says so and how to get it."""
    shutil.copytree(adapter, tmp_path / "adapter.new")
    rc, _, err = _run(["generate", "--adapter", str(tmp_path / "adapter"), "x"], capsys)
    assert rc == 2 and "its run was stopped while it wrote the adapter (into adapter.new)" in err, err
    assert "train.resume=auto" in err, err
    # Between the two renames (the earlier adapter set aside): the new one is complete.
    shutil.copytree(adapter, tmp_path / "adapter.old.0123456789ab")
    rc, _, err = _run(["generate", "--adapter", str(tmp_path / "adapter"), "x"], capsys)
    assert rc == 2 and "adapter.new holds it, complete: rename it to adapter" in err, err


def test_broken_template_and_tokenizer(adapter: Path, tiny_model: Path, tmp_path: Path, capsys) -> None:
    d = _adapter_copy(adapter, tmp_path / "tpl")
    (d / "ia3_dist.json").write_text(json.dumps({"prompt_template": "{nope}", "strip_prompt": True,
                                                 "response_prefix": "A: "}))
    rc, _, err = _run(["generate", "--adapter", str(d), "x"], capsys)
    assert rc == 2 and "ia3_dist.json: unusable prompt template" in err, err
    (d / "ia3_dist.json").write_text(json.dumps({"prompt_template": 5}))
    rc, _, err = _run(["generate", "--adapter", str(d), "x"], capsys)
    assert rc == 2 and "ia3_dist.json" in err, err

    m = _copy(tiny_model, tmp_path / "tok")
    (m / "tokenizer.json").write_text("{not json")
    rc, _, err = _run(["generate", "--adapter", str(m), "x"], capsys)
    assert rc == 2 and f"tokenizer {m}: cannot load it" in err, err


def test_a_tokenizer_file_of_the_wrong_shape_stops_the_preflight(tiny_model: Path, tmp_path: Path, capsys) -> None:
    """Valid JSON that the Rust tokenizers library cannot read raises a bare Exception (a traceback and exit 1
    from the training preflight before): exit 2 naming the tokenizer."""
    m = _copy(tiny_model, tmp_path / "tok")
    spec = json.loads((m / "tokenizer.json").read_text(encoding="utf-8"))
    spec["model"]["merges"] = 5
    (m / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    rc = main(["check", "--config", "configs/tiny-cpu.yaml", f"model.path={m}", f"output.dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert rc == 2 and f"tokenizer {m}: cannot load it (Exception: " in err and "tokenizer.json" in err, err
    assert "Traceback" not in err


class _CtrlC(io.StringIO):
    """stdin whose next read is interrupted by Ctrl-C (SIGINT raises KeyboardInterrupt in the blocked read)."""

    def readline(self, *a: Any) -> str:
        raise KeyboardInterrupt


def _chat(tiny_model: Path, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    try:
        return _run(["chat", "--adapter", str(tiny_model), "--max-new-tokens", "2"], capsys)
    except KeyboardInterrupt:  # escaping, it would end the test session instead of failing this test
        pytest.fail("Ctrl-C escaped ia3-dist chat (a traceback for the user)")


def test_chat_ctrl_c_at_the_prompt_ends_quietly(tiny_model: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr("sys.stdin", _CtrlC())
    rc, out, err = _chat(tiny_model, capsys)
    assert rc == 0 and "Traceback" not in err, err


def test_chat_ctrl_c_while_answering_drops_that_answer_and_goes_on(tiny_model: Path, capsys, monkeypatch) -> None:
    real, calls = inference.generate, []

    def interrupted_once(*a: Any, **k: Any) -> list[str]:
        calls.append(a[3][0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(inference, "generate", interrupted_once)
    # The interrupted line sets a system prompt: dropped with it, as its question is.
    monkeypatch.setattr("sys.stdin", io.StringIO('zero\n{"instruction": "first", "system": "be brief"}\nsecond\n'))
    rc, out, err = _chat(tiny_model, capsys)
    assert rc == 0 and "Traceback" not in err, err
    assert out.count("(interrupted)") == 1 and out.count("Assistant: ") == 2, out
    assert calls[1].system == "be brief"
    # the interrupted exchange is not in the conversation the next answer continues
    assert [t.instruction for t in calls[2].turns] == ["zero", "second"] and calls[2].system == ""


def test_chat_a_line_the_template_cannot_render_is_dropped_and_the_session_goes_on(tiny_model: Path, capsys,
                                                                                   monkeypatch) -> None:
    """A long session can reach the chat template's render budget, or a line a role it refuses: that line is
    dropped with the error, not the whole conversation with exit 2."""
    from ia3_dist.errors import UsageError

    real, calls = inference.generate, []

    def refused_once(*a: Any, **k: Any) -> list[str]:
        calls.append(a[3][0])
        if len(calls) == 2:
            raise UsageError("data.template chat_template: the chat template went past its render budget")
        return real(*a, **k)

    monkeypatch.setattr(inference, "generate", refused_once)
    monkeypatch.setattr("sys.stdin", io.StringIO("zero\nfirst\nsecond\n"))
    rc, out, err = _chat(tiny_model, capsys)
    assert rc == 0 and "render budget; that line is dropped" in err, err
    assert out.count("Assistant: ") == 2, out
    assert [t.instruction for t in calls[2].turns] == ["zero", "second"]
