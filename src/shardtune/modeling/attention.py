"""Packed attention: each packed example attends within itself, at the cost of its own length.

A packed row holds several examples. transformers turns their restarting position_ids
into a block-diagonal causal mask, and SDPA then computes every query-key pair of the
whole row and masks most of them away: on SAMSum (~200-token dialogues in 512-token
rows) that is ~5x the pairs the examples need, and it was 27% of a "tiny" training step.
Here the model's attention runs SDPA once per example instead, causal, over that
example's slice of the row only. The result is the masked computation's, up to float
rounding (tests/unit/test_attention.py).

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


def packed_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, packed_lengths: Lengths | None = None,
                **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: query [batch, heads, seq, head_dim], key and value
    [batch, kv_heads, seq, head_dim]; returns [batch, seq, heads, head_dim]."""
    window = kwargs.get("sliding_window")
    if (packed_lengths is None or key.shape[2] != query.shape[2]
            or (window and any(n > window for row in packed_lengths for n in row))):
        # the mask path: no lengths, a cache or prefix before the queries, or a sliding
        # window shorter than an example (is_causal alone would not apply the window)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
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
