"""`shardtune plan` against measured peak memory, on this machine's CPUs.

For each case it launches a real fine-tune under torchrun (gloo), in which every rank runs
sft.main and then reports its peak resident memory (VmHWM in /proc/self/status:
per process, unlike ru_maxrss, which keeps the launcher's peak across exec), and compares
the largest rank's peak with plan's prediction for the same flags (device cpu: the process
baseline is measured by plan). Prints a Markdown table (BENCHMARKS.md holds one).

    python benchmarks/plan_vs_measured.py --tiny DIR --medium DIR [--cases tiny-lora-w1-ac ...]

DIR: models built with `shardtune tiny` (see BENCHMARKS.md for the exact commands).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# run as a script (benchmarks/ is on sys.path): measure.py and workload.py are siblings whose
# top level is the standard library only
from measure import LIVE_ONLY_MMAP_THRESHOLD, vm_hwm_bytes
from workload import SHARED_DATA


def finetune_flags(model: str, peft: bool, checkpointing: bool, out_dir: str) -> list[str]:
    flags = ["--enable_fsdp", "--model_name", model, "--output_dir", out_dir,
             "--samsum_dataset.data_path", str(SHARED_DATA / "samsum"), "--samsum_dataset.train_split", "validation",
             "--run_validation", "False", "--num_epochs", "1", "--max_train_step", "3", "--context_length", "256",
             "--batch_size_training", "2", "--num_workers_dataloader", "0", "--save_model", "False",
             "--fsdp_activation_checkpointing", str(checkpointing)]
    return flags + (["--use_peft", "--peft_method", "lora"] if peft else [])


def probe(out_dir: str, argv: list[str]) -> int:
    """Runs inside each rank: the fine-tune, then this process's peak RSS."""
    from shardtune.recipes import sft

    code = sft.main(argv)
    Path(out_dir, f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps({"peak": vm_hwm_bytes()}))
    return code




def measure(world: int, flags: list[str], live_only: bool = True) -> list[int]:
    with tempfile.TemporaryDirectory() as probe_dir:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
               "--nproc_per_node", str(world), __file__, "--probe", probe_dir, "--", *flags]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "SHARDTUNE_DEVICE": "cpu", "TOKENIZERS_PARALLELISM": "false"}
        if live_only:
            env["MALLOC_MMAP_THRESHOLD_"] = LIVE_ONLY_MMAP_THRESHOLD
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        return [json.loads(Path(probe_dir, f"rank{r}.json").read_text())["peak"] for r in range(world)]


def cases(models: dict[str, str]) -> dict[str, tuple[str, bool, int, bool]]:
    """name -> (model dir, peft, world size, activation checkpointing)"""
    out = {}
    for size, model in models.items():
        for method in ("full", "lora"):
            for world in (1, 2):
                for ac in (True, False):
                    out[f"{size}-{method}-w{world}-{'ac' if ac else 'noac'}"] = (model, method == "lora", world, ac)
    return out


def main() -> int:
    if "--probe" in sys.argv:
        i = sys.argv.index("--probe")
        return probe(sys.argv[i + 1], sys.argv[sys.argv.index("--") + 1:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", required=True, help="the tiny model directory")
    p.add_argument("--medium", required=True, help="the ~124M-parameter model directory")
    p.add_argument("--cases", nargs="*", help="run only these (default: all 16)")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--glibc_default", action="store_true",
                   help="measure with glibc's default malloc thresholds (peak RSS then includes freed heap memory)")
    a = p.parse_args()
    from shardtune.config.parse import parse_args
    from shardtune.commands.plan import Launch, measured_cpu_baseline, model_shape, measured_label_share, plan_memory

    baseline = measured_cpu_baseline()
    rows = []
    print(f"process baseline (plan's cpu overhead): {baseline / 2**20:.0f} MiB")
    print("| case | params | predicted MiB | measured MiB (per rank) | error |")
    print("|---|---|---|---|---|")
    for name, (model, peft, world, ac) in cases({"tiny": a.tiny, "124M": a.medium}).items():
        if a.cases and name not in a.cases:
            continue
        with tempfile.TemporaryDirectory() as out_dir:
            flags = finetune_flags(model, peft, ac, out_dir)
            cfgs = parse_args(flags)
            plan = plan_memory(cfgs, model_shape(model), Launch(world, 1, "cpu", baseline, measured_label_share(cfgs)))
            measured = measure(world, flags, live_only=not a.glibc_default)
        error = plan.peak / max(measured) - 1
        rows.append({"case": name, "predicted": plan.peak, "measured": measured, "error": error,
                     "plan": plan.as_dict()})
        print(f"| {name} | {model_shape(model).params() / 1e6:.1f}M | {plan.peak / 2**20:.0f} | "
              f"{', '.join(f'{m / 2**20:.0f}' for m in measured)} | {error:+.1%} |", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
