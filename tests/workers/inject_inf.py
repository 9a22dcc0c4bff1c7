"""Test worker (torchrun, fp16): poison one gradient element with inf on rank 0 at
step 2 only, and record the sharded trainable weights and the loss scale after each
step, so the test can check that the scaler skipped exactly that step on every rank."""
import sys

import torch
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

from shardtune import device
from shardtune.recipes import sft
from shardtune.config.parse import parse_args

record: dict[str, torch.Tensor] = {}


def local(p):
    return (p.to_local() if isinstance(p, DTensor) else p).detach().clone().float()


def before_step(model, state):
    step = state.step + 1  # the step about to happen
    trainable = [p for p in model.parameters() if p.requires_grad]
    for i, p in enumerate(trainable):
        record[f"before{step}_{i}"] = local(p)
    if step == 2 and dist.rank == 0:
        g = next(p.grad for p in trainable if p.grad is not None and local(p.grad).numel())
        (g.to_local() if isinstance(g, DTensor) else g).view(-1)[0] = float("inf")


if __name__ == "__main__":  # spawned DataLoader workers import this file too
    out_file, argv = sys.argv[1], sys.argv[2:]
    cfgs = parse_args(argv)
    dist = device.setup(require_distributed=cfgs.train.enable_fsdp)  # read by before_step
    result = sft.run(cfgs, dist, before_step=before_step)
    trainable = [p for p in result.peft_model.parameters() if p.requires_grad]
    for i, p in enumerate(trainable):
        record[f"final_{i}"] = local(p)
    save_file(record, f"{out_file}.rank{dist.rank}")
    device.teardown()
