"""Hub downloads fetch one weight format: the choice on the file lists of real repos (pure), and the download path
end to end against a fake hub: the hub client's own cache layout in a tmp dir, filled by a stand-in for
``snapshot_download`` that filters with the client's own pattern matcher, then read back offline by the real client.
The ZeRO-3 loader and ``from_pretrained`` read the same files from every dir."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from ia3_dist.errors import UsageError
from ia3_dist.models.files import checkpoint_files, hub_files, hub_model_dir, hub_weights

TOKENIZER = ["special_tokens_map.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json"]

# meta-llama/Llama-2-7b-hf: both formats, sharded (13.5 GB each).
LLAMA2 = [".gitattributes", "LICENSE.txt", "README.md", "Responsible-Use-Guide.pdf", "USE_POLICY.md", "config.json",
          "generation_config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
          "model.safetensors.index.json", "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
          "pytorch_model.bin.index.json", *TOKENIZER]
# mistralai/Mistral-7B-v0.3: shards for transformers, plus consolidated.safetensors (the same weights, in
# mistral-inference's layout: transformers never reads it).
MISTRAL = [".gitattributes", "README.md", "config.json", "consolidated.safetensors", "generation_config.json",
           "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors",
           "model.safetensors.index.json", "params.json", *TOKENIZER, "tokenizer.model.v3"]
# A Mistral release with a single file beside its consolidated one.
MISTRAL_SINGLE = [".gitattributes", "README.md", "config.json", "consolidated.safetensors", "generation_config.json",
                  "model.safetensors", "params.json", "tekken.json", "tokenizer.json", "tokenizer_config.json"]
# huggyllama/llama-7b: .bin shards only (and a training_args.bin, which is not weights).
BINS_ONLY = ["config.json", "generation_config.json", "pytorch_model-00001-of-00002.bin",
             "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json", "training_args.bin", *TOKENIZER]
# openai-community/gpt2: every format there is.
GPT2 = [".gitattributes", "64-8bits.tflite", "64-fp16.tflite", "64.tflite", "README.md", "config.json",
        "flax_model.msgpack", "generation_config.json", "merges.txt", "model.safetensors", "onnx/config.json",
        "onnx/decoder_model.onnx", "onnx/decoder_model_merged.onnx", "onnx/decoder_with_past_model.onnx",
        "onnx/generation_config.json", "onnx/merges.txt", "onnx/special_tokens_map.json", "onnx/tokenizer.json",
        "onnx/tokenizer_config.json", "onnx/vocab.json", "pytorch_model.bin", "rust_model.ot", "tf_model.h5",
        "tokenizer.json", "tokenizer_config.json", "vocab.json"]
# meta-llama/Llama-3.1-8B: shards, and Meta's original checkpoint in original/.
LLAMA3 = [".gitattributes", "LICENSE", "README.md", "USE_POLICY.md", "config.json", "generation_config.json",
          *(f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)), "model.safetensors.index.json",
          "original/consolidated.00.pth", "original/params.json", "original/tokenizer.model",
          "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
# microsoft/Phi-3-mini-4k-instruct: its own modelling code.
PHI3 = ["CODE_OF_CONDUCT.md", "LICENSE", "NOTICE.md", "README.md", "SECURITY.md", "added_tokens.json", "config.json",
        "configuration_phi3.py", "generation_config.json", "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors", "model.safetensors.index.json", "modeling_phi3.py", "sample_finetune.py",
        *TOKENIZER]
# TheBloke/Llama-2-7B-GGUF: quantised files only.
GGUF = [".gitattributes", "LICENSE.txt", "Notice", "README.md", "USE_POLICY.md", "config.json",
        "llama-2-7b.Q2_K.gguf", "llama-2-7b.Q4_K_M.gguf", "llama-2-7b.Q8_0.gguf"]


def shards(n: int, prefix: str = "model", ext: str = "safetensors") -> list[str]:
    return [f"{prefix}-{i:05d}-of-{n:05d}.{ext}" for i in range(1, n + 1)]


def test_both_formats_fetch_safetensors_only() -> None:
    assert hub_weights(LLAMA2) == "model.safetensors.index.json"
    assert hub_files(LLAMA2) == ["LICENSE.txt", "config.json", "generation_config.json", "model.safetensors.index.json",
                                 "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
                                 "tokenizer_config.json"]
    got = hub_files(LLAMA2, shards=shards(2))
    assert set(got) - set(hub_files(LLAMA2)) == set(shards(2))
    assert not [f for f in got if f.endswith(".bin") or f.startswith("pytorch_model")]


def test_consolidated_safetensors_is_not_fetched() -> None:
    assert hub_weights(MISTRAL) == "model.safetensors.index.json"
    got = hub_files(MISTRAL, shards=shards(3))
    assert "consolidated.safetensors" not in got and set(shards(3)) <= set(got)
    assert "tokenizer.model.v3" not in got  # read by mistral-inference only
    assert hub_weights(MISTRAL_SINGLE) == "model.safetensors"
    assert [f for f in hub_files(MISTRAL_SINGLE) if f.endswith(".safetensors")] == ["model.safetensors"]


def test_bins_when_there_is_no_safetensors() -> None:
    assert hub_weights(BINS_ONLY) == "pytorch_model.bin.index.json"
    got = hub_files(BINS_ONLY, shards=shards(2, "pytorch_model", "bin"))
    assert [f for f in got if f.endswith(".bin")] == shards(2, "pytorch_model", "bin")
    assert hub_weights(["config.json", "pytorch_model.bin"]) == "pytorch_model.bin"


def test_other_formats_and_subfolders_are_not_fetched() -> None:
    assert hub_files(GPT2) == ["config.json", "generation_config.json", "merges.txt", "model.safetensors",
                               "tokenizer.json", "tokenizer_config.json", "vocab.json"]
    got = hub_files(LLAMA3, shards=shards(4))
    assert not [f for f in got if f.startswith("original/")]
    with pytest.raises(UsageError, match=r"no model\.safetensors.*llama-2-7b\.Q2_K\.gguf"):
        hub_weights(GGUF)


def test_remote_code_only_when_trusted() -> None:
    assert not [f for f in hub_files(PHI3, shards=shards(2)) if f.endswith(".py")]
    got = hub_files(PHI3, trust_remote_code=True, shards=shards(2))
    assert {"configuration_phi3.py", "modeling_phi3.py", "added_tokens.json"} <= set(got)


def test_single_file_before_index_as_from_pretrained(tmp_path: Path, tiny_model: Path) -> None:
    """A dir with a single file and a shard index of other weights (or .bin of other weights): the ZeRO-3 loader
    reads what from_pretrained reads, and a hub download would pick the same."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    d = tmp_path / "both"
    shutil.copytree(tiny_model, d)
    torch.manual_seed(1)
    other = AutoModelForCausalLM.from_config(AutoModelForCausalLM.from_pretrained(str(tiny_model)).config)
    other.save_pretrained(str(tmp_path / "other"), max_shard_size="200KB")
    for f in (tmp_path / "other").glob("model*.safetensors*"):
        shutil.copy(f, d / f.name)
    torch.save(other.state_dict(), d / "pytorch_model.bin")
    assert (d / "model.safetensors.index.json").is_file()
    assert checkpoint_files(d) == [d / "model.safetensors"]
    assert hub_weights(os.listdir(d)) == "model.safetensors"
    loaded = AutoModelForCausalLM.from_pretrained(str(d)).state_dict()
    single = load_file(str(d / "model.safetensors"))
    for k, v in single.items():
        assert torch.equal(loaded[k], v), k


