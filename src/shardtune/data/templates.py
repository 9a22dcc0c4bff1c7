"""Inference prompts: each dataset's training prompt, built from one record as token ids,
so that `shardtune generate` asks a fine-tuned model exactly what it was trained on.

A template names the string fields a record must have and turns (tokenizer, record) into
prompt ids. A chat template plugs in the same way, e.g.
    "chat": Template("content", lambda tok, r: chat.prompt_ids(tok, r["messages"]), required=())
with its own check of the messages inside prompt_ids.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from . import alpaca, grammar, samsum
from .tokenize import encode_prompt


@dataclass(frozen=True)
class Template:
    text_field: str  # the field that `--prompt TEXT` fills
    encode: Callable[[Any, dict], list[int]]  # (tokenizer, record) -> prompt ids
    required: tuple[str, ...]  # string fields every input record must have
    optional: tuple[str, ...] = ()  # string fields used when present


TEMPLATES: dict[str, Template] = {
    "samsum": Template("dialogue", lambda tok, r: encode_prompt(tok, samsum.PROMPT.format(dialog=r["dialogue"])),
                       required=("dialogue",)),
    "grammar": Template("input", lambda tok, r: encode_prompt(tok, grammar.PROMPT.format(input=r["input"])),
                        required=("input",)),
    "alpaca": Template("instruction", lambda tok, r: encode_prompt(tok, alpaca.prompt_for(r)),
                       required=("instruction",), optional=("input",)),
    "none": Template("text", lambda tok, r: encode_prompt(tok, r["text"]), required=("text",)),
}
