"""The launcher reproduces the reference recipe step for step (issue: exactness).

Reference side: HF ``Trainer`` + PEFT IA3 + ``DataCollatorForSeq2Seq`` exactly as in the recipe (micro-batch 1,
accumulation 8, lr 3e-3, 1 epoch, default AdamW and linear schedule), run as one process because HF Trainer +
DeepSpeed on CPU silently trains every rank on all data. Its sampling is made sequential
(``train_sampling_strategy="sequential"``) and the launcher runs with ``data.shuffle=false``, so both see the same
global batches. The data mixes in records whose prompt alone exceeds max_length (no label left after
truncation): the recipe keeps them in its batches, and so does the launcher with ``data.unlabeled=keep``.
Per-step losses must agree within 1e-6 relative and the final IA3 vectors within 1e-5 (fp32 reassociation in
a few thousand AdamW updates; 1e-4 with SDPA attention, another algorithm: RTOL_VECTORS_SDPA), for (world 1,
ZeRO-0), (world 2, ZeRO-1/2/3 and ZeRO-3 offload), for the splits
1x8, 2x4, 8x1 of global batch 8, with HF's cosine schedule and warmup, and with the speed options on (SDPA
attention, chunked loss); and for tiny random Llama, Qwen2, Mistral and GPT-NeoX models (one layout each, world 1
ZeRO-0 or world 2 ZeRO-3, the splits spread across them). Packed runs (``data.packing``) meet the same tolerances
against the unpacked reference: Bloom on world 2 ZeRO-3 (packed against unpacked for every family and stage:
test_packing_train.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from _util import adapter_tensors, check, launch, metrics
from test_data import reference_process_func

from ia3_dist.train.demo import make_records

pytestmark = pytest.mark.slow
N_RECORDS = 96   # 12 optimizer steps of global batch 8
RTOL_LOSS = 1e-6
RTOL_VECTORS = 1e-5
# SDPA's CPU kernel is another algorithm than eager's (blockwise softmax, its own backward), as accurate against
# float64 (measured: gradients of q, k, v within 3.6e-7, 5.6e-7, 5.6e-7 relative, eager 2.6e-7, 5.0e-7, 5.6e-7)
# but with its own roundings, where the eager path repeats the reference's ops. The losses still agree within
# RTOL_LOSS (measured up to 4.6e-7); the vectors, where AdamW amplifies the error of a few coordinates whose gradient
# is mostly cancellation, were measured at 1.2e-6 (one box), 7.3e-6 (AVX512 kernels here), 9.3e-6
# (ATEN_CPU_CAPABILITY=default), 1.5e-5 (=avx2) and once 3.3e-5 in CI, eager at the same split at 4.7e-7.
RTOL_VECTORS_SDPA = 1e-4
# Records (of the 96) whose prompt is made longer than max_length, spread over the steps: labels all masked.
LONG_AT = (3, 17, 40, 41, 66, 90)
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_zh_demo.json"


def _records(tok) -> list[dict]:
    """Shared Alpaca records where present (else generated); at LONG_AT the input is repeated until the prompt
    alone passes 256 tokens, so those examples have no label after truncation."""
    if not SHARED.exists() and os.environ.get("CI"):
        pytest.fail(f"CI: {SHARED} not present (the parity data must be the real records there)")
    pool = json.loads(SHARED.read_text(encoding="utf-8")) if SHARED.exists() else make_records(400, 11, None)
    out = [{k: r[k] for k in ("instruction", "input", "output")} for r in pool[:N_RECORDS]]
    for i in LONG_AT:
        r = out[i]
        r["input"] = (r["input"] or r["instruction"]) * 300
        assert all(v == -100 for v in reference_process_func(r, tok)["labels"]), i
    return out


@pytest.fixture(scope="module")
def parity_data(tmp_path_factory: pytest.TempPathFactory, demo_tokenizer) -> Path:
    f = tmp_path_factory.mktemp("parity") / "records.json"
    f.write_text(json.dumps(_records(demo_tokenizer), ensure_ascii=False), encoding="utf-8")
    return f


def _recipe_example(record: dict, tok, max_length: int = 256) -> dict:
    """The recipe's example, less the BOS that a BOS-adding tokenizer (Mistral's) puts before the answer's own
    encoding: the BOS stays where the model saw it in pretraining, at the start, and no answer starts with a
    labelled BOS. Bloom's tokenizer adds none: the recipe's example as it is."""
    ex = reference_process_func(record, tok, 1 << 30)
    at = next((i for i, lab in enumerate(ex["labels"]) if lab != -100), None)
    bos = tok.bos_token_id
    if bos is not None and at is not None and tok("x").input_ids[:1] == [bos] and ex["input_ids"][at] == bos:
        ex = {k: v[:at] + v[at + 1:] for k, v in ex.items()}
    return {k: v[:max_length] for k, v in ex.items()}


def _reference_run(model_dir: Path, tok, parity_data: Path, out_dir: Path, scheduler: str = "linear",
                   warmup: int = 0) -> dict:
    """The reference recipe itself, one process (``scheduler``/``warmup``: HF's lr_scheduler_type and
    warmup_steps)."""
    from datasets import Dataset
    from peft import IA3Config, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    records = json.loads(parity_data.read_text(encoding="utf-8"))
    ds = Dataset.from_list(records)
    tokenized_ds = ds.map(lambda ex: _recipe_example(ex, tok), remove_columns=ds.column_names)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    model = get_peft_model(model, IA3Config(task_type=TaskType.CAUSAL_LM))
    args = TrainingArguments(output_dir=str(out_dir), per_device_train_batch_size=1,
                             gradient_accumulation_steps=8, logging_steps=1, num_train_epochs=1,
                             learning_rate=3e-3, save_strategy="no", report_to=[], use_cpu=True, seed=42,
                             train_sampling_strategy="sequential", disable_tqdm=True,
                             lr_scheduler_type=scheduler, warmup_steps=warmup)
    micro_losses: list[float] = []

    class RecordingTrainer(Trainer):
        def training_step(self, *a, **k):
            loss = super().training_step(*a, **k)
            micro_losses.append(loss.item())
            return loss

    trainer = RecordingTrainer(model=model, args=args, train_dataset=tokenized_ds,
                               data_collator=DataCollatorForSeq2Seq(tokenizer=tok, padding=True))
    env_keep = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if k in os.environ}
    try:
        trainer.train()
    finally:
        os.environ.update(env_keep)
    assert len(micro_losses) == N_RECORDS
    # Each micro-step's loss is its token-loss sum / label tokens of the whole global batch; their sum per step is
    # the step's loss.
    steps = [sum(micro_losses[i:i + 8]) for i in range(0, N_RECORDS, 8)]
    vectors = {n.replace(".default", ""): p.detach().clone() for n, p in model.named_parameters() if "ia3_l" in n}
    # HF's logged epoch (the fraction done): what a user compares our metrics.jsonl against.
    epochs = [r["epoch"] for r in trainer.state.log_history if "loss" in r]
    return {"losses": steps, "vectors": vectors, "epochs": epochs}


@pytest.fixture(scope="module")
def references(parity_data: Path, demo_model: Path, demo_tokenizer, tmp_path_factory):
    """The demo model's reference run, once per LR schedule (``scheduler``, ``warmup_steps``)."""
    done: dict[tuple[str, int], dict] = {}

    def get(scheduler: str = "linear", warmup: int = 0) -> dict:
        if (scheduler, warmup) not in done:
            done[scheduler, warmup] = _reference_run(demo_model, demo_tokenizer, parity_data,
                                                     tmp_path_factory.mktemp("ref"), scheduler, warmup)
        return done[scheduler, warmup]

    return get


