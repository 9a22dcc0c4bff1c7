"""Checkpoint stage: write the trained adapter in PEFT format.

Files are written to a temporary sibling directory and moved into place one by
one with os.replace, so a crash mid-save never leaves a half-written adapter over a
previous good one.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from .device import Dist
from .errors import UserError


def full_trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU copies of the trainable parameters (a collective under FSDP)."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            t = p.full_tensor() if isinstance(p, DTensor) else p.detach()
            out[name] = t.to("cpu", copy=True)
    return out


def check_writable(output_dir: str) -> Path:
    out = Path(output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create output_dir {out}: {err.strerror}; pick a writable --output_dir") from None
    if not os.access(out, os.W_OK):
        raise UserError(f"output_dir {out} is not writable; pick a writable --output_dir")
    return out


def _publish(tmp: Path, out: Path) -> None:
    for f in sorted(tmp.iterdir()):
        os.replace(f, out / f.name)


def save_adapter(peft_model, output_dir: str, dist: Dist) -> Path | None:
    state = full_trainable_state(peft_model)  # every rank joins the gather
    out = Path(output_dir)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".adapter-tmp-", dir=out))
        try:
            peft_model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            _publish(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    return out
