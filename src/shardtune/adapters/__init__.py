"""PEFT stage: wrap the (meta-device) base model with the chosen PEFT method and
initialise the new adapter weights deterministically.

Adapter weights are initialised on the host from the run's seed, identically on
every rank, before the model is sharded: the starting point therefore does not
depend on the world size, which parity across world sizes relies on.
"""
from __future__ import annotations

import torch
from peft import PeftModel, get_peft_model

from ..errors import UserError
from . import llama_adapter, lora, prefix

METHODS = {"lora": lora, "llama_adapter": llama_adapter, "prefix": prefix}


def wrap(model: torch.nn.Module, cfgs) -> PeftModel:
    method = cfgs.train.peft_method
    if method not in METHODS:
        raise UserError(f"unknown --peft_method {method!r}; choose {', '.join(METHODS)}")
    try:
        return get_peft_model(model, METHODS[method].peft_config(cfgs.peft_config, model.config))
    except ValueError as err:  # e.g. target modules the model does not have
        raise UserError(f"--peft_method {method}: {str(err).splitlines()[0]}") from None


def init_new_params(model: torch.nn.Module, method: str, seed: int) -> dict[str, torch.Tensor]:
    """Materialise the adapter's meta-device parameters on the host, run peft's own
    initialisation, and return full copies by parameter name."""
    torch.manual_seed(seed)
    METHODS[method].init_weights(model)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_adapter_weights(peft_model, method: str, adapter_dir: str) -> dict[str, torch.Tensor]:
    """Trainable-parameter values from a saved PEFT adapter (safetensors only)."""
    from pathlib import Path

    from safetensors.torch import load_file

    path = Path(adapter_dir) / "adapter_model.safetensors"
    if not path.is_file():
        raise UserError(f"{adapter_dir} has no adapter_model.safetensors; --from_peft_checkpoint needs a PEFT adapter directory")
    saved = load_file(path)
    out = {}
    for name, p in peft_model.named_parameters():
        if not p.requires_grad:
            continue
        key = METHODS[method].saved_key(name)
        if key not in saved:
            raise UserError(f"{path} has no tensor {key}; it was saved for a different model or PEFT config")
        out[name] = saved[key].to(p.dtype)
    return out
