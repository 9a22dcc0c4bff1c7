"""PEFT stage: wrap the (meta-device) base model with the chosen PEFT method and
initialise the new adapter weights deterministically.

Adapter weights are initialised on the host from the run's seed, identically on
every rank, before the model is sharded: the starting point therefore does not
depend on the world size, which parity across world sizes relies on.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Callable, Optional

import torch
from safetensors.torch import load_file

from ..config.schema import PEFT_METHODS
from ..errors import UserError
from ..modeling.load import safetensors_keys

# What each method's module (shardtune.adapters.NAME, one per config.schema.PEFT_METHODS
# entry) supplies:
#   peft_config(method config, model config) -> peft config
#   check(method config): raise UserError for values peft would reject only while wrapping
#   init_weights(model): materialise and initialise the adapter on the host
#   saved_key(parameter name) -> its key in peft's adapter_model.safetensors
#   trainable_params(method config, shape) -> trained parameters (commands/plan.py's ModelShape)
# and optionally
#   adapter_state(full trainable state) -> peft's on-disk tensors, where peft's own save
#       would run a sharded module (otherwise peft's save_pretrained)
#   init_from_base(model, initial values, names read from --from_peft_checkpoint): what
#       depends on the loaded base weights (DoRA's magnitude), after materialisation
REQUIRED = ("peft_config", "check", "init_weights", "saved_key", "trainable_params")


def code(method: str) -> ModuleType:
    """The module that implements a registered PEFT method (imported on first use)."""
    if method not in PEFT_METHODS:
        raise UserError(f"unknown --peft_method {method!r}; choose one of: {', '.join(PEFT_METHODS)}")
    return importlib.import_module(f".{method}", __name__)


def adapter_state(method: str) -> Optional[Callable]:
    return getattr(code(method), "adapter_state", None)


def check_config(cfgs) -> None:
    """The chosen method's config, validated before any model is built: peft itself accepts
    some bad values (LoRA r 0, an unknown bias) and only rejects them while wrapping."""
    method, cfg = cfgs.train.peft_method, cfgs.peft_config
    for name, value in vars(cfg).items():
        if isinstance(value, int) and not isinstance(value, bool) and value < 1:
            raise UserError(f"--{type(cfg).__name__}.{name} must be a positive integer, got {value}")
    try:
        code(method).check(cfg)
    except ValueError as err:  # peft's own validation, e.g. an unknown task_type
        raise UserError(f"--peft_method {method}: {str(err).splitlines()[0]}") from None


def wrap(model: torch.nn.Module, cfgs):
    """The model wrapped by peft (a PeftModel) with the configured method."""
    from peft import get_peft_model

    method = cfgs.train.peft_method
    try:
        return get_peft_model(model, code(method).peft_config(cfgs.peft_config, model.config))
    except (ValueError, NotImplementedError) as err:  # e.g. target modules the model does not have
        raise UserError(f"--peft_method {method}: {str(err).splitlines()[0]}") from None


def init_new_params(model: torch.nn.Module, method: str, seed: int) -> dict[str, torch.Tensor]:
    """Materialise the adapter's meta-device parameters on the host, run peft's own
    initialisation, and return full copies by parameter name."""
    torch.manual_seed(seed)
    code(method).init_weights(model)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def init_from_base(model: torch.nn.Module, method: str, initial: dict[str, torch.Tensor], keep: set[str]) -> None:
    """After materialisation: adapter weights computed from the loaded base weights."""
    init = getattr(code(method), "init_from_base", None)
    if init is not None:
        init(model, initial, keep)


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
        key = code(method).saved_key(name)
        if key not in saved:
            raise UserError(f"{path} has no tensor {key}; it was saved for a different model or PEFT config")
        out[name] = saved[key].to(p.dtype)
    return out
