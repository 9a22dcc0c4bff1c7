"""`python -m shardtune.finetuning`: llama-recipes' entry point, kept. The recipe is
recipes/sft.py; commands/finetune.py dispatches to it."""
import sys

from .commands.finetune import main

if __name__ == "__main__":
    sys.exit(main())
