"""What every runner measures and emits, declared once. Standard library only: the
torchtune runner imports it from its own venv.

A runner records one StepRecord per optimizer step (the wall-clock time the step ended,
its loss, its tokens) and writes one JSON line (RunResult) to the file the driver names.
"""
from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class StepRecord:
    end: float  # time.perf_counter() when the step ended
    loss: float
    tokens: int  # non-pad tokens
    all_tokens: int  # tokens including padding


@dataclass
class RunResult:
    runner: str
    size: str
    steps: int  # optimizer steps trained
    timed_steps: int  # steps after warm-up, which the rates below cover
    s_per_step: float  # median seconds per optimizer step after warm-up
    tokens_per_s: float  # non-pad tokens / s after warm-up
    all_tokens_per_s: float  # all tokens (with padding) / s after warm-up
    first_loss: float
    final_loss: float  # mean loss of the last FINAL_WINDOW steps
    peak_rss_mib: float  # this process's peak resident set
    rank: int = 0
    world: int = 1
    threads: int = 1
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self))


FINAL_WINDOW = 5


# glibc's malloc serves blocks below its mmap threshold from its heaps and keeps them after
# free; the threshold grows (up to 32 MiB) as large blocks are freed, so by default the
# peak RSS also holds memory freed earlier in the step. A fixed 128 KiB threshold gives
# every tensor its own mapping, returned on free: the peak RSS is then the peak of live
# memory, which is what plan predicts (and what an accelerator's caching allocator holds).
LIVE_ONLY_MMAP_THRESHOLD = "131072"


def vm_hwm_bytes() -> int:
    """This process's peak resident set so far (Linux VmHWM: per process, unlike ru_maxrss,
    which keeps a launcher's peak across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class StepClock:
    """Start it right before the first step; call step() as each step ends."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.records: list[StepRecord] = []

    def step(self, loss: float, tokens: int, all_tokens: int, end: float | None = None) -> None:
        self.records.append(StepRecord(time.perf_counter() if end is None else end, loss, tokens, all_tokens))


def summarize(runner: str, size: str, records: list[StepRecord], start: float | None, warmup: int,
              threads: int, rank: int = 0, world: int = 1, extra: dict | None = None) -> RunResult:
    """Rates over the steps after `warmup` (all timed steps if there are no more than
    that). start=None: the first step's start was not seen, so its end only starts the
    clock and it counts as warm-up."""
    if not records:
        raise ValueError(f"{runner}: no steps were recorded")
    ends = ([start] if start is not None else []) + [r.end for r in records]
    durations = [b - a for a, b in zip(ends, ends[1:])]
    timed_records = records[len(records) - len(durations):]  # the steps with a duration
    skip = max(warmup - (len(records) - len(durations)), 0)
    if len(durations) <= skip:
        skip = 0
    timed, timed_records = durations[skip:], timed_records[skip:]
    if not timed:
        raise ValueError(f"{runner}: fewer than two steps, nothing to time")
    seconds = sum(timed)
    losses = [r.loss for r in records]
    return RunResult(
        runner=runner, size=size, steps=len(records), timed_steps=len(timed),
        s_per_step=statistics.median(timed),
        tokens_per_s=sum(r.tokens for r in timed_records) / seconds,
        all_tokens_per_s=sum(r.all_tokens for r in timed_records) / seconds,
        first_loss=losses[0], final_loss=statistics.fmean(losses[-FINAL_WINDOW:]),
        peak_rss_mib=peak_rss_mib(), rank=rank, world=world, threads=threads, extra=extra or {},
    )


def emit(result: RunResult, path: str | Path) -> None:
    """One JSON line to the driver's file (and stdout, for a person watching)."""
    line = result.to_json()
    Path(path).write_text(line + "\n")
    print(line, file=sys.stdout, flush=True)


def runner_args(argv: list[str] | None = None):
    """The arguments the driver passes to every runner."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--size", required=True)
    parser.add_argument("--model", required=True, help="HF model directory")
    parser.add_argument("--data", required=True, help="SAMSum subset directory")
    parser.add_argument("--batches", required=True, help="the packed batches (safetensors)")
    parser.add_argument("--settings", required=True, help="workload.Settings as JSON")
    parser.add_argument("--work", required=True, help="a directory for this run's outputs")
    parser.add_argument("--result", required=True, help="where to write the JSON line")
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)
