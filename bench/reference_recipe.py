"""The reference recipe as a benchmark side: HF Trainer + PEFT IA3 + DataCollatorForSeq2Seq, micro-batch 1 x
accumulation 8, lr 3e-3, exactly as in DEVELOPERS.md, for --steps optimizer steps. Writes a JSON summary.

    python bench/reference_recipe.py --model DIR --data FILE --steps N --out result.json [--bf16]
"""

from __future__ import annotations

import argparse
import collections
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def process_func(example: dict, tokenizer, max_length: int = 256) -> dict:
    instruction = tokenizer("\n".join(["Human: " + example["instruction"], example["input"]]).strip()
                            + "\n\nAssistant: ")
    response = tokenizer(example["output"] + tokenizer.eos_token)
    input_ids = instruction["input_ids"] + response["input_ids"]
    attention_mask = instruction["attention_mask"] + response["attention_mask"]
    labels = [-100] * len(instruction["input_ids"]) + response["input_ids"]
    if len(input_ids) > max_length:
        input_ids, attention_mask, labels = input_ids[:max_length], attention_mask[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2, help="optimizer steps excluded from the timing")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--micro", type=int, default=1, choices=(1, 2, 4, 8),
                    help="per_device_train_batch_size (accumulation 8 / micro: global batch 8). 1 is the recipe; "
                         "others are the same-shape HF peer of a launcher row")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    from peft import IA3Config, TaskType, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    tok = AutoTokenizer.from_pretrained(a.model)
    records = json.loads(Path(a.data).read_text(encoding="utf-8"))
    t0 = time.perf_counter()
    try:
        from datasets import Dataset

        ds = Dataset.from_list(records)
        tokenized = ds.map(lambda ex: process_func(ex, tok), remove_columns=ds.column_names)
    except Exception:  # a box without a working `datasets` (absent, or its pyarrow too old): a list of examples
        # is a map-style dataset too
        tokenized = [process_func(r, tok) for r in records]
    tok_s = time.perf_counter() - t0
    # use_kernels=False as the launcher loads (models/load.py HUB_KERNELS): offline, the hub kernels transformers
    # swaps in on a GPU at model.train() cannot be fetched, and the peer would run other code than the launcher.
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16 if a.bf16 else torch.float32,
                                                 use_kernels=False)
    model = get_peft_model(model, IA3Config(task_type=TaskType.CAUSAL_LM))
    if torch.cuda.is_available():
        model = model.cuda()

    tokens: list[int] = []
    slots = [0]
    stamps: list[float] = []

    class Timing(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())
            tokens.append(0)

    # Counted in the collator, on the host: by training_step the batch is on the GPU, and int(mask.sum()) there
    # would stop the queue every micro-step, a stall HF Trainer itself does not have. The loader may collate a
    # batch ahead; training_step takes the counts in the same order.
    counts: collections.deque[tuple[int, int]] = collections.deque()
    seq2seq = DataCollatorForSeq2Seq(tokenizer=tok, padding=True)

    def collate(features):
        batch = seq2seq(features)
        counts.append((int(batch["attention_mask"].sum()), int(batch["attention_mask"].numel())))
        return batch

    class Counting(Trainer):
        def training_step(self, model, inputs, *rest, **kw):
            if not tokens:
                tokens.append(0)
            real, padded = counts.popleft()
            tokens[-1] += real
            slots[0] += padded
            return super().training_step(model, inputs, *rest, **kw)

    args = TrainingArguments(output_dir=str(Path(a.out).parent / "ref-trainer"), per_device_train_batch_size=a.micro,
                             gradient_accumulation_steps=8 // a.micro, learning_rate=3e-3, num_train_epochs=1,
                             # Logs every step, as the launcher side does (train.log_every=1): both sides'
                             # timings include their per-step logging.
                             max_steps=a.steps, logging_steps=1, save_strategy="no", report_to=[],
                             bf16=a.bf16, use_cpu=not torch.cuda.is_available(), disable_tqdm=True, seed=42)
    trainer = Counting(model=model, args=args, train_dataset=tokenized,
                       data_collator=collate, callbacks=[Timing()])
    start = time.perf_counter()
    trainer.train()
    # tokens[i] counts the micro-batches that ended at stamps[i] (the list grows one step ahead).
    per_step = tokens[: len(stamps)]
    t_begin = stamps[a.warmup - 1] if a.warmup > 0 else start
    timed_tokens = sum(per_step[a.warmup:])
    secs = stamps[-1] - t_begin
    peak = (torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    Path(a.out).write_text(json.dumps({
        "side": "reference" if a.micro == 1 else f"HF peer {a.micro}x{8 // a.micro}", "micro": a.micro,
        "steps_timed": len(per_step) - a.warmup, "real_tokens": timed_tokens,
        "seconds": secs, "tokens_per_s": timed_tokens / secs,
        "step_ms": secs / max(len(per_step) - a.warmup, 1) * 1e3, "padding_efficiency": sum(tokens) / max(slots[0], 1),
        "peak_mem_gb": peak, "tokenize_s": tok_s, "records": len(records),
        "n_params": sum(p.numel() for p in model.parameters()),
    }, indent=1))


if __name__ == "__main__":
    main()
