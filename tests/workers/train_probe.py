"""Test worker (run under torchrun): the real finetuning run, then the in-memory trained
model's logits on a fixed probe batch, saved by rank 0 for comparison with a plain
PEFT reload of the saved adapter, and the bytes of parameter storage each rank holds
(`held_bytes`, one entry per rank). Runs with an NF4 base (--quantization 4bit
--enable_fsdp) also save, per rank, how many NF4 shards were compared with the
whole-tensor quantization and which differ (metadata "nf4": JSON [[checked, [names]], ...]).

    train_probe.py PROBE_FILE FLAGS... [--then PROBE_FILE FLAGS...]...

Each --then starts another run in the same processes (one launch, several runs)."""
import json
import sys

import torch
import torch.distributed
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

from shardtune import _compat, device, parallel
from shardtune.recipes import sft
from several_runs import runs
from shardtune.modeling import load, quant
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
        nf4 = cfgs.train.quantization == "4bit" and cfgs.train.enable_fsdp
        mine = (quant.held_bytes(result.train_model), nf4_mismatches(result.train_model, cfgs) if nf4 else None)
        ranks = [mine]
        if torch.distributed.is_initialized():
            ranks = [None] * dist.world_size
            torch.distributed.all_gather_object(ranks, mine)
        if dist.is_main:
            save_file({"logits": logits.float().cpu().contiguous(), "probe": probe,
                       "held_bytes": torch.tensor([held for held, _ in ranks], dtype=torch.int64)}, out_file,
                      metadata={"nf4": json.dumps([checks for _, checks in ranks])} if nf4 else None)
        del result
    device.teardown()


def nf4_mismatches(model: torch.nn.Module, cfgs) -> tuple[int, list[str]]:
    """(NF4 weights compared, names of those whose shard on this rank is not bitwise what
    FSDP2 cuts from torchao's to_nf4 of the whole checkpoint weight, as shardtune loaded them
    before each rank quantized only its rows). Frozen, so training left them as loaded."""
    nf4 = _compat.nf4_module()
    ckpt = load.WeightFiles(load.resolve_model_dir(cfgs.train.model_name))
    checked, differ = 0, []
    for name, param in model.named_parameters():
        local = param.to_local() if isinstance(param, DTensor) else param
        if not isinstance(local, nf4.NF4Tensor):
            continue
        whole = ckpt.get(load.checkpoint_key(name, ckpt)).to(local.device, local.dtype)
        expected = nf4.to_nf4(whole, quant.BLOCK_SIZE, quant.SCALER_BLOCK_SIZE)
        if isinstance(param, DTensor):  # FSDP2 shards over the mesh's last dimension
            shard_dim = param.device_mesh.ndim - 1
            expected = torch.chunk(expected, param.device_mesh.size(shard_dim))[param.device_mesh.get_local_rank(shard_dim)]
        checked += 1
        if not all(torch.equal(getattr(local, k), getattr(expected, k))
                   for k in ("quantized_data", "quantized_scalers", "quantization_factor", "scaler_mean")):
            differ.append(name)
    return checked, differ


if __name__ == "__main__":  # spawned DataLoader workers import this file too
    main()
