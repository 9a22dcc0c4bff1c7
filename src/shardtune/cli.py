"""The `shardtune` console script: a table of subcommands, each a main(argv) -> exit code."""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import exit_on_user_error

def _tiny(argv: list[str]) -> int:
    from .tiny import build_tiny

    p = argparse.ArgumentParser(prog="shardtune tiny")
    p.add_argument("out_dir")
    p.add_argument("--hidden_size", type=int, default=64)
    p.add_argument("--num_layers", type=int, default=2)
    p.add_argument("--num_heads", type=int, default=4)
    p.add_argument("--num_kv_heads", type=int, default=2)
    p.add_argument("--intermediate_size", type=int, default=176)
    p.add_argument("--tokenizer", help="use this tokenizer directory instead of training one")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pretrain_steps", type=int, default=0,
                   help="language-model steps on the bundled text before saving (0 = random init)")
    a = p.parse_args(argv)
    out = build_tiny(a.out_dir, a.hidden_size, a.num_layers, a.num_heads, a.num_kv_heads,
                     a.intermediate_size, a.tokenizer, a.seed, a.pretrain_steps)
    print(f"tiny Llama written to {out}")
    return 0


def _generate(argv: list[str]) -> int:
    from .generate import load_for_inference, sample_dialogue, summarize

    p = argparse.ArgumentParser(prog="shardtune generate")
    p.add_argument("--model_name", required=True)
    p.add_argument("--peft_model")
    p.add_argument("--dialogue", help="defaults to the first test dialogue of the bundled sample")
    p.add_argument("--max_new_tokens", type=int, default=48)
    a = p.parse_args(argv)
    model, tok = load_for_inference(a.model_name, a.peft_model)
    dialogue = a.dialogue or sample_dialogue()
    print("Dialogue:\n" + dialogue.replace("\r\n", "\n"))
    print("Generated summary:\n" + summarize(model, tok, dialogue, a.max_new_tokens))
    return 0


def _entry(target: str):
    def run(argv: list[str]) -> int:
        module, func = target.split(":")
        return getattr(importlib.import_module(module, __package__), func)(argv)
    return run


# name -> (usage line, what it does, entry point)
COMMANDS = {
    "finetune": ("[flags]", "fine-tune (same flags as llama_finetuning.py; launch with torchrun for N ranks)",
                 _entry(".finetuning:main")),
    "convert": ("CHECKPOINT OUT", "a step checkpoint -> a PEFT adapter or Hugging Face model directory",
                _entry(".checkpoint.convert:convert_main")),
    "merge": ("--model_name BASE --peft_model ADAPTER --output_dir OUT", "merge LoRA into the base model",
              _entry(".checkpoint.convert:merge_main")),
    "generate": ("--model_name DIR [--peft_model DIR] [--dialogue TEXT]",
                 "summarise one dialogue with a base model and an adapter", _generate),
    "prepare": ("grammar --jfleg DIR [--c4 FILE] --out DIR",
                "build grammar_dataset's train/validation CSVs from JFLEG (+ C4_200M)", _entry(".prepare:main")),
    "plot": ("METRICS_JSONL [-o loss.png]", "draw a run's train/eval loss and perplexity curves from its metrics",
             _entry(".plot:main")),
    "tiny": ("OUT_DIR", "build a random-init tiny Llama with a tokenizer trained on bundled text", _tiny),
}


def usage() -> str:
    lines = ["usage: shardtune <command> [args]   (shardtune <command> --help for its flags)", "", "commands:"]
    for name, (args, what, _) in COMMANDS.items():
        lines += [f"  {name} {args}", f"      {what}"]
    return "\n".join(lines)


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
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
