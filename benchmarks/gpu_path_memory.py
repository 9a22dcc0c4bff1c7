"""Per-rank memory of two GPU-path fixes, measured on CPU (BENCHMARKS.md, "GPU path: memory").

  * full fine-tuning under FSDP2 with gradient accumulation: peak RSS per rank at
    accumulation 1 vs 4 (the same micro batch), which differ by the unsharded gradients
    when accumulating micro-batches skip the reduce-scatter;
  * LoRA under bf16 mixed precision: the parameter bytes each rank holds (its shards),
    against the fp32 run.

    python -m benchmarks.gpu_path_memory [--src DIR] [--out FILE] [--nproc N] [--only full]

--src: the shardtune source tree to measure (default: this checkout's src/), so that an
older commit's worktree can be measured side by side. Each run is 2 ranks of torchrun on
the "small" Llama (~124M parameters), peak RSS on live memory (MALLOC_MMAP_THRESHOLD_, as
the planner's measurements use).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

from .harness import WORK
from .workload import REPO, build_model, write_subset

LIVE_MEMORY = "131072"  # freed blocks go back to the system at once: RSS follows live memory

FULL = ["--enable_fsdp", "--micro_batch_size", "1", "--max_train_step", "3", "--context_length", "512",
        "--fsdp_activation_checkpointing", "False"]
LORA = ["--enable_fsdp", "--use_peft", "--peft_method", "lora", "--micro_batch_size", "1", "--batch_size_training", "1",
        "--max_train_step", "1", "--context_length", "128"]
RUNS = {
    "full, accumulation 1": FULL + ["--batch_size_training", "1"],
    "full, accumulation 4": FULL + ["--batch_size_training", "4"],
    "lora, fp32": LORA + ["--mixed_precision", "False"],
    "lora, bf16 mixed": LORA + ["--mixed_precision", "True"],
}


def worker(record: str, argv: list[str]) -> None:
    """Under torchrun: the recipe, recording this rank's parameter bytes after setup and
    its peak RSS at the end."""
    from shardtune import device
    from shardtune.config.parse import parse_args
    from shardtune.modeling.quant import held_bytes
    from shardtune.recipes import sft

    held = {}

    def before_step(model, state):
        held.setdefault("parameter_bytes", held_bytes(model))

    cfgs = parse_args(argv)
    dist = device.setup(require_distributed=True)
    sft.run(cfgs, dist, before_step=before_step)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(f"{record}.rank{dist.rank}").write_text(json.dumps({**held, "peak_rss": peak}))
    device.teardown()


def measure(src: Path, name: str, flags: list[str], model: Path, data: Path, work: Path, nproc: int) -> list[dict]:
    record = work / f"{name.replace(', ', '_').replace(' ', '_')}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SHARDTUNE_DEVICE": "cpu", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "MALLOC_MMAP_THRESHOLD_": LIVE_MEMORY,
           "SHARDTUNE_CACHE": str(work / "cache"), "PYTHONPATH": os.pathsep.join([str(src), str(REPO)])}
    args = ["--model_name", str(model), "--samsum_dataset.data_path", str(data), "--output_dir", str(work / "out"),
            "--overwrite_output_dir", "--num_epochs", "1", "--run_validation", "False", "--save_model", "False",
            "--num_workers_dataloader", "0", *flags]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "benchmarks.gpu_path_memory", "--worker", str(record), "--", *args]
    subprocess.run(cmd, env=env, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return [json.loads(Path(f"{record}.rank{r}").read_text()) for r in range(nproc)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--src", type=Path, default=REPO / "src")
    parser.add_argument("--out", type=Path, default=WORK / "gpu_path_memory.json")
    parser.add_argument("--nproc", type=int, default=2, help="ranks of every run")
    parser.add_argument("--only", default="", help="run only the runs whose name starts with this")
    parser.add_argument("--worker")
    args, rest = parser.parse_known_args()
    if args.worker:
        return worker(args.worker, rest[1:] if rest[:1] == ["--"] else rest)
    work = WORK / "gpu_path_memory"
    work.mkdir(parents=True, exist_ok=True)
    model = build_model("small", WORK / "models" / "small")
    data = write_subset(work / "samsum", 200)
    results = {name: measure(args.src, name, flags, model, data, work, args.nproc) for name, flags in RUNS.items()
               if name.startswith(args.only)}
    args.out.write_text(json.dumps({"src": str(args.src), "runs": results}, indent=1))
    for name, ranks in results.items():
        print(f"{name:24s} peak RSS MiB per rank {[round(r['peak_rss'] / 2**20) for r in ranks]}  "
              f"parameter MiB per rank {[round(r.get('parameter_bytes', 0) / 2**20, 1) for r in ranks]}")


if __name__ == "__main__":
    main()
