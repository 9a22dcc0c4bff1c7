"""Flat integer arrays in one safetensors file, written and read through memory maps.

A prepared split (and each shard of one) is a safetensors file: an 8-byte header length,
a JSON header, then the raw arrays. Writing lays the header out first (the sizes are
known up front) and fills the arrays through a writable map, so no array has to exist in
memory whole; reading maps each array copy-on-write, so the ranks of a node share one
copy in the page cache and a rank's RSS grows with the pages it touches, not the corpus.
The files stay readable by the safetensors library itself (no pickle anywhere).
"""
from __future__ import annotations

import json
import mmap
import os
import shutil
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..errors import UserError
from ..files import atomic_path

_DTYPES = {"I32": np.int32, "I64": np.int64}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


def _header(shapes: dict[str, tuple[np.dtype, int]], meta: dict) -> tuple[bytes, dict[str, int]]:
    header, starts, pos = {"__metadata__": {"shardtune": json.dumps(meta)}}, {}, 0
    for name, (dtype, n) in shapes.items():
        size = np.dtype(dtype).itemsize * n
        header[name] = {"dtype": _NAMES[np.dtype(dtype)], "shape": [n], "data_offsets": [pos, pos + size]}
        starts[name], pos = pos, pos + size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data to 8 bytes
    return struct.pack("<Q", len(raw)) + raw, starts


class Filling(dict):
    """{name: writable array over the file being written}, plus release()."""

    def __init__(self, mm: Optional[mmap.mmap], arrays: dict[str, np.ndarray]) -> None:
        super().__init__(arrays)
        self._mm = mm

    def release(self) -> None:
        """Drop the filled pages from this process, so filling a file larger than memory does
        not grow RSS. The map is shared, so they stay in the page cache as dirty pages that
        the kernel writes back in its own time (no msync: every reader goes through the same
        page cache, and a synchronous flush per shard cost as much as the packing itself)."""
        if self._mm is not None:
            self._mm.madvise(mmap.MADV_DONTNEED)


@contextmanager
def write(path: Path, shapes: dict[str, tuple[np.dtype, int]], meta: dict,
          keep_existing: Optional[Callable[[Path], bool]] = None):
    """Yields a Filling; on a clean exit the file is moved into place atomically, so a reader
    never sees a partial file and concurrent writers of one path are harmless (keep_existing:
    a file other nodes may map, files.atomic_path)."""
    with atomic_path(path, keep_existing) as tmp:
        head, starts = _header(shapes, meta)
        data = sum(np.dtype(d).itemsize * n for d, n in shapes.values())
        _check_space(path, len(head) + data)
        with open(tmp, "r+b") as f:
            f.write(head)
            f.truncate(len(head) + data)
            f.flush()
            mm = mmap.mmap(f.fileno(), 0) if data else None
        arrays = {name: np.frombuffer(mm, dtype=d, count=n, offset=len(head) + starts[name]) if n else
                  np.zeros(0, dtype=d) for name, (d, n) in shapes.items()}
        filling = Filling(mm, arrays)
        yield filling
        filling.release()  # the map itself closes when the caller drops the arrays


def _check_space(path: Path, size: int) -> None:
    """A file filled through a memory map finds a full disk as SIGBUS, which kills the process
    without a word: check the room first and say it in one line."""
    free = shutil.disk_usage(path.parent).free
    if free < size:
        raise UserError(f"no room for {path}: it needs {size / 2**20:.1f} MiB and {path.parent} has "
                        f"{free / 2**20:.1f} MiB free; free some space, or set --data_cache_dir to a larger disk")


def save(path: Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Write in-memory arrays (a shard) the same way."""
    with write(path, {k: (v.dtype, len(v)) for k, v in arrays.items()}, meta) as out:
        for k, v in arrays.items():
            out[k][:] = v


def read(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """({name: copy-on-write map}, metadata); raises OSError/ValueError/KeyError on a bad file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < n <= size - 8:
            raise ValueError("not a safetensors file (bad header length)")
        header = json.loads(f.read(n))
    meta = json.loads(header.pop("__metadata__")["shardtune"])
    base = 8 + n
    arrays = {}
    for name, spec in header.items():
        (begin, end), dtype = spec["data_offsets"], _DTYPES[spec["dtype"]]
        if base + end > size:
            raise ValueError(f"{name} runs past the end of the file")
        count = (end - begin) // np.dtype(dtype).itemsize
        arrays[name] = np.memmap(path, dtype=dtype, mode="c", offset=base + begin, shape=(count,)) \
            if count else np.zeros(0, dtype=dtype)
    return arrays, meta
