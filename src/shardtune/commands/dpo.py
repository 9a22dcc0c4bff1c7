"""`shardtune dpo` and `python -m shardtune.dpo`: the preference-tuning recipe (recipes/dpo.py).
--help is answered from the config schema alone; the recipe is imported only to run."""
from __future__ import annotations

from .finetune import run_recipe


def main(argv: list[str] | None = None) -> int:
    return run_recipe("dpo", argv)
