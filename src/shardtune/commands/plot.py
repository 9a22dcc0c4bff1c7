"""`shardtune plot METRICS_JSONL`: draw a run's train/eval loss and perplexity curves."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserError
from ..metrics.curve import draw, read_curves


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="shardtune plot", description=__doc__.split(":", 1)[1].strip())
    p.add_argument("metrics", help="a run's metrics.jsonl (--save_metrics)")
    p.add_argument("-o", "--output", help="the PNG to write (default: loss.png beside the metrics file)")
    args = p.parse_args(argv)
    metrics = Path(args.metrics)
    curves = read_curves(metrics)
    if not curves.train_steps and not curves.eval_steps:
        raise UserError(f"{metrics} holds no step or eval records; nothing to plot")
    out = Path(args.output) if args.output else metrics.with_name("loss.png")
    draw(curves, out)
    print(f"loss curves written to {out}")
    return 0
