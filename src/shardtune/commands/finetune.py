"""`shardtune finetune`, `python -m shardtune.finetuning` and `llama_finetuning.py`: the
supervised fine-tuning recipe (recipes/sft.py). --help is answered from the config schema
alone; the recipe (torch, transformers, peft) is imported only to run."""
from __future__ import annotations

import importlib
import sys


def run_recipe(recipe: str, argv: list[str] | None) -> int:
    """recipes/<recipe>.py's main on argv, or the flags' help without importing it."""
    args = sys.argv[1:] if argv is None else argv
    if "-h" in args or "--help" in args:
        from ..config.parse import usage

        print(usage())
        return 0
    return importlib.import_module(f"..recipes.{recipe}", __package__).main(args)


def main(argv: list[str] | None = None) -> int:
    return run_recipe("sft", argv)
