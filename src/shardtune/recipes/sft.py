"""Fine-tune a decoder-only model (Llama, Mistral, Qwen, Gemma, ...) with PEFT and FSDP2:
the shardtune recipe.

    torchrun --nnodes 1 --nproc_per_node N -m shardtune.finetuning --enable_fsdp \
        --model_name DIR --use_peft --peft_method lora --output_dir OUT

Features and the flags that turn them on:
  * FSDP2 sharding per decoder layer ........ --enable_fsdp, --sharding_strategy, --hsdp
  * DDP (world size > 1 without FSDP) ....... torchrun without --enable_fsdp
  * PEFT through peft ....................... --use_peft --peft_method lora|llama_adapter|prefix,
                                              --lora_config.* / --llama_adapter_config.* / --prefix_config.*
  * full fine-tuning, first layers frozen ... (no --use_peft), --freeze_layers --num_freeze_layers
  * 8-bit / 4-bit (QLoRA) base weights ...... --quantization 8bit|4bit (bitsandbytes, one process);
                                              4bit with --enable_fsdp: NF4 base sharded by FSDP2 (torchao)
  * DoRA .................................... --lora_config.use_dora (any world size, with FSDP)
  * precisions .............................. --mixed_precision (bf16), --use_fp16 (grad scaler),
                                              --pure_bf16, --optimizer anyprecision (Kahan sums)
  * activation checkpointing ................ --fsdp_activation_checkpointing (with FSDP)
  * torch.compile per decoder layer ......... --compile (graph breaks reported, never silent)
  * CPU offload of shards ................... --fsdp_cpu_offload
  * gradient accumulation ................... --batch_size_training / --micro_batch_size,
                                              or --gradient_accumulation_steps (PEFT: reduced once per
                                              step; full fine-tuning: reduce-scattered per micro-batch)
  * gradient clipping (global norm) ......... --gradient_clipping --gradient_clipping_threshold
  * packing with per-example attention ...... --batching_strategy packing --context_length
  * validation each epoch (and every N steps)  --run_validation --val_batch_size --max_eval_step --eval_steps
  * step limit .............................. --max_train_step
  * learning-rate schedule .................. --lr_scheduler step|cosine|linear|constant, --warmup_steps, --gamma
  * metrics as JSON lines ................... --save_metrics (output_dir/metrics.jsonl)
  * TensorBoard, Weights & Biases, loss.png .. --use_tensorboard --tensorboard_dir, --use_wandb --wandb_config.*
  * tokens/s and MFU per step ............... --peak_tflops (detected for known GPUs)
  * step checkpoints (DCP, atomic) .......... --save_steps N, --save_total_limit K, best/ by eval loss
  * written while training continues ........ --async_checkpoint (default; False: synchronous)
  * from_pretrained-ready step checkpoints .. --checkpoint_type FULL_STATE_DICT (hf/ in each)
  * exact resume, also at another world size  --resume auto|PATH
  * preemption (SIGTERM, SIGUSR1) ........... always on: finish the step, checkpoint, exit 0
  * non-finite loss / grad norm guard ....... always on: stop, keep the last good checkpoint
  * output_dir protection ................... --overwrite_output_dir

Shape: setup (config -> data -> model+peft -> parallel -> optimizer -> resume) -> fit
(epochs of train + validate, step checkpoints, signals) -> save (final outputs).
"""
from __future__ import annotations

import copy
import faulthandler
import logging
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from .. import _compat, adapters, checkpoint, data, device, loop, parallel
from ..checkpoint import manifest, state as ckpt_state
from ..checkpoint.resume import (batching_for, check_resumable, check_same_data, check_schedule, checkpoint_dir,
                                 find_resume, model_fingerprint)
from ..config.parse import parse_args, usage
from ..config.schema import PEFT_METHODS, Configs
from ..config.validate import Batching, check_supported
from ..errors import UserError, exit_now, exit_on_user_error, take_debug_flag
from ..metrics import curve, sinks, throughput
from ..metrics.logs import MetricsWriter, perplexity, setup_logging
from ..modeling import load as model_lib, quant
from ..optim.build import build_grad_scaler, build_optimizer, build_scheduler, schedule_info
from ..preempt import StopRequest

log = logging.getLogger("shardtune.finetuning")


