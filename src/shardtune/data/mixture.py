"""mixture_dataset: several datasets drawn with weights, each prepared and cached on its own.

`--mixture_dataset.datasets "chat_dataset:0.6,alpaca_dataset:0.3,samsum_dataset:0.1"`; each
component reads its own config group (--chat_dataset.data_path ...).

One epoch is as many chunks as the components hold together (L = sum of their sizes).
Component i supplies q_i of them, w_i * L rounded by largest remainder (weights are
normalised), so an epoch's proportions are the weights to within 1/L. A component's chunks
come from its own stream: a seeded shuffle of the component, then another shuffle when
that is used up, and so on; epoch e takes the stream's chunks [e * q_i, (e + 1) * q_i). So
within a pass over a component there is no replacement: a chunk repeats only after every
chunk of its component has been drawn. The epoch's L chunks are then shuffled by the
training sampler like any split's. The order is a function of (seed, epoch) alone, so the
checkpointed data position (epoch, samples into it) resumes it exactly at any world size.

Validation is every component's validation split, unweighted: the loop reports each
component's loss and the loss over all of them (weighted by target tokens).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import torch
from torch.utils.data import Dataset

from ..config.schema import DATASETS
from ..errors import UserError
from .packing import PackStats

NAME = "mixture_dataset"

log = logging.getLogger(__name__)


def parse_spec(spec: str) -> list[tuple[str, float]]:
    """"name:weight,name:weight" -> [(name, weight)], each name a dataset and each weight > 0."""
    if not spec.strip():
        raise UserError('mixture_dataset needs its components: --mixture_dataset.datasets "chat_dataset:0.6,alpaca_dataset:0.4"')
    parts = []
    for item in spec.split(","):
        name, sep, weight = item.strip().rpartition(":")
        if not sep or not name:
            raise UserError(f"mixture component {item.strip()!r} is not NAME:WEIGHT (e.g. alpaca_dataset:0.3)")
        if name not in DATASETS or name == NAME:
            choices = ", ".join(n for n in DATASETS if n != NAME)
            raise UserError(f"unknown mixture component {name!r}; choose from: {choices}")
        try:
            w = float(weight)
        except ValueError:
            w = float("nan")
        if not w > 0 or w == float("inf"):
            raise UserError(f"mixture component {name}: weight {weight!r} must be a positive number")
        if name in (n for n, _ in parts):
            raise UserError(f"mixture component {name} is named twice; give it one weight")
        parts.append((name, w))
    return parts


def quotas(weights: list[float], total: int) -> list[int]:
    """Chunks per epoch of each component: weight * total, rounded by largest remainder."""
    exact = [w / sum(weights) * total for w in weights]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[:total - sum(counts)]:
        counts[i] += 1
    return counts


class EpochPlan:
    """Which chunks of the concatenated components form each epoch."""

    def __init__(self, sizes: list[int], weights: list[float], seed: int) -> None:
        self.sizes, self.seed = sizes, seed
        self.quotas = quotas(weights, sum(sizes))
        self.starts = [sum(sizes[:i]) for i in range(len(sizes))]

    def _stream(self, component: int, a: int, b: int) -> torch.Tensor:
        """Chunks [a, b) of a component's stream of successive shuffles."""
        n = self.sizes[component]
        passes = []
        for p in range(a // n, (b - 1) // n + 1):
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + component * 7_919 + p)
            passes.append(torch.randperm(n, generator=g))
        first = (a // n) * n
        return torch.cat(passes)[a - first:b - first] + self.starts[component]

    def __call__(self, epoch: int) -> torch.Tensor:
        """The epoch's chunk indices (into the concatenation), grouped by component."""
        return torch.cat([self._stream(i, epoch * q, (epoch + 1) * q) for i, q in enumerate(self.quotas) if q])


class Concatenated(Dataset):
    """The components' splits one after another; index -1 is the eval filler of the first."""

    def __init__(self, parts: list[Dataset]) -> None:
        self.parts = parts
        self.starts = [0]
        for part in parts:
            self.starts.append(self.starts[-1] + len(part))

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, i: int) -> dict:
        if i < 0:
            return self.parts[0][-1]
        k = next(k for k in range(len(self.parts)) if i < self.starts[k + 1])
        return self.parts[k][i - self.starts[k]]

    def lengths(self) -> list[int]:
        return [n for part in self.parts for n in part.lengths()]


def component_configs(cfgs, name: str):
    """The run's configs with `name` as the dataset: its own config group, cache key and reader."""
    return dataclasses.replace(cfgs, train=dataclasses.replace(cfgs.train, dataset=name))


def build(cfgs, tokenizer, split: str, build_split: Callable):
    """The mixture's SplitData: its components' splits, and for training the epoch plan."""
    from . import SplitData  # the data stage's record type; data/__init__ imports this module

    spec = parse_spec(cfgs.datasets[NAME].datasets)
    parts = []
    for name, _ in spec:
        try:
            parts.append(build_split(component_configs(cfgs, name), tokenizer, split))
        except UserError as err:
            raise UserError(f"mixture component {name}: {err}") from None
    if any(p.collate_fn is not None for p in parts):
        raise UserError("a mixture component cannot bring its own get_data_collator; its batches could not be mixed")
    dataset = Concatenated([p.dataset for p in parts])
    stats = _summed([p.stats for p in parts])
    lengths = dataset.lengths() if parts[0].lengths is not None else None
    plan = _epoch_plan(spec, [len(p.dataset) for p in parts], cfgs.train.seed) if split == "train" else None
    source = " + ".join(f"{name} x{w:g} ({p.source})" for (name, w), p in zip(spec, parts))
    return SplitData(dataset, stats, source, lengths, epoch_indices=plan,
                     parts={name: p for (name, _), p in zip(spec, parts)})


def _epoch_plan(spec: list[tuple[str, float]], sizes: list[int], seed: int) -> EpochPlan:
    """The plan, once every component draws at least one chunk; each one's share is logged,
    since a small component at a large weight repeats many times an epoch."""
    plan = EpochPlan(sizes, [w for _, w in spec], seed)
    total = sum(sizes)
    for (name, weight), size, quota in zip(spec, sizes, plan.quotas):
        if quota == 0:
            others = sum(w for _, w in spec) - weight
            raise UserError(f"mixture component {name}: weight {weight:g} gives it 0 of the {total} chunks an epoch "
                            f"draws; raise it to {others / (total - 1):.3g} or more, or leave the component out")
        log.info("mixture component %s: %d of %d chunks per epoch, %.2fx its %d chunks", name, quota, total,
                 quota / size, size)
    return plan


def _summed(each: list[PackStats]) -> PackStats:
    total = PackStats(context_length=each[0].context_length, from_cache=all(s.from_cache for s in each))
    for s in each:
        for name in ("examples", "tokens", "truncated", "skipped_no_target", "chunks", "target_tokens",
                     "bad_records", "dropped_last", "tokenized"):
            setattr(total, name, getattr(total, name) + getattr(s, name))
        total.notes += s.notes
    return total


def source(dataset_config, split: str):
    raise UserError("mixture_dataset is read through its components; evaluate or generate with one of them "
                    "(--dataset NAME)")
