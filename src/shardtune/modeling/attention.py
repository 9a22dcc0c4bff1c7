"""Packed attention: each packed example attends within itself, at the cost of its own length.

A packed row holds several examples. transformers turns their restarting position_ids
into a block-diagonal causal mask, and SDPA then computes every query-key pair of the
whole row and masks most of them away: on SAMSum (~200-token dialogues in 512-token
rows) that is ~5x the pairs the examples need, and it was 27% of a "tiny" training step.
Here the model's attention runs SDPA once per example instead, causal, over that
example's slice of the row only. The result is the masked computation's, up to float
rounding (tests/unit/test_attention.py).

On CUDA, in bf16/fp16, one call per layer does all examples of the batch: torch's
variable-length flash attention (torch.nn.attention.varlen), the same kernel family as
flash-attn's varlen path that transformers' flash_attention_2 uses, with no extra
package. It needs fp16/bf16 and CUDA; elsewhere (CPU, fp32) the per-example SDPA calls
run, which on CPU are faster than one masked call (BENCHMARKS.md) and match it to 1e-5.

No mask is built for packed rows. transformers would turn the restarting positions into a
[batch, 1, seq, seq] mask and check for packing on the device (a host sync) on every
forward; packed_inputs gives the model an empty 4-D mask instead, which transformers
passes through as "already prepared", and this function ignores it.

It is registered with transformers as the attention implementation PACKED. Without the
`packed_lengths` keyword (generation, prefix tuning's masked rows, a custom collator's
attention_mask) it is transformers' own SDPA path, mask and all; shardtune's loss passes
the keyword only for packed rows (loss.token_loss_sum). Under --compile the model keeps
plain SDPA: the lengths change every batch, and dynamo would recompile for each.
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

PACKED = "shardtune_packed"

Lengths = tuple[tuple[int, ...], ...]  # per row, the length of each example in order


def packed_lengths(position_ids: torch.Tensor) -> Lengths:
    """Per row of a packed batch (a host tensor), the lengths of its examples. As in
    transformers' find_packed_sequence_indices, a new one starts wherever a position is not
    its predecessor's + 1 (shardtune's packing restarts them at 0; a padding run counts as one)."""
    lengths = []
    for row in position_ids.tolist():
        starts = [0] + [i for i in range(1, len(row)) if row[i] != row[i - 1] + 1] + [len(row)]
        lengths.append(tuple(end - start for start, end in zip(starts, starts[1:])))
    return tuple(lengths)


def _window_fits(window: int | None, lengths: Lengths) -> bool:
    """A sliding window no shorter than every example changes nothing (is_causal alone
    would not apply a shorter one)."""
    return not window or all(n <= window for row in lengths for n in row)


def packed_inputs(position_ids: torch.Tensor, config) -> dict:
    """The model's extra inputs for a packed batch (position_ids on the host): the example
    lengths and the empty mask that stops transformers from building one; nothing when the
    mask path must run (a sliding window shorter than an example)."""
    lengths = packed_lengths(position_ids)
    if not _window_fits(getattr(config, "sliding_window", None), lengths):
        return {}
    return {"packed_lengths": lengths, "attention_mask": torch.ones(len(lengths), 1, 0, 0, dtype=torch.bool)}


def _varlen_runs(query: torch.Tensor) -> bool:
    return query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)


def _varlen(module, query, key, value, lengths: Lengths, scaling) -> torch.Tensor:
    """All examples in one flash-attention call: [batch*seq, heads, head_dim] with
    cumulative example offsets, causal, grouped-query as the model has it."""
    from torch.nn.attention.varlen import varlen_attn

    sizes = [n for row in lengths for n in row]
    offsets = torch.tensor([0, *sizes], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    offsets = offsets.pin_memory().to(query.device, non_blocking=True)  # no host sync
    batch, heads, seq, dim = query.shape
    flat = [t.transpose(1, 2).reshape(batch * seq, t.shape[1], dim) for t in (query, key, value)]
    out = varlen_attn(*flat, offsets, offsets, max(sizes), max(sizes), scale=scaling,
                      window_size=(-1, 0), enable_gqa=key.shape[1] != heads)
    return out.view(batch, seq, heads, dim)


def packed_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, packed_lengths: Lengths | None = None,
                **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: query [batch, heads, seq, head_dim], key and value
    [batch, kv_heads, seq, head_dim]; returns [batch, seq, heads, head_dim]."""
    if (packed_lengths is None or key.shape[2] != query.shape[2]
            or not _window_fits(kwargs.get("sliding_window"), packed_lengths)):
        # the mask path: no lengths, a cache or prefix before the queries, or a sliding
        # window shorter than an example (is_causal alone would not apply the window)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if _varlen_runs(query) and not kwargs.get("dropout") and not kwargs.get("softcap"):
        return _varlen(module, query, key, value, packed_lengths, kwargs.get("scaling")), None
    rows = []
    # unbind and split, not slicing: their backward concatenates the pieces' gradients
    # once, where each slice's backward would fill a zero tensor of the whole batch
    for q, k, v, sizes in zip(query.unbind(0), key.unbind(0), value.unbind(0), packed_lengths):
        # each example alone, with no mask: transformers' SDPA then runs its causal (and
        # GQA) kernel; each piece is [1, length, heads, head_dim]
        pieces = [sdpa_attention_forward(module, q_ex[None], k_ex[None], v_ex[None], None, **kwargs)[0]
                  for q_ex, k_ex, v_ex in zip(q.split(sizes, 1), k.split(sizes, 1), v.split(sizes, 1))]
        rows.append(torch.cat(pieces, dim=1))
    return torch.cat(rows, dim=0), None


AttentionInterface.register(PACKED, packed_sdpa)
# the mask is SDPA's: packed rows still get theirs built (and ignored), everything else uses it
AttentionMaskInterface.register(PACKED, sdpa_mask)
