"""Preemption: SIGTERM (torchrun, Kubernetes, slurm at the end) and SIGUSR1 (slurm's
`--signal=USR1@120` warning) ask the run to stop. The handler only sets a flag; the loop
checks it after each optimizer step, agreed across ranks, so every rank finishes the
same step, writes the checkpoint and exits 0."""
from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as tdist

from .device import Dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self, dist: Dist) -> bool:
        """True on every rank once any rank got a signal (one tiny all-reduce per step).

        The flag is a host tensor, reduced by the process group's CPU backend (gloo beside
        NCCL: device.backend_for): a device tensor would make every step wait on the host
        for all queued device work, where the loop otherwise syncs only at log steps. It is
        read through numpy, host memory, with no tensor op that could sync."""
        if not dist.distributed:
            return self.signal_name is not None
        flag = torch.tensor([1 if self.signal_name else 0], dtype=torch.int32)
        tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
        return bool(flag.numpy()[0])
