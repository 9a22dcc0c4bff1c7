"""Packing tokenized examples into context_length chunks without cross-talk.

Unlike llama-recipes' ConcatDataset, an example never attends to its neighbours:
position_ids restart at 0 for every example, and attention runs on each example alone
(shardtune/attention.py; transformers' own SDPA would turn restarting position_ids, with no
attention_mask, into a block-diagonal causal mask). The first label
of every example is -100, so the jump from one example into the next is never trained.
Examples are never split across chunks; an example longer than context_length is
truncated.

Chunks are filled best-fit-decreasing: examples longest first, each into the fullest
chunk that still has room for it (a new chunk when none has). Filling chunks in data
order left SAMSum's 512-token chunks 77% full; this fills them to ~99%. The chunk order
does not matter for training (the sampler shuffles chunks with the seed); the emptiest
chunk is put last, and it is the one drop_last drops when it is not full.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import Dataset

from . import mapped
from .tokenize import IGNORE_INDEX, Example

# Part of the tokenization cache key: bump when the chunks pack() builds change.
PACKING_ALGORITHM = "best-fit-decreasing/1"


@dataclass
class PackStats:
    examples: int = 0  # examples read and tokenized (bad records excluded)
    tokens: int = 0  # tokens in the chunks
    truncated: int = 0
    skipped_no_target: int = 0  # nothing left to learn after truncation
    chunks: int = 0
    target_tokens: int = 0
    bad_records: int = 0  # left out by --on_bad_record skip
    dropped_last: int = 0  # examples in the last chunk dropped by --drop_last
    tokenized: int = 0  # examples tokenized by this run (0 when the cache answered)
    from_cache: bool = False
    notes: list[str] = field(default_factory=list)
    context_length: int = 0  # chunk capacity

    @property
    def fill_ratio(self) -> float:
        """Tokens over chunk capacity: how much of each forward is real data."""
        return self.tokens / (self.chunks * self.context_length) if self.chunks else 0.0


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


def pack(examples: list[Example], context_length: int, packing: bool = True,
         drop_last: bool = False) -> tuple[list[dict], PackStats]:
    """Chunks of whole examples. With packing=False every example is its own chunk, in
    data order, and drop_last has no effect (there is no partly filled chunk)."""
    stats = PackStats(examples=len(examples), context_length=context_length)
    segments = []
    for ex in examples:
        seg = _segment(ex, context_length, stats)
        if seg is None:
            continue
        ids, labels = seg
        stats.tokens += len(ids)
        stats.target_tokens += sum(l != IGNORE_INDEX for l in labels[1:])
        segments.append(seg)
    groups = best_fit_decreasing([len(ids) for ids, _ in segments], context_length) if packing else \
        [[i] for i in range(len(segments))]
    chunks = [_chunk([segments[i] for i in group]) for group in groups]
    if packing and drop_last and chunks and len(chunks[-1]["input_ids"]) < context_length:
        _drop_last_chunk(chunks, stats)
    stats.chunks = len(chunks)
    return chunks, stats


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of item indices, each holding at most `capacity`: items longest first (ties in
    index order, so the result is deterministic), each into the bin with the least room
    that still fits it (ties: the oldest bin). Bins in creation order, except that the
    emptiest one is last."""
    bins: list[list[int]] = []
    room = _BinsByRoom()
    for item in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        found = room.take(lengths[item])
        if found is None:  # no open bin has room: open one
            bins.append([])
            found = capacity, len(bins) - 1
        free, target = found
        bins[target].append(item)
        room.put(free - lengths[item], target)
    if bins:
        used = [sum(lengths[i] for i in b) for b in bins]
        bins.append(bins.pop(min(range(len(bins)), key=lambda b: (used[b], -b))))
    return bins


class _BinsByRoom:
    """Open bins by free space: bit f of one integer says some bin has f tokens free, so the
    smallest free space that fits an item is a shift and a lowest set bit (in C, on
    capacity / 64 words), and a heap per free space yields its oldest bin. (A list of bins kept
    sorted costs O(bins) per insert, the item x bin product that grows quadratic with the corpus.)"""

    def __init__(self) -> None:
        self.free_spaces = 0  # bit f set: bins[f] is not empty
        self.bins: dict[int, list[int]] = {}

    def put(self, free: int, bin_index: int) -> None:
        if free < 0:  # an item longer than a bin fills its own bin (callers truncate first)
            return
        heap = self.bins.setdefault(free, [])
        if not heap:
            self.free_spaces |= 1 << free
        heapq.heappush(heap, bin_index)

    def take(self, length: int) -> Optional[tuple[int, int]]:
        """(free space, bin) of the fullest open bin that fits `length`, removed; None if none fits."""
        fitting = self.free_spaces >> length
        if not fitting:
            return None
        free = length + (fitting & -fitting).bit_length() - 1
        heap = self.bins[free]
        bin_index = heapq.heappop(heap)
        if not heap:
            self.free_spaces ^= 1 << free
        return free, bin_index


