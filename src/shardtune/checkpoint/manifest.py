"""Directories that are complete or invisible.

A writer fills a hidden temporary sibling (`.tmp-NAME`), fsyncs it, records every file
and its size in a manifest, and publishes it with one rename. Readers trust only a
directory whose manifest's files are all present, with their sizes; anything
else (a kill mid-write, a torn copy) is never loaded, and the next start removes the
stale temporaries. Every writer of checkpoints and final outputs goes through here.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

MANIFEST = "shardtune_manifest.json"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    try:
        fsync_file(path)
    except OSError:  # some filesystems cannot fsync a directory; the rename still orders
        pass


def temporary_for(final: Path) -> Path:
    return final.with_name(TMP_PREFIX + final.name)


def _files(directory: Path) -> dict[str, int]:
    out = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            out[path.relative_to(directory).as_posix()] = path.stat().st_size
    return out


def write_manifest(directory: Path, info: dict | None = None) -> None:
    """fsync every file under `directory` (other ranks' too, on a shared filesystem) and
    record them; the manifest is the last file written."""
    files = _files(directory)
    for rel in files:
        fsync_file(directory / rel)
    for sub in {(directory / rel).parent for rel in files}:
        fsync_dir(sub)
    path = directory / MANIFEST
    with open(path, "w") as f:
        json.dump({"files": files, **(info or {})}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(directory)


def read_manifest(directory: Path) -> dict | None:
    """The manifest of a complete directory, else None."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return None
    try:
        sizes = {rel: (directory / rel).stat().st_size for rel in manifest["files"]}
    except OSError:
        return None
    if sizes != manifest["files"]:
        return None
    return manifest


def publish(tmp: Path, final: Path) -> None:
    """Make a complete `tmp` visible as `final` with one rename. A `final` that already
    exists (a checkpoint of the same step, superseded) is moved aside first."""
    trash = None
    if final.exists():
        trash = final.with_name(TRASH_PREFIX + final.name)
        remove_now(trash)
        os.replace(final, trash)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if trash is not None:
        remove_now(trash)


def remove(directory: Path) -> None:
    """Hide first, then delete, so a half-deleted directory is never mistaken for one."""
    if not directory.exists() and not directory.is_symlink():
        return
    trash = directory.with_name(TRASH_PREFIX + directory.name)
    remove_now(trash)
    os.replace(directory, trash)
    remove_now(trash)


def remove_now(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def clean_stale(parent: Path) -> list[Path]:
    """Remove temporaries and trash left by a run that was killed mid-write."""
    removed = []
    if parent.is_dir():
        for entry in parent.iterdir():
            if entry.name.startswith((TMP_PREFIX, TRASH_PREFIX)):
                remove_now(entry)
                removed.append(entry)
    return removed
