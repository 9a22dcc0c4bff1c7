"""Test worker (under torchrun): several dpo runs in one launch, and what each trained.

    dpo_runs.py OUT FLAGS... [--then OUT FLAGS...]...

Each run writes to OUT (--output_dir OUT is added); rank 0 also saves OUT/trained.safetensors,
the run's trainable parameters gathered whole, for comparisons across world sizes.
With RANK_LOCAL_CACHE=1 each rank has a cache directory of its own, as each node has with a
node-local cache."""
import os
import sys
from pathlib import Path

from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

from shardtune import device
from shardtune.config.parse import parse_args
from shardtune.recipes import dpo
from several_runs import runs


def main() -> None:
    if os.environ.get("RANK_LOCAL_CACHE"):
        os.environ["SHARDTUNE_CACHE"] = os.path.join(os.environ["SHARDTUNE_CACHE"], f"rank{os.environ['RANK']}")
    plan = [(out, parse_args(argv + ["--output_dir", out])) for out, argv in runs(sys.argv[1:])]
    dist = device.setup(require_distributed=plan[0][1].train.enable_fsdp)
    for out, cfgs in plan:
        result = dpo.run(cfgs, dist)
        trained = {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().float().cpu().contiguous()
                   for name, p in result.peft_model.named_parameters() if p.requires_grad}
        if dist.is_main:
            save_file(trained, str(Path(out) / "trained.safetensors"))
        del result
    device.teardown()


if __name__ == "__main__":  # spawned DataLoader workers import this file too
    main()
