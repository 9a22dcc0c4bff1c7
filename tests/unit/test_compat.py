"""The private and version-dependent APIs in shardtune._compat still exist and still mean
what shardtune relies on: an upgrade that changes one fails here, by name."""
import pytest
import torch

from shardtune import _compat


@pytest.mark.pinned
def test_dynamo_has_the_checkpoint_side_effect_switch():
    assert hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint")
    with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=False):
        _compat.allow_checkpointed_side_effects()
        assert torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint is True


def test_graph_breaks_names_each_cause_once():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()

    @torch.compile(backend="eager")
    def twice_broken(x):
        x = x * 2
        torch._dynamo.graph_break()
        return x + 1

    assert _compat.graph_breaks() == []
    twice_broken(torch.ones(3))
    twice_broken(torch.ones(4))  # a recompile meets the same break: still one cause
    breaks = _compat.graph_breaks()
    assert len(breaks) == 1 and "graph_break" in breaks[0], breaks


def test_parameters_on_meta_moves_parameters_and_keeps_buffers():
    with _compat.parameters_on_meta():
        norm = torch.nn.BatchNorm1d(4)
    assert norm.weight.is_meta and isinstance(norm.weight, torch.nn.Parameter) and norm.weight.requires_grad
    assert not norm.running_mean.is_meta
    assert not torch.nn.Linear(2, 2).weight.is_meta  # and the swap is undone


def test_attention_choice_decoder_layer_names_and_saved_format():
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    shape = dict(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=2)
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**shape))
        moe = MixtralForCausalLM(MixtralConfig(**shape, num_local_experts=2))
    model.set_attn_implementation("eager")
    assert _compat.attn_implementation(model.config) == "eager"
    assert _compat.no_split_module_names(model) == {"LlamaDecoderLayer"}
    # a dense model is saved as it is held; Mixtral's fused experts, one tensor per expert
    tensors = dict(model.state_dict())
    assert _compat.checkpoint_format(model, tensors).keys() == tensors.keys()
    fused = {k: v for k, v in moe.state_dict().items() if ".experts." in k}
    saved = _compat.checkpoint_format(moe, fused)
    assert len(fused) == 2 and "model.layers.0.block_sparse_moe.experts.1.w3.weight" in saved and len(saved) == 6


def test_peft_and_torchao_names_exist():
    import torch.nn as nn

    assert issubclass(_compat.adapted_attention_class(), nn.Module)
    assert hasattr(_compat.nf4_module(), "NF4Tensor")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_shards_quantized_from_rows_are_the_split_of_the_whole(dtype):
    """torchao's double quantization (nf4_shard) still takes only the mean of all block
    absmax values from beyond a shard's rows: each half of a weight, quantized from its rows
    and the absmax values of both halves, is bitwise what FSDP2's split (torch.chunk) cuts
    from to_nf4 of the whole; quantized with its own absmax values alone, it is not."""
    nf4 = _compat.nf4_module()
    torch.manual_seed(0)
    whole = (torch.randn(256, 128) * torch.linspace(0.1, 3, 256)[:, None]).to(dtype)  # halves of 64 x 256 blocks
    halves = whole.chunk(2)
    absmax = torch.cat([_compat.nf4_block_absmax(half, 64) for half in halves])
    for half, expected, first in zip(halves, torch.chunk(nf4.to_nf4(whole, 64, 256), 2), (0, 256)):
        shard = _compat.nf4_shard(half.clone(), absmax, first, 64, 256)
        for attr in ("quantized_data", "quantized_scalers", "quantization_factor", "scaler_mean"):
            assert torch.equal(getattr(shard, attr), getattr(expected, attr)), attr
        assert (shard.shape, shard.n_blocks, shard.storage_offset()) == (expected.shape, expected.n_blocks, 0)
        alone = _compat.nf4_shard(half, _compat.nf4_block_absmax(half, 64), 0, 64, 256)
        assert not torch.equal(alone.quantized_scalers, expected.quantized_scalers)


@pytest.mark.pinned
def test_gloo_group_options_and_mesh_registry(tmp_path):
    """Options with a timeout reach a mesh's sub-groups; the registry release_device_meshes
    empties exists and is a dict (one real gloo rank)."""
    import datetime

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    timeout = datetime.timedelta(seconds=123)
    assert _compat.backend_options("gloo", timeout)._timeout == timeout
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("replicate", "shard"),
                                backend_override={0: ("gloo", _compat.backend_options("gloo", timeout)),
                                                  1: ("gloo", _compat.backend_options("gloo", timeout))})
        assert isinstance(mesh._pg_registry, dict) and mesh._pg_registry
        _compat.release_device_meshes()
        assert not mesh._pg_registry
    finally:
        dist.destroy_process_group()


def test_adapter_layers_switched_computes_as_peft_switches_and_keeps_requires_grad():
    """The private flags peft's LoRA forward reads: switched off, the output is the base's;
    switched to a second adapter, it is what peft's own set_adapter gives; requires_grad
    (which FSDP2's lazy init reads) never changes, and everything is restored on exit."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(4, 4))
    x = torch.randn(2, 4)
    plain = base(x)
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    model.add_adapter("other", LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    policy = model(x)
    model.base_model.set_adapter("other")
    other = model(x)
    model.base_model.set_adapter("default")
    for adapter, expected in ((None, plain), ("other", other)):
        with _compat.adapter_layers_switched(model, adapter):
            assert torch.equal(model(x), expected)
            assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    assert torch.equal(model(x), policy) and not torch.equal(policy, plain) and not torch.equal(other, policy)
