"""Fine-tune a Llama-architecture model with PEFT and FSDP2: the shardtune recipe.

    torchrun --nnodes 1 --nproc_per_node N -m shardtune.finetuning --enable_fsdp \
        --model_name DIR --use_peft --peft_method lora --output_dir OUT

Features and the flags that turn them on:
  * FSDP2 sharding per decoder layer ........ --enable_fsdp, --sharding_strategy, --hsdp
  * DDP (world size > 1 without FSDP) ....... torchrun without --enable_fsdp
  * LoRA through peft ....................... --use_peft --peft_method lora, --lora_config.*
  * bf16 mixed precision .................... --mixed_precision (default on GPUs with bf16)
  * activation checkpointing ................ --fsdp_activation_checkpointing (with FSDP)
  * gradient accumulation without reduce .... --batch_size_training / --micro_batch_size,
                                              or --gradient_accumulation_steps
  * gradient clipping (global norm) ......... --gradient_clipping --gradient_clipping_threshold
  * packing with per-example attention ...... --batching_strategy packing --context_length
  * validation each epoch ................... --run_validation --val_batch_size --max_eval_step
  * step limit .............................. --max_train_step
  * metrics as JSON lines ................... --save_metrics (output_dir/metrics.jsonl)

Shape: setup (config -> data -> model+peft -> parallel) -> fit (epochs of train +
validate) -> save.
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import adapters, checkpoint, data, device, model as model_lib, parallel, train
from .anyprecision import AnyPrecisionAdamW
from .args import parse_args, usage
from .configs import Configs
from .errors import UserError, exit_on_user_error
from .logs import MetricsWriter, setup_logging

log = logging.getLogger("shardtune.finetuning")


@dataclass
class RunResult:
    epochs: list[dict]
    steps: int
    train_model: torch.nn.Module  # what ran forward/backward (FSDP/DDP-wrapped)
    peft_model: torch.nn.Module  # the unwrapped PEFT model


@dataclass(frozen=True)
class Batching:
    micro: int  # per-forward batch per rank
    accum: int  # micro-batches per optimizer step


def resolve_batching(cfgs: Configs) -> Batching:
    """micro_batch_size keeps the seed's meaning; gradient_accumulation_steps is the
    modern alternative. See README 'Batch size and accumulation'."""
    t = cfgs.train
    bst, gas = t.batch_size_training, t.gradient_accumulation_steps
    micro_set = cfgs.was_set(t, "micro_batch_size")
    if bst < 1 or gas < 1 or t.micro_batch_size < 1:
        raise UserError("batch_size_training, micro_batch_size and gradient_accumulation_steps must be >= 1")
    if gas > 1:
        if micro_set and t.micro_batch_size != bst:
            raise UserError(
                "set either --micro_batch_size (accumulation = batch_size_training / micro_batch_size) "
                "or --gradient_accumulation_steps, not both"
            )
        return Batching(micro=bst, accum=gas)
    micro = t.micro_batch_size if micro_set else bst
    if micro > bst or bst % micro:
        raise UserError(
            f"batch_size_training ({bst}) must be a multiple of micro_batch_size ({micro}); "
            "accumulation is batch_size_training / micro_batch_size"
        )
    return Batching(micro=micro, accum=bst // micro)


def check_supported(cfgs: Configs) -> None:
    """Reject unknown values and contradictory combinations before any heavy work."""
    t, f = cfgs.train, cfgs.fsdp
    data.check_flags(t)
    if t.quantization not in (None, "8bit", "4bit"):
        raise UserError(f"unknown --quantization {t.quantization!r}; choose 8bit or 4bit")
    if t.quantization and not t.use_peft:
        raise UserError("--quantization needs --use_peft: quantized weights cannot be fine-tuned directly")
    if t.quantization and t.enable_fsdp:
        raise UserError("--quantization with --enable_fsdp is not supported yet; run QLoRA/8-bit LoRA "
                        "in one process (without torchrun and --enable_fsdp)")
    if f.optimizer.lower() not in ("adamw", "anyprecision"):
        raise UserError(f"unknown --optimizer {f.optimizer!r}; choose AdamW or anyprecision")
    if f.fsdp_cpu_offload and not t.enable_fsdp:
        raise UserError("--fsdp_cpu_offload needs --enable_fsdp")
    if f.sharding_strategy not in parallel.STRATEGIES:
        raise UserError(f"unknown --sharding_strategy {f.sharding_strategy!r}; choose one of {', '.join(parallel.STRATEGIES)}")
    if t.enable_fsdp and t.one_gpu:
        raise UserError("--one_gpu and --enable_fsdp contradict each other; drop one")
    if t.use_peft and t.freeze_layers:
        raise UserError("--freeze_layers applies to full fine-tuning; drop it or drop --use_peft")
    if t.use_peft and t.peft_method not in adapters.METHODS:
        raise UserError(f"unknown --peft_method {t.peft_method!r}; choose lora, llama_adapter or prefix")
    if t.from_peft_checkpoint and not t.use_peft:
        raise UserError("--from_peft_checkpoint needs --use_peft")
    if f.checkpoint_type not in ("SHARDED_STATE_DICT", "FULL_STATE_DICT"):
        raise UserError(f"unknown --checkpoint_type {f.checkpoint_type!r}; choose SHARDED_STATE_DICT or FULL_STATE_DICT")
    if t.save_optimizer and (t.use_peft or not t.enable_fsdp or f.checkpoint_type != "SHARDED_STATE_DICT"):
        raise UserError("--save_optimizer applies to full fine-tuning with --enable_fsdp and "
                        "checkpoint_type SHARDED_STATE_DICT (it is saved in the DCP checkpoint)")


def build_optimizer(params, cfgs: Configs) -> torch.optim.Optimizer:
    t, f = cfgs.train, cfgs.fsdp
    if f.optimizer.lower() == "anyprecision":
        # fp32 moments; Kahan compensation matters for bf16 weights (pure_bf16)
        return AnyPrecisionAdamW(params, lr=t.lr, weight_decay=t.weight_decay,
                                 momentum_dtype=torch.float32, variance_dtype=torch.float32,
                                 use_kahan_summation=True)
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)


def build_grad_scaler(cfgs: Configs, dist: device.Dist, precision: parallel.Precision):
    if not precision.grad_scaler:
        return None
    if cfgs.train.enable_fsdp:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device=dist.device.type)  # syncs found-inf across shards
    return torch.amp.GradScaler(dist.device.type)


def freeze_first_layers(model: torch.nn.Module, n: int) -> None:
    layers = parallel.decoder_layers(model)
    if n > len(layers):
        raise UserError(f"--num_freeze_layers {n} exceeds the model's {len(layers)} decoder layers")
    for layer in layers[:n]:
        layer.requires_grad_(False)


def setup_model(cfgs: Configs, dist: device.Dist, spec: model_lib.ModelSpec, precision: parallel.Precision):
    """Meta model -> PEFT/freeze -> shard/DDP -> materialise. Returns (train_model, peft_model)."""
    t = cfgs.train
    if t.quantization:
        model = model_lib.load_quantized(spec, t.quantization, dist.device)
        torch.manual_seed(t.seed)
        peft_model = adapters.wrap(model, cfgs)
        if t.from_peft_checkpoint:
            values = adapters.load_adapter_weights(peft_model, t.peft_method, t.from_peft_checkpoint)
            with torch.no_grad():
                for name, p in peft_model.named_parameters():
                    if name in values:
                        p.copy_(values[name])
        return peft_model, peft_model
    spec.dtype = precision.storage
    model = model_lib.build_meta_model(spec)
    new_params: dict[str, torch.Tensor] = {}
    if t.use_peft:
        model = adapters.wrap(model, cfgs)
        new_params = adapters.init_new_params(model, t.peft_method, t.seed)
        if t.from_peft_checkpoint:
            new_params.update(adapters.load_adapter_weights(model, t.peft_method, t.from_peft_checkpoint))
    elif t.freeze_layers:
        freeze_first_layers(model, t.num_freeze_layers)
    if t.enable_fsdp and cfgs.fsdp.fsdp_activation_checkpointing:
        method = adapters.METHODS.get(t.peft_method) if t.use_peft else None
        if getattr(method, "SUPPORTS_ACTIVATION_CHECKPOINTING", True):
            parallel.enable_activation_checkpointing(model)
        else:
            log.warning("activation checkpointing is off for %s: its KV cache cannot be replayed", t.peft_method)
    if t.enable_fsdp:
        mesh = parallel.build_mesh(dist, cfgs.fsdp)
        parallel.shard(model, mesh, cfgs.fsdp, precision, pin_memory=dist.is_accelerator)
        model_lib.materialize(model, spec, dist.device, new_params, offloaded=cfgs.fsdp.fsdp_cpu_offload)
        return model, model
    model_lib.materialize(model, spec, dist.device, new_params)
    if dist.world_size > 1:
        return parallel.wrap_ddp(model, dist), model
    return model, model


def run(cfgs: Configs, dist: device.Dist, before_step=None) -> RunResult:
    """before_step(model, state): optional hook after backward, before each optimizer step."""
    t = cfgs.train
    batching = resolve_batching(cfgs)
    spec = model_lib.load_spec(t.model_name)
    tokenizer = model_lib.load_tokenizer(t.tokenizer_name or str(spec.model_dir))
    if dist.is_main:
        checkpoint.check_writable(t.output_dir)  # fail before any heavy work
    precision = parallel.resolve_precision(cfgs, dist, log_choice=dist.is_main)
    if dist.is_main and precision.compute != torch.float32 and not dist.supports_fast_bf16():
        log.warning("%s on %s: expect this to be far slower than fp32", precision.name, dist.device.type)
    unpacked = t.use_peft and getattr(adapters.METHODS[t.peft_method], "NEEDS_UNPACKED", False)
    if unpacked and t.batching_strategy == "packing":
        log.info("%s: the learned prefix is a KV cache, so examples are not packed; using batching_strategy=padding", t.peft_method)
        t.batching_strategy = "padding"

    train_split = data.build_split(cfgs, tokenizer, "train", dist)
    eval_split = data.build_split(cfgs, tokenizer, "validation", dist) if t.run_validation else None
    pad_id = tokenizer.pad_token_id
    loader, sampler = data.train_loader(train_split, batching.micro, batching.accum, dist.world_size,
                                        dist.rank, t.seed, pad_id, t.num_workers_dataloader)
    eval_dl = (data.eval_loader(eval_split, t.val_batch_size, dist.world_size, dist.rank, pad_id,
                                t.num_workers_dataloader) if eval_split else None)
    log.info("global batch %d = micro batch %d x %d ranks x %d accumulation; %d steps per epoch (%d sequences past the last full batch are left to the next shuffle)",
             sampler.global_batch, batching.micro, dist.world_size, batching.accum,
             sampler.steps_per_epoch, sampler.dropped_per_epoch)

    train_model, peft_model = setup_model(cfgs, dist, spec, precision)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in trainable)
    n_all = sum(p.numel() for p in peft_model.parameters())
    log.info("trainable params %d of %d (%.4f%%)", n_train, n_all, 100 * n_train / n_all)
    optimizer = build_optimizer(trainable, cfgs)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=t.gamma)
    metrics = MetricsWriter(Path(t.output_dir) / "metrics.jsonl" if t.save_metrics and dist.is_main else None)
    loop_cfg = train.LoopConfig(
        accum=batching.accum, world=dist.world_size, max_train_step=t.max_train_step,
        max_eval_step=t.max_eval_step,
        grad_clip=t.gradient_clipping_threshold if t.gradient_clipping else None,
        log_every=max(1, t.log_every),
        autocast_dtype=(precision.compute if precision.compute != precision.storage and not t.enable_fsdp
                        else None),
        grad_scaler=build_grad_scaler(cfgs, dist, precision),
        mask_from_positions=unpacked,
        before_step=before_step,
    )
    state = train.LoopState()
    results = []
    for epoch in range(t.num_epochs):
        if t.max_train_step and state.step >= t.max_train_step:
            break
        state.epoch = epoch
        sampler.set_epoch(epoch)
        dist.reset_peak_memory()
        start = time.perf_counter()
        train_loss, tokens, step_losses = train.train_epoch(
            train_model, loader, optimizer, dist, loop_cfg, state, metrics, scheduler.get_last_lr()[0])
        dist.synchronize()
        elapsed = time.perf_counter() - start
        eval_loss = train.evaluate(train_model, eval_dl, dist, loop_cfg) if eval_dl else None
        peaks = train.peak_memory_all_ranks(dist)
        scheduler.step()
        summary = {
            "epoch": epoch + 1, "steps": len(step_losses), "train_loss": train_loss,
            "train_perplexity": train.perplexity(train_loss), "eval_loss": eval_loss,
            "eval_perplexity": train.perplexity(eval_loss) if eval_loss is not None else None,
            "epoch_time_s": elapsed, "tokens_per_s": tokens / elapsed if elapsed else 0.0,
            "peak_memory_mib_per_rank": [round(p / 2**20, 1) for p in peaks],
        }
        results.append(summary)
        metrics.write("epoch", **summary)
        eval_txt = (f" eval loss {eval_loss:.4f} ppl {summary['eval_perplexity']:.2f}" if eval_loss is not None else "")
        log.info("epoch %d: train loss %.4f ppl %.2f%s | %.1fs, %.0f tokens/s, peak memory per rank (MiB) %s",
                 epoch + 1, train_loss, summary["train_perplexity"], eval_txt, elapsed,
                 summary["tokens_per_s"], summary["peak_memory_mib_per_rank"])
    if t.save_model and t.use_peft:
        checkpoint.save_adapter(peft_model, t.output_dir, dist,
                                getattr(adapters.METHODS[t.peft_method], "adapter_state", None))
        log.info("saved the %s adapter to %s", t.peft_method, t.output_dir)
    elif t.save_model:
        sharded = None
        if t.enable_fsdp and cfgs.fsdp.checkpoint_type == "SHARDED_STATE_DICT":
            name = Path(t.model_name.rstrip("/")).name
            sharded = str(Path(t.dist_checkpoint_root_folder) / f"{t.dist_checkpoint_folder}-{name}")
        checkpoint.save_full_model(train_model, tokenizer, t.output_dir, dist, sharded,
                                   optimizer if t.save_optimizer else None)
        log.info("saved the fine-tuned model to %s%s", t.output_dir, f" and a DCP checkpoint to {sharded}" if sharded else "")
    skipped = {n: s.stats.bad_records for n, s in (("train", train_split), ("validation", eval_split)) if s}
    if any(skipped.values()):  # --on_bad_record skip: repeat the count where it is seen
        log.warning("bad records skipped (--on_bad_record skip): %s", ", ".join(f"{n} {c}" for n, c in skipped.items()))
    return RunResult(results, state.step, train_model, peft_model)


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(usage())
        return 0
    cfgs = parse_args(argv)
    check_supported(cfgs)
    resolve_batching(cfgs)
    dist = device.setup(require_distributed=cfgs.train.enable_fsdp)
    setup_logging(dist.rank)
    try:
        run(cfgs, dist)
    finally:
        device.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
