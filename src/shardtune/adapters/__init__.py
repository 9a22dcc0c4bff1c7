"""PEFT stage: wrap the (meta-device) base model with the chosen PEFT method and
initialise the new adapter weights deterministically.

Adapter weights are initialised on the host from the run's seed, identically on
every rank, before the model is sharded: the starting point therefore does not
depend on the world size, which parity across world sizes relies on.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from ..errors import UserError
from ..modeling.load import safetensors_keys
from . import llama_adapter, lora, prefix


@dataclass(frozen=True)
class Method:
    """The contract of a PEFT method, declared once: each module supplies the callables,
    and the flags say what the rest of the recipe must do differently."""

    peft_config: Callable  # (method config, model config) -> peft config
    check: Callable  # (method config) -> None: raise UserError for values peft would reject
    init_weights: Callable  # (model) -> None: materialise and initialise the adapter on the host
    saved_key: Callable  # parameter name -> key in peft's adapter_model.safetensors
    packs: bool = True  # several examples may share a row
    activation_checkpointing: bool = True  # a checkpointed layer may be replayed
    # full trainable state -> peft's on-disk tensors, where peft's own save would run a
    # sharded module; None: peft's save_pretrained
    adapter_state: Optional[Callable] = None
    # (model, initial values, names read from --from_peft_checkpoint) -> None: set what
    # depends on the loaded base weights (DoRA's magnitude), after materialisation
    init_from_base: Optional[Callable] = None


def _method(module, **flags) -> Method:
    return Method(module.peft_config, module.check, module.init_weights, module.saved_key, **flags)


METHODS = {
    "lora": _method(lora, init_from_base=lora.init_from_base),
    "llama_adapter": _method(llama_adapter),
    # The learned prefix is a KV cache: transformers then stops isolating packed examples,
    # and each layer appends to it, so an activation-checkpoint replay would append twice.
    "prefix": _method(prefix, packs=False, activation_checkpointing=False, adapter_state=prefix.adapter_state),
}


def check_config(cfgs) -> None:
    """The chosen method's config, validated before any model is built: peft itself accepts
    some bad values (LoRA r 0, an unknown bias) and only rejects them while wrapping."""
    method, cfg = cfgs.train.peft_method, cfgs.peft_config
    for name, value in vars(cfg).items():
        if isinstance(value, int) and not isinstance(value, bool) and value < 1:
            raise UserError(f"--{type(cfg).__name__}.{name} must be a positive integer, got {value}")
    try:
        METHODS[method].check(cfg)
    except ValueError as err:  # peft's own validation, e.g. an unknown task_type
        raise UserError(f"--peft_method {method}: {str(err).splitlines()[0]}") from None


def wrap(model: torch.nn.Module, cfgs) -> PeftModel:
    method = cfgs.train.peft_method
    if method not in METHODS:
        raise UserError(f"unknown --peft_method {method!r}; choose {', '.join(METHODS)}")
    try:
        return get_peft_model(model, METHODS[method].peft_config(cfgs.peft_config, model.config))
    except (ValueError, NotImplementedError) as err:  # e.g. target modules the model does not have
        raise UserError(f"--peft_method {method}: {str(err).splitlines()[0]}") from None


def init_new_params(model: torch.nn.Module, method: str, seed: int) -> dict[str, torch.Tensor]:
    """Materialise the adapter's meta-device parameters on the host, run peft's own
    initialisation, and return full copies by parameter name."""
    torch.manual_seed(seed)
    METHODS[method].init_weights(model)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def init_from_base(model: torch.nn.Module, method: str, initial: dict[str, torch.Tensor], keep: set[str]) -> None:
    """After materialisation: adapter weights computed from the loaded base weights."""
    if METHODS[method].init_from_base is not None:
        METHODS[method].init_from_base(model, initial, keep)


def adapter_file(adapter_dir: str) -> Path:
    """The adapter's safetensors file, its header checked (cheap: setup calls it before
    building the model)."""
    path = Path(adapter_dir) / "adapter_model.safetensors"
    if not path.is_file():
        raise UserError(f"{adapter_dir} has no adapter_model.safetensors; --from_peft_checkpoint needs a PEFT adapter directory")
    safetensors_keys(path)
    return path


def load_adapter_weights(peft_model, method: str, adapter_dir: str) -> dict[str, torch.Tensor]:
    """Trainable-parameter values from a saved PEFT adapter (safetensors only)."""
    path = adapter_file(adapter_dir)
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
