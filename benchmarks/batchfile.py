"""The packed batches on disk (safetensors), shared by the runners of both venvs:
torch and safetensors only, so the torchtune venv can read them."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

KEYS = ("input_ids", "labels", "position_ids")


def save_batches(batches: list[dict], path: Path) -> Path:
    tensors = {}
    for i, batch in enumerate(batches):
        for key in KEYS:
            tensors[f"{i:05d}.{key}"] = batch[key].contiguous()
        tensors[f"{i:05d}.num_tokens"] = torch.tensor(int(batch["num_tokens"]))
    save_file(tensors, str(path))
    return path


def load_batches(path: Path) -> list[dict]:
    """[{input_ids, labels, position_ids: [micro, length] tensors, num_tokens: int}]"""
    tensors = load_file(str(path))
    count = len({name.split(".")[0] for name in tensors})
    batches = []
    for i in range(count):
        batch = {key: tensors[f"{i:05d}.{key}"] for key in KEYS}
        batch["num_tokens"] = int(tensors[f"{i:05d}.num_tokens"])
        batches.append(batch)
    return batches
