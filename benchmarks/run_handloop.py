"""The floor: a minimal hand-written PyTorch loop (transformers model + peft LoRA +
AdamW) over the harness's packed batches, one optimizer step per batch."""
from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from .batchfile import load_batches
from .measure import StepClock, emit, runner_args, summarize
from .workload import Settings


def main() -> None:
    args = runner_args()
    torch.set_num_threads(args.threads)
    settings = Settings.from_json(args.settings)
    torch.manual_seed(settings.seed)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha,
                                             lora_dropout=settings.lora_dropout,
                                             target_modules=list(settings.lora_targets), task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.lr)
    batches = load_batches(Path(args.batches))
    model.train()
    clock = StepClock()
    for batch in batches:
        # restarting position_ids and no attention_mask: transformers keeps examples apart
        loss = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                     labels=batch["labels"], use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock.step(loss.item(), batch["num_tokens"], batch["input_ids"].numel())
    emit(summarize("handloop", args.size, clock.records, clock.start, settings.warmup_steps, args.threads),
         args.result)


if __name__ == "__main__":
    main()
