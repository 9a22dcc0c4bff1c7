"""QLoRA under FSDP2: the frozen linear weights of the decoder layers held as torchao's
NF4Tensor (4-bit NormalFloat, double-quantized block scales), as torchtune does.

Each decoder layer's base linear weights are read from the checkpoint one tensor at a
time, quantized whole, and handed to fully_shard, which keeps only this rank's rows of
the packed data: every rank holds 1/world of the quantized base. NF4Tensor implements
FSDP2's all-gather extension (fsdp_pre_all_gather / fsdp_post_all_gather), so forward
all-gathers the 4-bit data, not floats, and F.linear dequantizes on the fly. Quantizing
the whole tensor before sharding keeps the quantization (block scales and their mean)
independent of the world size. LoRA A/B stay in the compute dtype.
"""
from __future__ import annotations

import logging

import torch
from torch.distributed.tensor import DTensor

from .. import _compat
from ..errors import UserError
from . import load as model_lib

log = logging.getLogger(__name__)

# torchao's defaults (those of QLoRA): 64 values per block scale, 256 block scales per
# second-level (double-quantization) block
BLOCK_SIZE, SCALER_BLOCK_SIZE = 64, 256


def check_fits(name: str, shape: torch.Size, shard_size: int) -> None:
    """NF4 packs whole blocks, and FSDP2 splits its packed data by rows: each rank's rows
    must hold whole second-level blocks."""
    rows, cols = shape
    group = BLOCK_SIZE * SCALER_BLOCK_SIZE
    if rows % shard_size or (rows // shard_size) * cols % group:
        raise UserError(f"--quantization 4bit with --enable_fsdp: {name} has shape {tuple(shape)}, and each of "
                        f"{shard_size} shards ({rows // shard_size} rows x {cols}) must hold a multiple of {group} "
                        f"values (NF4 blocks of {BLOCK_SIZE} x {SCALER_BLOCK_SIZE}); shard over fewer ranks, or "
                        "drop --enable_fsdp for bitsandbytes' 4-bit in one process")


def base_linears(layer: torch.nn.Module) -> list[torch.nn.Linear]:
    """The frozen linear layers of a decoder layer: LoRA's base layers and the untargeted
    projections (LoRA's own A and B are trainable)."""
    return [m for m in layer.modules() if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad]


class LayerQuantizer:
    """Turns one decoder layer's frozen linear weights into NF4, from the checkpoint,
    just before fully_shard shards that layer (parallel.shard calls it per layer)."""

    def __init__(self, model: torch.nn.Module, spec: model_lib.ModelSpec, device: torch.device, shard_size: int):
        self.nf4 = _compat.nf4_module()
        self.ckpt = model_lib.WeightFiles(spec.model_dir)
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.dtype, self.device, self.shard_size = spec.dtype, device, shard_size
        self.loaded: set[str] = set()  # parameter names now holding their checkpoint values

    @torch.no_grad()
    def __call__(self, layer: torch.nn.Module) -> set[torch.nn.Parameter]:
        """Quantize the layer; returns the parameters fully_shard must leave alone."""
        quantized = set()
        for linear in base_linears(layer):
            name = self.names[id(linear.weight)]
            check_fits(name, linear.weight.shape, self.shard_size)
            full = self.ckpt.get(model_lib.checkpoint_key(name, self.ckpt)).to(self.device, self.dtype)
            linear.weight = torch.nn.Parameter(self.nf4.to_nf4(full, BLOCK_SIZE, SCALER_BLOCK_SIZE),
                                               requires_grad=False)
            self.loaded.add(name)
            quantized.add(linear.weight)
        # torch 2.13's FSDP2 takes a shortcut when the shard group has one rank that skips
        # tensor-subclass all-gather extensions (fsdp_post_all_gather gets one tensor instead
        # of three); unsharded anyway, frozen weights need FSDP for nothing, so it skips them.
        return quantized if self.shard_size == 1 else set()


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
