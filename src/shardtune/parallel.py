"""Parallel stage: device mesh, FSDP2 `fully_shard`, DDP, and the precision policy.

llama-recipes' sharding strategies map onto FSDP2 as:
  FULL_SHARD    -> reshard_after_forward=True  (1-D mesh)
  SHARD_GRAD_OP -> reshard_after_forward=False (1-D mesh)
  NO_SHARD      -> replicate: a (world, 1) mesh, every rank holds everything
  HYBRID_SHARD  -> a (replicas, shard_group) mesh; shard inside a node, replicate across
"""
from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from . import _compat
from .device import Dist
from .errors import UserError

log = logging.getLogger(__name__)

STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD")


@dataclass(frozen=True)
class Precision:
    """storage: dtype the trained weights are held in (fp32 master weights unless pure_bf16);
    compute: dtype of forward/backward; reduce: dtype of gradient reduction."""

    storage: torch.dtype = torch.float32
    compute: torch.dtype = torch.float32
    reduce: torch.dtype = torch.float32
    grad_scaler: bool = False  # fp16 needs loss scaling; bf16 does not

    @property
    def frozen(self) -> torch.dtype:
        """The dtype of weights that do not train. Under mixed precision they are only ever
        read in the compute dtype, so they are held in it: fp32 master weights are for what
        the optimizer updates (torchtune holds a LoRA base in bf16 too). Half the bytes of the
        frozen base of a LoRA run; bit for bit the same forward under FSDP2, which casts to
        the compute dtype when it gathers."""
        return self.compute if self.compute.itemsize < self.storage.itemsize else self.storage

    @property
    def name(self) -> str:
        if self.storage == torch.bfloat16:
            return "pure_bf16"
        return {torch.float32: "fp32", torch.bfloat16: "bf16 mixed", torch.float16: "fp16 mixed"}[self.compute]


def resolve_precision(cfgs, fast_bf16: bool, device_type: str = "", log_choice: bool = True) -> Precision:
    """The run's precision from its flags; fast_bf16: the device has bf16 units (the
    recipe asks its Dist, `shardtune plan` assumes them for cuda)."""
    t, f = cfgs.train, cfgs.fsdp
    fp16 = t.use_fp16 or f.use_fp16
    if fp16 and f.pure_bf16:
        raise UserError("--use_fp16 and --pure_bf16 contradict each other; pick one")
    if f.pure_bf16:
        return Precision(torch.bfloat16, torch.bfloat16, torch.bfloat16)
    if fp16:
        return Precision(torch.float32, torch.float16, torch.float32, grad_scaler=True)
    wants_mixed = t.mixed_precision and f.mixed_precision
    explicit = cfgs.was_set(t, "mixed_precision") or cfgs.was_set(f, "mixed_precision")
    if wants_mixed and (fast_bf16 or explicit):
        return Precision(compute=torch.bfloat16)
    if wants_mixed and log_choice:
        # llama-recipes' default mixed_precision=True only applies where bf16 is fast.
        log.info("mixed_precision: %s has no fast bf16, training in fp32 (pass --mixed_precision True to force bf16)", device_type)
    return Precision()


