"""TRL's preference trainers run as the reference side of the parity tests (one process: HF Trainer + DeepSpeed on
CPU trains every rank on all data), on exactly the tokens the launcher trains on.

The pairs are tokenized by ia3-dist (its template and cache) and handed to TRL pre-tokenized, so the comparison is
of the objectives, the batching, the optimizer and the schedule, not of two tokenizations: ``DPOTrainer`` gets
``prompt_ids``/``chosen_ids``/``rejected_ids`` (its own collator pads them), ``ORPOTrainer`` and ``CPOTrainer`` get
their ``tokenize_row`` output built from the same ids. Sampling is sequential (the launcher runs with
``data.shuffle=false``); optimizer, schedule, clipping and dropout are set to the launcher's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


def pair_ids(data: Any) -> list[tuple[list[int], list[int], list[int]]]:
    """``(prompt, chosen, rejected)`` token ids of every pair of ia3-dist's tokenized pair data."""
    out = []
    for i in range(len(data)):
        c_ids, _, c_lab = data.example(2 * i)
        r_ids, _, r_lab = data.example(2 * i + 1)
        n = next(k for k, v in enumerate(c_lab) if v != -100)
        assert c_ids[:n] == r_ids[:n] and all(v == -100 for v in r_lab[:n])
        out.append((c_ids[:n], c_ids[n:], r_ids[n:]))
    return out


def _row(prompt: list[int], answer: list[int]) -> dict[str, list[int]]:
    ids = prompt + answer
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * len(prompt) + answer}


def run_trl(objective: str, model_dir: Path, tok: Any, pairs: list, out_dir: Path, micro: int, accum: int,
            steps: int, lr: float, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
            simpo_gamma: float = 0.5, cpo_alpha: float = 0.0, init_adapter: Path | None = None) -> dict:
    """Per-step losses, per-step metrics (TRL's names) and the final IA3 vectors of a TRL run. ``init_adapter``:
    start from that adapter, and copy it into TRL's frozen ``ref`` adapter by hand (TRL's own copy misses IA3's
    parameter names: ``ref_was_base`` says whether it did)."""
    from datasets import Dataset
    from peft import IA3Config, PeftModel, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, TrainerCallback

    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    if init_adapter is not None:
        model = PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)
    else:
        model = get_peft_model(model, IA3Config(task_type=TaskType.CAUSAL_LM))
    common = dict(output_dir=str(out_dir), per_device_train_batch_size=micro, gradient_accumulation_steps=accum,
                  logging_steps=1, max_steps=steps, learning_rate=lr, lr_scheduler_type="linear", warmup_steps=0,
                  weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
                  save_strategy="no", report_to=[], use_cpu=True, seed=42, train_sampling_strategy="sequential",
                  disable_tqdm=True, bf16=False, gradient_checkpointing=False, beta=beta,
                  remove_unused_columns=False, max_length=100000)
    if objective == "dpo":
        from trl import DPOConfig, DPOTrainer

        ds = Dataset.from_list([{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in pairs])
        args = DPOConfig(**common, loss_type=loss_type, label_smoothing=label_smoothing)

        class Trainer(DPOTrainer):
            def _prepare_dataset(self, dataset, *a, **k):
                return dataset  # already ia3-dist's tokens
    else:
        rows = [{"prompt": "p", "chosen": "c", "rejected": "r", "ids": [p, c, r]} for p, c, r in pairs]
        ds = Dataset.from_list(rows)
        if objective == "orpo":
            from trl.experimental.orpo import ORPOConfig
            from trl.experimental.orpo import ORPOTrainer as Base

            args = ORPOConfig(**common)
        else:
            from trl.experimental.cpo import CPOConfig
            from trl.experimental.cpo import CPOTrainer as Base

            args = CPOConfig(**common, loss_type="simpo", simpo_gamma=simpo_gamma, cpo_alpha=cpo_alpha,
                             label_smoothing=label_smoothing)

        class Trainer(Base):
            def tokenize_row(self, feature, model=None):
                p, c, r = feature["ids"]
                out = {"prompt_input_ids": p, "prompt_attention_mask": [1] * len(p)}
                for side, answer in (("chosen", c), ("rejected", r)):
                    out.update({f"{side}_{k}": v for k, v in _row(p, answer).items()})
                return out

    micro_losses: list[float] = []
    logs: list[dict] = []

    class Record(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "rewards/chosen" in logs:
                logs_copy = dict(logs)
                logs_copy["step"] = state.global_step
                logs_list.append(logs_copy)

    logs_list = logs

    class Recording(Trainer):
        def training_step(self, *a, **k):
            loss = super().training_step(*a, **k)
            micro_losses.append(loss.item())
            return loss

    trainer = Recording(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[Record()])
    ref_was_base = None
    if init_adapter is not None:
        # DPOTrainer adds a "ref" adapter and copies the starting one into it by names containing ".default.";
        # IA3's end in ".ia3_l.default", so its "ref" stays fresh (all 1.0: the base). Set it by hand.
        ref = {n: q for n, q in model.named_parameters() if n.endswith(".ia3_l.ref")}
        assert ref, "TRL did not add its ref adapter"
        ref_was_base = all(bool((q == 1.0).all()) for q in ref.values())
        with torch.no_grad():
            for n, q in ref.items():
                q.copy_(model.get_parameter(n[:-len("ref")] + "default"))
    env_keep = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if k in os.environ}
    try:
        trainer.train()
    finally:
        os.environ.update(env_keep)
    assert len(micro_losses) == steps * accum, len(micro_losses)
    losses = [sum(micro_losses[i:i + accum]) for i in range(0, len(micro_losses), accum)]
    vectors = {n.replace(".default", ""): q.detach().clone() for n, q in model.named_parameters()
               if "ia3_l" in n and ".default" in n}
    return {"losses": losses, "metrics": logs, "vectors": vectors, "ref_was_base": ref_was_base}


def max_rel(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b, strict=True))


def vectors_close(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    assert set(ours) == set(ref), (sorted(ours)[:3], sorted(ref)[:3])
    return max(float((ours[k].float() - ref[k].float()).abs().max()) for k in ref)
