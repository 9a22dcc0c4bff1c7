"""Test worker (run under torchrun): the real finetuning run, then the in-memory trained
model's logits on a fixed probe batch, saved by rank 0 for comparison with a plain
PEFT reload of the saved adapter."""
import sys

import torch
from safetensors.torch import save_file

from shardtune import device, finetuning
from shardtune.args import parse_args


def main() -> None:
    out_file, argv = sys.argv[1], sys.argv[2:]
    cfgs = parse_args(argv)
    dist = device.setup(require_distributed=cfgs.train.enable_fsdp)
    result = finetuning.run(cfgs, dist)
    probe = torch.arange(3, 3 + 2 * 40).reshape(2, 40) % 200 + 3
    with torch.no_grad():
        result.train_model.eval()
        logits = result.train_model(input_ids=probe.to(dist.device)).logits
    if dist.is_main:
        save_file({"logits": logits.float().cpu().contiguous(), "probe": probe}, out_file)
    device.teardown()


if __name__ == "__main__":  # spawned DataLoader workers import this file too
    main()
