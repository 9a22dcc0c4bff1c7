"""shardtune (2 FSDP ranks) against an independent plain PEFT + PyTorch loop.

The reference shares only the data (chunks and the documented global sample order);
it runs every example on its own, unpacked, through a plain PeftModel, with its own
loss and torch.optim.AdamW."""
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from conftest import SHIM, check, plain_loop_losses, read_metrics, torchrun, assert_close
from shardtune.config.parse import parse_args
from shardtune.data import build_split
from shardtune.modeling.load import load_tokenizer

LR, WD, STEPS, GLOBAL_BATCH, SEED = 2e-3, 0.01, 5, 4, 42


def _reference_losses(tiny_model, init_dir, args):
    cfgs = parse_args(args)
    chunks = build_split(cfgs, load_tokenizer(str(tiny_model)), "train").dataset.chunks
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, init_dir, is_trainable=True)
    return plain_loop_losses(model, chunks, STEPS, GLOBAL_BATCH, LR, WD, SEED)


def test_matches_plain_peft_loop(tmp_path, tiny_model, shared_data):
    # the shared starting point: a plain-peft LoRA init with a non-zero B, so step 1 trains A too
    torch.manual_seed(0)
    init = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                          LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in init.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.02)
    init.save_pretrained(tmp_path / "init")

    out = tmp_path / "out"
    args = ["--use_peft", "--peft_method", "lora", "--lora_config.lora_dropout", "0",
            "--model_name", str(tiny_model), "--output_dir", str(out), "--num_workers_dataloader", "0",
            "--samsum_dataset.data_path", str(shared_data / "samsum"),
            "--samsum_dataset.train_split", "validation", "--context_length", "300",
            "--run_validation", "False", "--num_epochs", "1", "--max_train_step", str(STEPS),
            "--lr", str(LR), "--weight_decay", str(WD), "--seed", str(SEED), "--save_metrics",
            "--from_peft_checkpoint", str(tmp_path / "init")]
    check(torchrun(2, SHIM, args + ["--enable_fsdp", "--batch_size_training", str(GLOBAL_BATCH // 2)]))
    ours = [s["loss"] for s in read_metrics(out)[0]]
    ref = _reference_losses(tiny_model, tmp_path / "init", args)
    assert len(ours) == len(ref) == STEPS
    assert_close(ours, ref, rtol=1e-5)
    assert ref[0] != ref[-1]
