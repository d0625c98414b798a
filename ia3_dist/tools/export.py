"""``ia3-dist export``: merge the IA3 vectors into the base weights and save a plain HF model.

The target dir is never shared with files export did not write: it must be new or empty, or (with ``force``) hold
an earlier export of ours, recorded in :data:`.inference.EXPORT_MARKER`. The model is saved into a staging dir inside
it first
(``save_pretrained`` deletes weight shards it does not recognise in its target), then moved in; only files the
earlier export listed are replaced or removed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import UsageError
from ..models.load import save_tokenizer
from ..runtime.manifest import check_writable_dir, few
from ..runtime.safe_io import fsync, fsync_tree, plain_modes, write_file
from .inference import ADAPTER_CONFIG, EXPORT_MARKER, load_for_inference, read_export_marker

STAGING_PREFIX = ".ia3-dist-export-staging-"


def _previous_export(o: Path) -> list[str] | None:
    """The plain file names an earlier export recorded in ``o``, or None if ``o`` holds no readable marker."""
    m = read_export_marker(o)
    files = m.get("files") if m is not None else None
    if not isinstance(files, list):
        return None
    # A marker is a file anyone can edit: only plain names directly in o are ever acted on.
    return [f for f in files if isinstance(f, str) and f and "/" not in f and "\\" not in f and f not in (".", "..")]


def check_target(out: str, force: bool) -> list[str]:
    """Preflight for ``--out``; returns the files of the earlier export that this one replaces (empty if none).
    Raises UsageError, having touched nothing, unless the dir is new, empty, or an earlier export with ``force``."""
    o = Path(out).expanduser()
    check_writable_dir(o, "--out")
    if not o.is_dir():
        return []
    try:
        entries = sorted(p.name for p in o.iterdir() if not p.name.startswith(STAGING_PREFIX))
    except OSError as e:
        raise UsageError(f"--out {out}: cannot read it ({e.strerror or e}); pick another dir") from None
    if not entries:
        return []
    previous = _previous_export(o)
    if not force:
        what = "an earlier export" if previous is not None else "files export did not write"
        raise UsageError(f"--out {out} is not empty ({what}: {few(entries)}); pick a new or empty dir, or pass "
                         f"--force to replace an earlier `ia3-dist export` there")
    if previous is None:
        raise UsageError(f"--out {out} holds files `ia3-dist export` did not write ({few(entries)}; no "
                         f"{EXPORT_MARKER}); --force only replaces an earlier export, so pick a new or empty dir")
    return [f for f in previous if (o / f).is_file() and not (o / f).is_symlink()]


def export_merged(adapter: str, out: str, base: str | None = None, dtype: str = "auto", force: bool = False) -> Path:
    """Merge IA3 into the base weights (PEFT ``merge_and_unload``) and save a plain HF model + tokenizer + prompt
    template into ``out`` (see the module docstring for what may be there already), in ``dtype`` (``auto``: the
    base's stored dtype)."""
    previous = check_target(out, force)
    a = Path(adapter).expanduser()
    if a.is_dir() and not (a / ADAPTER_CONFIG).is_file():
        # Checked before load_for_inference, which would load a merged dir's whole model first.
        raise UsageError(f"--adapter {adapter}: not an adapter dir (no {ADAPTER_CONFIG}); give the adapter dir of "
                         f"a run (e.g. runs/x/adapter); a merged model needs no export")
    _check_not_base(out, a, base)
    model, tok, template, is_adapter = load_for_inference(adapter, base, dtype)
    if not is_adapter:
        raise UsageError(f"{adapter}: not an adapter dir (no adapter_config.json)")
    if dtype == "auto":
        from ..models.load import DTYPES

        stored = model.get_base_model().dtype
        dtype = next((name for name, t in DTYPES.items() if t == stored), "fp32")
        if DTYPES[dtype] != stored:  # a float64 or quantized checkpoint: saved as fp32
            model = model.to(DTYPES[dtype])
    _untie_scaled_head(model)
    stop = model.generation_config.eos_token_id  # load_for_inference's: the base's, eos, the end of turn
    merged = model.merge_and_unload()
    _check_finite_weights(merged, dtype)
    _keep_stop_ids(merged, stop)
    o = Path(out).expanduser()
    created = not o.exists()
    o.mkdir(parents=True, exist_ok=True)
    # What a killed export left (a whole merged model, GBs): ours by name, never part of an export. (Two exports
    # into one dir at once would clash anyway.)
    for d in o.iterdir():
        if d.name.startswith(STAGING_PREFIX) and d.is_dir() and not d.is_symlink():
            shutil.rmtree(d, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(dir=o, prefix=STAGING_PREFIX))
    try:
        try:
            merged.save_pretrained(str(staging), safe_serialization=True)
        except ValueError as e:  # transformers' checks of the configs it writes
            raise UsageError(f"--out {out}: transformers refused to save the merged model: {e}") from None
        # The training format as the tokenizer's chat template: transformers' apply_chat_template, vLLM and TGI
        # then prompt the merged model as it was trained (the base's own template, or none, otherwise).
        tok.chat_template = template.jinja(tok)
        save_tokenizer(tok, staging)
        # The template as it was checked and loaded, not the file again (it may have changed since); for a PEFT
        # adapter without one, the template generate prompts it in: the merged dir's own tokenizer now carries a
        # chat template (the one above), which would otherwise be read as the format instead.
        template.save(staging)
        _drop_code_references(staging)
        plain_modes(staging)
        fsync_tree(staging)  # on stable storage before the marker calls the export complete
        _publish(staging, o, previous, {"adapter": str(adapter), "base": base, "dtype": dtype})
        fsync(o, directory=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not any(o.iterdir()):
            o.rmdir()  # a failed export into a new dir leaves no empty dir behind
    return o


CODE_KEYS = ("auto_map", "custom_pipelines")
"""Keys of a config that point a loader at code (a ``.py`` beside it, or ``repo--module.Class`` on the hub)."""
CODE_KEY_FILES = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json",
                  "generation_config.json")


def _drop_code_references(staging: Path) -> None:
    """The merged model was built, and is saved, by classes transformers ships (the inference tools never run a
    dir's code): an ``auto_map`` the base's or the adapter's configs carried (save_pretrained copies it on) would
    send whoever loads the export with ``trust_remote_code`` (vLLM, TGI, a downstream user) to code that export
    never ran, chosen by whoever wrote the adapter. It goes from every config the export writes."""
    for name in CODE_KEY_FILES:
        f = staging / name
        if not f.is_file():
            continue
        body = json.loads(f.read_text(encoding="utf-8"))
        if isinstance(body, dict) and any(k in body for k in CODE_KEYS):
            for k in CODE_KEYS:
                body.pop(k, None)
            f.write_text(json.dumps(body, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _check_not_base(out: str, adapter: Path, base: str | None) -> None:
    """``--out`` is not the base the adapter merges onto (an earlier export, updated with --force): replaced, it
    would hold base+IA3, and every adapter trained on it would load onto that, IA3 applied twice, shapes intact."""
    from .inference import read_adapter_config

    if base is None and not (adapter / ADAPTER_CONFIG).is_file():
        return  # load_for_inference names what is missing
    src = base if base is not None else read_adapter_config(adapter).get("base_model_name_or_path")
    o = Path(out).expanduser()
    if not isinstance(src, str) or not o.is_dir():
        return
    b = Path(src).expanduser()
    try:
        same = b.is_dir() and os.path.samefile(b, o)
    except OSError:
        return
    if same:
        raise UsageError(f"--out {out} is the base model the adapter merges onto ({src}); replaced, it would hold "
                         f"the merged model, and adapters trained on it would get IA3 twice; pick a new or empty dir")


def _check_finite_weights(merged: Any, dtype: str) -> None:
    """Every merged weight finite: a base whose weights exceed fp16's range (65,504; bf16 and fp32 bases can hold
    them) becomes inf in an fp16 export, and so can a weight the adapter scales up. A model that would generate
    nothing but NaN is refused, naming the tensor."""
    import torch

    for name, w in merged.named_parameters():
        if not bool(torch.isfinite(w).all()):
            raise UsageError(f"the merged {name} holds non-finite values in --dtype {dtype} (beyond its range); "
                             f"export with --dtype bf16 or fp32")


def _keep_stop_ids(merged: Any, stop: Any) -> None:
    """Write the ids generate stops on into the merged model's generation config (the base's, otherwise as it
    was): a base whose eos is not the end of turn its adapter was trained to write (Qwen2.5's <|endoftext|> under
    a ChatML template, which ends an answer with <|im_end|>) would otherwise let transformers' generate or a
    server (vLLM, TGI) run on past the answer into turns the model invents."""
    from transformers import GenerationConfig

    if not stop:
        return
    if getattr(merged, "generation_config", None) is None:
        merged.generation_config = GenerationConfig()
    gen = merged.generation_config
    as_loaded = getattr(gen, "_original_object_hash", None) == hash(gen)
    gen.eos_token_id = stop
    if as_loaded:
        try:
            gen.validate(strict=True)
        except ValueError:
            # The base's own flags conflict (hub configs set temperature/top_p without do_sample): transformers
            # saves a config it loaded so as it is, but checks a changed one strictly and refuses it, after the
            # whole merge. The stop ids are the only change, and valid: saved as the base's would be.
            gen._original_object_hash = hash(gen)


def _untie_scaled_head(peft_model: Any) -> None:
    """Where the LM head shares its weight with the input embeddings and IA3 scales the head, give the head its
    own copy first: merging scales the shared tensor in place, so the input embeddings would be scaled too, and a
    saved config that still ties them would make the loader share them again."""
    import torch

    base = peft_model.get_base_model()
    head = base.get_output_embeddings()
    layer = getattr(head, "base_layer", None)  # PEFT wraps each module it targets
    if layer is None:
        return
    cfgs = {id(c): c for c in (base.config, base.config.get_text_config())}.values()
    if not any(getattr(c, "tie_word_embeddings", False) for c in cfgs):
        return
    for c in cfgs:
        c.tie_word_embeddings = False
    layer.weight = torch.nn.Parameter(layer.weight.detach().clone(), requires_grad=False)


def _publish(staging: Path, o: Path, previous: list[str], info: dict[str, Any]) -> None:
    """Move the staged export into ``o``: first check that no name collides with a file the earlier export did not
    write (someone put it there since), then drop the earlier export's files this one does not write (stale
    shards), move the new ones in and record them.

    The marker is written first, naming the old and the new files: an export killed while moving leaves a dir
    that ``--force`` still recognises as ours and replaces, instead of a partial model nothing can clean up."""
    new = sorted(p.name for p in staging.iterdir())
    theirs = [n for n in new if n not in previous and ((o / n).exists() or (o / n).is_symlink())]
    if theirs:
        raise UsageError(f"--out {o}: {few(theirs)} would be overwritten and an earlier export did not write it; "
                         f"move it away or pick a new or empty dir")
    _write_marker(o, sorted(set(previous) | set(new)), {**info, "complete": False})
    for name in previous:
        if name not in new and name != EXPORT_MARKER:
            (o / name).unlink(missing_ok=True)
    for name in new:
        os.replace(staging / name, o / name)
    _write_marker(o, new, info)


def _write_marker(o: Path, files: list[str], info: dict[str, Any]) -> None:
    text = json.dumps({"tool": "ia3-dist export", "version": __version__, **info, "files": files}, indent=1) + "\n"
    # Never through a link: a temp name planted in --out as a symlink would redirect a plain write anywhere.
    write_file(o / EXPORT_MARKER, lambda fh: fh.write(text.encode("utf-8")), what="--out ",
               fix="remove it, or pick a new or empty dir")
