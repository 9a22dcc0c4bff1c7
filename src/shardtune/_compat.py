"""Private or version-dependent APIs of torch, transformers and peft that shardtune relies on,
in one place, so that an upgrade breaks here with a clear message instead of deep in a run.
tests/unit/test_compat.py exercises each entry against the installed versions.

Checked against: torch 2.13.0, transformers 5.24.0 and 5.25.0, peft 0.21.2, torchao 0.17.0
(constraints.txt).
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import sys
from typing import Optional

import torch

from .errors import UserError


# ---- torch.distributed ---------------------------------------------------------------------

def backend_options(backend: str, timeout: datetime.timedelta):
    """Process-group options that carry a timeout, for init_device_mesh's backend_override
    (its sub-groups otherwise take torch's default 30 minutes). `backend` is a name ("gloo")
    or a device map ("cuda:nccl,cpu:gloo"): the options are the accelerator backend's, and
    torch gives the gloo part the same timeout (device_mesh passes options._timeout along).
    NCCL's Options exposes the timeout only as the private `_timeout`; the others are built
    through the C++ Backend.Options."""
    names = [part.rpartition(":")[2] for part in backend.split(",")]
    if "nccl" in names:
        from torch.distributed import ProcessGroupNCCL

        options = ProcessGroupNCCL.Options()
        options._timeout = timeout
        return options
    from torch._C._distributed_c10d import Backend

    return Backend.Options(names[0], timeout)


def release_device_meshes() -> None:
    """torch caches DeviceMeshes (DTensor sharding and redistribution caches, FSDP2 closures),
    and each mesh holds its process groups in the private `_pg_registry`. Those hidden
    references keep gloo's worker threads alive past destroy_process_group, and one still
    releasing a finished collective's tensor while the interpreter shuts down aborts the
    process. Emptying the registries lets the groups, and their threads, end."""
    if "torch.distributed.device_mesh" not in sys.modules:
        return
    from torch.distributed.device_mesh import DeviceMesh

    for obj in gc.get_objects():
        # type(), not isinstance(): isinstance asks a dead weakref.proxy for its __class__,
        # which raises ReferenceError
        registry = getattr(obj, "_pg_registry", None) if issubclass(type(obj), DeviceMesh) else None
        if isinstance(registry, dict):
            registry.clear()


@contextlib.contextmanager
def parameters_on_meta():
    """Every nn.Parameter created inside lands on the meta device, buffers stay real.
    Parameters go through Module.register_parameter (via __setattr__), which is swapped for
    the duration: accelerate's init_empty_weights(include_buffers=False), without the
    dependency. Process-wide while active."""
    original = torch.nn.Module.register_parameter

    def register(module, name, param):
        if param is not None and not param.is_meta:
            param = type(param)(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    torch.nn.Module.register_parameter = register
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original


# ---- transformers and peft --------------------------------------------------------------

def no_split_module_names(model: torch.nn.Module) -> set[str]:
    """The class names transformers marks as unsplittable, its decoder layers: the private
    `_no_split_modules` that accelerate's device maps and FSDP wrap policies read too."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    return names


def attn_implementation(config) -> str:
    """The attention a model runs (transformers keeps the resolved choice private)."""
    return config._attn_implementation


def checkpoint_format(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors as save_pretrained writes them: transformers 5 reverts the weight conversions
    it applies on load (fused MoE experts back to one tensor per expert, renamed keys); for
    the dense families nothing changes. Applied per file of a streamed save, as transformers
    does for offloaded models: its save-direction conversions each come from one tensor."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, tensors)


@contextlib.contextmanager
def adapter_layers_switched(model: torch.nn.Module, adapter: Optional[str]):
    """Every peft tuner layer (LoRA, DoRA) of `model` computes with `adapter` as its active
    adapter, or with its adapters disabled when None, for the duration; no parameter's
    requires_grad changes. peft's own switches (disable_adapter(), set_adapter()) also
    freeze the inactive adapters' weights, and FSDP2's lazy init, if it happens in such a
    forward, then finds no trainable parameter and records no reduce dtype: the first
    backward under bf16 mixed precision fails. Sets BaseTunerLayer's private
    `_disable_adapters` and `_active_adapter`, which its forward reads."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    saved = [(m._disable_adapters, m._active_adapter) for m in layers]
    try:
        for m in layers:
            if adapter is None:
                m._disable_adapters = True
            else:
                m._active_adapter = [adapter]
        yield
    finally:
        for m, (disabled, active) in zip(layers, saved):
            m._disable_adapters, m._active_adapter = disabled, active


def adapted_attention_class() -> type:
    """peft's LLaMA-Adapter attention wrapper, whose prompt and gate shardtune initialises."""
    from peft.tuners.adaption_prompt.layer import _BaseAdaptedAttention

    return _BaseAdaptedAttention


# ---- torchao ----------------------------------------------------------------------------

def nf4_module():
    """torchao's NF4 module: torchao.quantization.quantize_.workflows.nf4 from 0.18 on,
    torchao.dtypes.nf4tensor before (0.17 and 0.18 tested)."""
    try:
        from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor
        return nf4_tensor
    except ImportError:
        pass
    try:
        from torchao.dtypes import nf4tensor
        return nf4tensor
    except ImportError:
        raise UserError("--quantization 4bit with --enable_fsdp needs torchao: pip install 'shardtune[quant]'") from None


def nf4_block_absmax(rows: torch.Tensor, block_size: int) -> torch.Tensor:
    """The absmax of each NF4 block of `rows` (flattened), as torchao's to_nf4 computes it."""
    return nf4_module().get_block_absmax(rows.flatten(), block_size)


def nf4_shard(rows: torch.Tensor, absmax: torch.Tensor, first_block: int, block_size: int,
              scaler_block_size: int) -> torch.Tensor:
    """What FSDP2 keeps of torchao's to_nf4(whole) for `rows`, a slice of whole's first
    dimension starting at block `first_block`, computed from the rows and `absmax`, the
    block absmax values of the whole tensor (nf4_block_absmax of every slice, in order).
    A block's 4-bit codes depend on its own absmax only; the double quantization of the
    absmax values subtracts the mean of all of them. Uses torchao's internal
    NF4Tensor.double_quantize_scalers and construct_nf4_args."""
    nf4 = nf4_module()
    local = nf4.to_nf4(rows, block_size, scaler_block_size)  # its codes are right, its scales use the rows' mean
    # with block size 1 each absmax value is its own block (abs() leaves it as it is), so
    # torchao's own code takes the mean and quantizes the values exactly as to_nf4(whole) does
    scalers, factors, mean = nf4.NF4Tensor.double_quantize_scalers(absmax, 1, scaler_block_size)
    stop = first_block + local.n_blocks
    return nf4.NF4Tensor(*nf4.construct_nf4_args(local, {
        "quantized_scalers": scalers[first_block:stop].clone(),
        "quantization_factor": factors[first_block // scaler_block_size:stop // scaler_block_size].clone(),
        "scaler_mean": mean,
        "n_blocks": absmax.numel(),  # the whole tensor's, which FSDP2's split of to_nf4(whole) keeps
        "storage_offset": 0,  # a slice's offset into the whole means nothing here (FSDP2 expects 0)
    }))


# ---- torch.compile (dynamo) ---------------------------------------------------------------

def allow_checkpointed_side_effects() -> None:
    """Let dynamo compile a checkpointed decoder layer whose forward mutates Python state.

    From transformers 5.25 on, every attention module's forward runs inside the `kernels`
    package's `use_kernelized_func` wrapper, which sets a module-level CompileableContextVar
    on entry and resets it on exit (it routes rotary embedding calls to hub kernels). Under
    torch.utils.checkpoint dynamo refuses to trace a mutation of state from outside the
    checkpoint, because eager checkpointing would replay it in backward's recomputation; it
    then graph-breaks and runs the whole layer eagerly. The set/reset pair leaves the
    variable as it found it, and nothing in the layer's tensors depends on it, so not
    replaying it in backward computes the same gradients. The flag is process-wide; the
    training process compiles nothing but the decoder layers. torch before 2.13 lacks it
    (2.9.1 does): there a checkpointed layer graph-breaks, which the run reports."""
    if hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True


def graph_breaks() -> list[str]:
    """One line per distinct reason dynamo gave for a graph break in this process so far:
    the code around each break ran eagerly. The counter is keyed by the full message."""
    from torch._dynamo.utils import counters

    return [_summary(reason) for reason in counters["graph_break"]]


def _summary(reason: str) -> str:
    """The message's title and its developer context ('Attempted to mutate ...')."""
    lines = [line.strip() for line in reason.splitlines() if line.strip()]
    context = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Developer debug context:")), "")
    return f"{lines[0]}: {context}" if context else lines[0] if lines else reason
