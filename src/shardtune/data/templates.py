"""Inference prompts: each dataset's training prompt, built from one record as token ids,
so that `shardtune generate` asks a fine-tuned model exactly what it was trained on.

A template names the string fields a record must have and turns (tokenizer, record) into
prompt ids. `chat` renders a conversation exactly as chat_dataset trains it (data/chat.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from . import alpaca, chat, grammar, samsum
from .tokenize import encode_prompt


@dataclass(frozen=True)
class Template:
    text_field: str  # the field that `--prompt TEXT` fills
    encode: Callable[[Any, dict], list[int]]  # (tokenizer, record) -> prompt ids
    required: tuple[str, ...]  # string fields every input record must have
    optional: tuple[str, ...] = ()  # string fields used when present
    check: Optional[Callable[[dict], Optional[str]]] = None  # record -> what is wrong with it, or None


TEMPLATES: dict[str, Template] = {
    "samsum": Template("dialogue", lambda tok, r: encode_prompt(tok, samsum.PROMPT.format(dialog=r["dialogue"])),
                       required=("dialogue",)),
    "grammar": Template("input", lambda tok, r: encode_prompt(tok, grammar.PROMPT.format(input=r["input"])),
                        required=("input",)),
    "alpaca": Template("instruction", lambda tok, r: encode_prompt(tok, alpaca.prompt_for(r)),
                       required=("instruction",), optional=("input",)),
    "none": Template("text", lambda tok, r: encode_prompt(tok, r["text"]), required=("text",)),
}


def _chat_problem(record: dict) -> Optional[str]:
    if isinstance(record.get("messages"), list) or isinstance(record.get("content"), str):
        return None
    return "needs 'messages' (a list of {role, content}) or 'content' (one user turn)"


def chat_template(name: Optional[str] = None) -> Template:
    """A record's `messages` (OpenAI form), or its `content` as one user turn, rendered with
    the assistant turn opened; `name` is llama3|llama2|chatml, None = the tokenizer's own."""
    def encode(tokenizer, record: dict) -> list[int]:
        messages = record.get("messages") or [{"role": "user", "content": record["content"]}]
        return chat.prompt_ids(tokenizer, messages, name)
    return Template("content", encode, required=(), check=_chat_problem)


TEMPLATES["chat"] = chat_template()
