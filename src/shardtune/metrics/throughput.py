"""Throughput: the model FLOPs of a batch, the device's peak, and MFU.

Model FLOPs are the matmuls a training step needs (after PaLM, Chowdhery et al. 2022,
appendix B), counted per batch from what the model computes on it:

    (6 * N_trainable + 4 * N_frozen) * tokens            every weight but the head
  + (6 or 4) * N_head * targets                          the output head
  + 12 * layers * attention_width * pairs                QK^T and AV

A weight costs 2 FLOPs per use forward (multiply-add); backward costs 2 more for the
activation gradient and, only if the weight trains, 2 more for its own gradient. So a full
fine-tune is the familiar 6N, and PEFT's frozen base still costs (2+2)N besides the
adapter's own 6N_adapter.

  * tokens: the batch's non-pad tokens (the collate's num_tokens).
  * targets: its labelled positions (num_targets). The head (lm_head, or the input
    embedding tied to it, with any adapter on it) is applied only there (modeling/loss.py),
    not at every token; 4 * N_head when it is frozen, 6 when it trains.
  * pairs: the (query, key) pairs of causal attention within each example, n(n+1)/2 for
    an example of n tokens (num_attention_pairs, counted by the collate: data/packing.py).
    Per pair and layer QK^T and AV cost 2 * width each forward, twice that backward.
    A learned prompt (prefix tuning's virtual tokens, LLaMA-Adapter's prompt) adds keys
    that every query attends to: 12 * width per token and prompt key in each layer.

Attention counts the causal half, where PaLM's 12 * layers * width * seq_len per token
counts the full square of the whole row: a causal LM needs only the pairs in which a
query sees itself and its example's earlier tokens. The future half of an example's
square is masked exactly as the pairs across packed examples and the padding are, and
none of them changes the result, so none is counted, whatever a kernel spends on them
(SDPA with a mask computes the whole row; flash's causal kernels skip most of the future
half). MFU then compares packed and padded runs, and kernels, on the same work; it reads
lower than a full-square count where attention is a large share (long contexts).

A model run forward only on each batch (DPO's live reference: the adapter switched off, or a
frozen copy) adds 2 * N_reference per token (its head per target) and 4 * layers * width per
pair; a reference precomputed before training adds nothing to the steps.

Not counted: lookups (the input embedding unless tied to the head, the prompt tables);
norm scales and biases (elementwise); activation checkpointing's recomputed forward and
peft's LLaMA-Adapter's second pass of each token through q_proj and o_proj (MFU is model
FLOPs, not hardware FLOPs).
Counted although autograd skips it: under PEFT nothing below the first layer needs a
gradient, so the activation gradient of its query, key and value projections is never
computed (under 1% of a step at a real model's depth).

MFU = the model FLOPs of the steps in a window (all ranks) / its seconds / (peak FLOP/s
per device x devices).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

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


# peft's learned prompts (and LLaMA-Adapter's gate): they enter attention as keys and values,
# counted by ModelFlops.prompt_keys, not as weights applied at every token
PROMPT_PARAMETERS = ("prompt_encoder", "adaption_prompt", "adaption_gate")


@dataclass(frozen=True)
class ModelFlops:
    """The counts the formula takes; see the module docstring."""

    trainable: int  # matmul weights that train, applied at every token
    frozen: int  # matmul weights that do not
    head_trainable: int  # the output head's weights, applied at labelled positions only
    head_frozen: int
    layers: int
    attention_width: int  # heads x head_dim of the queries
    prompt_keys: int = 0  # keys a learned prompt adds to every query, summed over the layers
    reference: Optional[ModelFlops] = None  # a model run forward only on every batch (DPO's live reference)

    @property
    def per_token(self) -> float:
        return 6 * self.trainable + 4 * self.frozen + 12 * self.attention_width * self.prompt_keys

    @property
    def per_target(self) -> float:
        return 6 * self.head_trainable + 4 * self.head_frozen

    @property
    def per_pair(self) -> float:
        return 12 * self.layers * self.attention_width

    def of_batch(self, tokens: int, targets: int, attention_pairs: int) -> float:
        """A batch's model FLOPs from the collate's num_tokens, num_targets, num_attention_pairs."""
        own = tokens * self.per_token + targets * self.per_target + attention_pairs * self.per_pair
        return own + (self.reference.forward(tokens, targets, attention_pairs) if self.reference else 0)

    def forward(self, tokens: int, targets: int, attention_pairs: int) -> float:
        """The same batch forward only: 2 FLOPs per weight use, 4 * width per attention pair and layer."""
        weights = self.trainable + self.frozen + 2 * self.attention_width * self.prompt_keys
        return 2 * (tokens * weights + targets * (self.head_trainable + self.head_frozen)) + \
            attention_pairs * self.per_pair / 3


def model_flops(model: torch.nn.Module, config) -> ModelFlops:
    """Counts from the (PEFT-wrapped, possibly sharded) model and its transformers config.
    DTensor parameters report their global size, so this is the same on every rank."""
    lookup = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    head_params = {id(p) for p in head.parameters()} if head is not None else set()
    counts = {(is_head, trains): 0 for is_head in (False, True) for trains in (False, True)}
    for name, param in model.named_parameters():  # a tied weight once, as the head's
        if param.ndim < 2:
            continue  # norm scales and biases: elementwise
        is_head = id(param) in head_params
        if not is_head and (param is lookup or any(p in name for p in PROMPT_PARAMETERS)):
            continue  # read, not multiplied with every token
        counts[is_head, param.requires_grad] += param.numel()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads  # not every family sets it
    return ModelFlops(counts[False, True], counts[False, False], counts[True, True], counts[True, False],
                      config.num_hidden_layers, heads * head_dim, _prompt_keys(model, config.num_hidden_layers))


def _prompt_keys(model: torch.nn.Module, layers: int) -> int:
    """Keys that a learned prompt adds to every query, summed over the layers."""
    peft_config = getattr(model, "active_peft_config", None)
    kind = getattr(peft_config, "peft_type", None)
    if kind == "PREFIX_TUNING":  # the virtual tokens, in every layer
        return peft_config.num_virtual_tokens * layers
    if kind == "ADAPTION_PROMPT":  # the prompt, in each adapted layer
        return peft_config.adapter_len * peft_config.adapter_layers
    return 0


def peak_tflops(device_name: str) -> float | None:
    """The table's peak for this device, or None when it is not a known GPU."""
    for needle, tflops in PEAK_TFLOPS:
        if needle in device_name:
            return tflops
    return None


def mfu(flops_per_s: float, peak_flops_total: float) -> float | None:
    """Model FLOPs utilisation in [0, 1]; None without a peak."""
    return flops_per_s / peak_flops_total if peak_flops_total else None
