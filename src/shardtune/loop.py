"""Train stage: the explicit loop, evaluation, and the per-epoch summary.

What is trained is an Objective: supervised fine-tuning's token cross-entropy (TokenLoss,
here) or a preference loss (preference.py). Loss normalisation: each micro-batch
contributes its loss sum / (the objective's count over the whole optimizer step, all ranks)
* world_size; the count is target tokens for TokenLoss and pairs for preference losses.
FSDP2 and DDP average gradients over ranks, so the world_size factor turns that average
back into a sum, and the step's gradient is that of the mean loss over the global batch,
whatever the world size or accumulation split.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Optional, Protocol

import torch
import torch.distributed as tdist
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from .device import Dist
from .errors import UserError
from .metrics.logs import MetricsWriter, perplexity
from .modeling.loss import token_loss_sum
from .parallel import release_gathered
from .metrics.throughput import ModelFlops, mfu

log = logging.getLogger(__name__)


@dataclass
class LoopState:
    """Everything the loop needs to continue: small and JSON-serialisable, for checkpoints."""

    epoch: int = 0  # the epoch in progress, 0-based
    step: int = 0  # optimizer steps done in the run
    samples_in_epoch: int = 0  # global samples of this epoch already trained on: the data position
    epoch_loss_sum: float = 0.0  # this epoch's sum of step loss x step target tokens
    epoch_targets: float = 0.0
    epoch_tokens: int = 0  # tokens processed this epoch, all ranks
    best_eval_loss: Optional[float] = None
    best_step: Optional[int] = None

    @property
    def epoch_loss(self) -> float:
        return self.epoch_loss_sum / self.epoch_targets if self.epoch_targets else float("nan")

    def end_epoch(self) -> None:
        self.epoch += 1
        self.samples_in_epoch, self.epoch_loss_sum, self.epoch_targets, self.epoch_tokens = 0, 0.0, 0.0, 0


class Objective(Protocol):
    """What a recipe trains. counts(batch): host-side counts of a micro-batch, the first being
    what the loss is averaged over. loss(...) -> (the micro-batch's share of the step loss,
    scaled by world for backward; detached sums [loss numerator, *stat_names]), given the
    step's global counts. The step's loss and stats are those sums over the global count."""

    count_name: str  # what counts()[0] counts: "targets", "pairs"
    stat_names: tuple[str, ...]  # per-step means logged besides the loss

    def counts(self, batch: dict) -> list[float]: ...

    def loss(self, model, batch: dict, device: torch.device, global_counts: torch.Tensor,
             world: int) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class TokenLoss:
    """Supervised fine-tuning: the mean next-token cross-entropy over target tokens."""

    mask_from_positions: bool = False  # one example per row + attention_mask (prefix tuning)
    count_name: str = "targets"
    stat_names: tuple[str, ...] = ()

    def counts(self, batch: dict) -> list[float]:
        return [batch["num_targets"]]

    def loss(self, model, batch, device, global_counts, world):
        loss_sum = token_loss_sum(model, batch, device, self.mask_from_positions)
        return loss_sum * (world / global_counts[0]), loss_sum.detach()[None]


class NonFiniteError(UserError):
    """A non-finite loss or gradient norm: the run stops before anything is saved from it."""


@dataclass
class LoopConfig:
    accum: int
    world: int
    max_train_step: int
    max_eval_step: int
    grad_clip: float | None
    log_every: int
    autocast_dtype: torch.dtype | None = None  # mixed precision without FSDP
    flops: ModelFlops | None = None  # counts a batch's model FLOPs; None: no MFU
    peak_flops: float = 0.0  # FLOP/s of all ranks' devices together; 0 = unknown, no MFU
    mask_from_positions: bool = False  # one example per row + attention_mask (prefix tuning)
    global_batch: int = 0  # samples per optimizer step, all ranks: advances the data position
    defer_grad_reduce: bool = True  # accumulate unreduced gradients until the last micro-batch (see _grad_sync)
    objective: Optional[Objective] = None  # None: TokenLoss(mask_from_positions)

    def trained(self) -> Objective:
        return self.objective or TokenLoss(self.mask_from_positions)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def _to_device(count: float, device: torch.device) -> torch.Tensor:
    return torch.tensor(float(count)).to(device, non_blocking=True)


def _to_device_vector(counts: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor([float(c) for c in counts]).to(device, non_blocking=True)


def _all_reduce(t: torch.Tensor, dist: Dist) -> torch.Tensor:
    if dist.distributed:
        tdist.all_reduce(t)
    return t


def _grad_sync(model: torch.nn.Module, last: bool, defer: bool):
    """Gradient reduction on accumulating micro-batches (all but the last of a step).

    DDP: skip the all-reduce (no_sync); each rank holds full gradients either way.
    FSDP2, defer (PEFT): skip the reduce-scatter too. The unsharded gradients kept until the
    last micro-batch are the adapter's, a few MB, and the communication is saved.
    FSDP2, not defer (full fine-tuning): reduce-scatter after every micro-batch, as torchtune
    does. Deferring would keep every layer's unsharded fp32 gradient alive on every rank until
    the last micro-batch (+4 bytes per parameter: ~28 GB for 7B). Only HSDP's all-reduce
    across replicas waits for the last micro-batch; on a 1-D mesh there is none to skip."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        if defer:
            model.set_requires_gradient_sync(last)
        else:
            model.set_requires_gradient_sync(True)
            model.set_requires_all_reduce(last)
        return contextlib.nullcontext()
    if hasattr(model, "no_sync") and not last:  # DDP
        return model.no_sync()
    return contextlib.nullcontext()


