"""The run's final outputs in output_dir: the adapter in PEFT format, or the fully
fine-tuned model in Hugging Face format.

Files are written completely into a hidden temporary directory inside output_dir,
fsynced and listed in a manifest, then moved into place with os.replace, the manifest
last: a crash mid-save never leaves a truncated file over a previous good one, and an
output_dir without a matching manifest is visibly incomplete.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

from .. import _compat
from ..device import Dist
from ..errors import UserError
from . import manifest

# A full model's weights: one file, or HF's sharded layout with its index.
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Files that mark output_dir as holding a run's results.
OUTPUT_FILES = ("adapter_config.json", "adapter_model.safetensors", "config.json", SINGLE_FILE, INDEX_FILE,
                manifest.MANIFEST, "metrics.jsonl", "loss.png", "tensorboard")
MODEL_SHARDS = "model-*-of-*.safetensors"  # a full model in Hugging Face's sharded layout


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
    return [name for name in OUTPUT_FILES if (output_dir / name).exists()] + _model_shards(output_dir)


def _model_shards(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob(MODEL_SHARDS))


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
    if "config.json" in names:  # a model: one written before in the other layout would shadow or litter it
        for stale in set(_model_shards(out) + [SINGLE_FILE, INDEX_FILE]) - set(names):
            manifest.remove_now(out / stale)
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
            # the trained adapter only (a recipe may hold others, frozen: dpo's reference)
            peft_model.save_pretrained(directory, state_dict=state, safe_serialization=True,
                                       selected_adapters=["default"])
        else:
            save_peft_files(peft_model.peft_config["default"], adapter_state(state), directory)


def save_peft_files(peft_config, tensors: dict[str, torch.Tensor], directory: Path) -> None:
    """An adapter directory from a peft config and peft's on-disk tensors."""
    config = copy.deepcopy(peft_config)
    config.inference_mode = True  # as peft writes it
    config.save_pretrained(directory)
    save_file({k: v.contiguous() for k, v in tensors.items()}, directory / "adapter_model.safetensors",
              metadata={"format": "pt"})


# The most tensor bytes rank 0 holds while writing the full model: one file's worth.
SHARD_BYTES = 2 * 2**30


def write_full_model(model: torch.nn.Module, tokenizer, directory: Path | None, dist: Dist, dtype: torch.dtype,
                     shard_bytes: int = SHARD_BYTES) -> None:
    """Collective: full fine-tuning's Hugging Face directory (config, safetensors, tokenizer)
    that `from_pretrained` loads, written by rank 0 into `directory`. Floating tensors are
    written in `dtype` (the training's compute dtype), streamed: every rank joins one gather
    per tensor and rank 0 writes each file of at most `shard_bytes` once it is full (HF's
    sharded layout with its index; one model.safetensors when the model fits one file)."""
    hf_model = model.module if hasattr(model, "module") else model  # DDP wraps; FSDP2 does not
    tensors = saved_tensors(hf_model)
    files = plan_files(tensors, dtype, shard_bytes)
    if dist.is_main:
        directory.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for file_name, names in files.items():
        gathered = {name: _gathered(tensors[name], dtype, keep=dist.is_main) for name in names}
        if dist.is_main:
            gathered = _compat.checkpoint_format(hf_model, gathered)
            save_file(gathered, directory / file_name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(gathered, file_name))
        del gathered  # one file's tensors at a time
    if dist.is_main:
        if len(files) > 1:
            _write_index(directory, weight_map, tensors, dtype, hf_model.num_parameters())
        _write_config(hf_model, dtype, directory)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)


def saved_tensors(hf_model) -> dict[str, torch.Tensor]:
    """The state dict's live tensors (sharded under FSDP2), as save_pretrained writes them:
    keys it ignores on save left out, and a tied parameter once, under its first name
    (embed_tokens, not lm_head: the name from_pretrained ties from)."""
    ignored = set(getattr(hf_model, "_keys_to_ignore_on_save", None) or ())
    out, seen = {}, set()
    for name, tensor in hf_model.state_dict(keep_vars=True).items():
        if name in ignored or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        out[name] = tensor
    return out


def _saved_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    return dtype if tensor.is_floating_point() else tensor.dtype


def _saved_bytes(tensor: torch.Tensor, dtype: torch.dtype) -> int:
    return tensor.numel() * _saved_dtype(tensor, dtype).itemsize


def plan_files(tensors: dict[str, torch.Tensor], dtype: torch.dtype, shard_bytes: int) -> dict[str, list[str]]:
    """File name -> the tensor names it holds, in state-dict order: a new file starts when
    the next tensor would take the current one past shard_bytes."""
    groups, size = [[]], 0
    for name, tensor in tensors.items():
        nbytes = _saved_bytes(tensor, dtype)
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    if len(groups) == 1:
        return {SINGLE_FILE: groups[0]}
    return {f"model-{i:05d}-of-{len(groups):05d}.safetensors": names for i, names in enumerate(groups, 1)}


def _gathered(tensor: torch.Tensor, dtype: torch.dtype, keep: bool) -> torch.Tensor | None:
    """Collective for a DTensor: the full tensor in its saved dtype, on the CPU where kept (the
    live parameter itself when it already is one: written at once, never changed meanwhile).
    Cast before the gather (elementwise, so the same bits) to move fewer bytes."""
    tensor = tensor.detach().to(_saved_dtype(tensor, dtype))
    if isinstance(tensor, DTensor):
        if tensor.device.type != tensor.device_mesh.device_type:  # --fsdp_cpu_offload's host shards
            tensor = tensor.to(tensor.device_mesh.device_type)
        tensor = tensor.full_tensor()
    return tensor.to("cpu").contiguous() if keep else None


def _write_index(directory: Path, weight_map: dict[str, str], tensors: dict[str, torch.Tensor], dtype: torch.dtype,
                 parameters: int) -> None:
    total = sum(_saved_bytes(t, dtype) for t in tensors.values())
    index = {"metadata": {"total_parameters": parameters, "total_size": total}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _write_config(hf_model, dtype: torch.dtype, directory: Path) -> None:
    """config.json naming the dtype written and the model's own class (FSDP2 renames the
    class of the module it wraps), and generation_config.json, as save_pretrained writes them."""
    config = copy.deepcopy(hf_model.config)
    config.dtype = str(dtype).removeprefix("torch.")
    config.architectures = [type(hf_model).__name__.removeprefix("FSDP")]
    config.save_pretrained(directory)
    if hf_model.can_generate():
        hf_model.generation_config.save_pretrained(directory)


def hf_files(hf_model, state: dict, tokenizer, directory: Path) -> None:
    hf_model.save_pretrained(directory, state_dict=state, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def write_hf_model(hf_model, state: dict, tokenizer, out: Path) -> None:
    tmp = fresh_tmp(out, "model")
    hf_files(hf_model, state, tokenizer, tmp)
    publish_files(tmp, out)
