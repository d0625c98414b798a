"""What a model dir and a tokenizer dir must hold, checked before anything loads (exit 2 naming the file)."""

from __future__ import annotations

import glob
import json
import os
import pickle
import re
import struct
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

from ..errors import UsageError

# The safetensors library refuses headers past 100 MB; a larger length field means a corrupt or hostile file, and
# reading it would allocate that much.
MAX_SAFETENSORS_HEADER = 100_000_000
# Index and adapter config files are a few KB to a few MB; the bound keeps a hostile one from being read whole.
MAX_SMALL_JSON = 64 << 20
ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1, "C64": 8}

# (shard index, single file) as transformers saves them, in the order it prefers them.
WEIGHT_LAYOUTS = (("model.safetensors.index.json", "model.safetensors"),
                  ("pytorch_model.bin.index.json", "pytorch_model.bin"))


def error_line(e: BaseException) -> str:
    """An exception's message cut to one line (torch's run to paragraphs of advice)."""
    if isinstance(e, pickle.UnpicklingError) and "weights only" in str(e).lower():
        # torch's own text advises weights_only=False, i.e. running the code the pickle carries.
        return "a weights file holds non-tensor objects (a pickle that could run code); it will not be loaded"
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


def open_file(path: Path, what: str) -> IO[bytes]:
    """``path`` opened for reading if it is a regular file (through symlinks: the hub cache links its files), else
    a UsageError naming it: a FIFO or device in its place would hang or never end a read."""
    from ..runtime.safe_io import open_regular

    return open_regular(path, f"it should be the {what}; download or copy it again", follow=True)


def read_small_json(path: Path, what: str) -> Any:
    """A small JSON file (index, adapter config) parsed; UsageError naming the file if it is unreadable, too large
    or not JSON."""
    try:
        with open_file(path, what) as fh:
            raw = fh.read(MAX_SMALL_JSON + 1)
    except OSError as e:
        raise UsageError(f"{path}: cannot read the {what} ({error_line(e)})") from None
    if len(raw) > MAX_SMALL_JSON:
        raise UsageError(f"{path}: {what} larger than {MAX_SMALL_JSON >> 20} MiB; the file is corrupt")
    try:
        return json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, int digit limit
        raise UsageError(f"{path}: {what} is not valid JSON ({error_line(e)})") from None


# The sizes a decoder's config states under these names (per family); a model has at least one of each. A
# layer count of 0 or less builds (an empty range of blocks) and then fails after the ranks have met.
CONFIG_COUNTS = ("n_layer", "num_hidden_layers", "hidden_size", "n_embed", "n_head", "num_attention_heads",
                 "num_key_value_heads", "intermediate_size", "vocab_size")


def check_config_counts(config: Any, where: Path | str) -> None:
    """The counts in a model's config.json (``config``: the parsed JSON object) are positive integers; a
    UsageError naming the file and the field otherwise."""
    if not isinstance(config, dict):
        raise UsageError(f"{where}: a model config is a JSON object (model_type, hidden_size, ...)")
    for key in CONFIG_COUNTS:
        v = config.get(key)
        if key in config and v is not None and (type(v) is not int or v < 1):
            raise UsageError(f"{where}: '{key}' is {json.dumps(v)[:60]}, where a model has a positive whole "
                             f"number; the file is damaged or edited (restore it from the model's source)")


def shard_names(index: Path) -> list[str]:
    """The shard files a ``*.index.json`` names (its weight_map values), sorted."""
    data = read_small_json(index, "weight index")
    wm = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(v, str) and v for v in wm.values()):
        raise UsageError(f"{index}: unreadable weight index (needs a 'weight_map' object of tensor name -> shard "
                         f"file name)")
    names = sorted(set(wm.values()))
    # A shard outside the model dir would make a hostile index read arbitrary files as weights.
    bad = [n for n in names if Path(n).is_absolute() or ".." in Path(n).parts]
    if bad:
        raise UsageError(f"{index}: shard path {bad[0]!r} points outside the model dir; shard names must be file "
                         f"names inside it")
    return names


