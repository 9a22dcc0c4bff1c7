"""`shardtune verify`: do your flags give the same per-step losses on 1 rank and on N?

    shardtune verify --nproc_per_node 2 --enable_fsdp --model_name DIR --use_peft ...

It launches your fine-tune twice through torchrun, for --verify_steps optimizer steps,
on 1 rank and on --nproc_per_node ranks, with the same global batch (the one rank
accumulates what N ranks do side by side: shardtune's loss is normalised over the whole
global batch, so the per-step loss should not depend on the split), reads the per-step
losses each run writes to metrics.jsonl, and fails when any step differs by more than
--tolerance.

What it changes in your flags, and why: outputs go to a scratch directory (nothing is
saved, no checkpoint, no validation), metrics are written every step, and LoRA dropout is
set to 0 unless --keep_dropout: every rank draws its own dropout masks, so with dropout the
losses legitimately depend on how the batch is split across ranks.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ..config.parse import parse_args
from ..errors import UserError, exit_on_user_error
from ..metrics.logs import read_metrics

EXAMPLE = """example:
  shardtune verify --nproc_per_node 2 --verify_steps 5 \\
      --enable_fsdp --model_name /path/to/model --use_peft --peft_method lora \\
      --samsum_dataset.data_path /path/to/samsum --batch_size_training 2

Every finetune flag is accepted; --batch_size_training (and --micro_batch_size /
--gradient_accumulation_steps) are per rank at --nproc_per_node ranks, as they would be in
the real launch. Exit 0: within tolerance; 1: a step differs by more; 2: a run failed."""

# A relative difference (absolute below a loss of 1). On CPU in fp32 shardtune's losses
# agree to ~1e-6 across world sizes; bf16 or fp16 sums in another order, so pass a larger
# tolerance there (1e-2).
DEFAULT_TOLERANCE = 1e-4


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="shardtune verify", formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
        description="Run a few steps of your fine-tune on 1 rank and on N ranks and compare the per-step losses.",
        epilog=EXAMPLE)
    p.add_argument("--nproc_per_node", type=int, default=2, help="ranks of the second run (default 2)")
    p.add_argument("--verify_steps", type=int, default=5, help="optimizer steps per run (default 5)")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help=f"largest allowed |loss_1 - loss_N| / max(1, |loss_1|) (default {DEFAULT_TOLERANCE})")
    p.add_argument("--keep_dropout", action="store_true",
                   help="keep LoRA dropout (then losses depend on the rank split; expect a failure)")
    p.add_argument("--work_dir", help="keep both runs' outputs here (default: a temporary directory, removed)")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")
    return p


def run_flags(argv: list[str], world: int, nproc: int, steps: int, keep_dropout: bool, out_dir: Path) -> list[str]:
    """The user's flags with verify's overrides appended (the last value of a flag wins)."""
    from ..config.validate import check_supported, resolve_batching

    cfgs = parse_args(argv)
    check_supported(cfgs)
    batching = resolve_batching(cfgs)
    per_rank_at_n = batching.micro * batching.accum
    global_batch = per_rank_at_n * nproc
    flags = [*argv, "--output_dir", str(out_dir), "--dist_checkpoint_root_folder", str(out_dir / "checkpoints"),
             "--overwrite_output_dir", "True", "--resume", "", "--max_train_step", str(steps),
             "--save_metrics", "True", "--log_every", "1", "--save_model", "False", "--save_steps", "0",
             "--run_validation", "False",
             "--batch_size_training", str(global_batch // world), "--micro_batch_size", str(batching.micro),
             "--gradient_accumulation_steps", "1"]
    if not keep_dropout:
        flags += ["--lora_config.lora_dropout", "0"]
    return flags


def launch(world: int, flags: list[str]) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
           "--nproc_per_node", str(world), "-m", "shardtune.finetuning", *flags]
    print(f"verify: training on {world} rank(s) ...", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if "shardtune: error:" in line]
        reason = errors[0][errors[0].index("shardtune: error:") + len("shardtune: error:"):].strip() if errors \
            else (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"the {world}-rank run failed (exit {proc.returncode}): {reason}")


def step_losses(out_dir: Path) -> dict[int, float]:
    metrics = out_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise UserError(f"{metrics} was not written; the run trained no step (is the dataset empty?)")
    return {r["step"]: r["loss"] for r in read_metrics(metrics) if r.get("event") == "step"}


def compare(one: dict[int, float], many: dict[int, float]) -> list[dict]:
    if one.keys() != many.keys() or not one:
        raise UserError(f"the runs trained different steps ({sorted(one)} vs {sorted(many)}); "
                        "lower --verify_steps to what one epoch of your data holds")
    return [{"step": step, "loss_1": one[step], "loss_n": many[step],
             "difference": abs(one[step] - many[step]) / max(1.0, abs(one[step]))} for step in sorted(one)]


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = parser()
    if "-h" in argv or "--help" in argv:
        p.print_help()
        return 0
    args, finetune_argv = p.parse_known_args(argv)
    if args.nproc_per_node < 2 or args.verify_steps < 1:
        raise UserError("--nproc_per_node must be >= 2 and --verify_steps >= 1")
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="shardtune-verify-"))
    try:
        losses = {}
        for world in (1, args.nproc_per_node):
            out_dir = work / f"world{world}"
            launch(world, run_flags(finetune_argv, world, args.nproc_per_node, args.verify_steps,
                                    args.keep_dropout, out_dir))
            losses[world] = step_losses(out_dir)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    rows = compare(losses[1], losses[args.nproc_per_node])
    worst = max(rows, key=lambda row: row["difference"])
    passed = worst["difference"] <= args.tolerance
    if args.json:
        print(json.dumps({"nproc_per_node": args.nproc_per_node, "tolerance": args.tolerance, "steps": rows,
                          "max_difference": worst["difference"], "passed": passed}))
    else:
        print(f"{'step':>5} {'loss, 1 rank':>14} {f'loss, {args.nproc_per_node} ranks':>14} {'difference':>11}")
        for row in rows:
            print(f"{row['step']:>5} {row['loss_1']:>14.8f} {row['loss_n']:>14.8f} {row['difference']:>11.2e}")
        print(f"largest difference {worst['difference']:.2e} at step {worst['step']} "
              f"({'within' if passed else 'ABOVE'} tolerance {args.tolerance:g})")
    if not passed:
        sys.stderr.write(f"shardtune: error: per-step losses on 1 and {args.nproc_per_node} ranks differ by "
                         f"{worst['difference']:.2e} at step {worst['step']} (tolerance {args.tolerance:g}); "
                         "something in this configuration depends on the rank split\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