@pytest.fixture(scope="module")
def family_reference(parity_data: Path, family_models: dict, tmp_path_factory):
    """``model_type -> reference result``, each family's reference run once per module."""
    from transformers import AutoTokenizer

    done: dict[str, dict] = {}

    def get(model_type: str) -> dict:
        if model_type not in done:
            d = family_models[model_type]
            done[model_type] = _reference_run(d, AutoTokenizer.from_pretrained(str(d)), parity_data,
                                              tmp_path_factory.mktemp(f"ref-{model_type}"))
        return done[model_type]

    return get


CASES = {
    "w1-zero0-1x8": (1, "zero0", 1, 8),
    "w1-zero0-2x4": (1, "zero0", 2, 4),
    "w1-zero0-8x1": (1, "zero0", 8, 1),
    "w2-zero2-1x4": (2, "zero2", 1, 4),
    "w2-zero3-1x4": (2, "zero3", 1, 4),
    "w2-zero1-1x4": (2, "zero1", 1, 4),
    # zero3_offload matched too but took 100 s of a 15-minute suite on 2 cores: `IA3_PARITY_OFFLOAD=1` adds it.
    # The speed options on: Bloom attention through SDPA, the LM-head loss in chunks of 1 MiB of logits.
    "w1-zero0-8x1-sdpa-chunked": (1, "zero0", 8, 1, "model.attention=sdpa", "train.loss_chunk_mib=1"),
    # Packed rows (data.packing): the same losses and vectors as the unpacked reference (packed against unpacked
    # for every family and stage: test_packing_train.py). The LM head in chunks too: under ZeRO-3 every head call
    # gathers the head, so ranks whose rows need 1, 2 or 3 chunks of 1 MiB must agree on one count (their
    # collectives crossed and the run died).
    "w2-zero3-2x2-packed-512": (2, "zero3", 2, 2, "data.packing=true", "data.pack_length=512",
                                "train.loss_chunk_mib=1"),
}
if os.environ.get("IA3_PARITY_OFFLOAD") == "1":
    CASES["w2-zero3_offload-1x4"] = (2, "zero3_offload", 1, 4)
    # HF's cosine schedule with warmup (the reference gets the same lr_scheduler_type and warmup_steps): matched,
    # opt-in with the above for suite time (test_schedule.py checks the schedule's values against HF's).
    CASES["w1-zero0-2x4-cosine-warmup3"] = (1, "zero0", 2, 4, "train.scheduler=cosine", "train.warmup_steps=3")


