"""Packing tokenized examples into context_length chunks without cross-talk.

Unlike llama-recipes' ConcatDataset, an example never attends to its neighbours:
position_ids restart at 0 for every example, and transformers turns restarting
position_ids (with no attention_mask) into a block-diagonal causal mask. Examples are
never split across chunks; an example longer than context_length is truncated.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .tokenize import IGNORE_INDEX, Example


@dataclass
class PackStats:
    examples: int = 0
    tokens: int = 0
    truncated: int = 0
    skipped_no_target: int = 0  # nothing left to learn after truncation
    chunks: int = 0
    target_tokens: int = 0
    notes: list[str] = field(default_factory=list)


def _segment(ex: Example, context_length: int, stats: PackStats) -> tuple[list[int], list[int]] | None:
    ids, labels = list(ex["input_ids"]), list(ex["labels"])
    if len(ids) > context_length:
        stats.truncated += 1
        ids, labels = ids[:context_length], labels[:context_length]
    if labels:
        labels[0] = IGNORE_INDEX  # never train the jump from the previous example into this one
    if all(l == IGNORE_INDEX for l in labels[1:]):
        stats.skipped_no_target += 1
        return None
    return ids, labels


def pack(examples: list[Example], context_length: int, packing: bool = True) -> tuple[list[dict], PackStats]:
    """Chunks of whole examples. With packing=False every example is its own chunk."""
    stats = PackStats(examples=len(examples))
    chunks: list[dict] = []
    cur_ids: list[int] = []
    cur_labels: list[int] = []
    cur_pos: list[int] = []

    def flush() -> None:
        if cur_ids:
            chunks.append({
                "input_ids": torch.tensor(cur_ids, dtype=torch.long),
                "labels": torch.tensor(cur_labels, dtype=torch.long),
                "position_ids": torch.tensor(cur_pos, dtype=torch.long),
            })
            cur_ids.clear(), cur_labels.clear(), cur_pos.clear()

    for ex in examples:
        seg = _segment(ex, context_length, stats)
        if seg is None:
            continue
        ids, labels = seg
        stats.tokens += len(ids)
        stats.target_tokens += sum(l != IGNORE_INDEX for l in labels[1:])
        if not packing or len(cur_ids) + len(ids) > context_length:
            flush()
        cur_ids += ids
        cur_labels += labels
        cur_pos += range(len(ids))
    flush()
    stats.chunks = len(chunks)
    return chunks, stats


def collate(chunks: list[dict], pad_id: int) -> dict:
    """Right-pad to the longest chunk. The pad run gets its own restarting position_ids,
    so it forms a separate 'document' that no real token attends to."""
    longest = max(len(c["input_ids"]) for c in chunks)
    n = len(chunks)
    input_ids = torch.full((n, longest), pad_id, dtype=torch.long)
    labels = torch.full((n, longest), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((n, longest), dtype=torch.long)
    for i, c in enumerate(chunks):
        k = len(c["input_ids"])
        input_ids[i, :k] = c["input_ids"]
        position_ids[i, :k] = c["position_ids"]
        if not c.get("dummy"):
            labels[i, :k] = c["labels"]
        position_ids[i, k:] = torch.arange(longest - k)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        # counted here, on the host, so the training loop needs no device sync
        "num_targets": int((labels[:, 1:] != IGNORE_INDEX).sum()),
        "num_tokens": sum(len(c["input_ids"]) for c in chunks if not c.get("dummy")),
    }
