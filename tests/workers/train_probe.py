"""Test worker (run under torchrun): the real finetuning run, then the in-memory trained
model's logits on a fixed probe batch, saved by rank 0 for comparison with a plain
PEFT reload of the saved adapter, and the bytes of parameter storage each rank holds
(`held_bytes`, one entry per rank).

    train_probe.py PROBE_FILE FLAGS... [--then PROBE_FILE FLAGS...]...

Each --then starts another run in the same processes (one launch, several runs)."""
import sys

import torch
import torch.distributed
from safetensors.torch import save_file

from shardtune import device, parallel
from shardtune.recipes import sft
from several_runs import runs
from shardtune.modeling import quant
from shardtune.config.parse import parse_args


def main() -> None:
    plan = [(out_file, parse_args(argv)) for out_file, argv in runs(sys.argv[1:])]
    dist = device.setup(require_distributed=plan[0][1].train.enable_fsdp)
    for out_file, cfgs in plan:
        result = sft.run(cfgs, dist)
        probe = torch.arange(3, 3 + 2 * 40).reshape(2, 40) % 200 + 3
        with torch.no_grad():
            result.train_model.eval()
            logits = result.train_model(input_ids=probe.to(dist.device)).logits
        parallel.release_gathered(result.train_model)  # the forward above left the head gathered
        held = [quant.held_bytes(result.train_model)]
        if torch.distributed.is_initialized():
            held = [None] * dist.world_size
            torch.distributed.all_gather_object(held, quant.held_bytes(result.train_model))
        if dist.is_main:
            save_file({"logits": logits.float().cpu().contiguous(), "probe": probe,
                       "held_bytes": torch.tensor(held, dtype=torch.int64)}, out_file)
        del result
    device.teardown()


if __name__ == "__main__":  # spawned DataLoader workers import this file too
    main()
