"""LoRA with llama-recipes' defaults (r=8, alpha=32, dropout 0.05, q_proj/v_proj).
`--lora_config.target_modules all-linear` is peft's every-linear-layer-but-the-head."""
from __future__ import annotations

import typing

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer

from ..errors import UserError


def peft_config(cfg, model_config) -> LoraConfig:
    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.lora_alpha,
        target_modules=target_modules(cfg.target_modules),
        bias=cfg.bias,
        task_type=cfg.task_type,
        lora_dropout=cfg.lora_dropout,
        inference_mode=cfg.inference_mode,
    )


def check(cfg) -> None:
    """What LoraConfig accepts but peft rejects only while wrapping the model."""
    biases = typing.get_args(typing.get_type_hints(LoraConfig)["bias"])  # Literal['none', 'all', 'lora_only']
    if cfg.bias not in biases:
        raise UserError(f"--lora_config.bias {cfg.bias!r} is not one of peft's {', '.join(biases)}")
    if not 0 <= cfg.lora_dropout < 1:
        raise UserError(f"--lora_config.lora_dropout must be in [0, 1), got {cfg.lora_dropout}")
    if not cfg.target_modules:
        raise UserError("--lora_config.target_modules is empty; name the modules to adapt, e.g. q_proj,v_proj")
    peft_config(cfg, None)  # peft's own checks (task_type, ...) raise ValueError


def target_modules(names: list[str]) -> list[str] | str:
    # the CLI hands over a list; peft recognises all-linear only as the bare string
    if "all-linear" not in names:
        return list(names)
    if len(names) > 1:
        raise UserError(f"--lora_config.target_modules {','.join(names)}: all-linear already means every linear "
                        "layer; pass it alone")
    return "all-linear"


def init_weights(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name in module.lora_A:
                module.lora_A[name].to_empty(device="cpu")
                module.lora_B[name].to_empty(device="cpu")
                module.reset_lora_parameters(name, True)


def saved_key(param_name: str) -> str:
    return param_name.replace(".default", "")  # peft saves LoRA keys without the adapter name
