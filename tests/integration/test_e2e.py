"""End to end under real torchrun on CPU/gloo: the seed's command on the real SAMSum,
and a saved adapter that plain peft reloads to the trained model's exact logits."""
import json

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import REPO, SHIM, check, read_metrics, torchrun

SEED_FLAGS = ["--enable_fsdp", "--use_peft", "--peft_method", "lora"]


def test_seed_command_on_real_samsum(tmp_path, tiny_model, shared_data):
    out = tmp_path / "out"
    proc = check(torchrun(2, SHIM, SEED_FLAGS + [
        "--model_name", str(tiny_model), "--output_dir", str(out),
        "--samsum_dataset.data_path", str(shared_data / "samsum"),
        "--batch_size_training", "2", "--context_length", "512", "--num_epochs", "1",
        "--max_train_step", "24", "--max_eval_step", "4", "--lr", "1e-2", "--lora_config.r", "16",
        "--save_metrics", "--log_every", "8", "--fsdp_activation_checkpointing", "False",
    ]))
    assert "14732 examples" in proc.stdout and "818 examples" in proc.stdout
    steps, epochs = read_metrics(out)
    losses = [s["loss"] for s in steps]
    assert len(losses) == 24 and all(l == l for l in losses)
    # a random-init tiny model learns slowly; the trend over 6-step windows is still clear
    assert sum(losses[-6:]) / 6 < sum(losses[:6]) / 6 - 0.01, losses
    assert epochs[0]["eval_loss"] is not None and len(epochs[0]["peak_memory_mib_per_rank"]) == 2
    assert "epoch 1: train loss" in proc.stdout and "tokens/s" in proc.stdout
    # the epoch-end step checkpoint, and best/ pointing at it (the only evaluated one)
    run_dir = out / "checkpoints" / f"fine-tuned-{tiny_model.name}"
    assert (run_dir / "best").resolve() == (run_dir / "step_000024").resolve()
    assert json.loads((run_dir / "step_000024" / "state.json").read_text())["loop"]["best_eval_loss"] == \
        epochs[0]["eval_loss"]
    # the adapter is in PEFT format and loads in plain peft
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, out)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # trained away from zero init


def test_adapter_reproduces_trained_logits(tmp_path, tiny_model):
    out = tmp_path / "out"
    probe_file = tmp_path / "probe.safetensors"
    check(torchrun(2, REPO / "tests" / "workers" / "train_probe.py", [str(probe_file)] + SEED_FLAGS + [
        "--model_name", str(tiny_model), "--output_dir", str(out), "--batch_size_training", "2",
        "--context_length", "512", "--num_epochs", "1", "--max_train_step", "4", "--lr", "1e-2",
        "--run_validation", "False", "--num_workers_dataloader", "0",
    ]))
    probe = load_file(probe_file)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    with torch.no_grad():
        base_logits = base(input_ids=probe["probe"]).logits
        model = PeftModel.from_pretrained(base, out).eval()
        logits = model(input_ids=probe["probe"]).logits
    assert (logits - probe["logits"]).abs().max().item() <= 1e-5
    assert (base_logits - probe["logits"]).abs().max().item() > 1e-3  # training changed the model
