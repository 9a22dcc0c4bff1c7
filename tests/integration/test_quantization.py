"""8-bit and 4-bit (QLoRA) LoRA through bitsandbytes on CPU, in one process. Under FSDP
(torchao NF4) see test_qlora_fsdp.py."""
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from conftest import REPO, check, python, read_metrics

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def tiny_quantizable(tmp_path_factory):
    # bitsandbytes' CPU kernels need matrix sizes that divide their block size
    from shardtune.modeling.tiny import build_tiny

    return build_tiny(str(tmp_path_factory.mktemp("tq") / "model"), intermediate_size=128, pretrain_steps=100)


def _bnb(q):
    if q == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)


@pytest.mark.parametrize("q", ["8bit", "4bit"])
def test_quantized_lora_trains_and_reloads(q, tmp_path, tiny_quantizable):
    out, probe_file = tmp_path / "out", tmp_path / "probe.safetensors"
    check(python(REPO / "tests" / "workers" / "train_probe.py", [
        str(probe_file), "--use_peft", "--model_name", str(tiny_quantizable), "--output_dir", str(out),
        "--quantization", q, "--num_epochs", "2", "--context_length", "128", "--batch_size_training", "4",
        "--lr", "1e-2", "--save_metrics", "--val_batch_size", "4", "--num_workers_dataloader", "0"]))
    epochs = read_metrics(out)[1]
    assert epochs[1]["train_loss"] < epochs[0]["train_loss"], epochs  # same data both epochs
    base = AutoModelForCausalLM.from_pretrained(tiny_quantizable, quantization_config=_bnb(q),
                                                dtype=torch.float32, device_map={"": "cpu"})
    assert any("bitsandbytes" in type(m).__module__ for m in base.modules())  # really quantized
    probe = load_file(probe_file)
    with torch.no_grad():
        logits = PeftModel.from_pretrained(base, out).eval()(input_ids=probe["probe"]).logits
    assert (logits - probe["logits"]).abs().max().item() <= 1e-5
