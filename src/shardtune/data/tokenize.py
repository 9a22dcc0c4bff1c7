"""Prompt/target tokenization shared by the instruction-style datasets."""
from __future__ import annotations

import itertools
from typing import NamedTuple, TypedDict

import numpy as np

IGNORE_INDEX = -100  # the label value cross-entropy skips


class Example(TypedDict):
    input_ids: list[int]
    labels: list[int]


class FlatExamples(NamedTuple):
    """Examples laid end to end in flat arrays, as sharded preparation stores them: no
    Python list per example, so a shard of a large corpus costs numpy work, not lists of ints."""

    input_ids: np.ndarray  # int32, every example's ids one after another
    labels: np.ndarray  # int32, likewise
    lengths: np.ndarray  # int64, one per example

    def examples(self) -> list[Example]:
        ids, labels = self.input_ids.tolist(), self.labels.tolist()
        ends = np.cumsum(self.lengths).tolist()
        return [{"input_ids": ids[a:b], "labels": labels[a:b]} for a, b in zip([0] + ends[:-1], ends)]


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """The prompt half of tokenize_prompt_target: tok(bos + prompt), for inference."""
    return tokenizer((tokenizer.bos_token or "") + prompt, add_special_tokens=False)["input_ids"]


def _ids(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]


def _flat(lists: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter(map(len, lists), np.int64, len(lists))
    return np.fromiter(itertools.chain.from_iterable(lists), np.int32, int(lengths.sum())), lengths


def prompt_target(tokenizer, prompts: list[str], targets: list[str]) -> FlatExamples:
    """llama-recipes' scheme: tok(bos + prompt) + tok(target + eos); prompt labels are ignored."""
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
    prompt, prompt_lengths = _flat(_ids(tokenizer, [bos + p for p in prompts]) if prompts else [])
    target, target_lengths = _flat(_ids(tokenizer, [t + eos for t in targets]) if targets else [])
    lengths = prompt_lengths + target_lengths
    starts = np.cumsum(lengths) - lengths
    # token k lies in its example's prompt when its offset in the example is below the prompt's length
    offset = np.arange(int(lengths.sum())) - np.repeat(starts, lengths)
    in_prompt = offset < np.repeat(prompt_lengths, lengths)
    ids = np.empty(len(offset), np.int32)
    ids[in_prompt], ids[~in_prompt] = prompt, target
    labels = np.where(in_prompt, np.int32(IGNORE_INDEX), ids).astype(np.int32)
    return FlatExamples(ids, labels, lengths)


def tokenize_prompt_target(tokenizer, prompts: list[str], targets: list[str]) -> list[Example]:
    """prompt_target, one dict of lists per example."""
    return prompt_target(tokenizer, prompts, targets).examples()
