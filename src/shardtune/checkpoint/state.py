"""Step checkpoints: everything a run needs to continue exactly, in DCP.

    <root>/<dist_checkpoint_folder>-<model name>/step_000123/
        dcp/            trainable parameters and optimizer state; each rank writes its shards
        rng/rank_00000.safetensors   torch CPU / accelerator / python / numpy RNG of each rank
        state.json      loop state, scheduler, grad scaler, resolved config, world and batching
        hf/             with --checkpoint_type FULL_STATE_DICT: the adapter (PEFT format) or the
                        model (Hugging Face format) that `shardtune convert` would write, for
                        from_pretrained as it is
        shardtune_manifest.json      written last: the directory is complete
    best -> step_000100   (with validation: the step with the lowest eval loss)

Only tensors go into DCP (nothing pickled rides along); the rest is JSON and safetensors.
DCP reshards on load, so a checkpoint written at one world size loads at another.
All ranks must see one filesystem for the root (as for any DCP checkpoint).
"""
from __future__ import annotations

import contextlib
import json
import random
import re
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)

from ..device import Dist
from ..errors import UserError
from . import manifest

STEP_DIR = re.compile(r"^step_(\d+)$")
BEST = "best"
# PEFT: only the adapter is trainable, so only the adapter is saved (the base is on disk).
DCP_OPTIONS = StateDictOptions(ignore_frozen_params=True)
FORMAT = 1


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


@dataclass(frozen=True)
class ModelRef:
    path: str  # the base model directory the run was trained from
    config_sha256: str  # its config.json's fingerprint: a resume must use the same model


@dataclass
class RunState:
    """state.json: what a step checkpoint carries besides its tensors (rank 0 writes it)."""

    loop: dict  # loop.LoopState's fields
    scheduler: dict  # the LR scheduler's state_dict (LambdaLR holds {} per lambda: JSON)
    lrs: list[float]  # each param group's LR for the next step
    grad_scaler: Optional[dict]  # fp16's scaler state
    world_size: int
    global_batch: int  # samples per step, all ranks: the unit of the data position
    micro_batch: int
    accumulation: int
    model: ModelRef
    peft_method: Optional[str]  # None: full fine-tuning
    config: dict  # every config, by class name: what `shardtune convert` rebuilds the model from
    schedule: dict = field(default_factory=lambda: {"lr_scheduler": "step"})  # before --lr_scheduler: StepLR
    wandb_run_id: Optional[str] = None

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, **asdict(self)}, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, data: dict) -> "RunState":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["model"] = ModelRef(**values["model"])
        return cls(**values)


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    info: RunState


def complete_steps(run_dir: Path) -> list[Path]:
    """Complete step checkpoints, oldest first."""
    if not run_dir.is_dir():
        return []
    found = []
    for entry in run_dir.iterdir():
        match = STEP_DIR.match(entry.name)
        if match and entry.is_dir() and manifest.read_manifest(entry) is not None:
            found.append((int(match.group(1)), entry))
    return [path for _, path in sorted(found)]


def open_checkpoint(path: Path) -> Checkpoint:
    path = Path(path)
    if manifest.read_manifest(path) is None:
        raise UserError(f"{path} is not a complete shardtune checkpoint (no matching {manifest.MANIFEST}); "
                        "pass a step_NNNNNN directory, or --resume auto for the newest complete one")
    try:
        info = json.loads((path / "state.json").read_text())
    except (OSError, ValueError):
        raise UserError(f"{path}/state.json is unreadable; pass another checkpoint") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        found = info.get("format") if isinstance(info, dict) else None
        raise UserError(f"{path} was written by another shardtune checkpoint format ({found}); "
                        "resume it with the version that wrote it")
    try:
        state = RunState.from_json(info)
        step = int(state.loop["step"])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{path}/state.json lacks fields a checkpoint has; pass another checkpoint") from None
    return Checkpoint(path.resolve(), step, state)


# ---- RNG ----------------------------------------------------------------------------

def _rng_tensors(device: torch.device) -> dict[str, torch.Tensor]:
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    out = {
        "torch": torch.get_rng_state(),
        "python": torch.tensor([version, *words, -1 if gauss is None else 0], dtype=torch.int64),
        "python_gauss": torch.tensor([0.0 if gauss is None else gauss], dtype=torch.float64),
        "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
        "numpy_rest": torch.tensor([pos, has_gauss], dtype=torch.int64),
        "numpy_gauss": torch.tensor([cached], dtype=torch.float64),
    }
    if device.type != "cpu":
        out["accelerator"] = torch.get_device_module(device).get_rng_state(device)
    return out


