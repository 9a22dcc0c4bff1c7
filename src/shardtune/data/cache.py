"""On-disk cache of prepared splits (tokenized, truncated, packed).

The key covers everything the result depends on: the tokenizer, the content of the data
file(s) and which records are selected, the prompt template, context_length, the batching
strategy, drop_last, on_bad_record, the packing algorithm (packing.PACKING_ALGORITHM) and
CACHE_VERSION (bumped when preparation changes).
A split is one safetensors file: integer arrays plus a JSON metadata string (no pickle),
prepared in shards beside it (shards.py) and read back through memory maps (mapped.py).
Writes go to a temporary file that os.replace() moves into place, so a reader never sees
a partial file and concurrent writers of the same key are harmless.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Optional

from .packing import ChunkDataset

log = logging.getLogger(__name__)

CACHE_VERSION = 1
_DISABLED = ("none", "off", "false")


def cache_root(setting: str) -> Optional[Path]:
    """--data_cache_dir: "" = $SHARDTUNE_CACHE or ~/.cache/shardtune; "none" disables the cache."""
    if setting.strip().lower() in _DISABLED:
        return None
    root = setting or os.environ.get("SHARDTUNE_CACHE") or str(Path.home() / ".cache" / "shardtune")
    return Path(root).expanduser() / "data"


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of everything in the tokenizer that decides token ids."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())  # vocab, merges, normalizer, pre-tokenizer
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    # the chat template too: chat_dataset renders with it
    h.update(json.dumps([type(tokenizer).__name__, tokenizer.bos_token, tokenizer.eos_token, len(tokenizer),
                         tokenizer.chat_template]).encode())
    return h.hexdigest()


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps({"version": CACHE_VERSION, **parts}, sort_keys=True).encode()).hexdigest()


def load(path: Path) -> Optional[tuple[ChunkDataset, dict]]:
    """The cached split, memory-mapped, and its metadata; None when absent or unreadable."""
    if not path.is_file():
        return None
    try:
        return ChunkDataset.mapped(path)
    except (OSError, KeyError, ValueError) as err:
        log.warning("ignoring unreadable data cache %s (%s); preparing the split again", path, err)
        return None


def writable(root: Path) -> bool:
    """Whether prepared splits can be written under root (else they go to a temporary directory)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        return os.access(root, os.W_OK)
    except OSError as err:
        log.warning("cannot write the data cache %s (%s); set --data_cache_dir to a writable directory", root, err)
        return False