@dataclass
class Recipe:
    """Everything setup builds and fit trains; `state` is what a checkpoint carries."""

    cfgs: Configs  # resolved: derived choices made, the caller's object untouched
    dist: device.Dist
    batching: Batching
    spec: model_lib.ModelSpec
    tokenizer: object
    train_split: data.SplitData
    eval_split: Optional[data.SplitData]
    loader: torch.utils.data.DataLoader
    sampler: data.GlobalBatchSampler
    eval_loaders: dict[str, torch.utils.data.DataLoader]  # {component: loader} (data.eval_loaders); {} = none
    train_model: torch.nn.Module  # what runs forward/backward (FSDP/DDP-wrapped)
    peft_model: torch.nn.Module  # the unwrapped (PEFT) model
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loop_cfg: loop.LoopConfig
    state: loop.LoopState
    metrics: MetricsWriter
    run_dir: Path  # this run's step checkpoints
    epochs: list[dict] = field(default_factory=list)
    last_checkpoint: Optional[Path] = None  # the newest published step checkpoint
    last_eval: Optional[tuple[int, float]] = None  # (step, eval loss) of the latest evaluation
    grad_scaler: Optional[object] = None  # fp16's loss scaling
    before_step: Optional[Callable] = None  # before_step(model, state): see run
    graph_breaks: Optional[list[str]] = None  # --compile: the causes reported so far (None: none checked yet)
    precision: parallel.Precision = field(default_factory=parallel.Precision)
    checkpoints: Optional[ckpt_state.StepWriter] = None  # created by the first step checkpoint


@dataclass
class RunResult:
    epochs: list[dict]
    steps: int
    train_model: torch.nn.Module
    peft_model: torch.nn.Module
    stopped_by: Optional[str] = None  # the signal that stopped the run, if one did


# ---- setup ----------------------------------------------------------------------------

def needs_unpacked(cfgs: Configs) -> bool:
    """One example per row with an attention mask (prefix tuning's prefix is a KV cache)."""
    t = cfgs.train
    return t.use_peft and not PEFT_METHODS[t.peft_method].packs


def resolve(cfgs: Configs) -> Configs:
    """A copy with the derived choices made, so nothing downstream mutates the caller's."""
    cfgs = copy.deepcopy(cfgs)
    t = cfgs.train
    if needs_unpacked(cfgs) and t.batching_strategy == "packing":
        log.info("%s: the learned prefix is a KV cache, so examples are not packed; using batching_strategy=padding", t.peft_method)
        t.batching_strategy = "padding"
    return cfgs


def prepare_dirs(cfgs: Configs, dist: device.Dist, run_dir: Path) -> None:
    """Claim output_dir and the checkpoint folder before any heavy work: never mix with,
    or delete, another run's files unless --overwrite_output_dir says so. Every rank
    needs the checkpoint folder (each writes its shards)."""
    t = cfgs.train

    def claim() -> None:
        checkpoint.claim_output_dir(t.output_dir, resume=bool(t.resume), overwrite=t.overwrite_output_dir)
        checkpoint.check_writable(str(run_dir), "--dist_checkpoint_root_folder")
        manifest.clean_stale(run_dir)
        existing = ckpt_state.complete_steps(run_dir)
        if existing and not t.resume:
            if not t.overwrite_output_dir:
                raise UserError(f"{run_dir} already holds checkpoints of a run (newest {existing[-1].name}); pass "
                                "--resume auto to continue it, --overwrite_output_dir to discard them, or another "
                                "--dist_checkpoint_folder")
            for path in existing + [run_dir / ckpt_state.BEST]:
                manifest.remove(path)

    dist.on_main(claim)
    if not dist.is_main:
        checkpoint.check_writable(str(run_dir), "--dist_checkpoint_root_folder")


def freeze_first_layers(model: torch.nn.Module, n: int) -> None:
    layers = parallel.decoder_layers(model)
    if n > len(layers):
        raise UserError(f"--num_freeze_layers {n} exceeds the model's {len(layers)} decoder layers")
    for layer in layers[:n]:
        layer.requires_grad_(False)