def _set_rng(tensors: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(tensors["torch"])
    words = tensors["python"].tolist()
    gauss = None if words[-1] == -1 else tensors["python_gauss"].item()
    random.setstate((words[0], tuple(words[1:-1]), gauss))
    pos, has_gauss = tensors["numpy_rest"].tolist()
    np.random.set_state(("MT19937", tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss,
                         tensors["numpy_gauss"].item()))
    if device.type != "cpu" and "accelerator" in tensors:
        torch.get_device_module(device).set_rng_state(tensors["accelerator"], device)


def restore_rng(ckpt: Checkpoint, dist: Dist) -> bool:
    """This rank's RNG as saved; at another world size rank r takes the saved rank
    r mod old_world (exactness is then per-step loss, not per-rank random streams)."""
    saved_world = ckpt.info.world_size
    rank = dist.rank % saved_world
    _set_rng(load_file(ckpt.path / "rng" / f"rank_{rank:05d}.safetensors"), dist.device)
    return saved_world == dist.world_size


# ---- save / load ----

@contextlib.contextmanager
def _single_process_quiet():
    # DCP warns that it "assumes the intent" when no process group exists: it is ours.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def trainable_parameters(model) -> dict[str, torch.Tensor]:
    """Trainable parameters by their unwrapped name (DDP's `module.` removed), detached
    views of the live storage (DTensor shards under FSDP2), so DCP saves from them and loads
    into them in place. Not model.state_dict(): quantized base layers (bitsandbytes) run
    save hooks there that need state their frozen weights never got."""
    out = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            out[name[len("module."):] if name.startswith("module.") else name] = param.detach()
    return out


def _tensor_state(model, optimizer) -> tuple[dict, dict]:
    optim_sd = get_optimizer_state_dict(model, optimizer, options=DCP_OPTIONS)
    return {"model": trainable_parameters(model), "optim": optim_sd["state"]}, optim_sd


def save(run_dir: Path, step: int, model, optimizer, info: RunState, dist: Dist,
         export: Callable[[Path | None], None] | None = None) -> Path:
    """Collective: every rank writes its shards and RNG into a hidden temporary; rank 0
    adds state.json and the manifest and publishes it with one rename. export(directory),
    also collective, writes hf/ (rank 0 gets the directory, the others None)."""
    final = run_dir / step_dir_name(step)
    tmp = manifest.temporary_for(final)
    if dist.is_main:
        manifest.remove_now(tmp)
        (tmp / "rng").mkdir(parents=True)
    dist.barrier()
    state, _ = _tensor_state(model, optimizer)
    with _single_process_quiet():
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp / "dcp"), sync_files=True))
    save_file(_rng_tensors(dist.device), tmp / "rng" / f"rank_{dist.rank:05d}.safetensors")
    if export is not None:
        export(tmp / "hf" if dist.is_main else None)
    dist.barrier()
    if dist.is_main:
        (tmp / "state.json").write_text(info.to_json())
        manifest.write_manifest(tmp, {"step": step})
        manifest.publish(tmp, final)
    dist.barrier()
    return final


def load(ckpt: Checkpoint, model, optimizer) -> None:
    """Collective: fill the (sharded) trainable parameters and optimizer state in place."""
    state, optim_sd = _tensor_state(model, optimizer)
    try:
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=str(ckpt.path / "dcp"))
    except Exception as err:  # DCP wraps per-rank failures; the cause is what the user can act on
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load {ckpt.path}: {first[:300]}; it was written for another model or "
                        "PEFT config") from None
    # the parameters were loaded in place; the optimizer state is mapped back from names
    set_optimizer_state_dict(model, optimizer, {"state": state["optim"], "param_groups": optim_sd["param_groups"]},
                             options=DCP_OPTIONS)
    optimizer.zero_grad(set_to_none=True)  # get_optimizer_state_dict initialised empty state with zero grads


# ---- retention ----------------------------------------------------------------------

def best_target(run_dir: Path) -> Path | None:
    link = run_dir / BEST
    return link.resolve() if link.is_symlink() and link.resolve().is_dir() else None


def point_best(run_dir: Path, step_dir: Path) -> None:
    """best -> step_dir, replaced atomically (a symlink swapped in with one rename)."""
    tmp = run_dir / f"{manifest.TMP_PREFIX}{BEST}"
    manifest.remove_now(tmp)
    tmp.symlink_to(step_dir.name)
    tmp.replace(run_dir / BEST)
    manifest.fsync_dir(run_dir)


def prune(run_dir: Path, keep: int) -> list[Path]:
    """Keep the newest `keep` complete step checkpoints (0 = all) and the best one."""
    if keep <= 0:
        return []
    steps = complete_steps(run_dir)
    best = best_target(run_dir)
    removed = []
    for path in steps[:-keep]:
        if best is None or path.resolve() != best:
            manifest.remove(path)
            removed.append(path)
    return removed
