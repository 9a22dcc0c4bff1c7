"""Prefix tuning with llama-recipes' default num_virtual_tokens 30.

The learned prefix reaches every layer as a key/value cache, so transformers sees a cache
and no longer isolates packed examples; the training loop therefore feeds prefix runs
one example per row with an attention mask, exactly as plain peft does."""
from __future__ import annotations

import torch
from peft import PrefixTuningConfig
from peft.tuners.prefix_tuning import PrefixEncoder


def peft_config(cfg, model_config) -> PrefixTuningConfig:
    return PrefixTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens, task_type=cfg.task_type)


def check(cfg) -> None:
    peft_config(cfg, None)  # peft's own checks (task_type, ...) raise ValueError


def trainable_params(cfg, shape) -> int:
    """A key and a value vector per virtual token and layer (peft's embedding table); with
    grouped-query attention they have the key/value heads' width, not the hidden size."""
    return cfg.num_virtual_tokens * shape.layers * 2 * shape.kv_dim


def init_weights(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, PrefixEncoder):
            module.to_empty(device="cpu")
            module.embedding.reset_parameters()  # nn.Embedding's N(0, 1), as peft leaves it


def adapter_state(full_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft's on-disk form. peft would compute it by running the (sharded) prompt encoder;
    without a projection that output is the embedding table itself."""
    (weight,) = [v for k, v in full_state.items() if "prompt_encoder" in k]
    return {"prompt_embeddings": weight}


def saved_key(param_name: str) -> str:
    # peft stores the prefix table under one name
    return "prompt_embeddings" if "prompt_encoder" in param_name else param_name
