"""Model load time on every rank of a torchrun job, two ways:
  shardtune: meta model -> fully_shard per layer -> each rank reads its shards from
             safetensors one tensor at a time (what --enable_fsdp does);
  hf:        AutoModelForCausalLM.from_pretrained on every rank (a full copy per rank,
             what a script that loads then wraps does).
Each rank writes one JSON line: seconds from the config to a usable model (imports and
process-group start excluded), and its peak RSS."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.distributed as tdist
from transformers import AutoModelForCausalLM

from shardtune import device, parallel
from shardtune.modeling import load as model_lib
from shardtune.config.parse import parse_args

from .measure import peak_rss_mib


def load_shardtune(model_dir: str, dist: device.Dist) -> None:
    cfgs = parse_args(["--model_name", model_dir, "--enable_fsdp", "--mixed_precision", "False"])
    spec = model_lib.load_spec(model_dir)
    model = model_lib.build_meta_model(spec)
    mesh = parallel.build_mesh(dist, cfgs.fsdp)
    parallel.shard(model, mesh, cfgs.fsdp, parallel.resolve_precision(cfgs, dist.supports_fast_bf16(), log_choice=False), pin_memory=False)
    model_lib.materialize(model, spec, dist.device, {})


def load_hf(model_dir: str, dist: device.Dist) -> None:
    AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", choices=("shardtune", "hf"), required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--result", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist = device.setup(require_distributed=True)  # imports and the process group are not timed
    tdist.barrier()
    start = time.perf_counter()
    (load_shardtune if args.method == "shardtune" else load_hf)(args.model, dist)
    seconds = time.perf_counter() - start
    tdist.barrier()  # every rank holds its model: the job's load time is the slowest rank's
    rank, world = tdist.get_rank(), tdist.get_world_size()
    line = json.dumps({"method": args.method, "rank": rank, "world": world, "load_s": seconds,
                       "peak_rss_mib": peak_rss_mib()})
    Path(f"{args.result}.rank{rank}").write_text(line + "\n")
    tdist.destroy_process_group()


if __name__ == "__main__":
    main()
