"""What a dataset hands the data stage: one split, resolved to what it will read, before
anything is read or tokenized, so the cache can be consulted first."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from .records import BadRecords, data_files
from .tokenize import Example, FlatExamples

# (tokenizer, bad-record policy) -> tokenized examples
ReadFn = Callable[[Any, BadRecords], list[dict]]
# bad-record policy -> (the split's records, the file index of the first). Parsing and the
# checks that need no tokenizer happen here, once, so that any slice of the records can be
# tokenized on its own (in parallel, by shards.py).
RecordsFn = Callable[[BadRecords], tuple[list, int]]
# (tokenizer, records, bad-record policy, file index of records[0]) -> examples, one per good
# record (as dicts of lists, or flat arrays: what prompt/target datasets give, cheaper at scale)
TokenizeFn = Callable[[Any, list, BadRecords, int], "list[Example] | FlatExamples"]


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
    # Set when the split can be tokenized in slices (else only `read` reads it whole).
    records: Optional[RecordsFn] = None
    tokenize: Optional[TokenizeFn] = None
    size: int = 0  # bytes of raw data behind the split, when known (0: unknown or small)


def sliced(name: str, fingerprint: Optional[str], template: str, records: RecordsFn, tokenize: TokenizeFn,
           size: int = 0) -> Source:
    """A source read as records, then tokenized slice by slice; `read` is the two in one go."""
    def read(tokenizer, bad: BadRecords) -> list[Example]:
        recs, start = records(bad)
        examples = tokenize(tokenizer, recs, bad, start)
        return examples.examples() if isinstance(examples, FlatExamples) else examples

    return Source(name, fingerprint, template, read, records=records, tokenize=tokenize, size=size)


def file_digest(path: Path | Any) -> str:
    """sha256 of a data path's bytes: a file (a Path or an importlib.resources Traversable),
    read in blocks so a corpus is never held whole, or a directory's data files in order."""
    if isinstance(path, Path) and path.is_dir():
        h = hashlib.sha256()
        for file in data_files(path):
            h.update(f"{file.relative_to(path)}:{file_digest(file)}\n".encode())
        return "dir:" + h.hexdigest()
    h = hashlib.sha256()
    with path.open("rb") as f:  # hashlib.file_digest is Python 3.11+; 3.10 is supported
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def data_size(path: Path) -> int:
    """Bytes of a data path: a file, or a directory's data files."""
    return sum(file.stat().st_size for file in data_files(path))


def read_split(source: Source, tokenizer, bad: BadRecords | None = None) -> list[Example]:
    return source.read(tokenizer, bad or BadRecords())
