"""Data stage: dataset name -> source -> tokenized examples (cached) -> chunks -> per-rank loaders.

A split is prepared in shards (shards.py): under torchrun the ranks of a node each tokenize
their share of the records into the cache, one of them packs, and every rank then maps the
packed file, so a node's ranks share one copy of it and a rank's memory does not grow with
the corpus. No rank waits in a collective meanwhile. Splits that are not cached (a hub id,
a custom dataset file, or --data_cache_dir none) are prepared by every rank on its own, into
a temporary file that is mapped the same way.
"""
from __future__ import annotations

import atexit
import functools
import importlib
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import UserError
from ..config.schema import DATASETS
from . import cache, custom, mixture, shards
from .packing import PACKING_ALGORITHM, ChunkDataset, ExampleDataset, PackStats, collate, truncate_each
from .records import BadRecords
from .sampler import EvalSampler, GlobalBatchSampler
from .source import Source

log = logging.getLogger(__name__)

BATCHING_STRATEGIES = ("packing", "padding")

__all__ = ["source", "ChunkDataset", "SplitData", "build_split", "train_loader", "eval_loader", "eval_loaders",
           "split_source"]


@dataclass
class SplitData:
    dataset: Dataset  # ChunkDataset, or ExampleDataset for a custom collator
    stats: PackStats
    source: str
    # per-sample lengths for length-grouped batches (batching_strategy=padding), else None
    lengths: Optional[list[int]] = None
    # a custom dataset's collator, wrapped to add the loop's counts (num_targets, ...); None = the default
    collate_fn: Optional[Callable] = None
    # epoch -> the dataset indices that epoch draws (a mixture's weighted plan); None = each once
    epoch_indices: Optional[Callable[[int], torch.Tensor]] = None
    # a mixture's components by dataset name, whose datasets `dataset` concatenates; None = one source
    parts: Optional[dict[str, "SplitData"]] = None
    # what was read (its fingerprint keys caches derived from the split); None for a mixture
    data_source: Optional[Source] = None


def check_flags(t, pairs: bool = False) -> None:
    """Validate the data flags of a train_config; cheap, so callers run it before heavy work.
    `pairs`: the caller trains preference pairs (dpo) rather than single examples (finetune);
    a dataset of the other kind would fail late, inside the data stage or the loss."""
    if t.dataset not in DATASETS:
        raise UserError(f"unknown dataset {t.dataset!r}; choose one of: {', '.join(DATASETS)}")
    if DATASETS[t.dataset].pairs and not pairs:
        raise UserError(f"{t.dataset} holds preference pairs; train it with `shardtune dpo`")
    if pairs and not DATASETS[t.dataset].pairs:
        pair_datasets = " or ".join(name for name, kind in DATASETS.items() if kind.pairs)
        raise UserError(f"dpo trains preference pairs: use --dataset {pair_datasets} "
                        f"({t.dataset} holds single examples, for `shardtune finetune`)")
    if t.batching_strategy not in BATCHING_STRATEGIES:
        raise UserError(f"unknown --batching_strategy {t.batching_strategy!r}; choose packing or padding")
    BadRecords(t.on_bad_record)  # validates the mode
    if t.context_length < 2:
        raise UserError("--context_length must be at least 2")


def source(cfgs, split_name: str) -> Source:
    """The configured dataset's split, read by its module (config.schema.DATASETS)."""
    reader = importlib.import_module(f".{DATASETS[cfgs.train.dataset].module}", __name__)
    return reader.source(cfgs.dataset, split_name)


def split_source(cfgs, split: str) -> Source:
    """The source of the "train" or "validation" split (the dataset's train_split / test_split)."""
    return source(cfgs, getattr(cfgs.dataset, "train_split" if split == "train" else "test_split"))


def _cache_path(cfgs, tokenizer, src: Source) -> Optional[Path]:
    root = cache.cache_root(cfgs.train.data_cache_dir)
    if root is None or src.fingerprint is None:
        return None
    t = cfgs.train
    key = cache.cache_key({
        "dataset": t.dataset, "data": src.fingerprint, "template": src.template,
        "tokenizer": cache.tokenizer_fingerprint(tokenizer), "context_length": t.context_length,
        "batching_strategy": t.batching_strategy, "drop_last": t.drop_last, "on_bad_record": t.on_bad_record,
        "packing": PACKING_ALGORITHM,
    })
    return root / f"{t.dataset}-{key[:32]}.safetensors"


def _split_file(cfgs, tokenizer, src: Source) -> tuple[Path, bool]:
    """Where the prepared split goes, and whether that is the shared cache (else a private
    temporary directory, removed when the process exits)."""
    path = _cache_path(cfgs, tokenizer, src)
    if path is not None and cache.writable(path.parent):
        return path, True
    tmp = Path(tempfile.mkdtemp(prefix="shardtune-data-"))
    atexit.register(shutil.rmtree, tmp, True)
    return tmp / "split.safetensors", False


