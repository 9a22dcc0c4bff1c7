"""Checkpoint stage: the trained adapter in PEFT format, or the fully fine-tuned model
in Hugging Face format (plus an optional DCP checkpoint).

Files are written completely into a temporary directory inside output_dir, then each is
moved into place with os.replace: a crash mid-save never leaves a truncated file over a
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


def save_adapter(peft_model, output_dir: str, dist: Dist, adapter_state=None) -> Path:
    """adapter_state(full_state) -> peft's on-disk tensors, for methods where peft's own
    save would run a sharded module (prefix tuning); otherwise peft's save_pretrained."""
    state = full_trainable_state(peft_model)  # every rank joins the gather
    out = Path(output_dir)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".adapter-tmp-", dir=out))
        try:
            if adapter_state is None:
                peft_model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            else:
                _save_peft_files(peft_model, adapter_state(state), tmp)
            _publish(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    return out


def _save_peft_files(peft_model, tensors: dict[str, torch.Tensor], directory: Path) -> None:
    import copy

    from safetensors.torch import save_file

    config = copy.deepcopy(peft_model.peft_config["default"])
    config.inference_mode = True  # as peft writes it
    config.save_pretrained(directory)
    save_file({k: v.contiguous() for k, v in tensors.items()}, directory / "adapter_model.safetensors",
              metadata={"format": "pt"})


def save_full_model(model: torch.nn.Module, tokenizer, output_dir: str, dist: Dist,
                    sharded_dir: str | None = None, optimizer=None) -> Path:
    """Full fine-tuning: a Hugging Face directory (config, safetensors, tokenizer) that
    `from_pretrained` loads, gathered to rank 0; with sharded_dir, also a DCP checkpoint
    written by every rank in parallel (plus the optimizer when given)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    hf_model = model.module if hasattr(model, "module") else model  # DDP wraps; FSDP2 does not
    if sharded_dir:
        _save_dcp(model, sharded_dir, dist, optimizer)
    if dist.distributed:
        state = get_model_state_dict(hf_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = {k: v.detach().cpu() for k, v in hf_model.state_dict().items()}
    out = Path(output_dir)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".model-tmp-", dir=out))
        try:
            hf_model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            _publish(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    return out


def _save_dcp(model, path: str, dist: Dist, optimizer=None) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = Path(path)
    tmp = final.with_name(final.name + ".tmp")
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    if optimizer is not None:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optimizer": optim_sd}
    else:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = {"model": get_model_state_dict(model)}
    dcp.save(state, checkpoint_id=str(tmp))
    dist.barrier()
    if dist.is_main:  # swap in only once complete, so a crash never leaves a torn checkpoint
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)  # left by an earlier interrupted swap
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
