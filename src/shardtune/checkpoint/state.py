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

The shards are written in the background (StepWriter): training stalls only while they are
copied to host memory, and the directory appears once every rank's write has finished.
Only tensors go into DCP (nothing pickled rides along); the rest is JSON and safetensors.
DCP reshards on load, so a checkpoint written at one world size loads at another.
All ranks must see one filesystem for the root (as for any DCP checkpoint).
"""
from __future__ import annotations

import contextlib
import json
import logging
import random
import re
import warnings
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field, fields
from datetime import timedelta
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as tdist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.staging import BlockingAsyncStager
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.tensor import DTensor

from ..device import Dist
from ..errors import UserError
from . import manifest

log = logging.getLogger("shardtune.finetuning")

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
    data: Optional[str] = None  # data.split_identity of the train split (None: unknown, or older checkpoints)

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


@dataclass
class _Pending:
    """A step checkpoint whose shards are being written: `published` resolves (on rank 0,
    from the writer thread) once every rank's write finished and the directory is in place."""

    final: Path
    upload: Future  # this rank's DCP write
    published: Optional[Future]  # rank 0: the directory published and retention applied


class StepWriter:
    """Step checkpoints that stall training only for a copy. The trainable parameters and
    the optimizer state are copied to host memory at the step (DCP async_save stages them
    before it returns) and written by a background thread while training goes on; RNG,
    state.json and hf/ are written at the step too. Rank 0 publishes the directory (manifest,
    rename, then best/ and pruning) as soon as DCP's write has finished on every rank: the
    coordinator's write returns only after every rank reported its files written.

    At most one checkpoint is in flight: `finish` (collective) waits for it, at the next
    checkpoint and wherever the run must see it published (the end of fit, a stop, a
    non-finite stop). background=False writes before `start` returns, as DCP save does."""

    def __init__(self, dist: Dist, background: bool) -> None:
        self.dist, self.background = dist, background
        self._pending: Optional[_Pending] = None
        self._group = None
        if background and dist.distributed:
            # DCP's collectives run in the writer thread while training's run on the default
            # group: one group used from two threads would interleave their messages
            self._group = tdist.new_group(backend="gloo", timeout=timedelta(seconds=dist.timeout_s))
        elif background:
            _quiet_single_process_saves()

    def start(self, run_dir: Path, step: int, model, optimizer, info: RunState,
              export: Callable[[Path | None], None] | None = None, best: bool = False, keep: int = 0) -> None:
        """Collective: checkpoint the step into a hidden temporary that rank 0 publishes as
        step_NNNNNN once written. export(directory), also collective, writes hf/ (rank 0 gets
        the directory, the others None). best: point best/ at it; keep: see prune."""
        if self._pending is not None:
            raise RuntimeError("finish() the checkpoint in flight before starting another")
        final = run_dir / step_dir_name(step)
        tmp = manifest.temporary_for(final)
        if self.dist.is_main:
            manifest.remove_now(tmp)
            (tmp / "rng").mkdir(parents=True)
        self.dist.barrier()
        # Everything but the shards is on disk before this rank's write begins, so a finished
        # write on every rank means a complete directory.
        save_file(_rng_tensors(self.dist.device), tmp / "rng" / f"rank_{self.dist.rank:05d}.safetensors")
        if export is not None:
            export(tmp / "hf" if self.dist.is_main else None)
        if self.dist.is_main:
            (tmp / "state.json").write_text(info.to_json())
        upload = self._write_shards(_tensor_state(model, optimizer)[0], tmp / "dcp")
        published = None
        if self.dist.is_main:
            published = Future()
            upload.add_done_callback(lambda written: _publish(written, tmp, final, step, best, keep, published))
        self._pending = _Pending(final, upload, published)

    def finish(self) -> Optional[Path]:
        """Collective: wait until the checkpoint in flight is published; its path (None when
        none was in flight). A failed write or publish stops every rank with its cause."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        _wait(pending.upload, pending.final)  # DCP hands every rank the failure of any rank's write
        self.dist.on_main(lambda: _wait(pending.published, pending.final))  # and rank 0's, to all
        return pending.final

    def close(self) -> Optional[Path]:
        """Collective: finish, then release the checkpoint group (no reference to it may
        outlive the process group's teardown). The published path, as finish."""
        published = self.finish()
        if self._group is not None:
            tdist.destroy_process_group(self._group)
            self._group = None
        return published

    def _write_shards(self, state: dict, directory: Path) -> Future:
        writer = dcp.FileSystemWriter(str(directory), sync_files=True)
        if self.background:
            stager = _HostCopy()
            upload = dcp.async_save(state, storage_writer=writer, process_group=self._group, async_stager=stager)
            upload.add_done_callback(lambda _: stager.release())
            return upload
        done: Future = Future()
        with _single_process_quiet():
            done.set_result(dcp.save(state, storage_writer=writer))
        return done


class _HostCopy(BlockingAsyncStager):
    """The state on the host, one copy per tensor, before async_save returns. DCP's own staging
    copies a DTensor whole (deepcopy, or a device-to-host copy) and then once more into a fresh
    buffer: twice the stall."""

    def __init__(self) -> None:
        super().__init__()
        self.staged: dict = {}

    def stage(self, state_dict: dict) -> dict:
        self.staged = _host_copy(state_dict)
        return self.staged

    def release(self) -> None:
        """Free the copy once written: DCP's worker thread holds it (its task's arguments)
        until all the write's callbacks have run, which can be well into the next save."""
        self.staged.clear()


def _host_copy(value):
    if isinstance(value, DTensor):
        local = value.to_local().to("cpu", copy=True)
        return DTensor.from_local(local, value.device_mesh, value.placements, run_check=False, shape=value.shape,
                                  stride=value.stride())
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: _host_copy(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_host_copy(item) for item in value)
    return value  # the optimizer's Python numbers


def _publish(written: Future, tmp: Path, final: Path, step: int, best: bool, keep: int, published: Future) -> None:
    """Rank 0, when its write completes (in the writer thread, or the caller's when synchronous):
    every rank's shards are on disk then, so the directory is complete."""
    try:
        written.result()
        manifest.write_manifest(tmp, {"step": step})
        manifest.publish(tmp, final)
        if best:
            point_best(final.parent, final)
        prune(final.parent, keep)
        log.info("checkpoint step %d written to %s", step, final)
        published.set_result(final)
    except BaseException as err:  # raised by finish() in the training thread
        published.set_exception(err)


def _wait(future: Future, final: Path) -> None:
    try:
        future.result()
    except Exception as err:
        raise UserError(f"step checkpoint {final} was not written: {_first_line(err)}") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


def _quiet_single_process_saves() -> None:
    # DCP warns on every save without a process group that it assumes one process: that is
    # ours. The warning comes from the writer thread, where catch_warnings (process-wide
    # state, not thread-safe) cannot scope it, so the filter is installed for the process.
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")


def load(ckpt: Checkpoint, model, optimizer) -> None:
    """Collective: fill the (sharded) trainable parameters and optimizer state in place."""
    state, optim_sd = _tensor_state(model, optimizer)
    try:
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=str(ckpt.path / "dcp"))
    except Exception as err:  # DCP wraps per-rank failures; the cause is what the user can act on
        raise UserError(f"cannot load {ckpt.path}: {_first_line(err)}; it was written for another model or "
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
