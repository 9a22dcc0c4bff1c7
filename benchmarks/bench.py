"""The benchmark driver: prepares the workload once, runs every runner as its own process,
interleaved (the order rotates each repeat, so a load spike on the shared machine falls on
different runners), and writes the results (JSON lines) and a markdown report.

    python -m benchmarks.bench                     # what `make bench` runs
    python -m benchmarks.bench --quick --sizes micro --runners shardtune,handloop
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from . import report
from .harness import RUNNERS, TORCHTUNE_PYTHON, WORK, BenchError, Workload
from .workload import SIZES, Settings

QUICK_STEPS = 4


def run_throughput(args, settings: Settings, work: Path) -> list[dict]:
    rows = []
    for size in args.sizes:
        workload = Workload(size, settings, work)
        for repeat in range(args.repeats):
            shift = repeat % len(args.runners)
            for runner in args.runners[shift:] + args.runners[:shift]:
                print(f"[bench] {size} repeat {repeat + 1}/{args.repeats}: {runner}", flush=True)
                row = workload.run(runner, work / "runs" / size / f"{runner}-{repeat}", args.threads)
                rows.append({**row, "repeat": repeat})
                with (work / "results" / "throughput.jsonl").open("a") as out:
                    out.write(json.dumps(rows[-1]) + "\n")
    return rows


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_STEPS} steps per run, 1 repeat: a smoke run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", default="tiny,small")
    parser.add_argument("--runners", default=",".join(RUNNERS))
    parser.add_argument("--sections", default="throughput,mfu,distributed,profile,dpo",
                        help="comma-separated: throughput, mfu, distributed, profile, dpo")
    parser.add_argument("--threads", type=int, default=2, help="threads of a single-process run")
    parser.add_argument("--dialogues", type=int, default=Settings.dialogues)
    parser.add_argument("--max_steps", type=int, default=0, help="cut every run to N steps (0 = one epoch)")
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument("--dp_size", default="tiny", help="model of the data-parallel efficiency runs")
    parser.add_argument("--full_ft_size", default="small", help="model of the FULL_SHARD / NO_SHARD runs")
    parser.add_argument("--load_size", default="small", help="model of the load-time runs")
    parser.add_argument("--mfu_size", default="small", help="model of the needed-FLOPs / GEMM-peak run")
    parser.add_argument("--mfu_steps", type=int, default=10, help="timed steps of the MFU run")
    parser.add_argument("--dpo_size", default="tiny", help="model of the DPO runs (shardtune against TRL)")
    parser.add_argument("--dpo_pairs", type=int, default=None, help="JFLEG pairs of a DPO run, one epoch (default: benchmarks/dpo.py's PAIRS; --quick: 16)")
    args = parser.parse_args(argv)
    args.sizes = args.sizes.split(",")
    args.runners = args.runners.split(",")
    args.sections = args.sections.split(",")
    sizes = [*args.sizes, args.dp_size, args.full_ft_size, args.load_size, args.mfu_size, args.dpo_size]
    unknown = [s for s in sizes if s not in SIZES] + [r for r in args.runners if r not in RUNNERS]
    if unknown:
        parser.error(f"unknown size or runner: {', '.join(unknown)}")
    if args.quick:
        args.repeats = 1
        args.max_steps = args.max_steps or QUICK_STEPS
        args.dp_size = args.full_ft_size = args.load_size = args.mfu_size = args.dpo_size = "micro"
    return args


def main(argv: list[str] | None = None) -> int:
    from . import distributed, dpo, mfu, profile_step

    args = parse(argv)
    settings = replace(Settings(), dialogues=args.dialogues, max_steps=args.max_steps,
                       warmup_steps=1 if args.quick else Settings.warmup_steps)
    work = args.work.resolve()
    (work / "results").mkdir(parents=True, exist_ok=True)
    for stale in ("throughput.jsonl", "distributed.jsonl", "dpo.jsonl"):
        (work / "results" / stale).unlink(missing_ok=True)
    if "torchtune" in args.runners and "throughput" in args.sections and not TORCHTUNE_PYTHON.exists():
        print(f"error: {TORCHTUNE_PYTHON} is missing; `make bench-venv` creates it", file=sys.stderr)
        return 2
    machine = report.machine()
    out = work / "results" / "report.md"
    sections = {}
    for name, run in (("throughput", lambda: run_throughput(args, settings, work)),
                      ("mfu", lambda: mfu.run(args, settings, work)),
                      ("distributed", lambda: distributed.run_all(args, settings, work)),
                      ("profile", lambda: profile_step.run(args, settings, work)),
                      ("dpo", lambda: dpo.run(args, settings, work))):
        if name in args.sections:
            sections[name] = run()
            # written after every section: a long run that is cut short keeps what it measured
            machine["load_after"] = report.machine()["load_before"]
            out.write_text(report.render(machine, args, settings, sections))
    print(f"[bench] report: {out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
