"""QLoRA under FSDP2: the frozen linear weights of the decoder layers held as torchao's
NF4Tensor (4-bit NormalFloat, double-quantized block scales), as torchtune does.

Each decoder layer's base linear weights become NF4 placeholders on the meta device, which
fully_shard splits by rows as it would split the quantized weight. Then each rank reads
only its rows of each weight from the checkpoint and quantizes only those: every rank
reads, quantizes and holds 1/world of the base. The result is bitwise what fully_shard
would keep of the weight quantized whole, so the quantization does not depend on the world
size: a block's 4-bit codes and scale are its own, and the one value taken over the whole
weight, the mean of all block scales that double quantization subtracts, comes from the
block absmax values all-gathered over the shard group (1/64 of the weight's values).
NF4Tensor implements FSDP2's all-gather extension (fsdp_pre_all_gather /
fsdp_post_all_gather), so forward all-gathers the 4-bit data, not floats, and F.linear
dequantizes on the fly. LoRA A/B stay in the compute dtype.
"""
from __future__ import annotations

import logging

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from .. import _compat
from ..errors import UserError
from . import load as model_lib

log = logging.getLogger(__name__)

# torchao's defaults (those of QLoRA): 64 values per block scale, 256 block scales per
# second-level (double-quantization) block
BLOCK_SIZE, SCALER_BLOCK_SIZE = 64, 256


def nf4_fits(shape: tuple[int, int], shard_size: int) -> bool:
    """NF4 packs whole blocks, and FSDP2 splits its packed data by rows: each rank's rows
    must hold whole second-level blocks."""
    rows, cols = shape
    return rows % shard_size == 0 and (rows // shard_size) * cols % (BLOCK_SIZE * SCALER_BLOCK_SIZE) == 0


def check_fits(weights: dict[str, tuple[int, int]], shard_size: int) -> None:
    """Refuse the first of a decoder layer's quantized weights (name -> shape) that nf4_fits
    rejects, naming the shard counts every one of them fits: the run's (LayerQuantizer) check
    and shardtune plan's."""
    bad = [(name, shape) for name, shape in weights.items() if not nf4_fits(shape, shard_size)]
    if not bad:
        return
    (name, shape), (rows, cols) = bad[0], bad[0][1]
    fitting = [n for n in range(1, 257) if all(nf4_fits(s, n) for s in weights.values())]
    raise UserError(f"--quantization 4bit with --enable_fsdp: {name} has shape {tuple(shape)}, and each of "
                    f"{shard_size} shards ({rows / shard_size:g} rows x {cols}) must hold a multiple of "
                    f"{BLOCK_SIZE * SCALER_BLOCK_SIZE} values (NF4 blocks of {BLOCK_SIZE} x {SCALER_BLOCK_SIZE}); "
                    f"shard it over {', '.join(map(str, fitting))} ranks, or drop --enable_fsdp for bitsandbytes' "
                    "4-bit in one process")


def base_linears(layer: torch.nn.Module) -> list[torch.nn.Linear]:
    """The frozen linear layers of a decoder layer: LoRA's base layers and the untargeted
    projections, not LoRA's own A and B (trainable, or a frozen adapter: dpo's reference)."""
    return [m for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad
            and not {"lora_A", "lora_B"} & set(name.split("."))]


class LayerQuantizer:
    """Turns the decoder layers' frozen linear weights into NF4: placeholders just before
    fully_shard shards each layer (parallel.shard calls it per layer), then load() fills
    them from the checkpoint once the model is sharded and materialized (whose to_empty
    reallocates every tensor of a module that has a meta one, such as a linear's bias)."""

    def __init__(self, model: torch.nn.Module, spec: model_lib.ModelSpec, device: torch.device,
                 shard_mesh: DeviceMesh, offloaded: bool):
        self.nf4 = _compat.nf4_module()
        self.model_dir, self.ckpt = spec.model_dir, model_lib.WeightFiles(spec.model_dir)
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.dtype, self.device, self.shard_mesh, self.offloaded = spec.dtype, device, shard_mesh, offloaded
        self.weights: dict[str, torch.nn.Linear] = {}  # parameter name -> its linear, in the same order on every rank

    @torch.no_grad()
    def __call__(self, layer: torch.nn.Module) -> set[torch.nn.Parameter]:
        """Put the layer's NF4 placeholders in; returns the parameters fully_shard must leave alone."""
        placeholders = set()
        linears = base_linears(layer)
        check_fits({self.names[id(m.weight)]: tuple(m.weight.shape) for m in linears}, self.shard_mesh.size())
        for linear in linears:
            name = self.names[id(linear.weight)]
            meta = torch.empty(linear.weight.shape, dtype=self.dtype, device="meta")
            linear.weight = torch.nn.Parameter(self.nf4.to_nf4(meta, BLOCK_SIZE, SCALER_BLOCK_SIZE),
                                               requires_grad=False)
            self.weights[name] = linear
            placeholders.add(linear.weight)
        # torch 2.13's FSDP2 takes a shortcut when the shard group has one rank that skips
        # tensor-subclass all-gather extensions (fsdp_post_all_gather gets one tensor instead
        # of three); unsharded anyway, frozen weights need FSDP for nothing, so it skips them.
        return placeholders if self.shard_mesh.size() == 1 else set()

    @torch.no_grad()
    def load(self) -> None:
        """Read this rank's rows of each weight and quantize them, exchanging only the block
        absmax values. On the run's device, where the whole weight used to be quantized: the
        mean of the absmax values must be reduced in the same order to come out the same."""
        group = self.shard_mesh.get_group()
        for name, linear in self.weights.items():
            param = linear.weight
            start, stop = model_lib.local_rows(param) or (0, param.shape[0])  # plain: one shard rank
            key = model_lib.checked_key(name, param, self.ckpt, self.model_dir)
            rows = self.ckpt.get(key, (start, stop)).to(self.device, self.dtype)
            absmax = _compat.nf4_block_absmax(rows, BLOCK_SIZE)
            every = absmax.new_empty(absmax.numel() * group.size())
            torch.distributed.all_gather_into_tensor(every, absmax, group=group)
            shard = _compat.nf4_shard(rows, every, start * param.shape[1] // BLOCK_SIZE, BLOCK_SIZE, SCALER_BLOCK_SIZE)
            if isinstance(param, DTensor):  # with CPU offload, FSDP2 keeps shards in host memory
                shard = DTensor.from_local(shard.cpu() if self.offloaded else shard, param.device_mesh,
                                           param.placements, run_check=False, shape=param.shape, stride=param.stride())
            # assign=True swaps the parameter; FSDP2's load_state_dict hook then takes the new
            # local shard as the one it all-gathers (torchtune loads NF4 shards the same way)
            linear.load_state_dict({"weight": shard}, strict=False, assign=True)


def held_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameter storage this rank holds (its shards; NF4: packed data and scales)."""
    total = 0
    for param in model.parameters():
        local = param.to_local() if isinstance(param, DTensor) else param
        if hasattr(local, "quantized_data"):
            total += sum(t.nbytes for t in (local.quantized_data, local.quantized_scalers, local.quantization_factor))
        else:
            total += local.nbytes
    return total
