"""8-bit and 4-bit (QLoRA) LoRA through bitsandbytes on CPU, in one process. Under FSDP
(torchao NF4) see test_qlora_fsdp.py."""
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from conftest import REPO, check, python, read_metrics, torchrun

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


def _train_args(q, model, out, batch):
    return ["--use_peft", "--lora_config.lora_dropout", "0", "--model_name", str(model), "--output_dir", str(out), "--quantization", q,
            "--num_epochs", "2", "--context_length", "128", "--batch_size_training", str(batch), "--lr", "1e-2",
            "--save_metrics", "--val_batch_size", "4", "--num_workers_dataloader", "0"]


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory, tiny_quantizable):
    """q -> (output_dir, probe file) of a one-process run, trained once per module."""
    runs = {}

    def get(q):
        if q not in runs:
            out = tmp_path_factory.mktemp(f"one_rank_{q}")
            check(python(REPO / "tests" / "workers" / "train_probe.py",
                         [str(out / "probe.safetensors")] + _train_args(q, tiny_quantizable, out / "out", 4)))
            runs[q] = (out / "out", out / "probe.safetensors")
        return runs[q]
    return get


@pytest.mark.parametrize("q", ["8bit", "4bit"])
def test_quantized_lora_trains_and_reloads(q, one_rank, tiny_quantizable):
    out, probe_file = one_rank(q)
    epochs = read_metrics(out)[1]
    assert epochs[1]["train_loss"] < epochs[0]["train_loss"], epochs  # same data both epochs
    base = AutoModelForCausalLM.from_pretrained(tiny_quantizable, quantization_config=_bnb(q),
                                                dtype=torch.float32, device_map={"": "cpu"})
    assert any("bitsandbytes" in type(m).__module__ for m in base.modules())  # really quantized
    probe = load_file(probe_file)
    with torch.no_grad():
        logits = PeftModel.from_pretrained(base, out).eval()(input_ids=probe["probe"]).logits
    assert (logits - probe["logits"]).abs().max().item() <= 1e-5


def test_4bit_lora_under_torchrun_trains_one_adapter(one_rank, tmp_path, tiny_quantizable):
    """Without --enable_fsdp, torchrun's ranks are DDP over the bitsandbytes model: 2 ranks x
    batch 2 train the adapter that 1 rank x batch 4 trains (before, each rank trained its own
    on its share of the data and only rank 0's was saved)."""
    reference, _ = one_rank("4bit")
    out = tmp_path / "out"
    check(torchrun(2, REPO / "llama_finetuning.py", _train_args("4bit", tiny_quantizable, out, 2)))
    expected, got = load_file(reference / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert expected.keys() == got.keys() and expected
    for name, tensor in expected.items():
        assert (got[name] - tensor).abs().max().item() <= 1e-5, name


def test_bitsandbytes_base_follows_the_compute_dtype(tiny_quantizable):
    """--quantization under bf16 mixed precision: the 4-bit matmuls compute in bf16 and the
    weights left unquantized are held in bf16 (they were fp32 whatever the precision)."""
    from shardtune.modeling.load import load_quantized, load_spec

    model = load_quantized(load_spec(str(tiny_quantizable)), "4bit", torch.device("cpu"), torch.bfloat16)
    quantized = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    assert quantized and all(m.compute_dtype == torch.bfloat16 for m in quantized)
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
