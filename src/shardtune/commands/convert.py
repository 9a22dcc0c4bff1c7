"""`shardtune convert CHECKPOINT OUT`: a step checkpoint -> a PEFT adapter or Hugging Face model."""
from __future__ import annotations

import argparse
import json

from ..checkpoint.convert import convert


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="shardtune convert",
        description="Turn a step checkpoint into a PEFT adapter (PEFT runs) or a Hugging Face model directory.",
        epilog="example: shardtune convert out/checkpoints/fine-tuned-llama/step_000200 out/adapter-step200")
    parser.add_argument("checkpoint", help="a step_NNNNNN (or best) checkpoint directory")
    parser.add_argument("out_dir", help="a new or empty directory")
    args = parser.parse_args(argv)
    out = convert(args.checkpoint, args.out_dir)
    print(json.dumps({"written": str(out)}))
    return 0