def setup_model(cfgs: Configs, dist: device.Dist, spec: model_lib.ModelSpec, precision: parallel.Precision,
                frozen: bool = False, add_params: Callable | None = None):
    """Meta model -> PEFT/freeze -> shard/DDP -> materialise. Returns (train_model, peft_model).
    Frozen weights are held in precision.frozen, trainable ones in precision.storage.
    frozen: every weight frozen (a reference model: sharded like the policy, never DDP-wrapped).
    add_params(peft model, adapter values read from --from_peft_checkpoint) -> {name: value}:
    a recipe's own parameters added to the wrapped model before it is sharded, and their values."""
    t = cfgs.train
    spec.dtype = precision.frozen
    if t.quantization and not t.enable_fsdp:
        model = model_lib.load_quantized(spec, t.quantization, dist.device, precision.frozen)
        torch.manual_seed(t.seed)
        peft_model = adapters.wrap(model, cfgs)
        model_lib.hold_trainable_in(peft_model, precision.storage)
        if t.from_peft_checkpoint:
            values = adapters.load_adapter_weights(peft_model, t.peft_method, t.from_peft_checkpoint)
            values.update(add_params(peft_model, values) if add_params else {})
            with torch.no_grad():
                for name, p in peft_model.named_parameters():
                    if name in values:
                        p.copy_(values[name])
        if dist.world_size > 1:  # one adapter, its gradients averaged over the ranks
            return parallel.wrap_ddp(peft_model, dist), peft_model
        return peft_model, peft_model
    model = model_lib.build_meta_model(spec)
    if frozen:
        model.requires_grad_(False)
    new_params: dict[str, torch.Tensor] = {}
    from_adapter: dict[str, torch.Tensor] = {}
    if t.use_peft:
        model = adapters.wrap(model, cfgs)
    elif t.freeze_layers:
        freeze_first_layers(model, t.num_freeze_layers)
    model_lib.hold_trainable_in(model, precision.storage)
    if t.use_peft:
        new_params = adapters.init_new_params(model, t.peft_method, t.seed)
        if t.from_peft_checkpoint:
            from_adapter = adapters.load_adapter_weights(model, t.peft_method, t.from_peft_checkpoint)
            new_params.update(from_adapter)
        if add_params:
            added = add_params(model, from_adapter)
            new_params.update(added)
            from_adapter.update(added)  # loaded values too: init_from_base keeps them
    if t.enable_fsdp and cfgs.fsdp.fsdp_activation_checkpointing:
        if not t.use_peft or PEFT_METHODS[t.peft_method].activation_checkpointing:
            parallel.enable_activation_checkpointing(model)
        else:
            log.warning("activation checkpointing is off for %s: its KV cache cannot be replayed", t.peft_method)
    if t.compile:
        parallel.compile_layers(model)
    if t.enable_fsdp:
        mesh = parallel.build_mesh(dist, cfgs.fsdp)
        quantizer = (quant.LayerQuantizer(model, spec, dist.device, mesh["shard"], cfgs.fsdp.fsdp_cpu_offload)
                     if t.quantization else None)
        parallel.shard(model, mesh, cfgs.fsdp, precision, pin_memory=dist.is_accelerator, prepare_layer=quantizer)
        model_lib.materialize(model, spec, dist.device, new_params, offloaded=cfgs.fsdp.fsdp_cpu_offload,
                              skip=set(quantizer.weights) if quantizer else frozenset())
        if quantizer:
            quantizer.load()
        if t.use_peft:
            adapters.init_from_base(model, t.peft_method, new_params, keep=set(from_adapter))
        if quantizer:
            log.info("NF4 base: %d linear weights; this rank holds %.2f MiB of parameters",
                     len(quantizer.weights), quant.held_bytes(model) / 2**20)
        return model, model
    model_lib.materialize(model, spec, dist.device, new_params)
    if t.use_peft:
        adapters.init_from_base(model, t.peft_method, new_params, keep=set(from_adapter))
    if dist.world_size > 1 and not frozen:
        return parallel.wrap_ddp(model, dist), model
    return model, model