# The other tested families, on tiny random models (GQA for Llama/Qwen2/Mistral, Qwen2's q/k/v biases and tied
# head): one layout each, one process ZeRO-0 or two ranks ZeRO-3 with a different micro-batch split, so layouts
# and splits are covered across families without a run per family, layout and split. The last MLP runs at label
# rows (the default).
FAMILY_CASES = {
    "llama": [(2, "zero3", 1, 4)],
    "qwen2": [(1, "zero0", 8, 1)],
    "mistral": [(2, "zero3", 4, 1)],
    "gpt_neox": [(1, "zero0", 4, 2)],
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs() / b.abs().clamp_min(1e-12)).max().item()


def _run_and_compare(case: str, ref: dict, parity_data: Path, out: Path, world: int, ds: str, micro: int,
                     accum: int, *extra: str) -> None:
    check(launch(["--config", "configs/tiny-cpu.yaml", f"data.path={parity_data}", "data.shuffle=false",
                  f"deepspeed.config={ds}", f"train.micro_batch_size={micro}", f"train.grad_accum={accum}",
                  "train.lr=3e-3", "train.epochs=1", "train.log_every=1", "train.precision=fp32",
                  "checkpoint.at_end=false", "data.unlabeled=keep", f"output.dir={out}", *extra], nproc=world))
    got = [r["loss"] for r in metrics(out)]
    want = ref["losses"]
    assert len(got) == len(want) == N_RECORDS // 8
    assert [r["epoch"] for r in metrics(out)] == pytest.approx(ref["epochs"], abs=1e-4)
    loss_rel = _rel(torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64))
    vectors = adapter_tensors(out / "adapter")
    assert set(vectors) == set(ref["vectors"])
    vec_rel = max(_rel(vectors[k].double(), ref["vectors"][k].double()) for k in vectors)
    moved = max((v - 1).abs().max().item() for v in vectors.values())
    print(f"\nparity {case}: per-step loss max rel diff {loss_rel:.2e}, IA3 vectors max rel diff {vec_rel:.2e} "
          f"(vectors moved up to {moved:.3f} from init)")
    assert moved > 1e-3
    assert loss_rel < RTOL_LOSS, (got, want)
    assert vec_rel < (RTOL_VECTORS_SDPA if "model.attention=sdpa" in extra else RTOL_VECTORS)


@pytest.mark.parametrize("case", list(CASES))
def test_launcher_matches_reference(case: str, references, parity_data: Path, tmp_path: Path) -> None:
    world, ds, micro, accum, *extra = CASES[case]
    sets = dict(x.split("=", 1) for x in extra)
    reference = references(sets.get("train.scheduler", "linear"), int(sets.get("train.warmup_steps", 0)))
    _run_and_compare(case, reference, parity_data, tmp_path / case, world, ds, micro, accum, *extra)


FAMILY_PARAMS = [pytest.param(t, c, id=f"{t}-w{c[0]}-{c[1]}-{c[2]}x{c[3]}") for t, cs in FAMILY_CASES.items()
                 for c in cs]


@pytest.mark.parametrize("model_type, case", FAMILY_PARAMS)
def test_family_matches_reference(model_type: str, case: tuple, family_reference, family_models: dict,
                                  parity_data: Path, tmp_path: Path) -> None:
    world, ds, micro, accum, *extra = case
    _run_and_compare(f"{model_type}-w{world}-{ds}-{micro}x{accum}{'-packed' if extra else ''}",
                     family_reference(model_type), parity_data, tmp_path / "out", world, ds, micro, accum,
                     f"model.path={family_models[model_type]}", *extra)
