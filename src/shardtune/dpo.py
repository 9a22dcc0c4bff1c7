"""`python -m shardtune.dpo` (and torchrun ... -m shardtune.dpo): preference tuning. The
recipe is recipes/dpo.py; commands/dpo.py dispatches to it."""
import sys

from .commands.dpo import main

if __name__ == "__main__":
    sys.exit(main())