def _plan(cfgs, split: str, src: Source, path: Path, dist=None) -> shards.Plan:
    t = cfgs.train
    launch = dist.launch if dist is not None else shards.run_id()  # what the ranks of a launch share
    return shards.Plan(src, path, t.context_length, t.batching_strategy == "packing", t.drop_last,
                       t.on_bad_record, launch, rebuild=functools.partial(split_source, cfgs, split))


def _load_or_prepare(cfgs, src: Source, tokenizer, split: str, path: Path, shared: bool,
                     dist=None, processes: int = 1) -> tuple[ChunkDataset, PackStats]:
    """The cached split, or prepare it: with a shared cache, the ranks of this node divide
    the tokenizing between them (shards.py) and then all map the one packed file. A training
    process (dist given) tokenizes a large split in a child, and so never holds its records."""
    hit = cache.load(path) if shared else None
    if hit:
        dataset, meta = hit
        try:
            stats = PackStats(**{**meta["stats"], "from_cache": True, "tokenized": 0})
        except (KeyError, TypeError):  # written by another shardtune version
            stats = None
        if stats is not None:
            log.info("%s split: loaded from the cache %s; nothing tokenized", split, path)
            return dataset, stats
    plan, meta = _plan(cfgs, split, src, path, dist), {"source": src.name}
    in_child = dist is not None and src.size >= shards.CHILD_MIN_BYTES and src.records is not None
    if shared and dist and dist.distributed:
        stats = shards.prepare(plan, tokenizer, dist.local_rank, dist.local_world_size, meta, in_child=in_child)
    elif in_child:
        stats = shards.prepare(plan, tokenizer, 0, 1, meta, in_child=True)
    else:
        stats = shards.prepare_in_processes(plan, tokenizer, processes, meta)
    dataset, meta = ChunkDataset.mapped(path)
    if stats is None:  # another rank or job packed it; the file holds the split's counts
        stats = PackStats(**{**meta["stats"], "tokenized": 0})
    if shared:
        log.info("%s split: cached to %s", split, path)
    return dataset, stats


def build_split(cfgs, tokenizer, split: str, dist=None, processes: int = 1) -> SplitData:
    """split is 'train' or 'validation'; dist (a device.Dist) lets a node's ranks share the work,
    else `processes` local processes do (shardtune prepare --num_proc)."""
    t = cfgs.train
    check_flags(t)
    if t.dataset == mixture.NAME:
        return mixture.build(cfgs, tokenizer, split, functools.partial(build_split, dist=dist, processes=processes))
    src = split_source(cfgs, split)
    if src.collator_factory is not None:
        return _custom_collated(src, tokenizer, t, split)
    path, shared = _split_file(cfgs, tokenizer, src)
    dataset, stats = _load_or_prepare(cfgs, src, tokenizer, split, path, shared, dist, processes)
    _check_not_empty(stats, src.name, split, t.context_length)
    _log_summary(split, src.name, stats, t, dataset)
    lengths = dataset.lengths() if t.batching_strategy == "padding" else None
    return SplitData(dataset, stats, src.name, lengths, data_source=src)


def _checked_collator(collator: custom.CustomCollator, items: list[dict]) -> custom.CustomCollator:
    """The user's get_data_collator, and its collator on the first two examples, fail here,
    before training (inside a DataLoader worker, an error would reach the user wrapped)."""
    collator(items[:2])
    return collator


def _custom_collated(src: Source, tokenizer, t, split: str) -> SplitData:
    """A custom file with get_data_collator: one example per row, batched by its collator."""
    bad = BadRecords(t.on_bad_record)
    examples = src.read(tokenizer, bad)
    items, stats = truncate_each(examples, t.context_length)
    stats.bad_records, stats.notes, stats.tokenized = bad.count, bad.messages, len(examples)
    _check_not_empty(stats, src.name, split, t.context_length)
    if t.batching_strategy == "packing":
        log.info("%s split: the custom get_data_collator builds the batches, so examples are not packed", split)
    _log_summary(split, src.name, stats, t, None)
    dataset = ExampleDataset(items)
    lengths = dataset.lengths() if t.batching_strategy == "padding" else None
    return SplitData(dataset, stats, src.name, lengths, _checked_collator(src.collator_factory(tokenizer), items),
                     data_source=src)


