"""`shardtune merge`: a LoRA adapter folded into its base -> a Hugging Face model directory."""
from __future__ import annotations

import argparse
import json

from ..checkpoint.convert import merge


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="shardtune merge", description="Merge a LoRA adapter into its base model and save a Hugging Face model.",
        epilog="example: shardtune merge --model_name meta-llama/Llama-2-7b-hf --peft_model out --output_dir merged")
    parser.add_argument("--model_name", required=True, help="the base model directory")
    parser.add_argument("--peft_model", required=True, help="the LoRA adapter directory")
    parser.add_argument("--output_dir", required=True, help="a new or empty directory")
    args = parser.parse_args(argv)
    out = merge(args.model_name, args.peft_model, args.output_dir)
    print(json.dumps({"written": str(out)}))
    return 0
