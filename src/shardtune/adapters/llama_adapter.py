"""LLaMA-Adapter (peft's adaption prompt): llama-recipes' defaults adapter_len 10 and
adapter_layers 30, capped at the model's depth (peft rejects more layers than exist)."""
from __future__ import annotations

import torch
from peft import AdaptionPromptConfig

from .. import _compat


def peft_config(cfg, model_config) -> AdaptionPromptConfig:
    return AdaptionPromptConfig(
        adapter_len=cfg.adapter_len,
        adapter_layers=min(cfg.adapter_layers, model_config.num_hidden_layers),
        task_type=cfg.task_type,
    )


def check(cfg) -> None:
    # adapter_layers is capped at the model's depth once the model is known
    AdaptionPromptConfig(adapter_len=cfg.adapter_len, adapter_layers=cfg.adapter_layers, task_type=cfg.task_type)


def trainable_params(cfg, shape) -> int:
    """A prompt (adapter_len x hidden) and a gate per adapted layer."""
    return min(cfg.adapter_layers, shape.layers) * (cfg.adapter_len * shape.hidden + 1)


def init_weights(model: torch.nn.Module) -> None:
    # peft's own init: prompt ~ N(0, 1) (the paper's Embedding), gate = 0 (zero-init)
    for module in model.modules():
        if isinstance(module, _compat.adapted_attention_class()):
            module.to_empty(device="cpu", recurse=False)
            module.adaption_prompt.data.normal_()
            module.adaption_gate.data.zero_()


def saved_key(param_name: str) -> str:
    return param_name
