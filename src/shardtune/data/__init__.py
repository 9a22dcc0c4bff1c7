"""Data stage: dataset name -> tokenized examples -> packed chunks -> per-rank loaders."""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Callable

from torch.utils.data import DataLoader, Dataset

from ..errors import UserError
from . import samsum
from .packing import PackStats, collate, pack
from .sampler import EvalSampler, GlobalBatchSampler

log = logging.getLogger(__name__)

# dataset name -> get_split(dataset_config, tokenizer, split) -> (examples, source)
DATASETS: dict[str, Callable] = {
    "samsum_dataset": samsum.get_split,
}


class ChunkDataset(Dataset):
    def __init__(self, chunks: list[dict]) -> None:
        self.chunks = chunks

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> dict:
        if i < 0:  # EvalSampler's filler: same shape as a real chunk, no loss
            return {**self.chunks[0], "dummy": True}
        return self.chunks[i]


@dataclass
class SplitData:
    dataset: ChunkDataset
    stats: PackStats
    source: str


def build_split(cfgs, tokenizer, split: str, dist=None) -> SplitData:
    """split is 'train' or 'validation'; dist (a device.Dist) lets rank 0 build shared work first."""
    name = cfgs.train.dataset
    if name not in DATASETS:
        known = ", ".join(sorted(DATASETS))
        raise UserError(f"unknown dataset {name!r}; choose one of: {known}")
    ds_cfg = cfgs.dataset
    split_name = getattr(ds_cfg, "train_split" if split == "train" else "test_split")
    examples, source = DATASETS[name](ds_cfg, tokenizer, split_name)
    packing = cfgs.train.batching_strategy == "packing"
    chunks, stats = pack(examples, cfgs.train.context_length, packing=packing)
    if not chunks:
        raise UserError(
            f"{source}: the {split} split has no usable examples ({stats.examples} read, "
            f"{stats.skipped_no_target} with no target tokens within context_length {cfgs.train.context_length})"
        )
    log.info(
        "%s split from %s: %d examples, %d tokens (%d target), %d truncated to %d, %d skipped, %d %s",
        split, source, stats.examples, stats.tokens, stats.target_tokens, stats.truncated,
        cfgs.train.context_length, stats.skipped_no_target, stats.chunks,
        "packed chunks" if packing else "sequences",
    )
    return SplitData(ChunkDataset(chunks), stats, source)


def train_loader(split: SplitData, micro: int, accum: int, world: int, rank: int, seed: int,
                 pad_id: int, num_workers: int) -> tuple[DataLoader, GlobalBatchSampler]:
    sampler = GlobalBatchSampler(len(split.dataset), micro, world, rank, accum, seed)
    if sampler.steps_per_epoch == 0:
        raise UserError(
            f"{split.source}: {len(split.dataset)} training sequences cannot fill one global batch of "
            f"{sampler.global_batch} (micro batch {micro} x {world} ranks x {accum} accumulation); "
            "lower --batch_size_training or use more data"
        )
    loader = DataLoader(split.dataset, batch_sampler=sampler, num_workers=num_workers,
                        collate_fn=functools.partial(collate, pad_id=pad_id))
    return loader, sampler


def eval_loader(split: SplitData, batch: int, world: int, rank: int, pad_id: int, num_workers: int) -> DataLoader:
    sampler = EvalSampler(len(split.dataset), batch, world, rank)
    return DataLoader(split.dataset, batch_sampler=sampler, num_workers=num_workers,
                      collate_fn=functools.partial(collate, pad_id=pad_id))
