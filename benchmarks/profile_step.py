"""torch.profiler over one shardtune training step (tiny, LoRA, the throughput workload),
after two warm-up steps, in this process: shardtune's own setup and train_epoch."""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from .workload import Settings, build_model, shardtune_args, write_subset

WARMUP_STEPS = 2
TOP_OPS = 15


def run(args, settings: Settings, work: Path) -> dict:
    from shardtune import device, loop as train
    from shardtune.recipes import sft
    from shardtune.config.parse import parse_args
    from shardtune.metrics.logs import MetricsWriter

    size = "micro" if args.quick else args.dp_size
    os.environ.setdefault("SHARDTUNE_CACHE", str(work / "cache"))
    torch.set_num_threads(args.threads)
    model = build_model(size, work / "models" / size)
    data_dir = write_subset(work / "data" / f"samsum-{settings.dialogues}", settings.dialogues)
    out = work / "runs" / "profile"
    cfgs = parse_args(shardtune_args(model, data_dir, out, replace(settings, max_steps=0)))
    recipe = sft.setup(cfgs, device.setup())
    quiet = MetricsWriter(None)

    def steps(until: int) -> None:
        recipe.loop_cfg.max_train_step = until
        recipe.sampler.set_epoch(0, start=recipe.state.samples_in_epoch)
        train.train_epoch(recipe.train_model, recipe.loader, recipe.optimizer, recipe.dist, recipe.loop_cfg,
                          recipe.state, quiet)

    print(f"[bench] profile: one shardtune step of {size} after {WARMUP_STEPS} warm-up steps", flush=True)
    steps(WARMUP_STEPS)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        steps(WARMUP_STEPS + 1)
    events = prof.key_averages()
    total_us = sum(e.self_cpu_time_total for e in events)
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:TOP_OPS]
    return {"size": size, "threads": args.threads, "total_ms": total_us / 1000,
            "ops": [{"name": e.key, "self_ms": e.self_cpu_time_total / 1000, "calls": e.count,
                     "share": e.self_cpu_time_total / total_us} for e in top]}


def render(result: dict) -> str:
    from .report import table

    rows = [[f"`{op['name']}`", f"{op['self_ms']:.1f}", f"{100 * op['share']:.1f}%", str(op["calls"])]
            for op in result["ops"]]
    return "\n".join([f"One step of {result['size']} ({result['threads']} threads), {result['total_ms']:.0f} ms "
                      f"of self CPU time in all; top {len(rows)} ops by self time:", "",
                      table(["op", "self ms", "share", "calls"], rows)])
