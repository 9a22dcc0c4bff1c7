"""`shardtune dpo` and `python -m shardtune.dpo`: the preference-tuning recipe (recipes/dpo.py).
--help is answered from the config schema alone; the recipe is imported only to run."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if "-h" in args or "--help" in args:
        from ..config.parse import usage

        print(usage())
        return 0
    from ..recipes.dpo import main as run_recipe

    return run_recipe(args)
