"""Resume refuses a checkpoint whose run differs in anything that would make the continuation inexact, and takes one
saved on another layout (ranks, cut, ZeRO stage) with the same global batch through its layout-independent state."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ia3_dist.errors import UsageError
from ia3_dist.runtime import portable
from ia3_dist.runtime.checkpoint import (
    FIX,
    LAYOUT,
    MUST_MATCH,
    RECORDED_LATER,
    RECORDED_SINCE_2,
    check_compatible,
    resume_line,
)

META = {"world_size": 2, "micro_batch_size": 1, "grad_accum": 4, "seed": 42, "shuffle": True, "total_steps": 12,
        "data_key": "abc123", "n_examples": 96, "eval_ratio": 0.0, "group_by_length": False, "order_version": 2,
        "global_batch": 8, "zero_stage": 2, "precision": "fp32", "offload_optimizer": False,
        "model_key": "bloom-0123456789abcdef", "ia3": '{"variant": "default"}', "schedule": "lr 0.003, linear",
        "objective": "sft", "eval_key": "none", "bench_key": "none", "reference_start": "0f" * 16,
        "optimizer": '{"type": "AdamW"}', "held_copies": 0, "base_weights": "v1-0123456789abcdef"}
CHANGED = {"seed": 7, "shuffle": False, "total_steps": 24, "data_key": "def456", "n_examples": 95,
           "group_by_length": True, "order_version": 1, "precision": "bf16", "model_key": "llama-0123456789abcdef",
           "ia3": '{"variant": "paper"}', "schedule": "lr 0.01, linear",
           "objective": "dpo beta=0.1 loss_type=sigmoid label_smoothing=0.0", "reference_start": "a1" * 16,
           "optimizer": '{"amsgrad": true, "type": "AdamW"}', "base_weights": "v1-fedcba9876543210"}
# The same 8 examples per step, cut otherwise.
RECUT = [{"world_size": 1, "grad_accum": 8}, {"micro_batch_size": 2, "grad_accum": 2}, {"zero_stage": 3},
         {"world_size": 4, "grad_accum": 2, "zero_stage": 0}]


def _ckpt(tmp_path: Path, meta: dict | None = None, state: bool = True) -> Path:
    d = tmp_path / "checkpoints" / "step3"
    d.mkdir(parents=True)
    (d / "meta.json").write_text(json.dumps({**(META if meta is None else meta), "step": 3}))
    if state:  # check_compatible only asks whether they are there; their contents are checked when they load
        (d / portable.STATE).write_bytes(b"")
        (d / portable.INFO).write_text("{}")
    return d


def test_same_run_is_accepted_on_deepspeeds_files(tmp_path: Path) -> None:
    meta, moved = check_compatible(_ckpt(tmp_path), dict(META))
    assert meta["step"] == 3 and not moved


def test_every_key_is_checked() -> None:
    assert set(CHANGED) | {"global_batch"} == set(MUST_MATCH)
    # What the evaluations measured may change (train/selection.py refuses it only where a tracker carries over).
    measured = {"eval_key", "bench_key"}
    assert set(LAYOUT) | set(MUST_MATCH) | {"offload_optimizer", "eval_ratio", "held_copies"} | measured == set(META)


@pytest.mark.parametrize("key", list(CHANGED))
def test_each_difference_is_refused_naming_it(tmp_path: Path, key: str) -> None:
    with pytest.raises(UsageError, match=f"saved with {key}=.*this run has"):
        check_compatible(_ckpt(tmp_path), {**META, key: CHANGED[key]})


def test_each_refusal_says_how_to_go_on(tmp_path: Path) -> None:
    """A key that differs names the settings to restore or the way on (a resume with another train.lr said only
    "schedule='lr 0.01, linear'", neither the key to set nor what else to do)."""
    for key, value in CHANGED.items():
        with pytest.raises(UsageError) as e:
            check_compatible(_ckpt(tmp_path / key), {**META, key: value})
        assert str(e.value).endswith(f"the continuation would not be exact ({FIX[key]})"), str(e.value)
    assert "train.lr" in FIX["schedule"] and "ia3.init_from" in FIX["schedule"]


def test_base_weights_may_be_left_unchecked_and_nothing_else(tmp_path: Path) -> None:
    """checkpoint.check_base_weights=false: the fingerprint may differ; every other key is still held."""
    ck = _ckpt(tmp_path)
    assert not check_compatible(ck, {**META, "base_weights": CHANGED["base_weights"]}, ("base_weights",))[1]
    with pytest.raises(UsageError, match="saved with seed=42, this run has 7"):
        check_compatible(ck, {**META, "base_weights": CHANGED["base_weights"], "seed": 7}, ("base_weights",))
    with pytest.raises(UsageError, match="base_weights=.*checkpoint.check_base_weights=false resumes"):
        check_compatible(ck, {**META, "base_weights": CHANGED["base_weights"]})
    # Fingerprints of another version (or none) say nothing about the weights: not compared.
    for other in ("v2-fedcba9876543210", "fedcba9876543210", None):
        assert not check_compatible(ck, {**META, "base_weights": other})[1]


def _weights(d: Path, tensors: dict, shards: int = 1, fmt: str = "safetensors") -> Path:
    """``tensors`` as a model dir's weights: one file, ``shards`` safetensors files with an index, or a .bin as
    transformers before 5 wrote it (torch.save of the tensors)."""
    import torch
    from safetensors.torch import save_file

    d.mkdir()
    if fmt == "bin":
        torch.save(tensors, d / "pytorch_model.bin")
    elif shards == 1:
        save_file(tensors, d / "model.safetensors")
    else:
        names = sorted(tensors)
        where = {n: f"model-{i % shards:05d}.safetensors" for i, n in enumerate(names)}
        for f in set(where.values()):
            save_file({n: tensors[n] for n in names if where[n] == f}, d / f)
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": where}))
    return d


def test_weights_fingerprint_follows_the_tensors_not_the_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same tensors in one safetensors file, in shards, or in a .bin (whose head tied to the embeddings is saved
    under both names): one fingerprint. A value changed in any tensor's leading bytes, the dtype or a name:
    another. Past 1024 tensors it reads 1024 of them, of every kind and part of the model."""
    import torch

    from ia3_dist.models import files
    from ia3_dist.models.files import safetensors_header, weights_fingerprint

    g = torch.Generator().manual_seed(0)
    tensors = {f"h.{i}.{k}": torch.randn(16, 24, generator=g) for i in range(6) for k in ("qkv", "mlp")}
    tensors["ln.bias"] = torch.zeros(16, dtype=torch.bfloat16)
    tensors["transformer.word_embeddings.weight"] = torch.randn(40, 16, generator=g)
    tensors["empty.a"], tensors["empty.b"] = torch.zeros(0), torch.zeros(0)  # no storage: not one tensor
    # Past 4 KB in several layouts: the leading bytes are the first rows' (row-major), whatever the .bin's strides.
    tensors["w.wide"] = torch.randn(64, 48, generator=g)
    tensors["w.cube"] = torch.randn(4, 40, 30, generator=g)
    tensors["w.half"] = torch.randn(3000, generator=g).bfloat16()
    tensors["w.scalar"] = torch.tensor(3.0)
    tensors["w.none"] = torch.zeros(0, 16)
    fp = weights_fingerprint(_weights(tmp_path / "one", tensors))
    assert weights_fingerprint(_weights(tmp_path / "shards", tensors, shards=3)) == fp
    tied = {**tensors, "lm_head.weight": tensors["transformer.word_embeddings.weight"],  # one storage, two names
            "h.0.qkv": tensors["h.0.qkv"].t().contiguous().t(),  # transposed views: the same values, row-major
            "w.wide": tensors["w.wide"].t().contiguous().t(),
            "w.cube": tensors["w.cube"].permute(2, 0, 1).contiguous().permute(1, 2, 0)}
    assert weights_fingerprint(_weights(tmp_path / "bin", tied, fmt="bin")) == fp
    # A head of its own (not tied) is another tensor, even with equal values.
    untied = {**tensors, "lm_head.weight": tensors["transformer.word_embeddings.weight"].clone()}
    assert weights_fingerprint(_weights(tmp_path / "untied", untied, fmt="bin")) != fp
    for i, name in enumerate(n for n in tensors if tensors[n].numel()):  # fewer than 1024 tensors: each is read
        t = tensors[name].clone()
        t.view(-1)[0] += 1
        assert weights_fingerprint(_weights(tmp_path / f"edited{i}", {**tensors, name: t})) != fp, name
    assert weights_fingerprint(_weights(tmp_path / "fp16", {k: v.half() for k, v in tensors.items()})) != fp
    renamed = {("h.9.qkv" if k == "h.0.qkv" else k): v for k, v in tensors.items()}
    assert weights_fingerprint(_weights(tmp_path / "renamed", renamed)) != fp
    # A large model: 1024 of its tensors read, of every kind (a stride through the sorted names would read the same
    # few kinds of each layer), whichever files hold them.
    kinds = ("qkv.weight", "qkv.bias", "dense.weight", "dense.bias", "ln1.weight", "ln1.bias")
    big = {f"h.{i:03d}.{k}": torch.randn(4, generator=g) for i in range(500) for k in kinds}
    d = _weights(tmp_path / "big", big, shards=4)
    assert weights_fingerprint(_weights(tmp_path / "big-bin", big, fmt="bin")) == weights_fingerprint(d)
    at = {}
    for f in d.glob("*.safetensors"):
        header, start = safetensors_header(f)
        at.update({(f.name, start + info["data_offsets"][0]): name for name, info in header.items()})
    read = []
    original = files.open_file

    def recording(path: Path, what: str):
        fh = original(path, what)
        seek = fh.seek
        fh.seek = lambda off, *a: (read.append(at[Path(path).name, off]), seek(off, *a))[1]
        return fh

    monkeypatch.setattr(files, "open_file", recording)
    weights_fingerprint(d)
    assert len(read) == len(set(read)) == 1024
    # Of 3,000: every kind about equally (1024/6 ~ 171 each; a stride through the sorted names reads 2 of the 6)
    # and every part of the model (the first 1,024 names would end at layer 170 of 500).
    assert all(120 < sum(n.endswith(k) for n in read) < 220 for k in kinds), read
    layers = sorted(int(n.split(".")[1]) for n in read)
    assert layers[0] < 10 and layers[-1] > 490 and max(b - a for a, b in zip(layers, layers[1:])) < 20


