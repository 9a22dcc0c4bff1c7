"""Choices of the GPU path that are pure functions, checked on CPU: the process-group
backend for an accelerator (CPU tensors need gloo beside NCCL), its HSDP sub-groups, the
optimizer kernel, and the dtype frozen weights are held in."""
import datetime

import pytest
import torch

from shardtune import device, parallel
from shardtune.config.parse import parse_args
from shardtune.optim.build import adamw_kernel, build_optimizer


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


def test_adamw_is_fused_on_accelerators_only():
    assert adamw_kernel(on_accelerator=True) == {"fused": True}
    assert adamw_kernel(on_accelerator=False) == {}
    cfgs = parse_args(["--model_name", "unused"])
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert build_optimizer(params, cfgs).defaults["fused"] is None  # CPU: torch's default, numbers unchanged


@pytest.mark.parametrize("flags, frozen, trained", [
    ([], torch.float32, torch.float32),
    (["--mixed_precision", "True"], torch.bfloat16, torch.float32),
    (["--use_fp16"], torch.float16, torch.float32),
    (["--pure_bf16"], torch.bfloat16, torch.bfloat16),
])
def test_frozen_weights_are_held_in_the_compute_dtype(flags, frozen, trained):
    precision = parallel.resolve_precision(parse_args(["--model_name", "unused", *flags]), fast_bf16=False)
    assert (precision.frozen, precision.storage) == (frozen, trained)


def test_a_bf16_checkpoint_keeps_its_fingerprint_once_a_model_is_built(tmp_path):
    """Real Llama checkpoints are saved in bf16. Building the model writes the run's dtype
    into the config; the fingerprint a resume compares must be the config as read, or
    --resume refuses the run's own checkpoints as "another model"."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from shardtune.checkpoint.resume import model_fingerprint
    from shardtune.modeling.load import build_meta_model, load_spec

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path)
    spec = load_spec(str(tmp_path))
    saved = model_fingerprint(spec)
    spec.dtype = torch.float32
    build_meta_model(spec)
    assert model_fingerprint(spec) == saved == model_fingerprint(load_spec(str(tmp_path)))