# The fake hub: the repo's files in a dir, served into a cache in the hub client's layout.
REPO = "tiny-org/tiny-bloom"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _remote(root: Path, tiny_model: Path) -> Path:
    """A repo like LLAMA2 and GPT2 at once: sharded safetensors, .bin weights, Mistral's consolidated file, GGUF,
    Flax, ONNX, remote code; and a file name the hub client's patterns would read as a glob."""
    from transformers import AutoModelForCausalLM

    r = root / "remote"
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    model.save_pretrained(str(r), max_shard_size="200KB")
    assert len(list(r.glob("model-*.safetensors"))) > 1
    for f in tiny_model.glob("tokenizer*"):
        shutil.copy(f, r / f.name)
    torch.save(model.state_dict(), r / "pytorch_model.bin")
    shutil.copy(next(r.glob("model-*.safetensors")), r / "consolidated.safetensors")
    for junk in ("flax_model.msgpack", "model.Q4_K_M.gguf", "onnx/model.onnx", "onnx/config.json",
                 "modeling_custom.py", "README.md"):
        (r / junk).parent.mkdir(exist_ok=True)
        (r / junk).write_bytes(b"not for loading")
    (r / "notes[v2].txt").write_text("a name with glob characters")
    return r


def _listing(remote: Path) -> list[str]:
    return sorted(f.relative_to(remote).as_posix() for f in remote.rglob("*") if f.is_file())


