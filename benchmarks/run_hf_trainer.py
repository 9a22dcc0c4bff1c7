"""HF transformers.Trainer + peft LoRA, as users run it: --mode padded (one dialogue per
row, DataCollatorForSeq2Seq) or --mode packed (shardtune's packed chunks, padded to the
longest in the batch with restarting position_ids). Trainer shuffles with its own sampler."""
from __future__ import annotations

import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import (AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainerCallback,
                          TrainingArguments)

from shardtune import data
from shardtune.modeling import load as model_lib
from shardtune.config.parse import parse_args
from shardtune.data.packing import collate as pack_collate

from .measure import StepRecord, emit, runner_args, summarize
from .workload import Settings, padded_examples, shardtune_args


class Counting:
    """Wraps a collator: remembers each batch's (non-pad, all) tokens in order, and hands
    the model only the `keep` fields. With no accumulation batch i is step i (the loader
    may build one batch ahead; the order holds)."""

    def __init__(self, collate, count, keep: tuple[str, ...] | None = None) -> None:
        self.collate, self.count, self.keep, self.tokens = collate, count, keep, []

    def __call__(self, rows):
        batch = self.collate(rows)
        self.tokens.append(self.count(batch))
        return {k: batch[k] for k in self.keep} if self.keep else batch


class StepTimes(TrainerCallback):
    def __init__(self) -> None:
        self.start, self.ends, self.losses = None, [], []

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


def main() -> None:
    import argparse

    extra = argparse.ArgumentParser()
    extra.add_argument("--mode", choices=("padded", "packed"), required=True)
    own, rest = extra.parse_known_args()
    args = runner_args(rest)
    torch.set_num_threads(args.threads)
    settings = Settings.from_json(args.settings)
    tokenizer = model_lib.load_tokenizer(args.model)
    if own.mode == "padded":
        dataset = padded_examples(Path(args.model), Path(args.data), settings)
        collator = Counting(DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100, return_tensors="pt"),
                            lambda b: (int(b["attention_mask"].sum()), int(b["input_ids"].numel())))
    else:
        cfgs = parse_args(shardtune_args(Path(args.model), Path(args.data), Path(args.work), settings))
        dataset = data.build_split(cfgs, tokenizer, "train").dataset
        collator = Counting(lambda rows: pack_collate(rows, tokenizer.pad_token_id),
                            lambda b: (b["num_tokens"], int(b["input_ids"].numel())),
                            keep=("input_ids", "labels", "position_ids"))
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha,
                                             lora_dropout=settings.lora_dropout,
                                             target_modules=list(settings.lora_targets), task_type="CAUSAL_LM"))
    training_args = TrainingArguments(
        output_dir=str(Path(args.work) / "trainer"), per_device_train_batch_size=settings.micro_batch,
        num_train_epochs=1, max_steps=settings.max_steps or -1, learning_rate=settings.lr,
        lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0, seed=settings.seed,
        remove_unused_columns=False, disable_tqdm=True)
    times = StepTimes()
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset, data_collator=collator,
                      callbacks=[times])
    trainer.train()
    trainer.save_model()  # the adapter, as shardtune and torchtune save theirs
    records = [StepRecord(end, loss, *tokens) for end, loss, tokens in zip(times.ends, times.losses, collator.tokens)]
    emit(summarize(f"hf_trainer_{own.mode}", args.size, records, times.start, settings.warmup_steps, args.threads),
         args.result)


if __name__ == "__main__":
    main()
