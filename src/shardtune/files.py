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
from typing import Callable, Iterator, Optional


@contextmanager
def atomic_path(path: str | Path, keep_existing: Optional[Callable[[Path], bool]] = None) -> Iterator[Path]:
    """Yields a temporary path beside `path` to write to; when the block ends cleanly it
    replaces `path`, and when it raises the temporary is removed and `path` is untouched.

    keep_existing: for a file other nodes map from a shared filesystem. The new file reaches
    the disk (fsync) before it is published, so a node that opens it reads its bytes and not
    pages still in this node's cache; and it takes the path only where nothing stands, or
    what stands fails keep_existing: renamed over a file that another client has mapped, the
    old file's pages would turn stale under it (NFS), where keeping it is as good (same key)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        if keep_existing is None:
            os.replace(tmp, path)
        else:
            _fsync(tmp)
            _publish_unless_kept(Path(tmp), path, keep_existing)
            _fsync(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _publish_unless_kept(tmp: Path, path: Path, keep_existing: Callable[[Path], bool]) -> None:
    try:
        os.link(tmp, path)  # creates path only where nothing stands
    except FileExistsError:
        if not keep_existing(path):
            os.replace(tmp, path)
    except OSError:  # a filesystem without hard links
        os.replace(tmp, path)


def _fsync(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
