"""`shardtune tiny OUT_DIR`: a random-init tiny Llama with a tokenizer trained on bundled text."""
from __future__ import annotations

import argparse

from ..modeling.tiny import build_tiny


def main(argv: list[str]) -> int:
    """`shardtune tiny OUT_DIR [options]`."""
    parser = argparse.ArgumentParser(prog="shardtune tiny")
    parser.add_argument("out_dir")
    parser.add_argument("--hidden_size", type=int, default=64)
    parser.add_argument("--num_layers", type=int, default=2)
    parser.add_argument("--num_heads", type=int, default=4)
    parser.add_argument("--num_kv_heads", type=int, default=2)
    parser.add_argument("--intermediate_size", type=int, default=176)
    parser.add_argument("--tokenizer", help="use this tokenizer directory instead of training one")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pretrain_steps", type=int, default=0,
                        help="language-model steps on the bundled text before saving (0 = random init)")
    args = parser.parse_args(argv)
    out = build_tiny(args.out_dir, args.hidden_size, args.num_layers, args.num_heads, args.num_kv_heads,
                     args.intermediate_size, args.tokenizer, args.seed, args.pretrain_steps)
    print(f"tiny Llama written to {out}")
    return 0
