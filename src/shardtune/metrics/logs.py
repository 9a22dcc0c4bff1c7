"""Logging with a rank-0 filter, and metrics as JSON lines."""
from __future__ import annotations

import json
import math
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError

if TYPE_CHECKING:
    from .sinks import MetricsSink


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl file; a torn last line (a run killed mid-write) is
    skipped, any other line that is not JSON is an error naming the file and line."""
    records = []
    lines = Path(path).read_text().splitlines()
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except ValueError:
            if number == len(lines):
                continue
            raise UserError(f"{path} line {number} is not JSON; is this a shardtune metrics.jsonl?") from None
    return records


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")


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


# The fields of each metrics event that the sinks (TensorBoard, wandb, loss.png) receive,
# by tag. A step event also carries targets, epoch and run_id, which stay in the file.
# the dpo recipe's per-step means (modeling/preference.py STAT_NAMES; TRL's names)
PREFERENCE_STATS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                    "logps/chosen", "logps/rejected")
SINK_TAGS = {
    "step": {"loss": "train/loss", "perplexity": "train/perplexity", "lr": "train/lr",
             "grad_norm": "train/grad_norm", "tokens_per_s": "train/tokens_per_s", "mfu": "train/mfu",
             "peak_memory_mib": "train/peak_memory_mib", **{name: f"train/{name}" for name in PREFERENCE_STATS}},
    "eval": {"eval_loss": "eval/loss", "eval_perplexity": "eval/perplexity",
             **{f"eval_{name}": f"eval/{name}" for name in PREFERENCE_STATS}},
}


class MetricsWriter:
    """Appends one JSON object per line, and passes each step's and evaluation's scalars to
    the sinks (see sinks.MetricsSink). Only rank 0 writes: the others get no path, no sinks."""

    def __init__(self, path: Path | None, run_id: str | None = None, sinks: list[MetricsSink] | None = None) -> None:
        self.path = path
        self.run_id = run_id or time.strftime("%Y%m%d-%H%M%S")
        self.sinks = sinks or []
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, event: str, **fields) -> None:
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps({"event": event, "run_id": self.run_id, **fields}) + "\n")
        tags = SINK_TAGS.get(event)
        if tags and self.sinks:
            scalars = {tag: float(fields[name]) for name, tag in tags.items() if fields.get(name) is not None}
            for name, value in (fields.get("eval_loss_by_dataset") or {}).items():  # a mixture's components
                scalars[f"eval/loss/{name}"] = float(value)
            for sink in self.sinks:
                sink.log(fields["step"], scalars)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []

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
            if rec.get("event") in ("step", "eval") and rec.get("step", 0) > step:
                continue
            if rec.get("event") == "epoch" and rec.get("epoch", 0) > epochs_done:
                continue
            kept.append(line + "\n")
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, self.path)
