"""The `shardtune` console script: a table of subcommands, each a main(argv) -> exit code."""
from __future__ import annotations

import importlib
import sys

from .errors import exit_on_user_error, take_debug_flag


def _entry(target: str):
    def run(argv: list[str]) -> int:
        module, func = target.split(":")
        return getattr(importlib.import_module(module, __package__), func)(argv)
    return run


# name -> (usage line, what it does, entry point)
COMMANDS = {
    "finetune": ("[flags]", "fine-tune (same flags as llama_finetuning.py; launch with torchrun for N ranks)",
                 _entry(".commands.finetune:main")),
    "dpo": ("[flags] --dataset preference_dataset --preference_dataset.data_path FILE",
            "preference tuning: DPO, IPO, SimPO or ORPO (finetune's flags plus --dpo_config.*)",
            _entry(".commands.dpo:main")),
    "convert": ("CHECKPOINT OUT", "a step checkpoint -> a PEFT adapter or Hugging Face model directory",
                _entry(".commands.convert:main")),
    "merge": ("--model_name BASE --peft_model ADAPTER --output_dir OUT", "merge LoRA into the base model",
              _entry(".commands.merge:main")),
    "generate": ("--model_name DIR [--peft_model DIR] [--prompt TEXT | --input FILE.jsonl] [--template NAME]",
                 "complete prompts with a model and an optional adapter (greedy or sampled)",
                 _entry(".commands.generate:main")),
    "eval": ("--model_name DIR [--peft_model DIR] --dataset NAME [dataset flags] [--output report.json]",
             "loss, perplexity and ROUGE (samsum) or GLEU (grammar) on a validation or test split",
             _entry(".commands.evaluate:main")),
    "prepare": ("[TRAINING FLAGS] --num_proc N | grammar --jfleg DIR [--c4 FILE] --out DIR | preference [--jfleg DIR] "
                "[--samsum FILE] --out FILE",
                "tokenize a run's splits into the cache ahead of it; or build grammar_dataset's CSVs from JFLEG "
                "(+ C4_200M), or preference_dataset pairs from JFLEG/SAMSum", _entry(".commands.prepare:main")),
    "plot": ("METRICS_JSONL [-o loss.png]", "draw a run's train/eval loss and perplexity curves from its metrics",
             _entry(".commands.plot:main")),
    "tiny": ("OUT_DIR", "build a random-init tiny Llama with a tokenizer trained on bundled text",
             _entry(".commands.tiny:main")),
    "plan": ("[finetune flags] --world_size N [--device_memory 80GiB]",
             "predict peak memory per rank (parameters, gradients, optimizer, activations) before launch",
             _entry(".commands.plan:main")),
    "verify": ("--nproc_per_node N [--verify_steps K] [finetune flags]",
               "run a few steps on 1 and N ranks and check that the per-step losses agree",
               _entry(".commands.verify:main")),
}


def usage() -> str:
    lines = ["usage: shardtune <command> [args]   (shardtune <command> --help for its flags)", "", "commands:"]
    for name, (args, what, _) in COMMANDS.items():
        lines += [f"  {name} {args}", f"      {what}"]
    return "\n".join(lines)


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    argv = take_debug_flag(sys.argv[1:] if argv is None else argv)  # for every subcommand
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        choices = ", ".join(COMMANDS)
        print(f"shardtune: error: unknown command {cmd!r}; choose one of: {choices}", file=sys.stderr)
        return 2
    return COMMANDS[cmd][2](rest)


if __name__ == "__main__":
    sys.exit(main())
