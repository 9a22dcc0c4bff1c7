"""Atomic file writes: a reader never sees half a file, and a failed write leaves the old one.

Every file shardtune writes outside a checkpoint directory (prepared splits, reference
log-probabilities, prepared data files, reports) goes through `atomic_path`: the content
is written to a temporary sibling that os.replace() moves onto the target, so concurrent
writers of one path are harmless too. Checkpoint directories have their own, manifest-based
publication (checkpoint/manifest.py).
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside `path` to write to; when the block ends cleanly it
    replaces `path`, and when it raises the temporary is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
