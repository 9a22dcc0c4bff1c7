"""Throughput: model FLOPs per token, the device's peak, and MFU.

Model FLOPs per trained token (matmuls only; PaLM, Chowdhery et al. 2022, appendix B):

    6 * N_trainable + 4 * N_frozen + 12 * n_layers * attention_width * seq_len

A weight costs 2 FLOPs per token forward (multiply-add); backward costs 2 more for the
activation gradient and, only if the weight trains, 2 more for its own gradient. So a full
fine-tune is the familiar 6N, and PEFT's frozen base still costs (2+2)N besides the
adapter's own 6N_adapter. The attention term is QK^T and AV (no weights):
4 * layers * width * seq_len forward, twice that backward. N counts the weights that take
part in matmuls: the input embedding is a lookup and is left out unless it is tied to the
output head. Activation checkpointing's recomputed forward is not counted (MFU is model
FLOPs, not hardware FLOPs).

MFU = FLOPs per token x tokens/s (all ranks) / (peak FLOP/s per device x devices).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Dense bf16/fp16 tensor-core peaks (no sparsity) in TFLOP/s, from the vendors' datasheets.
# First substring match of torch.cuda.get_device_name wins, so variants precede their family.
PEAK_TFLOPS = (
    ("H200", 989.0),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM
    ("H800", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10", 125.0),  # A10 and AWS's A10G
    ("4090", 165.0),  # bf16 with fp32 accumulate
    ("3090", 71.0),
    ("V100", 125.0),  # fp16: V100 has no bf16
)


@dataclass(frozen=True)
class ModelFlops:
    """The counts the formula takes; see the module docstring."""

    trainable: int  # matmul weights that train
    frozen: int  # matmul weights that do not
    layers: int
    attention_width: int  # heads x head_dim of the queries
    seq_len: int

    @property
    def per_token(self) -> float:
        return (6 * self.trainable + 4 * self.frozen
                + 12 * self.layers * self.attention_width * self.seq_len)


def model_flops(model: torch.nn.Module, config, seq_len: int) -> ModelFlops:
    """Counts from the (PEFT-wrapped, possibly sharded) model and its transformers config.
    DTensor parameters report their global size, so this is the same on every rank."""
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    tied = output is not None and output.weight is embedding
    trainable = frozen = 0
    for param in model.parameters():
        if param is embedding and not tied:
            continue  # a lookup, no FLOPs
        if param.requires_grad:
            trainable += param.numel()
        else:
            frozen += param.numel()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads  # not every family sets it
    return ModelFlops(trainable, frozen, config.num_hidden_layers, heads * head_dim, seq_len)


def peak_tflops(device_name: str) -> float | None:
    """The table's peak for this device, or None when it is not a known GPU."""
    for needle, tflops in PEAK_TFLOPS:
        if needle in device_name:
            return tflops
    return None


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops_total: float) -> float | None:
    """Model FLOPs utilisation in [0, 1]; None without a peak."""
    return flops_per_token * tokens_per_s / peak_flops_total if peak_flops_total else None
