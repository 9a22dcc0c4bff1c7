"""Prompt/target tokenization shared by the instruction-style datasets."""
from __future__ import annotations

from typing import TypedDict

IGNORE_INDEX = -100  # the label value cross-entropy skips


class Example(TypedDict):
    input_ids: list[int]
    labels: list[int]


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """The prompt half of tokenize_prompt_target: tok(bos + prompt), for inference."""
    return tokenizer((tokenizer.bos_token or "") + prompt, add_special_tokens=False)["input_ids"]


def tokenize_prompt_target(tokenizer, prompts: list[str], targets: list[str]) -> list[Example]:
    """llama-recipes' scheme: tok(bos + prompt) + tok(target + eos); prompt labels are ignored."""
    if not prompts:
        return []
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
    p_ids = tokenizer([bos + p for p in prompts], add_special_tokens=False)["input_ids"]
    t_ids = tokenizer([t + eos for t in targets], add_special_tokens=False)["input_ids"]
    return [
        {"input_ids": p + t, "labels": [IGNORE_INDEX] * len(p) + list(t)}
        for p, t in zip(p_ids, t_ids)
    ]