def _chunk(segments: list[tuple[list[int], list[int]]]) -> dict:
    ids = [tok for seg_ids, _ in segments for tok in seg_ids]
    labels = [lab for _, seg_labels in segments for lab in seg_labels]
    positions = [p for seg_ids, _ in segments for p in range(len(seg_ids))]
    return {"input_ids": torch.tensor(ids, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long),
            "position_ids": torch.tensor(positions, dtype=torch.long)}


def _drop_last_chunk(chunks: list[dict], stats: PackStats) -> None:
    last = chunks.pop()
    stats.dropped_last = int((last["position_ids"] == 0).sum())
    stats.tokens -= len(last["input_ids"])
    stats.target_tokens -= int((last["labels"][1:] != IGNORE_INDEX).sum())


def truncate_each(examples: list[Example], context_length: int) -> tuple[list[dict], PackStats]:
    """Truncate and filter like pack(), one plain example per item (for a user's collator)."""
    stats = PackStats(examples=len(examples), context_length=context_length)
    out = []
    for ex in examples:
        seg = _segment(ex, context_length, stats)
        if seg is not None:
            ids, labels = seg
            stats.tokens += len(ids)
            stats.target_tokens += sum(l != IGNORE_INDEX for l in labels[1:])
            out.append({"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)})
    stats.chunks = len(out)
    return out, stats


class ChunkDataset(Dataset):
    """Chunks stored flat (one tensor per field plus offsets): compact, cheap to cache,
    and handed to DataLoader workers through shared memory."""

    def __init__(self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor,
                 offsets: torch.Tensor, path: Optional[Path] = None) -> None:
        self.input_ids, self.labels, self.position_ids = input_ids, labels, position_ids
        self.offsets = offsets  # chunk i is [offsets[i], offsets[i + 1])
        self.path = path  # the prepared file the arrays are mapped from, if any

    @classmethod
    def mapped(cls, path: Path) -> tuple["ChunkDataset", dict]:
        """The split in a prepared file, memory-mapped (shared by a node's ranks), and its metadata."""
        arrays, meta = mapped.read(path)
        t = {k: torch.from_numpy(arrays[k]) for k in ("input_ids", "labels", "position_ids", "offsets")}
        return cls(t["input_ids"], t["labels"], t["position_ids"], t["offsets"], path), meta

    def __getstate__(self) -> dict:
        # DataLoader workers get the file to map, not a copy of every token.
        return {"path": self.path} if self.path else self.__dict__

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state if "input_ids" in state else vars(ChunkDataset.mapped(state["path"])[0]))

    def arrays(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "labels": self.labels, "position_ids": self.position_ids,
                "offsets": self.offsets}

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def _chunk(self, i: int) -> dict:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return {"input_ids": self.input_ids[a:b].long(), "labels": self.labels[a:b].long(),
                "position_ids": self.position_ids[a:b].long()}

    def __getitem__(self, i: int) -> dict:
        if i < 0:  # EvalSampler's filler: same shape as a real chunk, no loss
            return {**self._chunk(0), "dummy": True}
        return self._chunk(i)

    def lengths(self) -> list[int]:
        return (self.offsets[1:] - self.offsets[:-1]).tolist()

    @property
    def chunks(self) -> list[dict]:
        return [self._chunk(i) for i in range(len(self))]


class ExampleDataset(Dataset):
    """Plain examples (lists) for a user's collator; index -1 is the eval filler."""

    def __init__(self, items: list[dict]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        if i < 0:
            return {**self.items[0], "dummy": True}
        return self.items[i]

    def lengths(self) -> list[int]:
        return [len(it["input_ids"]) for it in self.items]


def causal_pairs(length: int) -> int:
    """The (query, key) pairs of causal attention over one example: each token attends to
    itself and the example's earlier tokens. What model FLOPs count attention by
    (metrics/throughput.py)."""
    return length * (length + 1) // 2


def _chunk_attention_pairs(position_ids: torch.Tensor) -> int:
    starts = (position_ids == 0).nonzero().squeeze(1).tolist()  # each example restarts at 0
    return sum(causal_pairs(end - start) for start, end in zip(starts, starts[1:] + [len(position_ids)]))


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
        "num_attention_pairs": sum(_chunk_attention_pairs(c["position_ids"]) for c in chunks if not c.get("dummy")),
    }