def _serve(remote: Path, cache: Path, names: list[str], revision: str | None) -> Path:
    """``names`` of ``remote`` into ``cache`` as the hub client lays it out: content-addressed blobs, the commit's
    snapshot dir of relative links to them, the revision's ref naming the commit."""
    from huggingface_hub.file_download import repo_folder_name

    repo = cache / repo_folder_name(repo_id=REPO, repo_type="model")
    snap = repo / "snapshots" / COMMIT
    for name in names:
        data = (remote / name).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snap / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if revision != COMMIT:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / (revision or "main")).write_text(COMMIT)
    return snap


@pytest.fixture
def fake_hub(tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Online: listing and download come from the remote dir (downloads recorded); the real client serves every
    ``local_files_only`` call from the cache, as it does offline."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.utils import filter_repo_objects

    remote, cache = _remote(tmp_path, tiny_model), tmp_path / "hub-cache"
    real = huggingface_hub.snapshot_download
    hub: dict[str, Any] = {"remote": remote, "cache": cache, "downloaded": []}

    def list_repo_files(self: Any, repo_id: str, revision: str | None = None, **_: Any) -> list[str]:
        assert repo_id == REPO
        return _listing(remote)

    def snapshot_download(repo_id: str, *, revision: str | None = None, cache_dir: Any = None,
                          local_files_only: bool = False, allow_patterns: Any = None, **kw: Any) -> str:
        if local_files_only:
            return real(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True,
                        allow_patterns=allow_patterns, **kw)
        assert repo_id == REPO and revision in (None, "main", COMMIT)
        names = list(filter_repo_objects(_listing(remote), allow_patterns=allow_patterns))
        hub["downloaded"] += names
        return str(_serve(remote, Path(cache_dir or constants.HF_HUB_CACHE), names, revision))

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", list_repo_files)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return hub


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _no_hub(*a: Any, **k: Any) -> Any:
    raise AssertionError("asked the hub where nothing may")


def _count_listings(monkeypatch: pytest.MonkeyPatch, forbid_transformers: bool = False) -> list[str | None]:
    """The revisions the hub's file listing is asked for, in order. ``forbid_transformers``: transformers' own hub
    downloads fail the test (a rank reading by hub name, which the preflight's snapshots replace)."""
    import huggingface_hub
    import transformers.utils.hub as transformers_hub

    asked: list[str | None] = []
    listing = huggingface_hub.HfApi.list_repo_files

    def counting(self: Any, repo_id: str, revision: str | None = None, **kw: Any) -> list[str]:
        asked.append(revision)
        return listing(self, repo_id, revision=revision, **kw)

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", counting)
    if forbid_transformers:
        for name in ("hf_hub_download", "snapshot_download"):
            monkeypatch.setattr(transformers_hub, name, _no_hub)
    return asked


@pytest.mark.parametrize("trust", [False, True])
def test_download_fetches_one_format(fake_hub: dict[str, Any], trust: bool) -> None:
    remote = fake_hub["remote"]
    shard_files = sorted(f.name for f in remote.glob("model-*.safetensors"))
    d = hub_model_dir(REPO, None, trust_remote_code=trust)
    got = sorted(fake_hub["downloaded"])
    want = sorted(["config.json", "generation_config.json", "model.safetensors.index.json", *shard_files,
                   "notes[v2].txt", *(f.name for f in remote.glob("tokenizer*")),
                   *(["modeling_custom.py"] if trust else [])])
    assert got == want
    assert sorted(f.relative_to(d).as_posix() for f in d.rglob("*") if f.is_file()) == want
    assert d.name == COMMIT and checkpoint_files(d) == [d / f for f in shard_files]


def test_offline_cache_loads_on_both_paths(fake_hub: dict[str, Any], tiny_model: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache filled online, read back with HF_HUB_OFFLINE by the real hub client: ``from_pretrained`` (ZeRO 0-2)
    and the ZeRO-3 loader's files hold the tiny model's weights."""
    import huggingface_hub
    from huggingface_hub import constants
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from ia3_dist.config.schema import ModelSection
    from ia3_dist.models.load import load_base_model
    from ia3_dist.models.zero3_load import local_model_dir

    online = hub_model_dir(REPO, None)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def no_network(*a: Any, **k: Any) -> Any:
        raise AssertionError("the hub was asked while offline")

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", no_network)
    assert local_model_dir(REPO, None) == online
    ref = _state(AutoModelForCausalLM.from_pretrained(str(tiny_model)))
    plain = _state(load_base_model(ModelSection(path=REPO), REPO, "fp32"))
    zero3: dict[str, torch.Tensor] = {}
    for f in checkpoint_files(online):
        zero3.update(load_file(str(f)))
    for k, v in ref.items():
        assert torch.equal(plain[k], v), k
    for k, v in zero3.items():
        assert torch.equal(ref[k], v), k


def test_offline_without_cache_or_with_missing_shard(fake_hub: dict[str, Any],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UsageError, match="HF_HUB_OFFLINE is set, and the hub cache has no snapshot"):
        hub_model_dir(REPO, None)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    d = hub_model_dir(REPO, None)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    gone = sorted(d.glob("model-*.safetensors"))[-1]
    gone.unlink()
    with pytest.raises(UsageError, match=f"names shards that the hub cache does not have: {gone.name}"):
        hub_model_dir(REPO, None)


def test_unreachable_hub_falls_back_to_the_cache(fake_hub: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    d = hub_model_dir(REPO, None)

    def unreachable(*a: Any, **k: Any) -> Any:
        raise ConnectionError("no route to host")

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", unreachable)
    assert hub_model_dir(REPO, None) == d


def test_repo_without_loadable_weights_downloads_nothing(fake_hub: dict[str, Any]) -> None:
    remote = fake_hub["remote"]
    for f in [*remote.glob("model*.safetensors*"), remote / "pytorch_model.bin"]:
        f.unlink()
    with pytest.raises(UsageError, match=r"model\.path tiny-org/tiny-bloom: no model\.safetensors.*in the repo "
                                         r"\(it has consolidated\.safetensors"):
        hub_model_dir(REPO, None)
    assert fake_hub["downloaded"] == []


@pytest.mark.parametrize("broken", [False, True])
def test_preflight_downloads_and_checks_a_hub_model(fake_hub: dict[str, Any], tmp_path: Path, broken: bool,
                                                    monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """``ia3-dist check`` (the preflight every rank runs before the process group) fetches a hub model into the
    hub cache and checks its weights as a local dir's: a truncated shard in the cache exits 2 naming it, before
    any rank would wait on another; the whole one passes."""
    from huggingface_hub import constants

    from ia3_dist.cli import main

    d = hub_model_dir(REPO, None)  # the cache filled online; the preflight then runs offline from it
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    shard = sorted(d.glob("model-*.safetensors"))[-1]
    if broken:
        blob = shard.resolve()
        blob.write_bytes(blob.read_bytes()[:-100])
    out = tmp_path / "out"
    rc = main(["check", "--config", str(Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml"),
               f"model.path={REPO}", f"output.dir={out}", "deepspeed.config=zero3"])
    got = capsys.readouterr()
    if broken:
        assert rc == 2, got.out + got.err
        assert shard.name in got.err and "Traceback" not in got.err, got.err
    else:
        assert rc == 0, got.out + got.err
        assert "preflight: OK" in got.out


def test_a_stale_index_of_the_other_format_in_the_snapshot_is_not_required(fake_hub: dict[str, Any],
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A snapshot that already holds the other format's shard index without its shards (``hf download
    --exclude "*.bin"`` fetches pytorch_model.bin.index.json; so did an interrupted earlier download): the weights
    that load (the safetensors shards) are complete, so the download passes; from_pretrained never reads the
    other index. The index that loads is still required whole."""
    from huggingface_hub import constants

    stale = fake_hub["remote"] / "pytorch_model.bin.index.json"
    stale.write_text('{"weight_map": {"a": "pytorch_model-00001-of-00002.bin", '
                     '"b": "pytorch_model-00002-of-00002.bin"}}')
    _serve(fake_hub["remote"], Path(constants.HF_HUB_CACHE), ["config.json", stale.name], None)
    d = hub_model_dir(REPO, None)
    assert (d / stale.name).is_file() and checkpoint_files(d)[0].name.startswith("model-")
    sorted(d.glob("model-*.safetensors"))[-1].unlink()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UsageError, match="names shards that the hub cache does not have"):
        hub_model_dir(REPO, None)


def test_local_dir_needs_only_the_shards_that_load(tmp_path: Path, tiny_model: Path) -> None:
    """A local dir holding complete safetensors and a .bin shard index whose shards were never copied: it loads
    (from_pretrained reads the safetensors), so it is not refused; a missing shard of the index that loads is."""
    import json

    from ia3_dist.models.files import check_model_dir

    d = tmp_path / "m"
    shutil.copytree(tiny_model, d)
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"a": "pytorch_model-1.bin"}}))
    check_model_dir(str(d))
    (d / "model.safetensors").unlink()
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-1.safetensors"}}))
    with pytest.raises(UsageError, match="weight shards missing: model-1.safetensors"):
        check_model_dir(str(d))