def test_a_checkpoint_that_trained_on_copies_of_held_out_examples_is_refused_saying_so(tmp_path: Path) -> None:
    """This version leaves the copies of held-out examples out of training: a checkpoint of an earlier one (no
    held_copies in its meta) trained on them, so its example count differs though the user changed nothing. The
    refusal says so and how to go on, not that the user changed data.eval_ratio; a checkpoint that records the key
    gets the plain message."""
    old = {k: v for k, v in META.items() if k != "held_copies"}
    with pytest.raises(UsageError, match=r"saved with total_steps=12, this run has 11.*leaves the 8 example\(s\) "
                                         r"whose tokens equal a held-out one out of training.*ia3.init_from"):
        check_compatible(_ckpt(tmp_path, old), {**META, "total_steps": 11, "n_examples": 88, "held_copies": 8})
    shutil.rmtree(tmp_path / "checkpoints")
    with pytest.raises(UsageError, match=r"saved with n_examples=96, this run has 88; .*\(the training examples "
                                         r"changed in number"):
        check_compatible(_ckpt(tmp_path), {**META, "n_examples": 88, "held_copies": 8})


def test_another_global_batch_is_refused_with_the_key_that_keeps_it(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as e:
        check_compatible(_ckpt(tmp_path), {**META, "world_size": 1, "global_batch": 4})
    msg = str(e.value)
    assert "saved with a global batch of 8 examples per step (2 ranks x micro-batch 1 x 4 accumulation, ZeRO-2)" \
        in msg and "this run has 4 (1 rank x micro-batch 1 x 4 accumulation" in msg
    assert "train.global_batch_size=8" in msg


@pytest.mark.parametrize("change", RECUT, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_another_cut_of_the_same_global_batch_loads_the_portable_state(tmp_path: Path, change: dict) -> None:
    now = {**META, **change}
    meta, moved = check_compatible(_ckpt(tmp_path), now)
    assert moved
    line = resume_line(tmp_path, meta, now, moved)
    assert line.startswith(f"resuming step 3 saved on 2 ranks, now on {now['world_size']} ranks (saved as 2 ranks")
    assert "the same 8 examples per step" in line


@pytest.mark.parametrize("change", RECUT, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_a_preference_run_keeps_its_micro_batch(tmp_path: Path, change: dict) -> None:
    """A preference step's loss is the mean of its micro-batches' (TRL's per-batch losses): another micro-batch
    trains another objective, so only the number of ranks, the accumulation and the stage may change."""
    dpo = {**META, "objective": CHANGED["objective"]}
    now = {**dpo, **change}
    if "micro_batch_size" in change:
        with pytest.raises(UsageError, match=r"saved with micro_batch_size=1 \(now 2\).*; a preference step's loss .* "
                                             r"\(dpo\). Resume with train.micro_batch_size=1"):
            check_compatible(_ckpt(tmp_path, dpo), now)
    else:
        assert check_compatible(_ckpt(tmp_path, dpo), now)[1]


def test_offload_toggled_or_amsgrad_on_another_layout_is_refused(tmp_path: Path) -> None:
    """Optimizer offload on or off at the same layout swaps torch's AdamW for DeepSpeed's CPU Adam (their states do
    not continue each other); amsgrad keeps a running maximum the layout-independent state does not carry. Both
    are exit 2 before a process group starts (the second crashed at the first resumed step with a KeyError)."""
    with pytest.raises(UsageError, match="saved with offload_optimizer=False, this run has True"):
        check_compatible(_ckpt(tmp_path), {**META, "offload_optimizer": True})
    ams = {**META, "optimizer": '{"amsgrad": true, "type": "AdamW"}'}
    shutil.rmtree(tmp_path / "checkpoints")
    assert not check_compatible(_ckpt(tmp_path, ams), dict(ams))[1]  # its own layout: DeepSpeed's files
    with pytest.raises(UsageError, match="amsgrad the optimizer keeps a running maximum"):
        check_compatible(tmp_path / "checkpoints" / "step3", {**ams, "world_size": 1, "grad_accum": 8})
    from ia3_dist.runtime.ds_config import optimizer_key

    assert optimizer_key({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "fused": True}}}) == \
        '{"type": "AdamW"}'
    assert optimizer_key({"optimizer": {"type": "AdamW", "params": {"amsgrad": True}}}) == \
        '{"amsgrad": true, "type": "AdamW"}'
    # Truth values: amsgrad 1 is amsgrad; a default written out is the default left out.
    assert optimizer_key({"optimizer": {"type": "AdamW", "params": {"amsgrad": 1}}}) == \
        '{"amsgrad": true, "type": "AdamW"}'
    assert optimizer_key({"optimizer": {"type": "AdamW", "params": {"amsgrad": False, "adam_w_mode": True}}}) == \
        '{"type": "AdamW"}'


def test_another_cut_without_portable_state_names_the_layout_it_needs(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no layout-independent state .* resumes only on its own layout: 2 ranks x "
                                         "micro-batch 1 x 4 accumulation, ZeRO-2"):
        check_compatible(_ckpt(tmp_path, state=False), {**META, "world_size": 1, "grad_accum": 8})


def test_optimizer_offload_keeps_the_layout(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="optimizer offload"):
        check_compatible(_ckpt(tmp_path), {**META, "world_size": 1, "grad_accum": 8, "offload_optimizer": True})
    # An offload run saves no layout-independent state: the message names offload, not an older ia3-dist.
    offloaded = _ckpt(tmp_path / "off", {**META, "offload_optimizer": True}, state=False)
    with pytest.raises(UsageError, match="optimizer offload") as e:
        check_compatible(offloaded, {**META, "world_size": 1, "grad_accum": 8, "offload_optimizer": True})
    # The checkpoint records offload, which must match: resuming without it is no way out to offer.
    assert "without offload_optimizer" not in str(e.value)


def test_checkpoint_of_an_earlier_version(tmp_path: Path) -> None:
    """Without the keys recorded since layout-independent checkpoints: the global batch comes from its layout, the
    keys it lacks are not held against it, and its own layout resumes on DeepSpeed's files."""
    old = {k: v for k, v in META.items() if k not in (*RECORDED_SINCE_2, "global_batch")}
    meta, moved = check_compatible(_ckpt(tmp_path, old, state=False), {**META, "precision": "bf16"})
    assert not moved


def test_dpo_from_an_adapter_changed_since_the_start_is_refused(tmp_path: Path) -> None:
    """A DPO run from ia3.init_from records that adapter's content: its reference is the starting model, so a
    resume after the adapter was retrained in place (same path, the only thing `ia3` records) would compute
    another reference for the rest of the run. Refused naming the adapter; a copy elsewhere is the same adapter,
    and a checkpoint of a version that did not record it resumes as before."""
    from types import SimpleNamespace

    from ia3_dist.config import load_config
    from ia3_dist.train.prepare import run_keys

    adapter = tmp_path / "sft" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_model.safetensors").write_bytes(b"vectors-1")
    (adapter / "adapter_config.json").write_text("{}")
    mc = SimpleNamespace(model_type="bloom", to_dict=lambda: {"n_layer": 2})

    def keys(objective: str = "dpo", init: Path = adapter) -> dict:
        cfg = load_config("configs/tiny-cpu.yaml", [f"train.objective={objective}", f"ia3.init_from={init}"])
        return run_keys(cfg, mc)

    start = keys()
    assert "reference_start" in start and "reference_start" not in keys("simpo")
    import shutil

    shutil.copytree(adapter, tmp_path / "copy")
    assert keys(init=tmp_path / "copy")["reference_start"] == start["reference_start"]
    ck = _ckpt(tmp_path, {**META, "reference_start": start["reference_start"]})
    (adapter / "adapter_model.safetensors").write_bytes(b"vectors-2")  # the SFT run trained again in place
    with pytest.raises(UsageError, match="reference_start=.*ia3.init_from changed since the run started"):
        check_compatible(ck, {**META, "reference_start": keys()["reference_start"]})
    older = {k: v for k, v in META.items() if k not in RECORDED_LATER}
    shutil.rmtree(ck.parent)
    assert not check_compatible(_ckpt(tmp_path, older), {**META, "reference_start": keys()["reference_start"]})[1]


def _portable(tmp_path: Path, info: dict | None = None, state: bytes | None = None) -> Path:
    import torch
    from safetensors.torch import save_file

    d = tmp_path / "step3"
    d.mkdir()
    save_file({"param/w": torch.ones(2), "exp_avg/w": torch.zeros(2), "exp_avg_sq/w": torch.zeros(2),
               "rng/torch": torch.get_rng_state()}, str(d / portable.STATE))
    if state is not None:
        (d / portable.STATE).write_bytes(state)
    base = {"format": portable.FORMAT, "optimizer_step": 3, "lr": [0.001], "scheduler": None, "global_steps": 3,
            "global_samples": 24, "rng": {"python": [], "numpy": []}}
    (d / portable.INFO).write_text(json.dumps({**base, **(info or {})}))
    return d


def test_portable_state_reads_back(tmp_path: Path) -> None:
    tensors, info = portable.read(_portable(tmp_path))
    assert set(tensors) == {"param/w", "exp_avg/w", "exp_avg_sq/w", "rng/torch"} and info["optimizer_step"] == 3


@pytest.mark.parametrize("info, state, needle", [
    ({"format": 99}, None, "not format 1"),
    ({"optimizer_step": -1}, None, "'optimizer_step' is not a count"),
    ({"global_steps": True}, None, "'global_steps' is not a count"),
    ({"lr": "0.1"}, None, "'lr' is not a list of numbers"),
    ({"rng": None}, None, "no RNG state"),
    (None, b"\x80\x04\x95 a pickle, not safetensors", "unreadable"),
    (None, b"\xff" * 8 + b"{}", "unreadable"),
])
def test_damaged_portable_state_is_refused_naming_the_file(tmp_path: Path, info: dict | None, state: bytes | None,
                                                           needle: str) -> None:
    with pytest.raises(UsageError, match=needle):
        portable.read(_portable(tmp_path, info, state))


def test_portable_state_behind_a_symlink_is_refused(tmp_path: Path) -> None:
    d = _portable(tmp_path)
    real = tmp_path / "elsewhere.safetensors"
    (d / portable.STATE).rename(real)
    (d / portable.STATE).symlink_to(real)
    with pytest.raises(UsageError, match=portable.STATE):
        portable.read(d)


def test_fp16_keeps_the_layout(tmp_path: Path) -> None:
    """fp16's dynamic loss scale is DeepSpeed's optimizer state, which the portable state does not carry: the same
    layout resumes on DeepSpeed's files, another one is refused naming the way out."""
    fp16 = {**META, "precision": "fp16"}
    assert not check_compatible(_ckpt(tmp_path / "same", fp16), dict(fp16))[1]
    with pytest.raises(UsageError, match=r"in fp16 the dynamic loss scale .* Resume on the saved layout \(2 ranks "
                                         r"x micro-batch 1 x 4 accumulation, ZeRO-2\); a new run in bf16"):
        check_compatible(_ckpt(tmp_path / "cut", fp16), {**fp16, "world_size": 1, "grad_accum": 8})
    # As saved now (no portable state in fp16 checkpoints): the same reason, not "an earlier ia3-dist".
    with pytest.raises(UsageError, match="in fp16 the dynamic loss scale"):
        check_compatible(_ckpt(tmp_path / "bare", fp16, state=False), {**fp16, "world_size": 1, "grad_accum": 8})


def _step(root: Path, step: int) -> Path:
    d = root / f"step{step}"
    d.mkdir(parents=True)
    (d / "meta.json").write_text(json.dumps({**META, "step": step}))
    return d


def test_a_resume_before_the_runs_own_later_checkpoints_is_refused(tmp_path: Path) -> None:
    """A roll-back to step 4 of a run that saved up to step 12: its saves would go over step8's files and its
    rotation would delete its own new checkpoints first (step12 being higher), so the resume is refused naming the
    later ones; once they are moved away, or from the newest, it goes ahead."""
    from ia3_dist.runtime.checkpoint import refuse_later

    out = tmp_path / "run"
    four, eight, twelve = (_step(out / "checkpoints", s) for s in (4, 8, 12))
    (out / "checkpoints" / "step16").mkdir()  # an unfinished save (no meta.json) is not a checkpoint
    with pytest.raises(UsageError) as e:
        refuse_later(four, out)
    assert f"resumes at step 4, but {out / 'checkpoints'} holds checkpoints past it (step8, step12)" in str(e.value)
    assert "train.resume=auto" in str(e.value)
    refuse_later(twelve, out)
    refuse_later(four, tmp_path / "elsewhere")  # into another output dir: nothing there to lose
    eight.rename(tmp_path / "step8")
    twelve.rename(tmp_path / "step12")
    refuse_later(four, out)


def test_best_vectors_read_back_or_are_refused_naming_the_file(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from ia3_dist.runtime.checkpoint import BEST_VECTORS, read_best_vectors

    d = _ckpt(tmp_path)
    assert read_best_vectors(d) is None  # an earlier ia3-dist's checkpoint
    v = {"a.ia3_l": torch.rand(4), "b.ia3_l": torch.rand(1, 3)}
    save_file(v, str(d / BEST_VECTORS))
    back = read_best_vectors(d)
    assert back.keys() == v.keys() and all(torch.equal(back[k], v[k]) for k in v)
    for bad, why in ((b"not safetensors", "unreadable"), (None, "not the trainable vectors")):
        if bad is None:
            save_file({"a": torch.arange(3)}, str(d / BEST_VECTORS))
        else:
            (d / BEST_VECTORS).write_bytes(bad)
        with pytest.raises(UsageError, match=f"{BEST_VECTORS}: {why}"):
            read_best_vectors(d)
    (d / BEST_VECTORS).unlink()
    (d / BEST_VECTORS).symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(UsageError):
        read_best_vectors(d)


def test_a_failed_save_that_cannot_clear_its_temps_still_fails_together(tmp_path: Path) -> None:
    """Rank 0 clears the pointer temps of a failed save best-effort: where it cannot (an unremovable ``*.tmp``, a
    filesystem gone read-only), it still reaches the barrier every other rank waits in and raises the save's
    CheckpointWriteError (exit 74) naming the file, not an OSError that leaves the others in the barrier."""
    from types import SimpleNamespace

    import torch

    from ia3_dist.errors import CheckpointWriteError
    from ia3_dist.runtime import checkpoint, dist

    out = tmp_path / "out"
    (checkpoint.root_of(out) / "latest.tmp").mkdir(parents=True)  # unlink() of it fails: a directory
    engine = SimpleNamespace(device=torch.device("cpu"))
    with pytest.raises(CheckpointWriteError, match=r"checkpoint step5 could not be written.*latest\.tmp"):
        checkpoint.save(engine, out, 5, {}, keep=2, env=dist.DistEnv(0, 0, 1, 1))
    assert not (checkpoint.root_of(out) / "step5").exists()


def test_an_edited_window_record_is_skipped_or_logged_never_a_crash() -> None:
    """meta.json's ``window`` (the steps a killed run trained but had not logged) is read on rank 0 alone after the
    ranks met: a record without its optional grad_norm is logged without it, a malformed one skipped; a KeyError
    there left the other ranks waiting in the next collective."""
    from dataclasses import fields
    from types import SimpleNamespace

    from ia3_dist.train.loop import Trainer
    from ia3_dist.train.stats import StepStats

    lines: list[tuple] = []
    fake = SimpleNamespace(start=7, log=SimpleNamespace(log=lines.append),
                           _line=lambda w, done, lr, gn, dt, t0, obj: (done, w.steps, lr, gn))
    n = len(fields(StepStats))
    rec = {"steps": 3, "loss": 6.0, "seconds": 1.5, "lr": 1e-3, "stats": [1.0] * n, "objective": {}}
    Trainer.log_saved_window(fake, rec, 0.0)
    Trainer.log_saved_window(fake, {**rec, "grad_norm": 0.5}, 0.0)
    for bad in ({**rec, "grad_norm": "x"}, {**rec, "steps": 0}, {**rec, "stats": [1.0]}, {**rec, "lr": None}, [],
                {**rec, "objective": {"a": "b"}}):
        Trainer.log_saved_window(fake, bad, 0.0)
    assert lines == [(7, 3, 1e-3, None), (7, 3, 1e-3, 0.5)]
