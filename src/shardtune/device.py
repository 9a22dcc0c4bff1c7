"""The one device abstraction: which device this rank uses and how it talks to peers.

Everything device-specific goes through `torch.accelerator` (CUDA, XPU, ...) or the CPU
fallback here, so no other module branches on the device type.
"""
from __future__ import annotations

import datetime
import gc
import os
import resource
import sys
import uuid
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
# Imported before any process group exists, on purpose: torch.distributed.fsdp has
# `group=dist.group.WORLD` default arguments, which would hold the live group if imported
# after init_process_group (transformers imports it lazily). See _compat.release_device_meshes for why
# no hidden reference to a group may outlive teardown.
import torch.distributed.fsdp  # noqa: F401

from . import _compat
from .errors import UserError


@dataclass(frozen=True)
class Dist:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device
    backend: str
    timeout_s: int = 1800  # how long a collective waits for peers (--dist_timeout)
    # Names this launch, the same on every rank and new at every launch (a plain torchrun's
    # run id is "none" each time), so files a launch leaves are never taken for this one's.
    launch: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_accelerator(self) -> bool:
        return self.device.type != "cpu"

    def supports_fast_bf16(self) -> bool:
        # CPUs without bf16 units run bf16 matmuls ~70x slower than fp32.
        if not self.is_accelerator:
            return False
        mod = getattr(torch, self.device.type, None)
        check = getattr(mod, "is_bf16_supported", None)
        return bool(check()) if check else True

    def device_name(self) -> str:
        """The accelerator's marketing name ("NVIDIA H100 80GB HBM3"), or "cpu"."""
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return self.device.type

    def synchronize(self) -> None:
        if self.is_accelerator:
            torch.accelerator.synchronize(self.device)

    def reset_peak_memory(self) -> None:
        if self.is_accelerator:
            torch.accelerator.reset_peak_memory_stats(self.device)

    def peak_memory_bytes(self) -> int:
        """Peak accelerator memory allocated, or the process's peak RSS on CPU."""
        if self.is_accelerator:
            return int(torch.accelerator.max_memory_allocated(self.device))
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(kib if sys.platform == "darwin" else kib * 1024)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def on_main(self, check: Callable[[], None]) -> None:
        """Run a check on rank 0 only (filesystem claims, ...); a UserError it raises
        stops every rank with the reason, instead of leaving the others at the next
        collective."""
        failure = None
        if self.is_main:
            try:
                check()
            except UserError as err:
                failure = err
        if self.distributed:
            box = [str(failure) if failure else None]
            dist.broadcast_object_list(box, src=0)
            if box[0] and not self.is_main:
                raise UserError(f"rank 0 stopped the run: {box[0]}")
        if failure:
            raise failure


def _launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"))


def _refuse_srun_copies() -> None:
    """`srun python -m shardtune.finetuning` on N tasks starts N unrelated single-process runs.

    SLURM_STEP_NUM_TASKS is set by srun only; SLURM_NTASKS alone is also set in the batch
    script itself, where a plain command runs once."""
    tasks = os.environ.get("SLURM_STEP_NUM_TASKS", "")
    if tasks.isdigit() and int(tasks) > 1:
        raise UserError(
            f"srun started {tasks} independent copies of this run (no torchrun variables), which would "
            "all train alone and write one output_dir; run `srun torchrun ...` with one task per node, "
            "as scripts/multi_node.slurm does"
        )


def setup(require_distributed: bool = False, timeout_s: int = 1800) -> Dist:
    """Pick the device from LOCAL_RANK and start the process group when launched by torchrun."""
    if not _launched_by_torchrun():
        _refuse_srun_copies()
        if require_distributed:
            raise UserError(
                "--enable_fsdp needs a distributed launch; run it with "
                "`torchrun --nnodes 1 --nproc_per_node N -m shardtune.finetuning ...`"
            )
        device = _device_for(0)
        return Dist(0, 0, 1, 1, device, backend_for(device.type) if dist.is_available() else "", timeout_s)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])  # not RANK: on node 2, rank 8 is GPU 0
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    device = _device_for(local_rank)
    backend = backend_for(device.type)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if device.type != "cpu" else None)
    launch = [uuid.uuid4().hex]
    dist.broadcast_object_list(launch, src=0)  # at start, where every rank is anyway
    return Dist(rank, local_rank, world, local_world, device, backend, timeout_s, launch[0])


def backend_for(device_type: str) -> str:
    """The process-group backend for a device type: gloo on CPU; on an accelerator its own
    backend (NCCL, XCCL, ...) for its tensors plus gloo for CPU tensors. CPU tensors do reach
    collectives there: gradients and their norm under --fsdp_cpu_offload, the final save's
    gathers of offloaded shards, asynchronous checkpoints and object collectives. An
    accelerator-only group fails those with "No backend type associated with device type cpu"
    (torchtune passes the same pair). parallel.build_mesh gives the HSDP sub-groups the same."""
    if device_type == "cpu":
        return "gloo"
    return f"{device_type}:{dist.get_default_backend_for_device(device_type)},cpu:gloo"


def _device_for(local_rank: int) -> torch.device:
    if os.environ.get("SHARDTUNE_DEVICE") == "cpu" or not torch.accelerator.is_available():
        return torch.device("cpu")
    acc = torch.accelerator.current_accelerator()
    count = torch.accelerator.device_count()
    if local_rank >= count:
        raise UserError(
            f"local rank {local_rank} has no {acc.type} device ({count} visible); "
            f"use --nproc_per_node {count} or fewer"
        )
    torch.accelerator.set_device_index(local_rank)
    return torch.device(acc.type, local_rank)


def teardown() -> None:
    """End the process group so that its backend threads are joined before interpreter exit."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()  # the model and its FSDP state, which hold the groups, are cyclic garbage
        _compat.release_device_meshes()
        dist.destroy_process_group()


