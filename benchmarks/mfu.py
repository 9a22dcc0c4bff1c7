"""How close one shardtune process comes to this CPU's matmul peak: the FLOPs the work
needs per second, divided by the fp32 GEMM peak measured at the same thread count.

Needed FLOPs of a LoRA step (per non-pad token, matmuls only): shardtune.throughput's
model FLOPs, counted here on their own from the saved batches (and the model's shape),
except that the chunks' few pad positions count as attention queries too:
  - every frozen decoder weight 4 (forward and the input gradient), every adapter weight 6;
  - the output head 4 x vocab x hidden, but only at labelled positions (the rest of a
    position's head output is never needed: shardtune's loss.py skips it);
  - attention 12 x layers x width x (tokens before it in its own example): causal, and no
    attention across packed examples.
Activation recomputation is not needed work, so it counts as overhead.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

GEMM_SIZES = (512, 1024, 2048)


def gemm_peak_flops(threads: int, repeats: int = 7) -> tuple[float, int]:
    """The best median fp32 torch.mm rate over a few square sizes: (FLOP/s, size)."""
    torch.set_num_threads(threads)
    best = (0.0, 0)
    for n in GEMM_SIZES:
        a, b = torch.randn(n, n), torch.randn(n, n)
        for _ in range(2):
            torch.mm(a, b)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - start)
        best = max(best, (2 * n**3 / statistics.median(times), n))
    return best


def needed_flops(batch: dict, dims, lora_r: int, lora_targets: tuple[str, ...], vocab: int) -> float:
    """Needed FLOPs of one packed batch (see the module docstring)."""
    hidden, layers, inter = dims.hidden, dims.layers, dims.intermediate
    frozen_per_layer = 4 * hidden * hidden + 3 * hidden * inter  # q, k, v, o (no GQA here) and the MLP
    adapter_per_layer = len(lora_targets) * lora_r * 2 * hidden
    tokens = batch["num_tokens"]
    labelled = int((batch["labels"] != -100).sum())
    # position_ids restart at 0 for each packed example: the query at position p attends to
    # p + 1 keys (the chunk's few pad positions are counted too: they are computed)
    query_key_pairs = float((batch["position_ids"].double() + 1).sum())
    body = tokens * layers * (4 * frozen_per_layer + 6 * adapter_per_layer)
    # per (query, key) pair and layer: QK^T and AV are 2 x width each forward, twice that backward
    attention = 12 * layers * hidden * query_key_pairs
    return body + 4 * vocab * hidden * labelled + attention


def run(args, settings, work: Path) -> dict:
    from .harness import Workload
    from .batchfile import load_batches
    from .workload import SIZES

    size = args.mfu_size
    steps = settings.warmup_steps + (2 if args.quick else args.mfu_steps)
    run_settings = replace(settings, max_steps=steps)
    workload = Workload(size, run_settings, work)
    peak, gemm_n = gemm_peak_flops(args.threads)
    print(f"[bench] mfu: fp32 GEMM peak {peak / 1e9:.1f} GFLOP/s ({gemm_n}^3) at {args.threads} threads; "
          f"shardtune {size} for {steps} steps", flush=True)
    row = workload.run("shardtune", work / "runs" / "mfu" / size, args.threads)
    batches = load_batches(workload.batches)[settings.warmup_steps:steps]
    vocab = json.loads((workload.model / "config.json").read_text())["vocab_size"]
    flops = [needed_flops(b, SIZES[size], settings.lora_r, settings.lora_targets, vocab) for b in batches]
    needed_per_s = statistics.mean(flops) / row["s_per_step"]
    return {"size": size, "threads": args.threads, "gemm_peak_gflops": peak / 1e9, "gemm_size": gemm_n,
            "s_per_step": row["s_per_step"], "needed_gflop_per_step": statistics.mean(flops) / 1e9,
            "needed_gflops": needed_per_s / 1e9, "ratio": needed_per_s / peak, "steps": row["timed_steps"]}


def render(result: dict) -> str:
    from .report import table

    return table(["model", "threads", "fp32 GEMM peak GFLOP/s", "s/step", "needed GFLOP/step", "needed GFLOP/s",
                  "needed / peak"],
                 [[result["size"], str(result["threads"]), f"{result['gemm_peak_gflops']:.1f} ({result['gemm_size']}^3)",
                   f"{result['s_per_step']:.2f}", f"{result['needed_gflop_per_step']:.1f}",
                   f"{result['needed_gflops']:.1f}", f"{result['ratio']:.2f}"]])
