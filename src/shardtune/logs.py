"""Logging with a rank-0 filter, and metrics as JSON lines."""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path


class _RankZero(logging.Filter):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        # Warnings and errors from any rank matter; chatter only from rank 0.
        return self.rank == 0 or record.levelno >= logging.WARNING


def setup_logging(rank: int, level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stdout)
    prefix = f"[rank {rank}] " if rank else ""
    handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(message)s", "%H:%M:%S"))
    handler.addFilter(_RankZero(rank))
    root = logging.getLogger("shardtune")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


class MetricsWriter:
    """Appends one JSON object per line; only rank 0 writes."""

    def __init__(self, path: Path | None, run_id: str | None = None) -> None:
        self.path = path
        self.run_id = run_id or time.strftime("%Y%m%d-%H%M%S")
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, event: str, **fields) -> None:
        if self.path is None:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"event": event, "run_id": self.run_id, **fields}) + "\n")