def setup_data(cfgs: Configs, dist: device.Dist, tokenizer, batching: Batching) -> tuple:
    """Tokenized (cached) splits and this rank's loaders: (train split, eval split or None,
    train loader, its sampler, eval loader or None)."""
    t = cfgs.train
    train_split = data.build_split(cfgs, tokenizer, "train", dist)
    eval_split = data.build_split(cfgs, tokenizer, "validation", dist) if t.run_validation else None
    pad_id = tokenizer.pad_token_id
    loader, sampler = data.train_loader(train_split, batching.micro, batching.accum, dist.world_size,
                                        dist.rank, t.seed, pad_id, t.num_workers_dataloader, dist.is_accelerator)
    eval_loaders = (data.eval_loaders(eval_split, t.val_batch_size, dist.world_size, dist.rank, pad_id,
                                      t.num_workers_dataloader, dist.is_accelerator) if eval_split else {})
    log.info("global batch %d = micro batch %d x %d ranks x %d accumulation; %d steps per epoch (%d sequences past the last full batch are left to the next shuffle)",
             sampler.global_batch, batching.micro, dist.world_size, batching.accum,
             sampler.steps_per_epoch, sampler.dropped_per_epoch)
    return train_split, eval_split, loader, sampler, eval_loaders


def peak_flops(cfgs: Configs, dist: device.Dist) -> float:
    """FLOP/s of all ranks' devices together (--peak_tflops, else the known GPU's), 0 if unknown."""
    t = cfgs.train
    name = dist.device_name()
    tflops = t.peak_tflops or throughput.peak_tflops(name)
    if not tflops:
        log.info("MFU not reported: no known peak for %s; pass --peak_tflops", name)
        return 0.0
    log.info("MFU against %.0f TFLOP/s per device (%s)", tflops, "--peak_tflops" if t.peak_tflops else name)
    return tflops * 1e12 * dist.world_size


def loop_config(cfgs: Configs, dist: device.Dist, batching: Batching, precision: parallel.Precision,
                global_batch: int, flops: throughput.ModelFlops) -> loop.LoopConfig:
    t = cfgs.train
    return loop.LoopConfig(
        accum=batching.accum, world=dist.world_size, max_train_step=t.max_train_step,
        max_eval_step=t.max_eval_step,
        grad_clip=t.gradient_clipping_threshold if t.gradient_clipping else None,
        log_every=max(1, t.log_every),
        autocast_dtype=(precision.compute if precision.compute != precision.storage and not t.enable_fsdp
                        else None),
        mask_from_positions=needs_unpacked(cfgs), global_batch=global_batch,
        defer_grad_reduce=t.use_peft,  # only an adapter's unsharded gradients are small enough to keep
        flops=flops, peak_flops=peak_flops(cfgs, dist),
    )


def setup(cfgs: Configs, dist: device.Dist, before_step: Callable | None = None, data_stage: Callable = None,
          objective: Callable | None = None, add_params: Callable | None = None) -> Recipe:
    """Config -> data -> model (+PEFT, sharded) -> optimizer -> resumed state. Another recipe
    passes its data_stage (setup_data's signature), objective(recipe) -> loop.Objective,
    built after the model and before any checkpoint is restored (so it sees the base weights),
    and add_params (see setup_model)."""
    cfgs = resolve(cfgs)
    t = cfgs.train
    run_dir = checkpoint_dir(cfgs)
    ckpt = find_resume(cfgs, run_dir)
    batching = batching_for(cfgs, dist.world_size, ckpt)
    spec = model_lib.load_spec(t.model_name)
    if t.from_peft_checkpoint:
        adapters.adapter_file(t.from_peft_checkpoint)  # checked before the data and model are built
    if ckpt:
        check_resumable(ckpt, cfgs, spec)
    tokenizer = model_lib.load_tokenizer(t.tokenizer_name or str(spec.model_dir))
    model_lib.check_vocab(tokenizer, spec)
    prepare_dirs(cfgs, dist, run_dir)
    precision = parallel.resolve_precision(cfgs, dist.supports_fast_bf16(), dist.device.type, log_choice=dist.is_main)
    if dist.is_main and precision.compute != torch.float32 and not dist.supports_fast_bf16():
        log.warning("%s on %s: expect this to be far slower than fp32", precision.name, dist.device.type)

    train_split, eval_split, loader, sampler, eval_loaders = (data_stage or setup_data)(cfgs, dist, tokenizer, batching)
    train_model, peft_model = setup_model(cfgs, dist, spec, precision, add_params=add_params)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in trainable)
    n_all = sum(p.numel() for p in peft_model.parameters())
    log.info("trainable params %d of %d (%.4f%%)", n_train, n_all, 100 * n_train / n_all)
    optimizer = build_optimizer(trainable, cfgs, dist)
    scheduler = build_scheduler(optimizer, cfgs, sampler.steps_per_epoch)
    flops = throughput.model_flops(peft_model, spec.config)
    loop_cfg = loop_config(cfgs, dist, batching, precision, sampler.global_batch, flops)
    metrics = build_metrics(cfgs, dist, ckpt)
    recipe = Recipe(cfgs, dist, batching, spec, tokenizer, train_split, eval_split, loader, sampler, eval_loaders,
                    train_model, peft_model, optimizer, scheduler, loop_cfg, loop.LoopState(), metrics, run_dir,
                    grad_scaler=build_grad_scaler(cfgs, dist, precision), before_step=before_step,
                    precision=precision)
    if objective is not None:
        recipe.loop_cfg.objective = objective(recipe)
    if ckpt:
        restore(recipe, ckpt)
    elif t.resume == "auto":
        log.info("--resume auto: no complete checkpoint in %s; starting fresh", run_dir)
        metrics.rewind(0, 0)  # a first attempt that died before its first checkpoint
    return recipe


