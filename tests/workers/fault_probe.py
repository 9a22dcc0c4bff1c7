"""Test worker (python or torchrun): the real entry point (sft.main) with one
fault injected, chosen by the first argument (JSON):

  {"pause_at": K, "dir": D}   before step K's optimizer step, once no step checkpoint is
                              still being written in the background (under --output_dir),
                              rank 0 writes D/paused and every rank waits until D/release
                              exists (SIGKILL or SIGTERM it meanwhile)
  {"stall_publish_at": K, "dir": D}   the step-K checkpoint is fully written but hangs
                              before its publishing rename; rank 0 writes D/stalled
  {"nan_at": K}               rank 0's first trainable gradient becomes NaN at step K
  {"raise_at": K, "rank": R}  rank R raises a UserError before step K's optimizer step
"""
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from shardtune.recipes import sft
from shardtune.checkpoint import manifest
from shardtune.errors import UserError

WAIT_S = 120


class Rank:
    def __init__(self, rank: int) -> None:
        self.rank, self.is_main = rank, rank == 0


def _wait_for(path: Path) -> None:
    deadline = time.monotonic() + WAIT_S
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def _wait_for_checkpoint_writes(output_dir: Path) -> None:
    """Until every step checkpoint started so far is published (its temporary renamed)."""
    deadline = time.monotonic() + WAIT_S
    while any(output_dir.rglob(f"{manifest.TMP_PREFIX}step_*")) and time.monotonic() < deadline:
        time.sleep(0.05)


def hooks(fault: dict, dist, output_dir: Path):
    if "pause_at" in fault:
        folder = Path(fault["dir"])

        def before_step(model, state):
            if state.step + 1 == fault["pause_at"]:
                if dist.is_main:
                    _wait_for_checkpoint_writes(output_dir)
                    (folder / "paused").write_text(str(os.getpid()))
                _wait_for(folder / "release")
        return before_step
    if "stall_publish_at" in fault:
        folder, publish = Path(fault["dir"]), manifest.publish

        def stalled_publish(tmp, final):
            if final.name == f"step_{fault['stall_publish_at']:06d}":
                (folder / "stalled").write_text(str(os.getpid()))
                time.sleep(WAIT_S)
            publish(tmp, final)
        manifest.publish = stalled_publish
        return None
    if "nan_at" in fault:
        def before_step(model, state):
            if state.step + 1 == fault["nan_at"] and dist.is_main:
                grad = next(p.grad for p in model.parameters() if p.requires_grad and p.grad is not None)
                (grad.to_local() if isinstance(grad, DTensor) else grad).view(-1)[0] = float("nan")
        return before_step
    if "raise_at" in fault:
        def before_step(model, state):
            if state.step + 1 == fault["raise_at"] and dist.rank == fault["rank"]:
                raise UserError(f"injected failure at step {fault['raise_at']}")
        return before_step
    return None


def main() -> int:
    fault, argv = json.loads(sys.argv[1]), sys.argv[2:]
    rank = Rank(int(os.environ.get("RANK", 0)))
    output_dir = Path(argv[argv.index("--output_dir") + 1])
    return sft.main(argv, before_step=hooks(fault, rank, output_dir))


if __name__ == "__main__":  # spawned DataLoader workers import this file too
    sys.exit(main())
