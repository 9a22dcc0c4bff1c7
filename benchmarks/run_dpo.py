"""The DPO section's runners (benchmarks/dpo.py starts each as its own process):

  shardtune  the dpo recipe's own entry (shardtune.recipes.dpo.main), packed;
  trl        TRL's DPOTrainer with its defaults (padded; gradient checkpointing on), on the
             same pairs reordered into the order shardtune's sampler draws them and read
             sequentially, so that step k of both trains the same pairs, from the same saved
             LoRA start;
  trl_no_checkpointing  the same without gradient checkpointing: neither side recomputes
             activations (shardtune does not checkpoint in one process).

All stamp the clock at the same point of every optimizer step (after backward, before the
optimizer step: shardtune's before_step, Trainer's on_pre_optimizer_step) and count the
tokens of what they were given, non-pad and with padding (shardtune: its collate's
num_tokens and row slots; TRL: its attention mask and input_ids), so tokens/s covers only
the training steps, never loading or setup. Each stamp also reads the process's CPU time
(all its threads): on a shared machine it tells a step that waited for a core (wall time
only) from one that did more work, threads spinning included (CPU time too).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from .measure import StepRecord, emit, summarize, vm_hwm_bytes


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("runner", choices=("shardtune", "trl", "trl_no_checkpointing"))
    parser.add_argument("--model", required=True)
    parser.add_argument("--pairs", required=True, help="the pairs (shardtune) or the same pairs in step order (trl)")
    parser.add_argument("--adapter", required=True, help="the LoRA start both load")
    parser.add_argument("--batch", type=int, required=True, help="pairs per optimizer step")
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--beta", type=float, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--context", type=int, required=True)
    parser.add_argument("--warmup", type=int, required=True)
    parser.add_argument("--size", required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--work", required=True)
    parser.add_argument("--result", required=True)
    return parser.parse_args(argv)


def stamp() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def shardtune_steps(args) -> tuple[list[tuple[float, float]], list[float], list[tuple[int, int]]]:
    from shardtune.recipes import dpo

    out = Path(args.work) / "out"
    tokens: list[tuple[int, int]] = []  # (non-pad, with padding) per step
    collate = dpo.collate_pairs

    def counting(*a, **kw):  # num_workers 0: the collate runs here, once per step in step order
        batch = collate(*a, **kw)
        tokens.append((batch["num_tokens"], batch["input_ids"].numel()))
        return batch

    dpo.collate_pairs = counting  # setup_pair_data binds it by name when the recipe starts
    stamps: list[tuple[float, float]] = []
    flags = ["--model_name", args.model, "--dataset", "preference_dataset", "--preference_dataset.data_path",
             args.pairs, "--preference_dataset.validation_path", args.pairs, "--run_validation", "False",
             "--batching_strategy", "packing", "--context_length", str(args.context),
             "--batch_size_training", str(args.batch), "--num_epochs", "1", "--lr", str(args.lr),
             "--lr_scheduler", "constant", "--weight_decay", "0", "--seed", str(args.seed),
             "--mixed_precision", "False", "--use_peft", "--peft_method", "lora", "--from_peft_checkpoint",
             args.adapter, "--lora_config.lora_dropout", "0", "--dpo_config.loss_type", "sigmoid",
             "--dpo_config.beta", str(args.beta),
             "--num_workers_dataloader", "0", "--save_metrics", "--log_every", "1", "--save_model", "False",
             "--data_cache_dir", "none", "--output_dir", str(out), "--overwrite_output_dir"]
    assert dpo.main(flags, before_step=lambda model, state: stamps.append(stamp())) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return stamps, [r["loss"] for r in rows if r["event"] == "step"], tokens[:len(stamps)]


def trl_steps(args) -> tuple[list[tuple[float, float]], list[float], list[tuple[int, int]]]:
    from datasets import load_dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    stamps, losses, tokens, pending = [], [], [], [0, 0]

    class Counted(DPOTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            value = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if self.model.training:
                pending[0] += int(inputs["attention_mask"].sum())
                pending[1] += inputs["input_ids"].numel()
                losses.append(value.item())
            return value

    class Clock(TrainerCallback):
        def on_pre_optimizer_step(self, *a, **kw):
            stamps.append(stamp())
            tokens.append(tuple(pending))
            pending[:] = [0, 0]

    data = load_dataset("json", data_files=args.pairs, split="train")
    config = DPOConfig(output_dir=str(Path(args.work) / "trl"), per_device_train_batch_size=args.batch,
                       gradient_accumulation_steps=1, num_train_epochs=1, learning_rate=args.lr,
                       lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, loss_type=["sigmoid"],
                       beta=args.beta, train_sampling_strategy="sequential", max_length=args.context,
                       logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, bf16=False,
                       dataloader_num_workers=0, seed=args.seed, disable_tqdm=True,
                       gradient_checkpointing=args.runner == "trl")
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    policy = PeftModel.from_pretrained(base, args.adapter, is_trainable=True)
    Counted(model=policy, args=config, train_dataset=data, processing_class=AutoTokenizer.from_pretrained(args.model),
            callbacks=[Clock()]).train()
    return stamps, losses, tokens


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    stamps, losses, tokens = (shardtune_steps if args.runner == "shardtune" else trl_steps)(args)
    records = [StepRecord(end, loss, *counts) for (end, _), loss, counts in zip(stamps, losses, tokens)]
    # start=None: a step's duration runs from the previous step's stamp to its own
    result = summarize(args.runner, args.size, records, None, args.warmup, args.threads,
                       extra={"last_loss": losses[-1], "tokens": [n for n, _ in tokens]})
    cpu = [b[1] - a[1] for a, b in zip(stamps, stamps[1:])][-result.timed_steps:]  # summarize's timed steps
    result.extra.update(cpu_s_per_step=statistics.median(cpu),
                        cpu_tokens_per_s=sum(n for n, _ in tokens[-result.timed_steps:]) / sum(cpu))
    result.peak_rss_mib = vm_hwm_bytes() / 2**20  # VmHWM: this process alone (see measure.py)
    emit(result, args.result)


if __name__ == "__main__":
    main()
