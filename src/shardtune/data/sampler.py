"""Samplers whose only state is a global sample position.

Every optimizer step consumes one global batch of micro_batch * world * accum
consecutive samples from a seeded order; rank r takes its micro-batch slice of
each micro-step. The samples a step sees therefore do not depend on the world size
or on the accumulation split, which is what makes losses comparable across both and
lets a run resume at a different world size from the position alone.

With `lengths` (batching_strategy=padding) the order is length-grouped, in the spirit of
llama-recipes' LengthBasedBatchSampler: the epoch's permutation is cut into buckets of
BUCKET_BATCHES global batches, each bucket is sorted by length and cut into global
batches, and the order of all global batches is shuffled with the epoch seed. Inside a
global batch samples are sorted by length, so each micro-step pads little. Which samples
form a global batch depends only on (seed, epoch, lengths, global batch size), never on
how the global batch is split over ranks and accumulation.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

BUCKET_BATCHES = 64  # global batches per length-sorting bucket: grouping vs randomness


class GlobalBatchSampler:
    def __init__(self, num_samples: int, micro_batch: int, world: int, rank: int, accum: int,
                 seed: int, shuffle: bool = True, lengths: Optional[Sequence[int]] = None,
                 epoch_indices: Optional[Callable[[int], torch.Tensor]] = None) -> None:
        self.num_samples, self.micro, self.world, self.rank = num_samples, micro_batch, world, rank
        self.accum, self.seed, self.shuffle = accum, seed, shuffle
        if lengths is not None and len(lengths) != num_samples:
            raise ValueError(f"{len(lengths)} lengths for {num_samples} samples")
        self.lengths = torch.as_tensor(list(lengths), dtype=torch.long) if lengths is not None else None
        # epoch -> the num_samples dataset indices that epoch draws (a mixture); None = 0..num_samples-1
        self.epoch_indices = epoch_indices
        self.epoch = 0
        self.start = 0  # global samples of this epoch to skip (resume)

    @property
    def global_batch(self) -> int:
        return self.micro * self.world * self.accum

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    @property
    def dropped_per_epoch(self) -> int:
        """Samples past the last full global batch; a new shuffle reaches them next epoch."""
        return self.num_samples - self.steps_per_epoch * self.global_batch

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Begin `epoch`, skipping its first `start` global samples (used on resume)."""
        self.epoch, self.start = epoch, start

    def _order(self) -> torch.Tensor:
        drawn = self.epoch_indices(self.epoch) if self.epoch_indices else None
        return self._positions(drawn) if drawn is None else drawn[self._positions(drawn)]

    def _positions(self, drawn: Optional[torch.Tensor]) -> torch.Tensor:
        """The epoch's order of positions 0..num_samples-1 (into `drawn` when given)."""
        if not self.shuffle:
            return torch.arange(self.num_samples)
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.num_samples, generator=g)
        if self.lengths is None:
            return perm
        return self._length_grouped(perm, g, self.lengths if drawn is None else self.lengths[drawn])

    def _length_grouped(self, perm: torch.Tensor, g: torch.Generator, lengths: torch.Tensor) -> torch.Tensor:
        gb = self.global_batch
        used = self.steps_per_epoch * gb
        bucket = gb * BUCKET_BATCHES
        batches = []
        for a in range(0, used, bucket):
            idx = perm[a:min(a + bucket, used)]
            # stable: equal lengths keep their shuffled order
            idx = idx[torch.sort(lengths[idx], stable=True).indices]
            batches += list(idx.view(-1, gb))
        order = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        return torch.cat(order + [perm[used:]])  # the remainder waits for the next shuffle

    def __iter__(self):
        # Iteration keeps no state on self: DataLoader workers prefetch ahead of what
        # the loop has consumed, so consumption is tracked by the loop, not here.
        order = self._order().tolist()
        step = self.micro * self.world
        end = self.steps_per_epoch * self.global_batch
        for pos in range(self.start, end - step + 1, step):
            first = pos + self.rank * self.micro
            yield order[first : first + self.micro]

    def __len__(self) -> int:
        return max(self.steps_per_epoch * self.global_batch - self.start, 0) // (self.micro * self.world)


class EvalSampler:
    """Strided eval batches with the same count on every rank (FSDP needs every rank in
    every forward); missing slots are index -1, which the dataset turns into a dummy
    example that carries no loss."""

    def __init__(self, num_samples: int, batch: int, world: int, rank: int) -> None:
        self.n, self.batch, self.world, self.rank = num_samples, batch, world, rank

    def __len__(self) -> int:
        per_step = self.batch * self.world
        return -(-self.n // per_step)

    def __iter__(self):
        for b in range(len(self)):
            start = (b * self.world + self.rank) * self.batch
            yield [i if i < self.n else -1 for i in range(start, start + self.batch)]
