"""llama-recipes compatible entry point, so the seed's command runs from a checkout:

    torchrun --nnodes 1 --nproc_per_node 4 llama_finetuning.py --enable_fsdp \
        --model_name PATH --use_peft --peft_method lora --output_dir OUT
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))  # works without installing too

from shardtune.commands.finetune import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
