"""LoRA with llama-recipes' defaults (r=8, alpha=32, dropout 0.05, q_proj/v_proj).
`--lora_config.target_modules all-linear` is peft's every-linear-layer-but-the-head;
`--lora_config.use_dora` adds DoRA's magnitude vector (peft's own DoRA layers)."""
from __future__ import annotations

import typing

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from torch.distributed.tensor import DTensor

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
        use_dora=cfg.use_dora,
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


def targeted(cfg, linears) -> frozenset:
    """Which of a decoder layer's linear layers (names) get an adapter."""
    names = frozenset(linears)
    return names if "all-linear" in cfg.target_modules else names & set(cfg.target_modules)


def trainable_params(cfg, shape) -> int:
    """A and B per adapted linear (r x in + out x r), and DoRA's magnitude (one per output row)."""
    linears = shape.linears()
    per_layer = sum(cfg.r * (n_in + n_out) + (n_out if cfg.use_dora else 0)
                    for name, (n_in, n_out) in linears.items() if name in targeted(cfg, linears))
    return shape.layers * per_layer


def init_weights(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name in module.lora_A:
                module.lora_A[name].to_empty(device="cpu")
                module.lora_B[name].to_empty(device="cpu")
                module.reset_lora_parameters(name, True)
            for dora in module.lora_magnitude_vector.values():
                # peft computed it from the meta-device base weight: garbage. init_from_base
                # computes it once the base weights are loaded; NaN until then, so a missed
                # call fails the non-finite check instead of training from garbage.
                dora.to_empty(device="cpu")
                with torch.no_grad():
                    dora.weight.fill_(float("nan"))


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a (possibly FSDP-sharded, possibly NF4-quantized) weight, as a
    plain tensor."""
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.get_original_weight() if hasattr(local, "get_original_weight") else local  # NF4: dequantized


@torch.no_grad()
def init_from_base(model: torch.nn.Module, initial: dict[str, torch.Tensor], keep: set[str]) -> None:
    """DoRA's magnitude m = ||W + scaling * B A|| per output row, from the base weights as
    loaded (after materialisation) and the adapter's initial A and B; magnitudes in `keep`
    (read from --from_peft_checkpoint) stay. FSDP shards W, B and m along their first
    (output) dimension alike, so each rank computes exactly its own rows of m, without a
    collective; A is taken whole from `initial`."""
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for adapter, dora in module.lora_magnitude_vector.items():
            if f"{name}.lora_magnitude_vector.{adapter}.weight" in keep:
                continue
            lora_b = _local(module.lora_B[adapter].weight)
            lora_a = initial[f"{name}.lora_A.{adapter}.weight"].to(lora_b)
            weight = _local(module.get_base_layer().weight).to(lora_b)
            norm = dora.get_weight_norm(weight, lora_b @ lora_a, module.scaling[adapter])  # peft's own formula
            _local(dora.weight).copy_(norm)


def saved_key(param_name: str) -> str:
    # peft saves LoRA keys without the adapter name, and DoRA's magnitude without ".weight"
    key = param_name.replace(".default", "")
    return key.removesuffix(".weight") if key.endswith(".lora_magnitude_vector.weight") else key