def test_offline_cache_without_weights_says_how_to_get_them(fake_hub: dict[str, Any],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline, a cache that holds only what ``ia3-dist prepare`` read (config, tokenizer): the error says the
    hub cache lacks the weights, why the hub was not asked, and how to fetch them."""
    from huggingface_hub import constants

    _serve(fake_hub["remote"], Path(constants.HF_HUB_CACHE),
           ["config.json", *(f.name for f in fake_hub["remote"].glob("tokenizer*"))], None)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UsageError, match=r"in the hub cache;.*HF_HUB_OFFLINE is set.*hf download tiny-org/tiny-bloom"):
        hub_model_dir(REPO, None)


def test_hub_model_keeps_its_hub_name(fake_hub: dict[str, Any]) -> None:
    """Loaded from its snapshot dir, a hub model is still named by its hub id: PEFT writes that name into the
    adapter's adapter_config.json (base_model_name_or_path), which generate/chat/export and AutoPeftModel load the
    base from; a path into this machine's hub cache would not exist where the adapter is copied to."""
    from ia3_dist.config.schema import IA3Section, ModelSection
    from ia3_dist.models.ia3 import apply_ia3
    from ia3_dist.models.load import load_base_model

    model = load_base_model(ModelSection(path=REPO), REPO, "fp32")
    assert model.name_or_path == REPO and model.config.name_or_path == REPO
    peft_model = apply_ia3(model, IA3Section())
    assert peft_model.peft_config["default"].base_model_name_or_path == REPO


def test_loaders_read_the_dir_the_preflight_resolved(fake_hub: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    """Online, the preflight of a launch's first rank on a node fetches the hub model's config and tokenizer files
    (no weights yet), reads both from that snapshot, then fetches the weights of the same commit; transformers,
    given the hub name, would ask the hub for each file on every rank. The launch's other ranks ask the hub
    nothing. The hub name stays the model's and the tokenizer's. The loaders, which run once the ranks have met,
    read the dir the preflight resolved and ask the hub nothing either (nor another commit, should the branch move
    meanwhile)."""
    import huggingface_hub

    from ia3_dist.config import load_config
    from ia3_dist.runtime import dist
    from ia3_dist.train.loop import load_base
    from ia3_dist.train.prepare import prepare

    asked = _count_listings(monkeypatch, forbid_transformers=True)
    cfg = load_config(str(Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml"),
                      [f"model.path={REPO}", f"output.dir={tmp_path / 'out'}"])
    p = prepare(cfg, dist.DistEnv(0, 0, 2, 2))
    files = sorted(["config.json", "generation_config.json", "notes[v2].txt",
                    *(f.name for f in fake_hub["remote"].glob("tokenizer*"))])
    assert asked == [None, COMMIT] and sorted(fake_hub["downloaded"][:len(files)]) == files
    assert p.weights_dir == p.weights_dir.parent / COMMIT and p.model_path == REPO
    assert p.tokenizer.name_or_path == REPO
    fetched = list(fake_hub["downloaded"])
    other = prepare(cfg, dist.DistEnv(1, 1, 2, 2))  # another rank of the same launch on this node
    assert asked == [None, COMMIT] and fake_hub["downloaded"] == fetched and other.weights_dir == p.weights_dir

    monkeypatch.setattr(huggingface_hub, "snapshot_download", _no_hub)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", _no_hub)
    model, _ = load_base(p)
    assert model.name_or_path == REPO


def test_a_hub_tokenizer_is_fetched_once_per_node_and_read_from_its_snapshot(
        fake_hub: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_model: Path) -> None:
    """``model.tokenizer`` naming a hub repo beside a local model: the launch's first rank on a node fetches its
    config and tokenizer files (no weights), the other ranks ask nothing, transformers never asks the hub, and the
    tokenizer keeps its hub name. A repo without tokenizer files exits 2 naming the key."""
    from ia3_dist.config import load_config
    from ia3_dist.runtime import dist
    from ia3_dist.train.prepare import prepare

    asked = _count_listings(monkeypatch, forbid_transformers=True)
    tiny = str(Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml")
    # The model's own repo named as its tokenizer too: read from the model's snapshot, not resolved again.
    same = load_config(tiny, [f"model.path={REPO}", f"model.tokenizer={REPO}", f"output.dir={tmp_path / 's'}"])
    assert prepare(same, dist.DistEnv(0, 0, 2, 2)).tokenizer.name_or_path == REPO
    assert asked == [None, COMMIT]  # the model's files, then its weights at that commit
    asked.clear()
    fake_hub["downloaded"].clear()
    cfg = load_config(tiny, [f"model.path={tiny_model}", f"model.tokenizer={REPO}", f"output.dir={tmp_path / 'o'}"])
    p = prepare(cfg, dist.DistEnv(0, 0, 2, 2))
    assert asked == [None] and not any(f.endswith((".safetensors", ".bin")) for f in fake_hub["downloaded"])
    assert p.tokenizer.name_or_path == REPO and p.weights_dir == tiny_model
    fetched = list(fake_hub["downloaded"])
    prepare(cfg, dist.DistEnv(1, 1, 2, 2))
    assert asked == [None] and fake_hub["downloaded"] == fetched
    for f in fake_hub["remote"].glob("tokenizer*"):
        f.unlink()
    (fake_hub["remote"] / "vocab.json").unlink(missing_ok=True)
    shutil.rmtree(fake_hub["cache"])
    with pytest.raises(UsageError, match=f"model.tokenizer {REPO}: the repo has no tokenizer files"):
        prepare(cfg, dist.DistEnv(0, 0, 1, 1))


def test_tokenizer_dirs_of_every_vocabulary_kind_count_and_a_snapshot_is_named_by_its_hub_name(
        tmp_path: Path) -> None:
    from ia3_dist.models.files import check_tokenizer_dir, has_tokenizer_files

    for name in ("vocab.txt", "spiece.model", "merges.txt", "cl100k_base.tiktoken", "tokenizer.json"):
        d = tmp_path / name.replace(".", "_")
        d.mkdir()
        (d / name).write_text("x")
        assert has_tokenizer_files(d), name
    empty = tmp_path / "snapshots" / COMMIT
    empty.mkdir(parents=True)
    (empty / "config.json").write_text("{}")
    assert not has_tokenizer_files(empty)
    with pytest.raises(UsageError, match=f"tokenizer {REPO} \\(its files in {empty}\\): no tokenizer files"):
        check_tokenizer_dir(str(empty), REPO)


def test_dpo_reference_key_follows_the_snapshot(tmp_path: Path, tiny_model: Path) -> None:
    """The stored DPO reference log-probs are keyed by the files the weights load from: for a hub model, its
    snapshot (a new commit of the same name and architecture is other weights), not the hub name alone."""
    from types import SimpleNamespace

    import numpy as np

    from ia3_dist.train.objectives.reference import reference_key

    snaps = []
    for commit, seed in (("a" * 40, 1), ("b" * 40, 2)):
        d = tmp_path / "snapshots" / commit
        shutil.copytree(tiny_model, d)
        (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes() + b"x" * seed)
        snaps.append(d)
    data = SimpleNamespace(cache_file=str(tmp_path / "cache.npy"), rows=np.arange(4))

    def key(weights_dir: Path, micro: int = 2) -> str:
        p = SimpleNamespace(meta={"model_key": "bloom-x", "ia3": "{}"}, model_path=REPO, weights_dir=weights_dir,
                            cfg=SimpleNamespace(train=SimpleNamespace(precision="fp32", micro_batch_size=micro),
                                                model=SimpleNamespace(attention="eager"),
                                                ia3=SimpleNamespace(init_from=None)))
        return reference_key(p, data)

    assert key(snaps[0]) != key(snaps[1])
    assert key(snaps[0]) == key(snaps[0])
    # The pairs are batched as training batches them: another micro-batch pads them otherwise.
    assert key(snaps[0], micro=4) != key(snaps[0])


def test_one_process_of_a_node_fetches_at_a_time(fake_hub: dict[str, Any]) -> None:
    """The ranks' preflights fetch a hub model one after another (a file lock in the hub cache): while one holds
    it, another neither asks the hub nor reads a half-written snapshot; it goes on once the lock is free."""
    import fcntl
    import threading

    from huggingface_hub.file_download import repo_folder_name

    lock = fake_hub["cache"] / ".locks" / "ia3-dist" / f"{repo_folder_name(repo_id=REPO, repo_type='model')}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    got: list[Path] = []
    with open(lock, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # another rank of the node, mid-download
        t = threading.Thread(target=lambda: got.append(hub_model_dir(REPO, None)))
        t.start()
        t.join(1.0)
        assert t.is_alive() and not got and fake_hub["downloaded"] == []
        fcntl.flock(fh, fcntl.LOCK_UN)
    t.join(60)
    assert got and got[0].name == COMMIT and fake_hub["downloaded"]


def test_the_ranks_of_one_launch_ask_the_hub_once_per_node(fake_hub: dict[str, Any],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The first rank of a launch on a node records the snapshot it resolved; the other ranks of that launch take it
    without asking the hub (a listing and a download's checks per rank were thousands of requests at a few hundred
    ranks). Another launch, another revision, or a record whose snapshot lost a file asks the hub again."""

    from ia3_dist.runtime import dist

    asked = _count_listings(monkeypatch)
    first = hub_model_dir(REPO, None, shared="n1-100-5")
    downloads = len(fake_hub["downloaded"])
    assert [hub_model_dir(REPO, None, shared="n1-100-5") for _ in range(3)] == [first] * 3
    assert asked == [None] and len(fake_hub["downloaded"]) == downloads
    assert hub_model_dir(REPO, None, shared="n1-200-9") == first and asked == [None, None]  # the next launch
    assert hub_model_dir(REPO, "main", shared="n1-100-5") == first and asked == [None, None, "main"]
    (first / "config.json").unlink()  # the snapshot lost a file since: resolved (and fetched) again
    assert hub_model_dir(REPO, None, shared="n1-100-5") == first and len(asked) == 4
    assert (first / "config.json").is_file()
    # The key: the ranks' common parent (a launcher) by host, pid and start time; a lone process has none.
    key = dist.launch_key(dist.DistEnv(0, 0, 2, 2))
    assert key is not None and key.split("-")[-2] == str(os.getppid())
    assert dist.launch_key(dist.DistEnv(0, 0, 1, 1)) is None


@pytest.mark.parametrize("error, says", [
    ("GatedRepoError", "a gated repo this login may not read"),
    ("RepositoryNotFoundError", "if it is private, log in (hf auth login) or set HF_TOKEN"),
])
def test_gated_or_private_repo_says_how_to_log_in(fake_hub: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path, error: str, says: str) -> None:
    import httpx2
    import huggingface_hub
    from huggingface_hub import constants, errors

    response = httpx2.Response(401 if error == "GatedRepoError" else 404,
                               request=httpx2.Request("GET", f"https://huggingface.co/api/models/{REPO}"))

    def refuse(*a: Any, **k: Any) -> Any:
        raise getattr(errors, error)("refused", response=response)

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", refuse)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(UsageError) as e:
        hub_model_dir(REPO, None)
    assert says in str(e.value) and REPO in str(e.value)
    assert fake_hub["downloaded"] == []


class _NetworkUsed(BaseException):
    """Raised past the hub client's own ``except Exception`` retries, so a request fails the test at once."""


def test_an_adapter_on_a_hub_base_loads_it_from_the_cache_without_asking_the_hub(
        fake_hub: dict[str, Any], tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Offline without HF_HUB_OFFLINE (a compute node), every file transformers asks the hub for was retried for
    # some 20 s before it fell back to the cache: three minutes for each generate, chat or export.
    import socket

    from peft import IA3Config, get_peft_model
    from transformers import AutoModelForCausalLM

    from ia3_dist.tools.inference import cached_snapshot, load_for_inference

    snap = hub_model_dir(REPO, None)
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_model)), IA3Config(task_type="CAUSAL_LM"))
    pm.save_pretrained(str(tmp_path / "adapter"))
    cfg = tmp_path / "adapter" / "adapter_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "base_model_name_or_path": REPO}))

    def no_network(*a: Any, **k: Any) -> Any:
        raise _NetworkUsed("the hub was asked")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    assert cached_snapshot(REPO) == snap and cached_snapshot(str(tiny_model)) is None
    model = load_for_inference(str(tmp_path / "adapter"))[0]
    assert model.get_base_model().name_or_path == str(snap)
    sorted(snap.glob("model-*.safetensors"))[-1].unlink()
    assert cached_snapshot(REPO) is None  # a partial snapshot: the hub id loads (and downloads) as before


def test_an_adapter_records_and_loads_the_hub_base_version_it_was_trained_on(
        fake_hub: dict[str, Any], tiny_model: Path, tmp_path: Path) -> None:
    """Trained on a hub base, the adapter records the commit of the snapshot the preflight checked (PEFT's
    ``revision``); inference takes that version from the cache, and an adapter naming a version the cache does not
    hold does not silently load the cached branch head."""
    from types import SimpleNamespace

    from peft import IA3Config, get_peft_model
    from transformers import AutoModelForCausalLM

    from ia3_dist.config.schema import ModelSection
    from ia3_dist.tools.inference import cached_snapshot
    from ia3_dist.train.loop import base_revision

    snap = hub_model_dir(REPO, None)
    hub_run = SimpleNamespace(model_path=REPO, weights_dir=snap, cfg=SimpleNamespace(model=ModelSection(path=REPO)))
    assert base_revision(hub_run) == COMMIT
    local = SimpleNamespace(model_path=str(tiny_model), weights_dir=tiny_model,
                            cfg=SimpleNamespace(model=ModelSection(path=str(tiny_model))))
    assert base_revision(local) is None
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_model)), IA3Config(task_type="CAUSAL_LM"))
    pm.peft_config["default"].revision = COMMIT
    pm.save_pretrained(str(tmp_path / "adapter"))
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["revision"] == COMMIT
    assert cached_snapshot(REPO, COMMIT) == snap and cached_snapshot(REPO) == snap
    assert cached_snapshot(REPO, "f" * 40) is None  # another version: not the cached one


def test_a_bad_recorded_revision_is_named(tmp_path: Path, tiny_model: Path) -> None:
    from peft import IA3Config, get_peft_model
    from transformers import AutoModelForCausalLM

    from ia3_dist.tools.inference import load_for_inference

    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_model)), IA3Config(task_type="CAUSAL_LM"))
    pm.save_pretrained(str(tmp_path / "adapter"))
    cfg = tmp_path / "adapter" / "adapter_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "base_model_name_or_path": REPO, "revision": ""}))
    with pytest.raises(UsageError, match="'revision' must be a hub revision .a commit, branch or tag., got ''"):
        load_for_inference(str(tmp_path / "adapter"))
