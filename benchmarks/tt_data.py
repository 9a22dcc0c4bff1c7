"""torchtune components for the torchtune runner (imported by torchtune's config system
inside the torchtune venv): the harness's packed batches as a dataset, a collate that
keeps examples apart and clocks each step, and a constant learning rate."""
from __future__ import annotations

import time

import torch
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import Dataset

from .batchfile import load_batches

# perf_counter() when the loader builds each batch (num_workers=0: right before the step
# that trains it), and when each step ends (the recipe steps the LR scheduler right after
# the optimizer). The runner, in the same process, reads both after the recipe returns.
BATCH_STARTS: list[float] = []
STEP_ENDS: list[float] = []


class PackedChunks(Dataset):
    """The packed batches' rows in order; with shuffle off and the same batch size,
    torchtune's loader rebuilds exactly the harness's batches."""

    def __init__(self, path: str) -> None:
        self.rows = []
        for batch in load_batches(path):
            for row in range(batch["input_ids"].shape[0]):
                self.rows.append({key: batch[key][row] for key in ("input_ids", "labels", "position_ids")})

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return self.rows[index]


def packed_chunks(tokenizer, path: str) -> PackedChunks:
    del tokenizer  # the batches are already tokenized, by shardtune's pipeline
    return PackedChunks(path)


def block_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """[b, s, s] True where token i may attend to token j: causal, and only within the
    example (a run of positions starting at 0) that i belongs to."""
    starts = (position_ids == 0).long().cumsum(-1)  # example index of every token
    same = starts.unsqueeze(-1) == starts.unsqueeze(-2)
    causal = torch.ones(position_ids.shape[-1], position_ids.shape[-1], dtype=torch.bool).tril()
    return same & causal


def collate(rows: list[dict], padding_idx: int = 0, ignore_idx: int = -100) -> dict:
    del padding_idx, ignore_idx  # rows of a batch were padded to one length by the harness
    tokens = torch.stack([r["input_ids"] for r in rows])
    position_ids = torch.stack([r["position_ids"] for r in rows])
    labels = torch.stack([r["labels"] for r in rows])
    BATCH_STARTS.append(time.perf_counter())
    return {"tokens": tokens, "labels": labels, "input_pos": position_ids, "mask": block_causal_mask(position_ids)}


def constant_lr(optimizer, num_training_steps: int, last_epoch: int = -1) -> LambdaLR:
    """Constant, as shardtune's per-epoch StepLR is within one epoch; it also clocks the
    end of each step (LambdaLR evaluates the factor once per scheduler step)."""
    del num_training_steps

    def factor(step: int) -> float:
        if step:  # step 0 is the scheduler's construction
            STEP_ENDS.append(time.perf_counter())
        return 1.0

    return LambdaLR(optimizer, factor, last_epoch)