# from_pretrained's order (single file before index, safetensors before .bin): the ZeRO-3 loader and the hub
# download take the first one present too, so every path loads the same files from a dir that has several.
WEIGHT_FILES = tuple(f for layout in WEIGHT_LAYOUTS for f in reversed(layout))
INDEX_SUFFIX = ".index.json"


def _named_weights(model_dir: Path) -> str | None:
    """The weights file config.json names (``transformers_weights``), which ``from_pretrained`` loads before any
    other; a name outside the dir is refused, as transformers refuses it."""
    f = model_dir / "config.json"
    if not f.is_file():
        return None
    cfg = read_small_json(f, "model config")
    name = cfg.get("transformers_weights") if isinstance(cfg, dict) else None
    if name is None:
        return None
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise UsageError(f"{f}: 'transformers_weights' must name a weights file inside the model dir, got "
                         f"{json.dumps(name)[:80]}")
    if not name.endswith((".safetensors", ".safetensors" + INDEX_SUFFIX)):
        # transformers reads only safetensors by this name (and fails on another file after the ranks met).
        raise UsageError(f"{f}: 'transformers_weights' names {json.dumps(name)[:80]}; transformers loads only a "
                         f".safetensors file or a .safetensors.index.json by that name")
    return name


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The weight files of a model dir, chosen as ``from_pretrained`` chooses them: the file config.json names
    (``transformers_weights``), else the first of :data:`WEIGHT_FILES` present."""
    named = _named_weights(model_dir)
    if named is not None:
        if not (model_dir / named).is_file():
            raise UsageError(f"model.path {model_dir}: its config.json names the weights {named} "
                             f"(transformers_weights), which are not there (a hub model is fetched by the usual "
                             f"weight names: download it whole, hf download <repo> --local-dir DIR, and set "
                             f"model.path=DIR)")
        if named.endswith(INDEX_SUFFIX):
            return [model_dir / n for n in shard_names(model_dir / named)]
        return [model_dir / named]
    for name in WEIGHT_FILES:
        if (model_dir / name).exists():
            if name.endswith(INDEX_SUFFIX):
                return [model_dir / n for n in shard_names(model_dir / name)]
            return [model_dir / name]
    raise UsageError(f"model.path {model_dir}: no model.safetensors, pytorch_model.bin or shard index in it")


ST_TORCH: dict[str, str] = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                            "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                            "U16": "uint16", "U32": "uint32", "U64": "uint64", "F8_E4M3": "float8_e4m3fn",
                            "F8_E5M2": "float8_e5m2"}
"""safetensors' dtype names -> torch's (``torch.<name>``)."""
_ST_NAME = {v: k for k, v in ST_TORCH.items()}
FINGERPRINT_TENSORS = 1024
"""Tensors whose leading bytes :func:`weights_fingerprint` reads: every tensor of the models trained here (723 for a
70B Llama, 365 for bloom-7b1), so weights that differ in a few matrices only (a LoRA merged, IA3 exported, layers
fine-tuned) differ; past it a sample chosen by name hash, spread over every kind of tensor (a stride through the
sorted names read only one kind per layer)."""
FINGERPRINT_BYTES = 4096
FINGERPRINT_VERSION = "v1"
"""Prefixed to the digest: a later ia3-dist that fingerprints otherwise does not read a weight change into the
difference (``checkpoint.comparable``)."""


def weights_fingerprint(model_dir: Path) -> str:
    """A digest of the base weights in ``model_dir`` (the files :func:`checkpoint_files` picks): every tensor's
    name, dtype and shape, and the first :data:`FINGERPRINT_BYTES` of each (up to :data:`FINGERPRINT_TENSORS` of
    them). Keyed by tensor, not by file: the same weights resharded, or saved as safetensors instead of .bin in the
    same dtype, keep their digest (a .bin's head tied to the embeddings counts once, under the embedding's name, as
    transformers saves it). Per start: the headers and up to 1,024 reads of 4 KB (a few ms on a local disk); a .bin's
    pickle loads memory-mapped."""
    import hashlib

    entries: dict[str, tuple[str, list[int]]] = {}
    where: dict[str, tuple[Path, int, int]] = {}  # safetensors: (file, data offset, bytes to read)
    leading: dict[str, bytes] = {}
    for f in checkpoint_files(model_dir):
        if f.suffix == ".safetensors":
            header, start = safetensors_header(f)
            for name, info in header.items():
                begin, end = info["data_offsets"]
                entries[name] = (info["dtype"], info["shape"])
                where[name] = (f, start + begin, min(end - begin, FINGERPRINT_BYTES))
        else:
            _bin_leading(f, entries, leading)  # file by file: an old .bin that cannot be mapped is read whole
    read = set(entries)
    if len(read) > FINGERPRINT_TENSORS:
        read = set(sorted(read, key=lambda n: hashlib.sha256(n.encode()).digest())[:FINGERPRINT_TENSORS])
        leading = {n: b for n, b in leading.items() if n in read}
    by_file: dict[Path, list[str]] = {}
    for name in read & set(where):
        by_file.setdefault(where[name][0], []).append(name)
    for f, in_file in by_file.items():
        try:
            with open_file(f, "weights") as fh:
                for name in sorted(in_file, key=lambda n: where[n][1]):
                    fh.seek(where[name][1])
                    leading[name] = fh.read(where[name][2])
        except OSError as e:
            raise UsageError(f"{f}: cannot read the weights ({error_line(e)})") from None
    h = hashlib.sha256()
    for name in sorted(entries):
        dtype, shape = entries[name]
        lead = leading.get(name, b"")
        h.update(json.dumps([name, dtype, shape, len(lead)]).encode() + lead)
    return f"{FINGERPRINT_VERSION}-{h.hexdigest()[:16]}"


def _bin_leading(f: Path, entries: dict[str, tuple[str, list[int]]], leading: dict[str, bytes]) -> None:
    """The tensors of a .bin into ``entries`` and their first :data:`FINGERPRINT_BYTES` into ``leading``. A name
    whose tensor is another's (a head tied to the embeddings, saved under both names) is left out: transformers
    saves safetensors with it once, under the name deepest in the model (the embedding's, e.g.
    ``model.embed_tokens.weight`` over ``lm_head.weight``)."""
    import torch

    seen: set[tuple] = set()
    sd = torch_load_weights(f)
    for name in sorted(sd, key=lambda n: (-n.count("."), n)):
        t = sd[name].detach()
        alias = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and alias in seen:
            continue
        seen.add(alias)
        entries[name] = (_ST_NAME.get(str(t.dtype).removeprefix("torch."), str(t.dtype)), list(t.shape))
        if not t.numel():
            leading[name] = b""
            continue
        k = FINGERPRINT_BYTES // t.element_size()
        # The first k elements in row-major order, copying no more than the rows that hold them (a transposed
        # view's reshape would copy the whole tensor).
        while t.dim() > 1 and t[0].numel() >= k:
            t = t[0]
        if t.dim() > 1:
            t = t[:-(-k // max(1, t[0].numel()))]
        leading[name] = t.reshape(-1)[:k].contiguous().view(torch.uint8).numpy().tobytes()
    del sd


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model", "vocab.txt", "merges.txt")
"""Files any of which a tokenizer dir holds (transformers' fast and slow tokenizers' vocabularies); ``*.tiktoken``
files count too."""


def looks_local(path: str) -> bool:
    return path.startswith(("/", ".", "~")) or Path(path).expanduser().exists()


# What loading reads from a repo besides the weights: config.json, generation_config.json, the tokenizer's files
# (tokenizer.json, vocab.json, merges.txt, tokenizer.model, *.tiktoken, chat_template.jinja), at the top level.
# Subfolders hold other formats and originals (onnx/, original/consolidated.00.pth), never what from_pretrained reads.
HUB_SUPPORT_SUFFIXES = (".json", ".txt", ".model", ".tiktoken", ".jinja")
COMMIT = re.compile(r"[0-9a-f]{40}")


def hub_weights(files: Iterable[str], where: str = "the repo") -> str:
    """Which weight file of a hub repo's listing loads: the first of :data:`WEIGHT_FILES` it has, as
    ``from_pretrained`` and :func:`checkpoint_files` choose. UsageError if it has none (only GGUF, ONNX, Flax,
    TensorFlow or original-format weights); ``where`` names the listing there."""
    names = set(files)
    for name in WEIGHT_FILES:
        if name in names:
            return name
    other = sorted(f for f in names if f.endswith((".safetensors", ".bin", ".pth", ".pt", ".gguf", ".onnx",
                                                     ".msgpack", ".h5")))
    seen = f" (it has {', '.join(other[:5])}{' ...' if len(other) > 5 else ''})" if other else ""
    raise UsageError(f"no {', '.join(WEIGHT_FILES)} in {where}{seen}; transformers loads only those")


def hub_files(files: Iterable[str], trust_remote_code: bool = False, shards: Iterable[str] = ()) -> list[str]:
    """The files of a hub repo's listing to download, sorted: its config, generation and tokenizer files, the
    weights :func:`hub_weights` picks (with ``shards``, the files its shard index names, once it is read) and,
    with ``trust_remote_code``, the repo's Python files. Nothing else: a repo that ships safetensors and .bin
    weights (or GGUF, ONNX, Flax, TensorFlow, Mistral's consolidated.safetensors) would otherwise cost its size
    again in download time and disk for files that are never read."""
    names = set(files)
    weights = hub_weights(names)
    shards = set(shards)
    if shards and not weights.endswith(INDEX_SUFFIX):
        raise ValueError(f"shards given for {weights}, which is not a shard index")
    return sorted({*hub_support_files(names, trust_remote_code), *shards, weights})


def hub_support_files(files: Iterable[str], trust_remote_code: bool = False) -> list[str]:
    """What of a hub repo's listing the config and the tokenizer load from (:func:`hub_files` without the
    weights): the top-level config, generation and tokenizer files and, with ``trust_remote_code``, the repo's
    Python files (a remote-code config's class)."""
    # Every *.index.json is left out: the other format's index would only make the dir claim shards it does not
    # hold.
    support = {f for f in files if "/" not in f and f.endswith(HUB_SUPPORT_SUFFIXES) and not f.endswith(INDEX_SUFFIX)}
    code = {f for f in files if f.endswith(".py")} if trust_remote_code else set()
    return sorted(support | code)


def hub_model_dir(repo_id: str, revision: str | None, trust_remote_code: bool = False,
                  cache_dir: str | None = None, token: str | bool | None = None, shared: str | None = None,
                  weights: bool = True, tokenizer: bool = False) -> Path:
    """A hub model's snapshot dir in the hub cache, holding only what :func:`hub_files` picks from the repo's
    listing, checked as a local model dir is (:func:`check_model_dir`); without ``weights``, only what
    :func:`hub_support_files` picks (the config and the tokenizer, for the preflight's checks before GBs of weights
    are fetched), with config.json checked there; ``tokenizer`` (without ``weights``): a ``model.tokenizer`` repo,
    which need hold neither weights nor a config, only tokenizer files. Offline (``HF_HUB_OFFLINE``, or the hub
    unreachable) the listing is what the cached snapshot holds. ``cache_dir``, ``token``: the hub client's
    (None: its own defaults, ``HF_HUB_CACHE``, ``HF_TOKEN``). One process of a node at a time (a file lock in the
    hub cache): every rank runs the preflight, and without it the others would ask the hub all at once (rate limits
    at a few hundred ranks) or, falling back to the cache while the first one still downloads, find a partial
    snapshot and stop the job. ``shared``: the launch's :func:`..runtime.dist.launch_key`; the first of its ranks
    here records what it resolved, and the others take that snapshot without asking the hub (the listing and the
    download's checks are a few requests per rank: thousands at a few hundred ranks)."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    from ..data.cache import file_lock

    lock = Path(cache_dir or constants.HF_HUB_CACHE) / ".locks" / "ia3-dist" / \
        f"{repo_folder_name(repo_id=repo_id, repo_type='model')}.lock"
    with file_lock(lock, required=False):  # a read-only cache still serves what it holds
        # One record per part: the ranks of a node resolve the support files, then (later, and pinned to that
        # commit) the weights; a shared record would send the ranks still on the first part to the hub.
        tokenizer = tokenizer and not weights
        part = "" if weights else ".tokenizer" if tokenizer else ".files"
        record = lock.with_name(f"{lock.stem}.{shared}{part}.json") if shared else None
        asked = {"repo": repo_id, "revision": revision, "trust_remote_code": trust_remote_code, "weights": weights,
                 "tokenizer": tokenizer}
        d = _resolved_by_this_launch(record, asked) if record is not None else None
        if d is None:
            d = _hub_model_dir(repo_id, revision, trust_remote_code, cache_dir, token, weights, tokenizer)
            if record is not None:
                _record_resolved(record, {**asked, "dir": str(d)})
        return d


RESOLVED_KEEP_S = 86400.0
"""A launch's record of the snapshot it resolved is removed by a later launch after this long (its ranks have all
read it within minutes)."""


def _resolved_by_this_launch(record: Path, asked: dict[str, Any]) -> Path | None:
    """The snapshot dir another rank of this launch resolved for the same request, still complete; else None."""
    try:
        got = json.loads(record.read_bytes()[:1 << 16])
        d = Path(got.pop("dir"))
        if got != asked:
            return None
        if asked["weights"]:
            check_model_dir(str(d), f"model.path {asked['repo']}, resolved by another rank to")
        elif not (has_tokenizer_files(d) if asked["tokenizer"] else (d / "config.json").is_file()):
            return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, UsageError):
        return None  # none, or unusable: resolve it here
    return d


def _record_resolved(record: Path, what: dict[str, Any]) -> None:
    """Best effort (a read-only hub cache records nothing: every rank then asks, as without a record)."""
    import time

    now = time.time()
    try:
        for old in record.parent.glob("*.json"):  # earlier launches' records
            if now - old.stat().st_mtime > RESOLVED_KEEP_S:
                old.unlink(missing_ok=True)
        tmp = record.with_name(f".{record.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(what))
        os.replace(tmp, record)
    except OSError:
        pass


def _hub_model_dir(repo_id: str, revision: str | None, trust_remote_code: bool, cache_dir: str | None,
                   token: str | bool | None, weights: bool = True, tokenizer: bool = False) -> Path:
    from huggingface_hub import snapshot_download

    key = "model.tokenizer" if tokenizer else "model.path"
    listing, offline = _hub_listing(repo_id, revision, cache_dir, token, key)
    cached = offline is not None
    where = "the hub cache" if cached else "the repo"
    # Offline, what the cache lacks is fetched where the hub can be reached (`ia3-dist prepare` caches the config
    # and tokenizer only): the error says why the hub was not asked, and how.
    fix = (f"; {offline}, so fetch it into this hub cache where the hub can be reached: hf download {repo_id}"
           f"{f' --revision {revision}' if revision else ''}") if cached else ""

    def fetch(names: list[str], rev: str | None) -> Path:
        try:
            # Escaped: the hub client matches these as fnmatch patterns, and a name may hold [, * or ?.
            return Path(snapshot_download(repo_id, revision=rev, cache_dir=cache_dir, token=token,
                                          local_files_only=cached, allow_patterns=[glob.escape(n) for n in names]))
        except Exception as e:  # the hub client raises many types (offline, 404, auth, disk); all mean "cannot get it"
            raise UsageError(f"{key} {repo_id}: cannot download it ({error_line(e)})") from None

    if not weights:
        if not cached and not tokenizer:
            # A repo without loadable weights exits 2 here, before the preflight reads its config. Offline, the
            # cache may hold the config and tokenizer only (`ia3-dist prepare`): the weights part says so.
            try:
                hub_weights(listing, where)
            except UsageError as e:
                raise UsageError(f"{key} {repo_id}: {e}") from None
        d = fetch(hub_support_files(listing, trust_remote_code), revision)
        if tokenizer:
            if not has_tokenizer_files(d):
                raise UsageError(f"{key} {repo_id}: {where} has no tokenizer files ({', '.join(TOKENIZER_FILES)})"
                                 f"{fix}")
            return d
        if not (d / "config.json").is_file():
            raise UsageError(f"{key} {repo_id}: {where} has no config.json; it is not a transformers model "
                             f"repo{fix}")
        return d
    try:
        picked = hub_weights(listing, where)
    except UsageError as e:
        raise UsageError(f"{key} {repo_id}: {e}{fix}") from None
    want = hub_files(listing, trust_remote_code)
    d = fetch(want, revision)
    if picked.endswith(INDEX_SUFFIX):
        shards = shard_names(d / picked)
        missing = sorted(set(shards) - set(listing))
        if missing:
            raise UsageError(f"{key} {repo_id}: {picked} names shards that {where} does not have: "
                             f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}{fix}")
        # The snapshot dir is named by its commit: the shards come from the commit the index came from, even if
        # the branch moves meanwhile.
        d = fetch(shards, snapshot_commit(d) or revision)
        want = hub_files(listing, trust_remote_code, shards)
    absent = [n for n in want if not (d / n).is_file()]
    if absent:
        raise UsageError(f"{key} {repo_id}: {d} lacks {', '.join(absent[:5])}{' ...' if len(absent) > 5 else ''}"
                         f" after the download")
    check_model_dir(str(d), f"{key} {repo_id}, downloaded to")
    return d


def _hub_listing(repo_id: str, revision: str | None, cache_dir: str | None,
                 token: str | bool | None, key: str = "model.path") -> tuple[list[str], str | None]:
    """``(files, offline)``: the repo's file list from the hub (``offline`` None), or, offline or where the hub
    cannot be reached (the hub client itself falls back to its cache then), the files its cached snapshot of
    ``revision`` holds and why the hub was not asked."""
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    reason = "HF_HUB_OFFLINE is set"
    if not constants.HF_HUB_OFFLINE:
        try:
            return HfApi(token=token).list_repo_files(repo_id, revision=revision), None
        except GatedRepoError as e:
            raise UsageError(f"{key} {repo_id}: a gated repo this login may not read ({error_line(e)}); accept "
                             f"its terms on its hub page, then log in (hf auth login) or set HF_TOKEN") from None
        except (RepositoryNotFoundError, RevisionNotFoundError, HFValidationError) as e:
            # The hub answers a private repo without a login as one that does not exist.
            login = "" if token or constants.HF_TOKEN_PATH and Path(constants.HF_TOKEN_PATH).is_file() \
                or os.environ.get("HF_TOKEN") else "; if it is private, log in (hf auth login) or set HF_TOKEN"
            raise UsageError(f"{key} {repo_id}: not a local dir and not on the hub ({error_line(e)}){login}") \
                from None
        except HfHubHTTPError as e:
            if getattr(getattr(e, "response", None), "status_code", None) in (401, 403):
                raise UsageError(f"{key} {repo_id}: the hub refused access ({error_line(e)}); log in "
                                 f"(hf auth login) or set HF_TOKEN") from None
            reason = f"the hub cannot be reached ({error_line(e)})"
        except Exception as e:  # connection errors: their types depend on the hub client's HTTP library
            reason = f"the hub cannot be reached ({error_line(e)})"
    try:
        # config.json: every model repo has it, and loading the config has already cached it.
        d = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True,
                                   allow_patterns=["config.json"]))
    except Exception as e:
        raise UsageError(f"{key} {repo_id}: not a local dir, {reason}, and the hub cache has no snapshot of "
                         f"it ({error_line(e)})") from None
    return sorted(f.relative_to(d).as_posix() for f in d.rglob("*") if f.is_file()), reason


def local_model_dir(path: str, revision: str | None, trust_remote_code: bool = False, shared: str | None = None,
                    weights: bool = True) -> Path:
    """A local dir as is; a hub name through the hub cache (:func:`hub_model_dir`: one process of a node at a
    time; ``shared``, the ranks of one launch resolve it once per node; ``weights`` False: the config and
    tokenizer files only), so the ZeRO-3 loader and ``from_pretrained`` read the same files."""
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    if looks_local(path):
        raise UsageError(f"model.path {path}: not a directory")
    return hub_model_dir(path, revision, trust_remote_code, shared=shared, weights=weights)


def snapshot_commit(d: Path) -> str | None:
    """The commit a hub snapshot dir is named by (the hub cache's layout); None for any other dir."""
    return d.name if COMMIT.fullmatch(d.name) else None


def check_model_dir(path: str, what: str = "model.path") -> None:
    """A local model dir must hold config.json and complete, well-formed weights (headers and sizes checked, a
    ``.bin`` loaded weights-only); a hub name is checked when it loads. ``what`` names the dir in messages."""
    p = Path(path).expanduser()
    if not looks_local(path):
        return
    if not p.is_dir():
        raise UsageError(f"{what} {path}: no such directory")
    if not (p / "config.json").is_file():
        raise UsageError(f"{what} {p}: no config.json; point model.path at a save_pretrained directory")
    if (p / "config.json").stat().st_size > MAX_SMALL_JSON:
        raise UsageError(f"{what} {p}: config.json is larger than {MAX_SMALL_JSON >> 20} MiB; the file is "
                         f"corrupt")
    check_config_counts(read_small_json(p / "config.json", "model config"), p / "config.json")
    named = _named_weights(p)
    if not named and not any((p / f).is_file() for f in WEIGHT_FILES) and not list(p.glob("*.safetensors")):
        raise UsageError(f"{what} {p}: no weights ({', '.join(WEIGHT_FILES)}); the download or copy is "
                         f"incomplete")
    for index, _ in WEIGHT_LAYOUTS:
        if (p / index).is_file():
            shard_names(p / index)  # every index well-formed, its shards inside the dir, whichever loads
    if named or any((p / f).exists() for layout in WEIGHT_LAYOUTS for f in layout):
        # Only the shards of the index that loads must be there: a dir (or hub snapshot) may also hold the other
        # format's index without its shards (`hf download --exclude "*.bin"` fetches pytorch_model.bin.index.json),
        # which from_pretrained never reads.
        files = checkpoint_files(p)
        missing = [f.relative_to(p).as_posix() for f in files if not f.exists()]  # a FIFO: named below
        if missing:
            raise UsageError(f"{what} {p}: weight shards missing: {', '.join(missing[:5])}"
                             f"{' ...' if len(missing) > 5 else ''}")
    else:
        files = sorted(p.glob("*.safetensors"))
    for f in files:
        check_weight_file(f)


def safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """The tensor table of a ``.safetensors`` file (``__metadata__`` removed) and the offset its data starts at,
    read from the header alone. UsageError naming the file if the header is corrupt or the file is shorter (or
    longer) than the header says: a truncated download must fail here, not halfway through loading."""
    try:
        with open_file(path, "weights") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(8)
            if len(head) != 8:
                raise UsageError(f"{path}: not a safetensors file ({size} bytes, shorter than its 8-byte header "
                                 f"length)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_SAFETENSORS_HEADER or 8 + n > size:
                raise UsageError(f"{path}: corrupt safetensors header: its length field says {n} bytes, the file "
                                 f"has {size}; the file is truncated or not safetensors")
            raw = fh.read(n)
    except OSError as e:
        raise UsageError(f"{path}: cannot read the weights ({error_line(e)})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise UsageError(f"{path}: corrupt safetensors header (not JSON: {error_line(e)})") from None
    if not isinstance(header, dict):
        raise UsageError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, not an object)")
    header.pop("__metadata__", None)
    end = 0
    for key, info in header.items():
        problem = _tensor_entry_problem(info)
        if problem:
            raise UsageError(f"{path}: corrupt safetensors header (tensor {key[:200]!r}: {problem})")
        end = max(end, info["data_offsets"][1])
    need = 8 + n + end
    if size < need:
        raise UsageError(f"{path}: truncated: {size} bytes, header needs {need}; download or copy it again")
    if size > need:
        raise UsageError(f"{path}: corrupt: {size} bytes, header accounts for {need}; download or copy it again")
    return header, 8 + n


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _tensor_entry_problem(info: Any) -> str | None:
    if not isinstance(info, dict):
        return "entry is not an object"
    dtype, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str):
        return "no string 'dtype'"
    if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
        return "'shape' is not a list of non-negative integers"
    if not isinstance(offs, list) or len(offs) != 2 or not all(_is_int(o) for o in offs) or offs[0] > offs[1]:
        return "'data_offsets' is not [begin, end] with 0 <= begin <= end"
    item = ST_ITEMSIZE.get(dtype)
    if item is not None:
        numel = 1
        for d in shape:
            numel *= d
        if numel * item != offs[1] - offs[0]:
            return f"data_offsets span {offs[1] - offs[0]} bytes, shape {shape} of {dtype} needs {numel * item}"
    return None


def check_torch_bin(path: Path) -> None:
    """A PyTorch ``.bin`` checkpoint must be a dict of tensors loadable with ``weights_only``: anything else is
    refused before transformers, PEFT or the ZeRO-3 loader touch it. Memory-mapped, so only the pickle is read."""
    sd = torch_load_weights(path)
    if not isinstance(sd, dict) or not all(isinstance(k, str) for k in sd):
        raise UsageError(f"{path}: not a state dict (a {type(sd).__name__}, not tensor name -> tensor); it will "
                         f"not be loaded")
    import torch

    bad = next((k for k, v in sd.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise UsageError(f"{path}: entry {bad[:200]!r} is a {type(sd[bad]).__name__}, not a tensor; the file holds "
                         f"non-tensor objects and will not be loaded")


def torch_load_weights(path: Path, mmap: bool = True) -> Any:
    """``torch.load`` with ``weights_only``: a pickle that would build arbitrary objects (and could run code) is
    refused with a UsageError naming the file; so is any file torch cannot read, anything but a regular file, and
    a zip whose directory is not what torch.save writes (a compressed pickle inflates before it can be refused:
    see ``runtime/safe_load.check_torch_zip``). ``mmap``: map the tensors instead of reading them (zip files)."""
    import torch

    from ..runtime.safe_load import check_torch_zip

    with open_file(path, "weights") as fh:
        is_zip = zipfile.is_zipfile(fh)
        if is_zip:
            check_torch_zip(fh, path, "the weights file is corrupt or not a torch.save file; download or copy it "
                                      "again, or use safetensors weights")
    try:
        # Files from before torch 1.6 (not zip) cannot be memory-mapped: read whole, as from_pretrained would.
        return torch.load(path, map_location="cpu", mmap=mmap and is_zip, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower():
            raise UsageError(f"{path}: holds non-tensor objects (a pickle that builds arbitrary Python objects and "
                             f"could run code); it will not be loaded. Use safetensors weights from a source you "
                             f"trust") from None
        raise UsageError(f"{path}: not a PyTorch checkpoint ({error_line(e)})") from None
    except Exception as e:  # torch raises RuntimeError, OSError, EOFError, KeyError... for corrupt files
        raise UsageError(f"{path}: cannot read this PyTorch checkpoint ({error_line(e)}); the file is corrupt, "
                         f"truncated or not a torch.save file") from None


def check_weight_file(path: Path) -> None:
    """Header and size of a safetensors file, else (as the loaders do) a weights-only load: before anything
    loads it."""
    if path.suffix == ".safetensors":
        safetensors_header(path)
    else:
        check_torch_bin(path)


def has_tokenizer_files(d: Path) -> bool:
    return any((d / f).is_file() for f in TOKENIZER_FILES) or any(f.is_file() for f in d.glob("*.tiktoken"))


def check_tokenizer_dir(path: str, name: str | None = None) -> None:
    """A local tokenizer dir must hold a tokenizer file; ``name``: what messages call it (a hub name whose snapshot
    dir ``path`` is)."""
    p = Path(path).expanduser()
    if looks_local(path) and p.is_dir() and not has_tokenizer_files(p):
        where = f"{name} (its files in {p})" if name and name != path else str(p)
        raise UsageError(f"tokenizer {where}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); set "
                         f"model.tokenizer to the tokenizer's directory or hub name")


def check_vocab(tok: Any, model_config: Any, where: str) -> None:
    vocab = getattr(model_config, "vocab_size", None)
    if vocab is not None and len(tok) > vocab:
        raise UsageError(f"{where}: the tokenizer has {len(tok)} tokens but the model's embeddings have {vocab} "
                         f"rows; ids past {vocab - 1} would index out of range. Use the model's own tokenizer "
                         f"(model.tokenizer)")
