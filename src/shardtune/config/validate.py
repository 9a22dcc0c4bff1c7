"""Every check of a run's flags that needs no model or data, in one place: unknown values,
out-of-range numbers and contradictory combinations fail here, before any heavy work, with
one line that says what to change. Also the batch split the flags ask for."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import adapters, data, parallel
from ..errors import UserError
from ..metrics import sinks
from ..optim.build import SCHEDULERS
from .schema import PEFT_METHODS, Configs

# train_config field -> its smallest valid value: each would otherwise fail late (val_batch_size 0
# after the first epoch) or be silently wrong (a negative clip threshold)
MINIMUM = {"num_epochs": 1, "val_batch_size": 1, "num_workers_dataloader": 0, "max_train_step": 0,
           "max_eval_step": 0, "num_freeze_layers": 0, "gradient_clipping_threshold": 0.0, "lr": 0.0,
           "weight_decay": 0.0}


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


def check_supported(cfgs: Configs, pairs: bool = False) -> None:
    """Reject unknown values and contradictory combinations before any heavy work. pairs: the
    run trains preference pairs (the dpo recipe); see data.check_flags."""
    t, f = cfgs.train, cfgs.fsdp
    data.check_flags(t, pairs)
    if pairs:
        check_dpo(cfgs)
    elif any(name.startswith("dpo_config.") for name in cfgs.explicit):
        raise UserError("--dpo_config.* flags belong to preference tuning: run `shardtune dpo`, not finetune")
    for name, least in MINIMUM.items():
        if getattr(t, name) < least:
            raise UserError(f"--{name} must be >= {least}, got {getattr(t, name)}")
    if t.gradient_clipping and t.gradient_clipping_threshold == 0:
        raise UserError("--gradient_clipping_threshold must be > 0 (the largest gradient norm allowed)")
    if t.quantization not in (None, "8bit", "4bit"):
        raise UserError(f"unknown --quantization {t.quantization!r}; choose 8bit or 4bit")
    if t.quantization and not t.use_peft:
        raise UserError("--quantization needs --use_peft: quantized weights cannot be fine-tuned directly")
    if t.quantization and t.enable_fsdp and (t.quantization != "4bit" or t.peft_method != "lora"):
        raise UserError(f"--quantization {t.quantization} --peft_method {t.peft_method} with --enable_fsdp is not "
                        "supported; under FSDP use --quantization 4bit (NF4) with --peft_method lora, or run "
                        "without torchrun and --enable_fsdp")
    if t.compile and t.quantization:
        raise UserError("--compile with --quantization is not supported; drop one")
    if t.quantization and t.enable_fsdp and cfgs.peft_config.use_dora:
        raise UserError("--lora_config.use_dora with --quantization and --enable_fsdp is not supported; drop one")
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
    if t.use_peft and t.peft_method not in PEFT_METHODS:
        raise UserError(f"unknown --peft_method {t.peft_method!r}; choose one of: {', '.join(PEFT_METHODS)}")
    if t.use_peft:
        adapters.check_config(cfgs)
    if t.from_peft_checkpoint and not t.use_peft:
        raise UserError("--from_peft_checkpoint needs --use_peft")
    if f.checkpoint_type not in ("SHARDED_STATE_DICT", "FULL_STATE_DICT"):
        raise UserError(f"unknown --checkpoint_type {f.checkpoint_type!r}; choose SHARDED_STATE_DICT or FULL_STATE_DICT")
    if t.dist_timeout <= 0:
        raise UserError(f"--dist_timeout must be a positive number of seconds, got {t.dist_timeout}")
    if t.save_steps < 0 or t.save_total_limit < 0:
        raise UserError("--save_steps and --save_total_limit must be >= 0 (0 = off / keep all)")
    if t.lr_scheduler not in SCHEDULERS:
        raise UserError(f"unknown --lr_scheduler {t.lr_scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
    if t.warmup_steps < 0:
        raise UserError(f"--warmup_steps must be >= 0, got {t.warmup_steps}")
    if t.warmup_steps and t.lr_scheduler == "step":
        raise UserError("--warmup_steps needs a per-step schedule: add --lr_scheduler cosine, linear or constant")
    if t.eval_steps < 0:
        raise UserError(f"--eval_steps must be >= 0 (0 = evaluate at epoch ends only), got {t.eval_steps}")
    if t.eval_steps and not t.run_validation:
        raise UserError("--eval_steps evaluates the validation split: drop --run_validation False or --eval_steps")
    if t.peak_tflops < 0:
        raise UserError(f"--peak_tflops must be >= 0 (0 = detect the GPU), got {t.peak_tflops}")
    sinks.check_flags(cfgs)
    resolve_batching(cfgs)


def check_dpo(cfgs: Configs) -> None:
    from ..data.pairs import TRUNCATION_MODES
    from ..modeling.preference import LABEL_SMOOTHED, LOSS_TYPES, REFERENCE_FREE

    d = cfgs.dpo
    if d.loss_type not in LOSS_TYPES:
        raise UserError(f"unknown --dpo_config.loss_type {d.loss_type!r}; choose one of: {', '.join(LOSS_TYPES)}")
    if d.beta <= 0:
        raise UserError(f"--dpo_config.beta must be > 0, got {d.beta}")
    if not 0 <= d.label_smoothing < 0.5:
        raise UserError(f"--dpo_config.label_smoothing must be in [0, 0.5), got {d.label_smoothing}")
    if d.label_smoothing and d.loss_type not in LABEL_SMOOTHED:
        also = "; for conservative DPO use --dpo_config.loss_type cdpo" if d.loss_type == "sigmoid" else ""
        raise UserError(f"--dpo_config.label_smoothing applies to {' and '.join(LABEL_SMOOTHED)}, not "
                        f"{d.loss_type} (as in TRL){also}; or drop it")
    if d.simpo_gamma < 0:
        raise UserError(f"--dpo_config.simpo_gamma must be >= 0, got {d.simpo_gamma}")
    if d.orpo_alpha <= 0:
        raise UserError(f"--dpo_config.orpo_alpha must be > 0, got {d.orpo_alpha}")
    if d.truncation_mode not in TRUNCATION_MODES:
        raise UserError(f"unknown --dpo_config.truncation_mode {d.truncation_mode!r}; choose one of: "
                        f"{', '.join(TRUNCATION_MODES)}")
    if d.loss_type in REFERENCE_FREE and cfgs.was_set(d, "reference"):
        raise UserError(f"--dpo_config.loss_type {d.loss_type} is reference-free: drop --dpo_config.reference")
    if d.loss_type in REFERENCE_FREE:
        return
    if d.reference not in ("base", "precomputed") and not Path(d.reference).expanduser().is_dir():
        raise UserError(f"--dpo_config.reference {d.reference!r} is not base, precomputed or a model directory")
    t = cfgs.train
    if t.use_peft and t.peft_method == "lora" and cfgs.peft_config.bias != "none" and d.reference == "base":
        raise UserError(f"--lora_config.bias {cfgs.peft_config.bias} with --dpo_config.reference base: the trained "
                        "biases belong to the base layers, so disabling the adapter does not give the reference; use "
                        "--dpo_config.reference precomputed (computed before the first step) or --lora_config.bias none")
    if t.use_peft and t.peft_method != "lora" and d.reference in ("base", "precomputed"):
        raise UserError(f"--dpo_config.reference {d.reference} with --peft_method {t.peft_method}: the "
                        "reference is the model with the adapter disabled, which shardtune supports for lora (and "
                        "DoRA); use --peft_method lora, or name a reference model directory")
