"""Test worker (torchrun): materialise a model under FSDP2 meshes whose shard sizes do not
divide the weights evenly, and compare every rank's shard with what distribute_tensor cuts
from the whole checkpoint tensor (the independent reference). Prints one JSON line per rank.

    load_probe.py MODEL_DIR"""
import json
import sys

import torch
from torch.distributed.tensor import distribute_tensor

from shardtune import device, parallel
from shardtune.modeling import load as model_lib
from shardtune.config.schema import fsdp_config

# HYBRID_SHARD on one node: a (1, world) mesh, so a Replicate mesh dim comes before Shard(0)
STRATEGIES = ("FULL_SHARD", "HYBRID_SHARD")


def main() -> None:
    dist = device.setup(require_distributed=True)
    spec = model_lib.load_spec(sys.argv[1])
    ckpt = model_lib.WeightFiles(spec.model_dir)
    report = {"rank": dist.rank}
    for strategy in STRATEGIES:
        cfg = fsdp_config(sharding_strategy=strategy)
        model = model_lib.build_meta_model(spec)
        parallel.shard(model, parallel.build_mesh(dist, cfg), cfg, parallel.Precision(), pin_memory=False)
        model_lib.materialize(model, spec, dist.device, {})
        mismatched, sliced, uneven = [], 0, 0
        for name, param in model.named_parameters():
            whole = ckpt.get(model_lib.checkpoint_key(name, ckpt))
            expected = distribute_tensor(whole, param.device_mesh, param.placements, src_data_rank=None).to_local()
            if not torch.equal(param.to_local(), expected):
                mismatched.append(name)
            sliced += model_lib.local_rows(param) is not None
            uneven += whole.shape[0] % dist.world_size != 0
        report[strategy] = {"params": len(list(model.parameters())), "sliced": sliced, "uneven": uneven,
                            "mismatched": mismatched}
    sys.stdout.write(json.dumps(report) + "\n")  # one write: ranks share stdout
    sys.stdout.flush()
    device.teardown()


if __name__ == "__main__":
    main()