def split_identity(split: SplitData) -> Optional[str]:
    """What the split was read from (content hashes, record selection, templates; a mixture's
    components with their weights' names): equal for the same data wherever its files now
    live. None when shardtune cannot see its inputs (a hub id, a user's code)."""
    if split.parts:
        each = {name: split_identity(part) for name, part in split.parts.items()}
        return None if None in each.values() else cache.cache_key(each)
    src = split.data_source
    if src is None or src.fingerprint is None:
        return None
    return cache.cache_key({"data": src.fingerprint, "template": src.template})


def _check_not_empty(stats: PackStats, source: str, split: str, context_length: int) -> None:
    if stats.chunks:
        return
    bad = f", {stats.bad_records} bad records skipped (first: {stats.notes[0]})" if stats.bad_records else ""
    raise UserError(
        f"{source}: the {split} split has no usable examples ({stats.examples} read{bad}, "
        f"{stats.skipped_no_target} with no target tokens within context_length {context_length}); "
        "check the data, or raise --context_length if the prompts are longer than it"
    )


def _log_summary(split: str, source: str, stats: PackStats, t, dataset: Optional[Dataset]) -> None:
    packing = t.batching_strategy == "packing" and isinstance(dataset, ChunkDataset)
    log.info(
        "%s split from %s: %d examples, %d tokens (%d target), %d truncated to %d, %d skipped with no target "
        "left, %d bad records skipped, %d %s",
        split, source, stats.examples, stats.tokens, stats.target_tokens, stats.truncated, t.context_length,
        stats.skipped_no_target, stats.bad_records, stats.chunks, "packed chunks" if packing else "sequences",
    )
    if packing:
        log.info("%s split: chunks are %.1f%% full (%d tokens in %d chunks of %d)", split, 100 * stats.fill_ratio,
                 stats.tokens, stats.chunks, t.context_length)
        if stats.dropped_last:
            log.info("%s split: the last, partly filled chunk (%d examples) was dropped (--drop_last)",
                     split, stats.dropped_last)
        else:
            log.info("%s split: the last chunk holds %d of %d tokens and is kept (--drop_last drops it)",
                     split, dataset.lengths()[-1], t.context_length)
    if stats.bad_records:
        log.warning("%s split: %d bad records were skipped (--on_bad_record skip); first: %s",
                    split, stats.bad_records, stats.notes[0])


def _collate_fn(split: SplitData, pad_id: int) -> Callable:
    return split.collate_fn or functools.partial(collate, pad_id=pad_id)


def train_loader(split: SplitData, micro: int, accum: int, world: int, rank: int, seed: int,
                 pad_id: int, num_workers: int, pin_memory: bool = False) -> tuple[DataLoader, GlobalBatchSampler]:
    sampler = GlobalBatchSampler(len(split.dataset), micro, world, rank, accum, seed, lengths=split.lengths,
                                 epoch_indices=split.epoch_indices)
    if sampler.steps_per_epoch == 0:
        raise UserError(
            f"{split.source}: {len(split.dataset)} training sequences cannot fill one global batch of "
            f"{sampler.global_batch} (micro batch {micro} x {world} ranks x {accum} accumulation); "
            "lower --batch_size_training or use more data"
        )
    return _loader(split, sampler, pad_id, num_workers, pin_memory), sampler


def eval_loader(split: SplitData, batch: int, world: int, rank: int, pad_id: int, num_workers: int,
                pin_memory: bool = False) -> DataLoader:
    sampler = EvalSampler(len(split.dataset), batch, world, rank)
    return _loader(split, sampler, pad_id, num_workers, pin_memory)


def eval_loaders(split: SplitData, batch: int, world: int, rank: int, pad_id: int, num_workers: int,
                 pin_memory: bool = False) -> dict[str, DataLoader]:
    """{component: its loader} for a mixture, so each component's loss is reported beside
    the combined one; {"": the loader} for one source."""
    parts = split.parts or {"": split}
    return {name: eval_loader(part, batch, world, rank, pad_id, num_workers, pin_memory)
            for name, part in parts.items()}


def _loader(split: SplitData, batch_sampler, pad_id: int, num_workers: int, pin_memory: bool) -> DataLoader:
    # Its own generator: creating an iterator then draws no number from the global RNG,
    # whose state a checkpoint restores for dropout (exact resume). Pinned batches (on an
    # accelerator) let the loop's non_blocking copies overlap compute.
    return DataLoader(split.dataset, batch_sampler=batch_sampler, num_workers=num_workers,
                      collate_fn=_collate_fn(split, pad_id), generator=torch.Generator().manual_seed(0),
                      pin_memory=pin_memory, **_worker_options(num_workers))


def _worker_options(num_workers: int) -> dict:
    # Workers are not forked from this process (shards.fresh_start_method says why);
    # persistent, so that their start cost is paid once per run.
    if num_workers == 0:
        return {}
    return {"multiprocessing_context": shards.fresh_start_method(), "persistent_workers": True}
