"""torchtune 0.6.1's lora_finetune_single_device recipe (`tune run`), in fp32 on the CPU,
on the harness's model (read by its HF checkpointer) and packed batches. Runs in
benchmarks/.venv-torchtune. torchtune's own tokens/s counts only label tokens, so the
steps are clocked by tt_data's collate and LR schedule, and tokens counted from the batches."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch
import yaml

from . import tt_data
from .batchfile import load_batches
from .measure import StepRecord, emit, runner_args, summarize

LLAMA2_VOCAB = 32000


def recipe_config(args, settings: dict, work: Path) -> dict:
    hf = json.loads((Path(args.model) / "config.json").read_text())
    return {
        "output_dir": str(work),
        "model": {
            "_component_": "torchtune.models.llama2.lora_llama2",
            "lora_attn_modules": list(settings["lora_targets"]), "apply_lora_to_mlp": False,
            "apply_lora_to_output": False, "vocab_size": hf["vocab_size"], "num_layers": hf["num_hidden_layers"],
            "num_heads": hf["num_attention_heads"], "num_kv_heads": hf["num_key_value_heads"],
            "embed_dim": hf["hidden_size"], "intermediate_dim": hf["intermediate_size"],
            "max_seq_len": settings["context"], "norm_eps": hf["rms_norm_eps"],
            "lora_rank": settings["lora_r"], "lora_alpha": settings["lora_alpha"],
            "lora_dropout": settings["lora_dropout"],
        },
        "tokenizer": {"_component_": "torchtune.models.llama2.llama2_tokenizer",
                      "path": str(Path(args.tokenizer) / "tokenizer.model"), "max_seq_len": settings["context"]},
        "checkpointer": {"_component_": "torchtune.training.FullModelHFCheckpointer",
                         "checkpoint_dir": args.model, "checkpoint_files": ["model.safetensors"],
                         "adapter_checkpoint": None, "recipe_checkpoint": None,
                         "output_dir": str(work), "model_type": "LLAMA2"},
        "resume_from_checkpoint": False, "save_adapter_weights_only": True,
        "dataset": {"_component_": "benchmarks.tt_data.packed_chunks", "path": args.batches},
        "collate_fn": "benchmarks.tt_data.collate",
        "seed": settings["seed"], "shuffle": False, "batch_size": settings["micro_batch"],
        "optimizer": {"_component_": "torch.optim.AdamW", "fused": False, "weight_decay": 0.0, "lr": settings["lr"]},
        "lr_scheduler": {"_component_": "benchmarks.tt_data.constant_lr"},
        "loss": {"_component_": "torchtune.modules.loss.CEWithChunkedOutputLoss"},
        "epochs": 1, "max_steps_per_epoch": settings["max_steps"] or None, "gradient_accumulation_steps": 1,
        "clip_grad_norm": None, "compile": False,
        "metric_logger": {"_component_": "torchtune.training.metric_logging.DiskLogger",
                          "log_dir": str(work / "logs"), "filename": "steps"},
        "log_every_n_steps": 1, "log_peak_memory_stats": False,
        "device": "cpu", "dtype": "fp32",
        "enable_activation_checkpointing": False, "enable_activation_offloading": False,
        "profiler": {"_component_": "torchtune.training.setup_torch_profiler", "enabled": False},
    }


def step_losses(log_dir: Path) -> list[float]:
    text = "".join(p.read_text() for p in sorted(log_dir.iterdir()))
    return [float(m) for m in re.findall(r"^Step \d+ \| loss:(\S+)", text, flags=re.M)]


def main() -> None:
    import argparse

    extra = argparse.ArgumentParser()
    extra.add_argument("--tokenizer", required=True, help="directory holding the Llama 2 tokenizer.model")
    own, rest = extra.parse_known_args()
    args = runner_args(rest)
    args.tokenizer = own.tokenizer
    torch.set_num_threads(args.threads)
    settings = json.loads(args.settings)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    config_path = work / "lora_cpu_fp32.yaml"
    config_path.write_text(yaml.safe_dump(recipe_config(args, settings, work)))

    from torchtune._cli.tune import main as tune_main

    sys.argv = ["tune", "run", "lora_finetune_single_device", "--config", str(config_path)]
    try:
        tune_main()
    except SystemExit as done:
        if done.code not in (0, None):
            raise
    losses = step_losses(work / "logs")
    batches = load_batches(Path(args.batches))
    records = [StepRecord(end, loss, batch["num_tokens"], batch["input_ids"].numel())
               for end, loss, batch in zip(tt_data.STEP_ENDS, losses, batches)]
    result = summarize("torchtune", args.size, records, tt_data.BATCH_STARTS[0], settings["warmup_steps"],
                       args.threads)
    emit(result, args.result)


if __name__ == "__main__":
    main()