def build_metrics(cfgs: Configs, dist: device.Dist, ckpt: Optional[ckpt_state.Checkpoint]) -> MetricsWriter:
    """metrics.jsonl (--save_metrics) and the sinks, on rank 0; nothing on the others."""
    t = cfgs.train
    if not dist.is_main:
        return MetricsWriter(None)
    path = Path(t.output_dir) / "metrics.jsonl" if t.save_metrics else None
    loss_curve = curve.LossCurve(Path(t.output_dir) / "loss.png", history=path)
    resume_step, wandb_run = (ckpt.step, ckpt.info.wandb_run_id) if ckpt else (None, None)
    return MetricsWriter(path, sinks=[*sinks.build_sinks(cfgs, resume_step, wandb_run), loss_curve])


def restore(recipe: Recipe, ckpt: ckpt_state.Checkpoint) -> None:
    """Parameters and optimizer (resharded to this world), scheduler, scaler, loop state,
    then the RNG last, so nothing after it draws a number before the first step."""
    info = ckpt.info
    check_same_data(ckpt, recipe.cfgs, data.split_identity(recipe.train_split))
    check_schedule(ckpt, recipe.cfgs, recipe.sampler.steps_per_epoch)
    ckpt_state.load(ckpt, recipe.train_model, recipe.optimizer)
    recipe.scheduler.load_state_dict(info.scheduler)
    for group, lr in zip(recipe.optimizer.param_groups, info.lrs):
        group["lr"] = lr
    if recipe.grad_scaler is not None and info.grad_scaler:
        recipe.grad_scaler.load_state_dict(info.grad_scaler)
    recipe.state = loop.LoopState(**info.loop)
    recipe.metrics.rewind(recipe.state.step, recipe.state.epoch)
    same_world = ckpt_state.restore_rng(ckpt, recipe.dist)
    recipe.last_checkpoint = ckpt.path
    log.info("resumed from %s: step %d, epoch %d, %d samples into it%s", ckpt.path, recipe.state.step,
             recipe.state.epoch + 1, recipe.state.samples_in_epoch,
             "" if same_world else f" (saved at world size {info.world_size}, now {recipe.dist.world_size})")


# ---- fit ------------------------------------------------------------------------------

def fit(recipe: Recipe) -> Optional[str]:
    """Epochs of train + validate with step checkpoints. Returns the name of the signal
    that stopped the run (after its checkpoint), or None when training completed."""
    t = recipe.cfgs.train
    with StopRequest() as stop:
        for epoch in range(recipe.state.epoch, t.num_epochs):
            if t.max_train_step and recipe.state.step >= t.max_train_step:
                break
            recipe.state.epoch = epoch
            if not fit_epoch(recipe, stop):
                return stop.signal_name or "a signal on another rank"
    return None


