"""shardtune itself: the recipe's own entry (shardtune.finetuning.main, what
`python -m shardtune.finetuning` runs), with a before_step hook that only reads the clock.
Works under torchrun too: every rank writes its own result line (--result gets .rankN)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from shardtune.recipes import sft

from .batchfile import load_batches
from .measure import StepRecord, emit, runner_args, summarize, vm_hwm_bytes
from .workload import Settings, shardtune_args


def main() -> None:
    import argparse

    extra = argparse.ArgumentParser()
    extra.add_argument("--shardtune_flag", action="append", default=[],
                       help="an extra shardtune flag (repeatable; --shardtune_flag=--enable_fsdp)")
    own, rest = extra.parse_known_args()
    args = runner_args(rest)
    torch.set_num_threads(args.threads)
    settings = Settings.from_json(args.settings)
    work = Path(args.work)
    argv = shardtune_args(Path(args.model), Path(args.data), work / "out", settings) + own.shardtune_flag

    stamps: list[float] = []  # after each step's backward, before its optimizer step
    training_peak = [0]  # VmHWM when the last step ends: the peak of loading and training, not of saving

    def clock(model, state) -> None:
        stamps.append(time.perf_counter())
        training_peak[0] = vm_hwm_bytes()

    sft.main(argv, before_step=clock)
    # main() tore the process group down: rank and world come from torchrun's environment
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    metrics = work / "out" / "metrics.jsonl"
    steps = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    losses = [s["loss"] for s in steps if s["event"] == "step"]
    if rank != 0:  # only rank 0 writes metrics; the loss is the global one anyway
        losses = [float("nan")] * len(stamps)
    batches = load_batches(Path(args.batches))
    # Step 1's start is not seen (start=None). Tokens are the global batch's (all ranks):
    # the sampler draws the same global batches at any world size.
    records = [StepRecord(stamps[i], losses[i], batches[i]["num_tokens"], batches[i]["input_ids"].numel())
               for i in range(len(stamps))]
    result = summarize("shardtune", args.size, records, None, settings.warmup_steps, args.threads,
                       rank=rank, world=world, extra={"training_peak_rss_mib": training_peak[0] / 2**20})
    emit(result, f"{args.result}.rank{rank}" if world > 1 else args.result)


if __name__ == "__main__":
    main()
