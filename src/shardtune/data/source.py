"""What a dataset hands the data stage: one split, resolved to what it will read, before
anything is read or tokenized, so the cache can be consulted first."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from .records import BadRecords
from .tokenize import Example

# (tokenizer, bad-record policy) -> tokenized examples
ReadFn = Callable[[Any, BadRecords], list[dict]]


@dataclass(frozen=True)
class Source:
    name: str  # shown in messages and logs: a file, "bundled sample (train)", a hub id
    # Identifies the raw data (content hashes and the record selection); None means the
    # split is not cached (a hub id or a user's code, whose inputs shardtune cannot see).
    fingerprint: Optional[str]
    template: str  # prompt template(s); part of the cache key
    read: ReadFn
    # tokenizer -> the batch collator, when a custom dataset's file defines get_data_collator.
    collator_factory: Optional[Callable[[Any], Callable]] = None


def file_digest(path: Path | Any) -> str:
    """sha256 of a file's bytes (a Path or an importlib.resources Traversable)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_split(source: Source, tokenizer, bad: BadRecords | None = None) -> list[Example]:
    return source.read(tokenizer, bad or BadRecords())