def after_step(recipe: Recipe, stop: StopRequest, sync: Callable[[], None]) -> bool:
    """Runs after every optimizer step: the per-step LR schedule, evaluation every
    eval_steps, step checkpoints, and the stop on a signal."""
    t, state = recipe.cfgs.train, recipe.state
    if t.compile:
        report_compile(recipe)
    if t.lr_scheduler != "step":
        recipe.scheduler.step()  # before any checkpoint, which must hold the next step's LR
    stopping = stop.agreed(recipe.dist)
    eval_loss = None
    # not while stopping: a preempted job's grace period is for the checkpoint
    if recipe.eval_loaders and t.eval_steps and state.step % t.eval_steps == 0 and not stopping:
        sync()  # the steps up to this one are logged before their evaluation
        eval_loss = validate(recipe)
        recipe.train_model.train()
    # a new best evaluation gets a checkpoint, so that best/ can point at it
    new_best = eval_loss is not None and improves_best(state, eval_loss) and t.save_model
    if stopping or new_best or (t.save_steps and state.step % t.save_steps == 0):
        sync()  # log the pending steps; a non-finite one stops the run before the save
        save_checkpoint(recipe, eval_loss, wait=stopping)  # the process exits right after a stop
    if stopping:
        log.warning("stopping after step %d on %s: checkpoint %s; continue with --resume auto",
                    state.step, stop.signal_name or "a signal on another rank", recipe.last_checkpoint)
    return stopping


def report_compile(recipe: Recipe) -> None:
    """--compile never runs eagerly in silence. After the first step (forward and backward
    have both been compiled by then), and after any later one that met a new graph break, the
    metrics get a "compile" event (compiled: false with the causes when a layer graph-broke)
    and rank 0 warns once per new cause."""
    breaks = _compat.graph_breaks()
    new = [b for b in breaks if b not in (recipe.graph_breaks or [])]
    if recipe.graph_breaks is not None and not new:
        return
    recipe.graph_breaks = breaks
    recipe.metrics.write("compile", step=recipe.state.step, compiled=not breaks, graph_breaks=breaks)
    if recipe.dist.is_main:
        for cause in new:
            log.warning("--compile: the decoder layers graph-break and run partly eagerly: %s", cause)


def fit_epoch(recipe: Recipe, stop: StopRequest) -> bool:
    """One epoch from the data position in `state`; False when a signal stopped it."""
    r, t, state = recipe, recipe.cfgs.train, recipe.state
    r.sampler.set_epoch(state.epoch, start=state.samples_in_epoch)
    r.dist.reset_peak_memory()
    start = time.perf_counter()
    if loop.train_epoch(r.train_model, r.loader, r.optimizer, r.dist, r.loop_cfg, state, r.metrics,
                        scaler=r.grad_scaler, before_step=r.before_step,
                        after_step=lambda _, sync: after_step(recipe, stop, sync)):
        return False
    r.dist.synchronize()
    elapsed = time.perf_counter() - start
    eval_loss = None
    if r.eval_loaders:  # an --eval_steps evaluation of this very step is not repeated
        eval_loss = r.last_eval[1] if r.last_eval and r.last_eval[0] == state.step else validate(r)
    peaks = loop.peak_memory_all_ranks(r.dist)
    token_loss = not r.loop_cfg.trained().stat_names  # perplexity means something for token losses only
    summary = {
        "epoch": state.epoch + 1, "steps": state.samples_in_epoch // r.sampler.global_batch,
        "train_loss": state.epoch_loss, "train_perplexity": perplexity(state.epoch_loss) if token_loss else None,
        "eval_loss": eval_loss,
        "eval_perplexity": perplexity(eval_loss) if eval_loss is not None and token_loss else None,
        "epoch_time_s": elapsed, "tokens_per_s": state.epoch_tokens / elapsed if elapsed else 0.0,
        "peak_memory_mib_per_rank": [round(p / 2**20, 1) for p in peaks],
    }
    r.epochs.append(summary)
    r.metrics.write("epoch", **summary)
    ppl = (lambda key: f" ppl {summary[key]:.2f}" if summary[key] is not None else "")
    eval_txt = f" eval loss {eval_loss:.4f}{ppl('eval_perplexity')}" if eval_loss is not None else ""
    log.info("epoch %d: train loss %.4f%s%s | %.1fs, %.0f tokens/s, peak memory per rank (MiB) %s",
             state.epoch + 1, state.epoch_loss, ppl("train_perplexity"), eval_txt, elapsed,
             summary["tokens_per_s"], summary["peak_memory_mib_per_rank"])
    if state.samples_in_epoch >= r.sampler.steps_per_epoch * r.sampler.global_batch:
        # a whole epoch (not one cut short by max_train_step, which a resume may continue)
        if t.lr_scheduler == "step":
            r.scheduler.step()
        state.end_epoch()
    if t.save_model:
        save_checkpoint(recipe, eval_loss)
    return True


