"""Test worker (torchrun): build the FSDP mesh for a strategy with --dist_timeout and
print the timeout of each of its sub-groups (a private accessor: if torch renames it,
this fails loudly)."""
import sys, json
import torch
from shardtune import device, parallel
from shardtune.config.schema import fsdp_config
dist = device.setup(timeout_s=int(sys.argv[1]))
cfg = fsdp_config(sharding_strategy=sys.argv[2])
mesh = parallel.build_mesh(dist, cfg)
out = {}
for name in ("replicate", "shard"):
    pg = mesh.get_group(name)
    be = pg._get_backend(torch.device("cpu"))
    out[name] = be.options._timeout.total_seconds()
sys.stdout.write(json.dumps(out) + "\n")  # one write: ranks share stdout
sys.stdout.flush()
device.teardown()
