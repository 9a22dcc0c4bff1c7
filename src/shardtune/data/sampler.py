"""Samplers whose only state is a global sample position.

Every optimizer step consumes one global batch of micro_batch * world * accum
consecutive samples from a seeded permutation; rank r takes its micro-batch slice of
each micro-step. The samples a step sees therefore do not depend on the world size
or on the accumulation split, which is what makes losses comparable across both and
lets a run resume at a different world size from the position alone.
"""
from __future__ import annotations

import torch


class GlobalBatchSampler:
    def __init__(self, num_samples: int, micro_batch: int, world: int, rank: int, accum: int,
                 seed: int, shuffle: bool = True) -> None:
        self.num_samples, self.micro, self.world, self.rank = num_samples, micro_batch, world, rank
        self.accum, self.seed, self.shuffle = accum, seed, shuffle
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
        if not self.shuffle:
            return torch.arange(self.num_samples)
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.num_samples, generator=g)

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
