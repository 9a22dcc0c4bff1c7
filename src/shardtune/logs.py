"""Logging with a rank-0 filter, and metrics as JSON lines."""
from __future__ import annotations

import json
import logging
import os
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

    def rewind(self, step: int, epochs_done: int) -> None:
        """On resume: drop what a killed run logged past its checkpoint, so each step and
        epoch appears once, as the resumed run trains it."""
        if self.path is None or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:  # a line torn by the kill
                continue
            if rec.get("event") == "step" and rec.get("step", 0) > step:
                continue
            if rec.get("event") == "epoch" and rec.get("epoch", 0) > epochs_done:
                continue
            kept.append(line + "\n")
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, self.path)