def validate(recipe: Recipe) -> float:
    """Evaluate at the current step; the loss goes to the metrics (an "eval" event) and the log."""
    state = recipe.state
    eval_loss, stats, by_dataset = loop.evaluate(recipe.train_model, recipe.eval_loaders, recipe.dist,
                                                 recipe.loop_cfg)
    recipe.last_eval = (state.step, eval_loss)
    fields = {f"eval_{name}": value for name, value in stats.items()} or {"eval_perplexity": perplexity(eval_loss)}
    log.info("step %d: eval loss %.4f %s", state.step, eval_loss,
             " ".join(f"{k} {v:.4f}" for k, v in {**fields, **by_dataset}.items()))
    if by_dataset:  # a mixture: each component's loss too
        fields["eval_loss_by_dataset"] = by_dataset
    recipe.metrics.write("eval", epoch=state.epoch + 1, step=state.step, eval_loss=eval_loss, **fields)
    return eval_loss


def improves_best(state: loop.LoopState, eval_loss: float) -> bool:
    return state.best_eval_loss is None or eval_loss < state.best_eval_loss


def checkpoint_info(recipe: Recipe) -> ckpt_state.RunState:
    t, r = recipe.cfgs.train, recipe
    scaler = r.grad_scaler
    return ckpt_state.RunState(
        loop=asdict(r.state),
        scheduler=r.scheduler.state_dict(),
        schedule=schedule_info(r.cfgs, r.sampler.steps_per_epoch),
        lrs=[group["lr"] for group in r.optimizer.param_groups],
        grad_scaler=scaler.state_dict() if scaler is not None else None,
        world_size=r.dist.world_size, global_batch=r.sampler.global_batch,
        micro_batch=r.batching.micro, accumulation=r.batching.accum,
        model=ckpt_state.ModelRef(str(r.spec.model_dir), model_fingerprint(r.spec)),
        peft_method=t.peft_method if t.use_peft else None,
        config={type(c).__name__: asdict(c) for c in r.cfgs.all()},
        wandb_run_id=sinks.wandb_run_id(r.metrics.sinks),  # rank 0 writes state.json: its sinks
        data=data.split_identity(r.train_split),
    )


def save_checkpoint(recipe: Recipe, eval_loss: Optional[float] = None, wait: bool = False) -> None:
    """A step checkpoint (collective); with an eval loss, best/ follows the lowest one. With
    --async_checkpoint it is written while training goes on and appears once written; wait:
    return only then."""
    r, t, state = recipe, recipe.cfgs.train, recipe.state
    require_finite(recipe)
    best = eval_loss is not None and improves_best(state, eval_loss)
    if best:
        state.best_eval_loss, state.best_step = eval_loss, state.step
    # FULL_STATE_DICT: the step also holds what save() writes, loadable with from_pretrained
    export = (lambda directory: write_outputs(r, directory)) if r.cfgs.fsdp.checkpoint_type == "FULL_STATE_DICT" else None
    if r.checkpoints is None:
        r.checkpoints = ckpt_state.StepWriter(r.dist, background=t.async_checkpoint)
    publish_checkpoint(recipe)  # the previous one: at most one in flight
    r.checkpoints.start(r.run_dir, state.step, r.train_model, r.optimizer, checkpoint_info(r), export,
                        best=best, keep=t.save_total_limit)
    if wait or not r.checkpoints.background:
        publish_checkpoint(recipe)


def publish_checkpoint(recipe: Recipe, close: bool = False) -> None:
    """Collective: wait until the step checkpoint in flight, if any, is published; close: also
    release the checkpoint writer (the run saves no more steps)."""
    writer = recipe.checkpoints
    if writer is None:
        return
    path = writer.close() if close else writer.finish()
    recipe.last_checkpoint = path or recipe.last_checkpoint


def require_finite(recipe: Recipe) -> None:
    """Weights made non-finite by the last update are never saved."""
    params = [p for p in recipe.train_model.parameters() if p.requires_grad]
    if not loop.all_finite(params, recipe.dist):
        raise loop.NonFiniteError(f"step {recipe.state.step}: the weights are no longer finite; training "
                                   "stopped and nothing from this state was saved")