def mesh_shape(fsdp_cfg, world: int, local_world: int) -> tuple[int, ...]:
    """(shard,) for FULL_SHARD and SHARD_GRAD_OP, else (replicas, shard): the mesh a run
    builds, also what `shardtune plan` models. local_world: ranks per node."""
    strategy = "HYBRID_SHARD" if fsdp_cfg.hsdp else fsdp_cfg.sharding_strategy
    if strategy in ("FULL_SHARD", "SHARD_GRAD_OP"):  # the name was validated by config.validate
        return (world,)
    if strategy == "NO_SHARD":
        return (world, 1)
    shard = fsdp_cfg.sharding_group_size or local_world
    replicas = fsdp_cfg.replica_group_size or (world // shard if shard else 0)
    if shard <= 0 or world % shard or replicas * shard != world:
        raise UserError(
            f"HYBRID_SHARD needs sharding_group_size x replica_group_size = world size {world}; "
            f"got {shard} x {replicas}: pick a sharding_group_size that divides {world}"
        )
    return (replicas, shard)


def build_mesh(dist: Dist, fsdp_cfg) -> DeviceMesh:
    shape = mesh_shape(fsdp_cfg, dist.world_size, dist.local_world_size)
    if len(shape) == 1:
        return init_device_mesh(dist.device.type, shape, mesh_dim_names=("shard",))
    return init_device_mesh(dist.device.type, shape, mesh_dim_names=("replicate", "shard"),
                            backend_override=sub_group_backends(dist, 2))


def sub_group_backends(dist: Dist, ndim: int) -> dict:
    """Each mesh dimension's (backend, options): the default group's backend, so CPU tensors
    have gloo beside the accelerator's backend there too (device.backend_for), and
    --dist_timeout (without an override, sub-groups take torch's 30 minutes)."""
    options = _compat.backend_options(dist.backend, datetime.timedelta(seconds=dist.timeout_s))
    return {dim: (dist.backend, options) for dim in range(ndim)}


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks, found by the class names HF marks as unsplittable."""
    names = _compat.no_split_module_names(model)
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:  # sharding only the root would gather the whole model on every rank
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise UserError(f"cannot find the decoder layers of this {model_type} model (transformers names none in "
                        "_no_split_modules), so it cannot be sharded or frozen per layer; use a model type that does")
    return layers


def reshards_after_forward(fsdp_cfg) -> bool:
    """A layer frees its gathered weights after forward (all but SHARD_GRAD_OP)."""
    return fsdp_cfg.sharding_strategy != "SHARD_GRAD_OP"


def shard(model: torch.nn.Module, mesh: DeviceMesh, fsdp_cfg, precision: Precision,
          pin_memory: bool = True, prepare_layer=None) -> torch.nn.Module:
    """fully_shard each decoder layer, the input embedding and an untied output head, then
    the root (the rest). prepare_layer(layer) -> parameters to leave
    unsharded: runs on each layer just before it is sharded (quant.LayerQuantizer)."""
    reshard = reshards_after_forward(fsdp_cfg)
    kwargs = {
        "mesh": mesh,
        "reshard_after_forward": reshard,
        "mp_policy": MixedPrecisionPolicy(param_dtype=precision.compute, reduce_dtype=precision.reduce),
    }
    if fsdp_cfg.fsdp_cpu_offload:
        # pinned host memory makes the copies async, but needs an accelerator
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=pin_memory)
    layers = decoder_layers(model)
    for layer in layers:
        ignored = prepare_layer(layer) if prepare_layer else None
        fully_shard(layer, ignored_params=ignored or None, **kwargs)
    embedding = model.get_input_embeddings()
    output = model.get_output_embeddings()
    if output is None or output.weight is not embedding.weight:
        # Its own unit: gathered for the lookup, then freed, and gathered again in backward only
        # when it trains. In the root it would stay gathered, with the head, for all of backward.
        fully_shard(embedding, **kwargs)
        if output is not None:
            # Gathered when forward reaches it, not at the root's start beside the embedding;
            # kept for backward, which starts with it.
            fully_shard(output, **{**kwargs, "reshard_after_forward": False})
    # The root (the final norm, root-level adapters such as the prefix encoder, and a tied
    # embedding and head) stays gathered from forward into backward, which needs the head
    # first (torch's own default for a root): one all-gather per step, not two.
    fully_shard(model, **{**kwargs, "reshard_after_forward": False})
    set_prefetch(layers)
    return model


def release_gathered(model: torch.nn.Module) -> None:
    """Units that keep their weights gathered after forward (the root, an untied head) give
    them back in backward. A forward without backward (evaluation) leaves them gathered, and
    then the model's registered parameters are not the sharded ones that the optimizer and
    checkpoints hold: reshard them after every evaluation."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def set_prefetch(layers: list) -> None:
    """Forward: each layer issues the next layer's all-gather before its own compute
    (explicit prefetch, as torchtitan sets it), so a CPU-bound step does not delay the
    all-gather behind kernel launches; it costs one more gathered layer alive at a time.
    Backward already prefetches one layer ahead in reverse forward order (FSDP2's default).
    Gradients: FSDP2 reduce-scatters only parameters that have a gradient, so LoRA's frozen
    base weights cost their all-gathers and no reduction; nothing needs setting for that.
    Measured together with the embedding and head units: BENCHMARKS.md, Distributed."""
    for layer, following in zip(layers, layers[1:]):
        layer.set_modules_to_forward_prefetch([following])


def compile_layers(model: torch.nn.Module) -> None:
    """torch.compile each decoder layer in place, before fully_shard (as torchtune and
    torchtitan do). Module.compile keeps the module and its parameter names, so state dicts
    and checkpoints are those of the uncompiled model; the layers share one code object, so
    dynamo compiles it once and reuses the graph for every layer of the same shapes.
    FSDP2's hooks stay outside the graph (torch._dynamo.config.skip_fsdp_hooks).
    Attention goes back to plain SDPA: the packed path's per-example lengths change every
    batch, and dynamo would recompile the layer for each. A layer that still graph-breaks
    is reported after the first step (recipes.sft.report_compile), never silently eager."""
    _compat.allow_checkpointed_side_effects()
    model.set_attn_implementation("sdpa")
    for layer in decoder_layers(model):
        layer.compile()


def wrap_ddp(model: torch.nn.Module, dist: Dist) -> torch.nn.Module:
    ids = [dist.device.index] if dist.is_accelerator else None
    return DistributedDataParallel(model, device_ids=ids)


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant checkpointing of every decoder layer, through transformers' own
    hook, so parameter names (and hence checkpoints) are unchanged."""
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    kwargs = {"use_reentrant": False}
    if hasattr(target, "activation_checkpointing_enable"):  # transformers >= 5.x name
        target.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        target.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
