"""The run's final outputs in output_dir: the adapter in PEFT format, or the fully
fine-tuned model in Hugging Face format.

Files are written completely into a hidden temporary directory inside output_dir,
fsynced and listed in a manifest, then moved into place with os.replace, the manifest
last: a crash mid-save never leaves a truncated file over a previous good one, and an
output_dir without a matching manifest is visibly incomplete.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from ..device import Dist
from ..errors import UserError
from . import manifest

# Files that mark output_dir as holding a run's results.
OUTPUT_FILES = ("adapter_config.json", "adapter_model.safetensors", "config.json", "model.safetensors",
                "model.safetensors.index.json", manifest.MANIFEST, "metrics.jsonl", "loss.png", "tensorboard")


def full_trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU copies of the trainable parameters (a collective under FSDP)."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            full = p.full_tensor() if isinstance(p, DTensor) else p.detach()
            out[name] = full.to("cpu", copy=True)
    return out


def check_writable(directory: str, flag: str = "--output_dir") -> Path:
    out = Path(directory)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create {out}: {err.strerror}; pick a writable {flag}") from None
    if not os.access(out, os.W_OK):
        raise UserError(f"{out} is not writable; pick a writable {flag}")
    return out


def used_by_a_run(output_dir: Path) -> list[str]:
    return [name for name in OUTPUT_FILES if (output_dir / name).exists()]


def claim_output_dir(output_dir: str, resume: bool, overwrite: bool) -> Path:
    """Refuse an output_dir that holds another run's results unless told; with
    --overwrite_output_dir remove those results first, so runs never mix files."""
    out = check_writable(output_dir)
    used = used_by_a_run(out)
    if used and not resume and not overwrite:
        raise UserError(
            f"output_dir {out} already holds a run's results ({', '.join(used)}); pass --resume auto to "
            "continue that run, --overwrite_output_dir to replace it, or pick another --output_dir")
    if used and overwrite and not resume:
        for name in used:
            manifest.remove_now(out / name)
    manifest.clean_stale(out)
    return out


def publish_files(tmp: Path, out: Path) -> None:
    manifest.write_manifest(tmp)
    manifest.remove_now(out / manifest.MANIFEST)  # incomplete until the new one lands
    names = sorted(p.name for p in tmp.iterdir() if p.name != manifest.MANIFEST)
    for name in names + [manifest.MANIFEST]:
        os.replace(tmp / name, out / name)
    manifest.fsync_dir(out)
    tmp.rmdir()


def fresh_tmp(out: Path, kind: str) -> Path:
    tmp = out / f"{manifest.TMP_PREFIX}{kind}"
    manifest.remove_now(tmp)
    tmp.mkdir(parents=True)
    return tmp


def write_adapter(peft_model, directory: Path | None, dist: Dist, adapter_state=None) -> None:
    """Collective: the adapter in PEFT format, written by rank 0 into `directory` (None on
    the other ranks). adapter_state(full_state) -> peft's on-disk tensors, for methods where
    peft's own save would run a sharded module (prefix tuning); otherwise peft's save_pretrained."""
    state = full_trainable_state(peft_model)  # every rank joins the gather
    if dist.is_main:
        if adapter_state is None:
            peft_model.save_pretrained(directory, state_dict=state, safe_serialization=True)
        else:
            save_peft_files(peft_model.peft_config["default"], adapter_state(state), directory)


def save_peft_files(peft_config, tensors: dict[str, torch.Tensor], directory: Path) -> None:
    """An adapter directory from a peft config and peft's on-disk tensors."""
    import copy

    from safetensors.torch import save_file

    config = copy.deepcopy(peft_config)
    config.inference_mode = True  # as peft writes it
    config.save_pretrained(directory)
    save_file({k: v.contiguous() for k, v in tensors.items()}, directory / "adapter_model.safetensors",
              metadata={"format": "pt"})


def write_full_model(model: torch.nn.Module, tokenizer, directory: Path | None, dist: Dist) -> None:
    """Collective: full fine-tuning's Hugging Face directory (config, safetensors, tokenizer)
    that `from_pretrained` loads, gathered to rank 0 and written there into `directory`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    hf_model = model.module if hasattr(model, "module") else model  # DDP wraps; FSDP2 does not
    if dist.distributed:
        state = get_model_state_dict(hf_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = {k: v.detach().cpu() for k, v in hf_model.state_dict().items()}
    if dist.is_main:
        hf_files(hf_model, state, tokenizer, directory)


def hf_files(hf_model, state: dict, tokenizer, directory: Path) -> None:
    hf_model.save_pretrained(directory, state_dict=state, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def write_hf_model(hf_model, state: dict, tokenizer, out: Path) -> None:
    tmp = fresh_tmp(out, "model")
    hf_files(hf_model, state, tokenizer, tmp)
    publish_files(tmp, out)
