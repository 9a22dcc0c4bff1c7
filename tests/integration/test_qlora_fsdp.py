"""QLoRA under FSDP2: --quantization 4bit --enable_fsdp holds the decoder layers' linear
weights as torchao NF4, sharded so that each rank reads, quantizes and keeps 1/world of
them. Each rank's shards are bitwise those of the weights quantized whole, the same run at 1
and 2 ranks gives the same losses, each rank holds half the bytes at 2 ranks, and the
adapter loads in plain peft, where a base quantized by torchao directly reproduces the
trained model's logits."""
import json

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import REPO, SHIM, check, error_lines, read_metrics, run_cli, torchrun, assert_close
from shardtune import _compat

WORKER = REPO / "tests" / "workers" / "train_probe.py"
STEPS = 10
COMMON = ["--enable_fsdp", "--use_peft", "--peft_method", "lora", "--quantization", "4bit", "--num_epochs", "1",
          "--max_train_step", str(STEPS), "--context_length", "128", "--num_workers_dataloader", "0",
          "--run_validation", "False", "--save_metrics", "--log_every", "1", "--lora_config.lora_dropout", "0",
          "--lr", "1e-2"]


@pytest.fixture(scope="module")
def runs(tiny_nf4_model, tmp_path_factory):
    """One launch per world size, global batch 2."""
    tmp = tmp_path_factory.mktemp("qlora")
    out = {world: tmp / f"out{world}" for world in (1, 2)}
    for world in (1, 2):
        check(torchrun(world, WORKER, [str(tmp / f"probe{world}.safetensors"), *COMMON, "--model_name",
                                       str(tiny_nf4_model), "--output_dir", str(out[world]),
                                       "--batch_size_training", str(2 // world)]))
    return out


def test_losses_match_at_one_and_two_ranks(runs):
    one = [s["loss"] for s in read_metrics(runs[1])[0]]
    two = [s["loss"] for s in read_metrics(runs[2])[0]]
    assert len(one) == len(two) == STEPS
    assert_close(one, two, rtol=1e-4)
    assert one[0] != one[-1]  # it trained


def test_ranks_quantize_their_rows_as_the_whole_weight(runs):
    """Each rank reads and quantizes only its rows of each NF4 weight, yet holds bitwise
    the shard FSDP2 would cut from the weight quantized whole: codes, block scales, their
    scale factors and the mean of all block scales (gathered exactly over the ranks)."""
    for world in (1, 2):
        with safe_open(runs[world].parent / f"probe{world}.safetensors", "pt") as f:
            ranks = json.loads(f.metadata()["nf4"])
        assert ranks == [[2 * 7, []]] * world, ranks  # 2 layers x 7 linears on every rank, none differing


def test_each_rank_holds_its_slice(runs, tiny_nf4_model):
    one = load_file(runs[1].parent / "probe1.safetensors")["held_bytes"].tolist()
    two = load_file(runs[2].parent / "probe2.safetensors")["held_bytes"].tolist()
    assert len(one) == 1 and two == [one[0] // 2] * 2, (one, two)  # every dimension here splits evenly
    with safe_open(tiny_nf4_model / "model.safetensors", "pt") as f:
        fp32_bytes = sum(f.get_tensor(k).nbytes for k in f.keys())
    assert one[0] < fp32_bytes / 2  # the quantized base really is smaller than the float one


def _nf4_base(model_dir):
    """The base as transformers loads it, each decoder-layer linear weight replaced by its
    NF4 round trip, quantized by torchao directly (not by shardtune's sharded path)."""
    nf4 = _compat.nf4_module()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            for module in layer.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight.copy_(nf4.to_nf4(module.weight.detach()).get_original_weight())
    return model


@pytest.mark.parametrize("world", [1, 2])
def test_adapter_loads_in_plain_peft(runs, tiny_nf4_model, world):
    probe = load_file(runs[world].parent / f"probe{world}.safetensors")
    with torch.no_grad():
        on_nf4 = PeftModel.from_pretrained(_nf4_base(tiny_nf4_model), runs[world]).eval()(input_ids=probe["probe"]).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_nf4_model, dtype=torch.float32)
        on_float = PeftModel.from_pretrained(base, runs[world]).eval()(input_ids=probe["probe"]).logits
    assert (on_nf4 - probe["logits"]).abs().max().item() <= 1e-4
    assert torch.isfinite(on_float).all() and on_float.shape == probe["logits"].shape


def test_unsupported_combinations_are_refused(tmp_path, tiny_model, capfd):
    """8-bit under FSDP (refused before any process group: in this process), and weights
    whose per-rank slice does not hold whole NF4 blocks (tiny_model: 64 x 64 projections;
    found at 2 ranks)."""
    flags = ["--enable_fsdp", "--use_peft", "--model_name", str(tiny_model), "--output_dir", str(tmp_path / "o"),
             "--num_workers_dataloader", "0", "--context_length", "128", "--batch_size_training", "1"]
    code, _, err = run_cli(capfd, ["finetune", "--quantization", "8bit", *flags])
    assert code != 0 and "Traceback" not in err
    assert [line for line in error_lines(err) if "--quantization" in line], err
    proc = torchrun(2, SHIM, ["--quantization", "4bit", *flags])
    assert proc.returncode != 0 and "src/shardtune" not in proc.stderr, proc.stderr[-3000:]  # no traceback of ours
    assert any("--quantization" in line for line in error_lines(proc.stderr)), proc.stderr[-3000:]
