"""LoRA with llama-recipes' defaults (r=8, alpha=32, dropout 0.05, q_proj/v_proj)."""
from __future__ import annotations

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer


def peft_config(cfg, model_config) -> LoraConfig:
    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.lora_alpha,
        target_modules=list(cfg.target_modules),
        bias=cfg.bias,
        task_type=cfg.task_type,
        lora_dropout=cfg.lora_dropout,
        inference_mode=cfg.inference_mode,
    )


def init_weights(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name in module.lora_A:
                module.lora_A[name].to_empty(device="cpu")
                module.lora_B[name].to_empty(device="cpu")
                module.reset_lora_parameters(name, True)


def saved_key(param_name: str) -> str:
    return param_name.replace(".default", "")  # peft saves LoRA keys without the adapter name