def train_epoch(model, loader, optimizer, dist: Dist, cfg: LoopConfig, state: LoopState, metrics: MetricsWriter,
                scaler=None, before_step: Callable | None = None,
                after_step: Callable[[LoopState, Callable[[], None]], bool] | None = None) -> bool:
    """Train from the sampler's position to the end of the epoch (or max_train_step),
    keeping the running totals in `state`. Returns True when after_step asked to stop.

    scaler: fp16's torch.amp.GradScaler / ShardedGradScaler. before_step(model, state): after
    backward, before the optimizer step. after_step(state, sync) -> stop?: after each optimizer
    step; sync() logs the pending steps (and runs the non-finite guard) before anything is saved."""
    model.train()
    steps = len(loader) // cfg.accum  # before iter(): workers prefetch from the sampler
    it = iter(loader)
    if cfg.max_train_step:
        steps = min(steps, max(cfg.max_train_step - state.step, 0))
    autocast = _autocast(dist.device, cfg.autocast_dtype)
    objective = cfg.trained()
    # per step: [local loss share, global count, grad norm, local tokens, local model FLOPs, local stat shares];
    # reduced every log_every steps, so the loop never waits on the host between those
    pending: list[torch.Tensor] = []
    lrs: list[float] = []  # the LR each pending step used (host floats: no device sync)
    bar = tqdm(total=steps, desc=f"epoch {state.epoch + 1}", disable=not dist.is_main, dynamic_ncols=True)
    # Throughput is measured over the pending window: the reduce below is the only point
    # where the host knows the device has finished those steps.
    window_start = time.perf_counter()

    def flush() -> None:
        if not pending:
            return
        stacked = torch.stack(pending)
        stacked[:, 1:3] /= cfg.world  # every rank carries the same global count and norm
        vals = _all_reduce(stacked, dist).tolist()
        elapsed = time.perf_counter() - window_start
        tokens_per_s = sum(v[3] for v in vals) / elapsed
        step_mfu = mfu(sum(v[4] for v in vals) / elapsed, cfg.peak_flops)
        speed = {"tokens_per_s": tokens_per_s, **({"mfu": step_mfu} if step_mfu is not None else {}),
                 "peak_memory_mib": round(dist.peak_memory_bytes() / 2**20, 1)}  # see Dist.peak_memory_bytes
        step_lrs = lrs[:]
        pending.clear()
        lrs.clear()
        first = state.step - len(vals) + 1
        for k, ((loss, n, norm, tokens, _, *stats), lr) in enumerate(zip(vals, step_lrs)):
            _check_finite(first + k, loss, norm, cfg, scaled=scaler is not None)
            state.epoch_loss_sum += loss * n
            state.epoch_targets += n
            state.epoch_tokens += int(tokens)
            fields = {"perplexity": perplexity(loss)} if not stats else dict(zip(objective.stat_names, stats))
            metrics.write("step", epoch=state.epoch + 1, step=first + k, loss=loss, **fields,
                          **{objective.count_name: int(n)}, lr=lr, grad_norm=norm, **speed)
        postfix = {"loss": f"{vals[-1][0]:.4f}", "tok/s": f"{tokens_per_s:.0f}"}
        if step_mfu is not None:
            postfix["mfu"] = f"{step_mfu:.1%}"
        bar.set_postfix(postfix)

    stopped = False
    for _ in range(steps):
        micro = [next(it) for _ in range(cfg.accum)]
        # counted by the collate on the host; non_blocking: a copy from host memory does not
        # wait for the device to finish queued work, so the step never stalls on these
        counts = [sum(c) for c in zip(*(objective.counts(b) for b in micro))]
        n_global = _all_reduce(_to_device_vector(counts, dist.device), dist).clamp_min(1.0)
        tokens_local = _to_device(sum(b["num_tokens"] for b in micro), dist.device)
        flops = sum(cfg.flops.of_batch(b["num_tokens"], b["num_targets"], b["num_attention_pairs"])
                    for b in micro) if cfg.flops else 0.0
        flops_local = _to_device(flops, dist.device)
        step_sums = torch.zeros(1 + len(objective.stat_names), device=dist.device)
        for i, batch in enumerate(micro):
            with _grad_sync(model, i == cfg.accum - 1, cfg.defer_grad_reduce), autocast:
                loss, sums = objective.loss(model, batch, dist.device, n_global, cfg.world)
            (scaler.scale(loss) if scaler else loss).backward()
            step_sums += sums
        if before_step:
            before_step(model, state)
        lrs.append(optimizer.param_groups[0]["lr"])
        norm = optimizer_step(model, optimizer, scaler, cfg.grad_clip)
        state.step += 1
        state.samples_in_epoch += cfg.global_batch
        step_means = step_sums / n_global[0]
        pending.append(torch.cat([torch.stack([step_means[0], n_global[0], norm.to(n_global), tokens_local,
                                               flops_local]), step_means[1:]]))
        bar.update(1)
        if len(pending) >= cfg.log_every:
            flush()
        if after_step and after_step(state, flush):
            stopped = True
            break
        if not pending:  # flushed: the next window starts now, after any evaluation or checkpoint
            window_start = time.perf_counter()
    flush()
    bar.close()
    return stopped


