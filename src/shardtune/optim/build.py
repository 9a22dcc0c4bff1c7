"""The optimizer, the learning-rate schedule and the fp16 grad scaler, built from the configs."""
from __future__ import annotations

import torch

from ..config.schema import Configs
from ..device import Dist
from ..parallel import Precision
from .anyprecision import AnyPrecisionAdamW

# name -> transformers' schedule (None: llama-recipes' StepLR, stepped once per epoch)
SCHEDULERS = {"step": None, "cosine": "get_cosine_schedule_with_warmup",
              "linear": "get_linear_schedule_with_warmup", "constant": "get_constant_schedule_with_warmup"}


def build_optimizer(params, cfgs: Configs, dist: Dist) -> torch.optim.Optimizer:
    t, f = cfgs.train, cfgs.fsdp
    if f.optimizer.lower() == "anyprecision":
        # fp32 moments; Kahan compensation matters for bf16 weights (pure_bf16)
        return AnyPrecisionAdamW(params, lr=t.lr, weight_decay=t.weight_decay,
                                 momentum_dtype=torch.float32, variance_dtype=torch.float32,
                                 use_kahan_summation=True)
    # Fused AdamW where the parameters and their state live on an accelerator: one kernel for
    # all parameters, and its step counters stay on the device, so a step never reads one back
    # to the host (the default implementations call .item() on a host counter per step). On
    # CPU, and with --fsdp_cpu_offload (CPU shards), the default stays: CPU runs keep their numbers.
    fused = dist.is_accelerator and not f.fsdp_cpu_offload
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, **({"fused": True} if fused else {}))


def total_steps(cfgs: Configs, steps_per_epoch: int) -> int:
    """Optimizer steps the whole run will take: what cosine and linear decay over."""
    t = cfgs.train
    planned = t.num_epochs * steps_per_epoch
    return min(t.max_train_step, planned) if t.max_train_step else planned


def build_scheduler(optimizer, cfgs: Configs, steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    t = cfgs.train
    if t.lr_scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=t.gamma)
    import transformers

    make = getattr(transformers, SCHEDULERS[t.lr_scheduler])
    if t.lr_scheduler == "constant":
        return make(optimizer, num_warmup_steps=t.warmup_steps)
    return make(optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=total_steps(cfgs, steps_per_epoch))


def schedule_info(cfgs: Configs, steps_per_epoch: int) -> dict:
    """What the scheduler was built from: its state_dict holds only counters (the lambdas
    are rebuilt from the config), so a resume must rebuild the same schedule."""
    t = cfgs.train
    return {"lr_scheduler": t.lr_scheduler, "warmup_steps": t.warmup_steps,
            "total_steps": total_steps(cfgs, steps_per_epoch)}


def build_grad_scaler(cfgs: Configs, dist: Dist, precision: Precision):
    if not precision.grad_scaler:
        return None
    if cfgs.train.enable_fsdp:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device=dist.device.type)  # syncs found-inf across shards
    return torch.amp.GradScaler(dist.device.type)
