"""Choices of the GPU path that are pure functions, checked on CPU: the process-group
backend for an accelerator (CPU tensors need gloo beside NCCL), its HSDP sub-groups, the
optimizer kernel, and the dtype frozen weights are held in."""
import datetime

import pytest
import torch

from shardtune import device, parallel
from shardtune.config.parse import parse_args
from shardtune.optim.build import build_optimizer


@pytest.mark.parametrize("device_type, accelerator_backend", [("cuda", "nccl"), ("xpu", "xccl")])
def test_accelerators_get_gloo_for_cpu_tensors(device_type, accelerator_backend):
    backend = device.backend_for(device_type)
    pairs = dict(part.split(":") for part in backend.split(","))
    assert pairs == {device_type: accelerator_backend, "cpu": "gloo"}
    assert device.backend_for("cpu") == "gloo"


def test_hsdp_sub_groups_get_the_same_backends_and_the_timeout():
    # xpu: the options of a non-NCCL backend can be built on a CPU-only torch
    dist = device.Dist(0, 0, 4, 2, torch.device("xpu", 0), device.backend_for("xpu"), timeout_s=77)
    override = parallel.sub_group_backends(dist, 2)
    assert sorted(override) == [0, 1]
    for backend, options in override.values():
        assert backend == dist.backend and "cpu:gloo" in backend
        assert options._timeout == datetime.timedelta(seconds=77)


@pytest.mark.parametrize("device_type, flags, fused", [
    ("cuda", [], True),
    ("cuda", ["--enable_fsdp", "--fsdp_cpu_offload"], None),  # the shards and their state live on the host
    ("cpu", [], None),  # torch's default: CPU runs keep their numbers
])
def test_adamw_is_fused_where_its_state_lives_on_an_accelerator(device_type, flags, fused):
    dist = device.Dist(0, 0, 1, 1, torch.device(device_type, 0), device.backend_for(device_type))
    params = [torch.nn.Parameter(torch.zeros(2))]  # on the host: torch's fused AdamW accepts CPU tensors too
    assert build_optimizer(params, parse_args(["--model_name", "unused", *flags]), dist).defaults["fused"] is fused


@pytest.mark.parametrize("flags, frozen, trained", [
    ([], torch.float32, torch.float32),
    (["--mixed_precision", "True"], torch.bfloat16, torch.float32),
    (["--use_fp16"], torch.float16, torch.float32),
    (["--pure_bf16"], torch.bfloat16, torch.bfloat16),
])
def test_frozen_weights_are_held_in_the_compute_dtype(flags, frozen, trained):
    precision = parallel.resolve_precision(parse_args(["--model_name", "unused", *flags]), fast_bf16=False)
    assert (precision.frozen, precision.storage) == (frozen, trained)