def _check_finite(step: int, loss: float, norm: float, cfg: LoopConfig, scaled: bool) -> None:
    """Every rank sees the same reduced values, so every rank stops at the same step.
    With fp16's grad scaler (scaled) an inf step is skipped and the scale backs off instead."""
    if scaled:
        return
    if not math.isfinite(loss):
        what = f"the loss is {loss}"
    elif cfg.grad_clip and not math.isfinite(norm):
        what = f"the gradient norm is {norm}"
    else:
        return
    raise NonFiniteError(f"step {step}: {what}; training stopped and nothing from this state was saved")


def all_finite(params, dist: Dist) -> bool:
    """True when every (local shard of every) parameter is finite on every rank."""
    bad = torch.zeros((), device=dist.device)
    for p in params:
        local = p.to_local() if isinstance(p, DTensor) else p
        bad += (~torch.isfinite(local.detach())).any()
    return _all_reduce(bad, dist).item() == 0


def optimizer_step(model, optimizer, scaler, grad_clip: float | None) -> torch.Tensor:
    """Clip (global norm over all shards) and step; with a scaler, a step whose gradients
    hold inf/nan on any rank is skipped on every rank and the scale backs off. Returns the
    pre-clip global gradient norm, still on the device (no host sync)."""
    if scaler:
        scaler.unscale_(optimizer)
    params = [p for p in model.parameters() if p.requires_grad]
    if grad_clip:
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if isinstance(norm, DTensor):  # FSDP2: the norm of the local shards, reduced here
        norm = norm.full_tensor()
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def eval_mode(model: torch.nn.Module) -> None:
    model.eval()
    # bitsandbytes repacks 4-bit weights into an inference-only CPU layout the first time
    # a module runs in eval mode without grad, and training afterwards silently stops
    # updating; keep its layers in training layout (they have no dropout of their own).
    for m in model.modules():
        if type(m).__name__ == "Linear4bit":
            m.training = True


@torch.no_grad()
def evaluate(model, loaders, dist: Dist, cfg: LoopConfig) -> tuple[float, dict[str, float], dict[str, float]]:
    """The objective's loss over the whole split (or max_eval_step batches of each part),
    weighted by its count (target tokens, pairs), and its stats' means. `loaders` is one
    DataLoader or {part: DataLoader} (a mixture's components); the third value is each
    part's own loss when there are several."""
    eval_mode(model)
    autocast = _autocast(dist.device, cfg.autocast_dtype)
    objective = cfg.trained()
    parts = loaders if isinstance(loaders, dict) else {"": loaders}
    totals = torch.zeros(len(parts), 2 + len(objective.stat_names), dtype=torch.float64, device=dist.device)
    for row, loader in zip(totals, parts.values()):
        for i, batch in enumerate(tqdm(loader, desc="eval", disable=not dist.is_main, dynamic_ncols=True)):
            if cfg.max_eval_step and i >= cfg.max_eval_step:
                break
            counts = objective.counts(batch)
            with autocast:
                _, sums = objective.loss(model, batch, dist.device,
                                         _to_device_vector(counts, dist.device).clamp_min(1.0), 1)
            row[0] += sums[0].double()
            row[1] += counts[0]
            row[2:] += sums[1:].double()
    release_gathered(model)  # FSDP2 units that stay gathered after a forward wait for a backward
    _all_reduce(totals, dist)  # one collective for every part
    by_part = {name: (s / n if n else float("nan")) for name, (s, n) in zip(parts, totals[:, :2].tolist())}
    loss_sum, n, *stat_sums = totals.sum(0).tolist()
    if not n:
        return float("nan"), {}, {}
    stats = {name: v / n for name, v in zip(objective.stat_names, stat_sums)}
    return loss_sum / n, stats, by_part if len(parts) > 1 else {}


def peak_memory_all_ranks(dist: Dist) -> list[int]:
    mine = dist.peak_memory_bytes()
    if not dist.distributed:
        return [mine]
    out = [0] * dist.world_size
    tdist.all_gather_object(out, mine)
    return out