# ---- save -----------------------------------------------------------------------------

def save(recipe: Recipe) -> None:
    """The final adapter (PEFT format) or Hugging Face model in output_dir."""
    r, t = recipe, recipe.cfgs.train
    if not t.save_model:
        return
    require_finite(recipe)
    out = Path(t.output_dir)
    tmp = checkpoint.outputs.fresh_tmp(out, "outputs") if r.dist.is_main else None
    write_outputs(recipe, tmp)
    if r.dist.is_main:
        checkpoint.outputs.publish_files(tmp, out)  # whole or not at all
    r.dist.barrier()
    log.info("saved the %s to %s", f"{t.peft_method} adapter" if t.use_peft else "fine-tuned model", out)


def write_outputs(recipe: Recipe, directory: Optional[Path]) -> None:
    """Collective: the adapter or the model, as save() publishes it, into `directory` (rank 0)."""
    r, t = recipe, recipe.cfgs.train
    if t.use_peft:
        checkpoint.outputs.write_adapter(r.peft_model, directory, r.dist, adapters.adapter_state(t.peft_method))
    else:
        checkpoint.outputs.write_full_model(r.train_model, r.tokenizer, directory, r.dist, r.precision.compute)


def report_skipped(recipe: Recipe) -> None:
    splits = (("train", recipe.train_split), ("validation", recipe.eval_split))
    skipped = {name: split.stats.bad_records for name, split in splits if split}
    if any(skipped.values()):  # --on_bad_record skip: repeat the count where it is seen
        log.warning("bad records skipped (--on_bad_record skip): %s", ", ".join(f"{n} {c}" for n, c in skipped.items()))


def run(cfgs: Configs, dist: device.Dist, before_step: Callable | None = None) -> RunResult:
    """The whole recipe on configs not yet validated. before_step(model, state): optional
    hook after backward, before each optimizer step (tests inject faults through it)."""
    check_supported(cfgs)
    return run_checked(cfgs, dist, before_step)


def run_checked(cfgs: Configs, dist: device.Dist, before_step: Callable | None = None,
                setup_recipe: Callable[..., Recipe] = setup) -> RunResult:
    """setup -> fit -> save, on configs that check_supported has passed."""
    recipe = setup_recipe(cfgs, dist, before_step)
    try:
        try:
            stopped_by = fit(recipe)
        except loop.NonFiniteError as err:
            publish_checkpoint(recipe, close=True)  # every rank stops here; the last good one may be in flight
            newest = ckpt_state.complete_steps(recipe.run_dir)
            keep = f"; the last good checkpoint is {newest[-1]}" if newest else "; no checkpoint was written"
            raise loop.NonFiniteError(f"{err}{keep}") from None
        publish_checkpoint(recipe, close=True)
        if stopped_by is None:
            save(recipe)
    finally:
        recipe.metrics.close()  # flush TensorBoard / wandb and draw loss.png, also after a failure
    report_skipped(recipe)
    return RunResult(recipe.epochs, recipe.state.step, recipe.train_model, recipe.peft_model, stopped_by)


@exit_on_user_error
def main(argv: list[str] | None = None, before_step: Callable | None = None) -> int:
    """The command line entry. before_step: see run (tests inject faults through it)."""
    return launch(argv, before_step, check_supported, run_checked)


def launch(argv: list[str] | None, before_step: Callable | None, check: Callable[[Configs], None],
           run_recipe: Callable[..., RunResult]) -> int:
    """A recipe's command line: parse, check, process group, run, tear down."""
    argv = take_debug_flag(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(usage())
        return 0
    cfgs = parse_args(argv)
    check(cfgs)  # before the process group: a bad flag fails in a second on every rank
    faulthandler.enable()  # a crash prints every thread's stack
    faulthandler.register(signal.SIGUSR2, all_threads=True)  # `kill -USR2 PID`: where is a hung rank?
    dist = device.setup(require_distributed=cfgs.train.enable_fsdp, timeout_s=cfgs.train.dist_timeout)
    setup_logging(dist.rank)
    try:
        run_recipe(cfgs, dist, before_step)
    except BaseException as err:
        if dist.distributed:
            exit_now(err)  # never waits on peers: they fail within seconds instead of at the timeout
        raise
    device.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
