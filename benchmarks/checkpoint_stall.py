"""BENCHMARKS.md, "Checkpoints": a full fine-tune at world size 2 (FSDP2, one thread per rank).

(a) How long a step checkpoint stalls training: the time `sft.save_checkpoint` blocks (from
    the step's end to the next step's start), written before training continues
    (--async_checkpoint False) or in the background (True), jobs alternating.
(b) Rank 0's peak resident memory during the final save of the model against the model's
    size, at an earlier revision (--before, its source exported with `git archive`) and at
    this one, in an fp32 run and a --mixed_precision (bf16) one; this one also with a small
    file limit. Live memory (MALLOC_MMAP_THRESHOLD_, see measure.py), the peak reset
    (/proc/self/clear_refs) right before the save.

    PYTHONPATH=src python -m benchmarks.checkpoint_stall [--size small] [--repeats 2] [--before 48767cc]

Driver and runner in one file: the driver launches torchrun jobs of `--runner`, which wraps
the recipe's save_checkpoint / save with a clock and a memory probe and writes one JSON line
per rank."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .harness import WORK, read_results, runner_env, timed_process
from .measure import LIVE_ONLY_MMAP_THRESHOLD, vm_hwm_bytes
from .report import table
from .workload import REPO, Settings, build_model, shardtune_args, write_subset

SAVE_EVERY = 2
STALL_STEPS = 9  # step checkpoints at 2, 4, 6, 8 (timed) and at the epoch end (9)
SMALL_FILES = 64 * 2**20  # (b): the file limit that shows rank 0 holding one file at a time


# ---- runner (every rank) ------------------------------------------------------------------

def vm_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM restarts from the current RSS


def run_rank(result: str, argv: list[str], file_limit: int) -> None:
    from shardtune.recipes import sft

    record = {"stalls": [], "final_save": {}}
    save_checkpoint, save = sft.save_checkpoint, sft.save

    def timed_checkpoint(recipe, *args, **kwargs):
        start = time.perf_counter()
        save_checkpoint(recipe, *args, **kwargs)
        record["stalls"].append({"step": recipe.state.step, "s": time.perf_counter() - start})

    def probed_save(recipe):
        params = sum(p.numel() for p in recipe.train_model.parameters())
        reset_peak_rss()
        before, start = vm_rss_bytes(), time.perf_counter()
        save(recipe)
        record["final_save"] = {"s": time.perf_counter() - start, "rss_before": before, "peak": vm_hwm_bytes(),
                                "params": params}

    sft.save_checkpoint, sft.save = timed_checkpoint, probed_save
    if file_limit:
        from functools import partial

        from shardtune.checkpoint import outputs
        outputs.write_full_model = partial(outputs.write_full_model, shard_bytes=file_limit)
    start = time.perf_counter()
    sft.main(argv)
    record["process_s"] = time.perf_counter() - start
    rank = int(os.environ.get("RANK", 0))
    Path(f"{result}.rank{rank}").write_text(json.dumps({"rank": rank, **record}) + "\n")


# ---- driver -------------------------------------------------------------------------------

def export_revision(rev: str, work: Path) -> Path:
    """The source tree of `rev` (the save it is measured against), exported once."""
    out = work / f"src-{rev}"
    if not (out / "src" / "shardtune").is_dir():
        out.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", rev, "src"], cwd=REPO, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out / "src"


def job(work: Path, name: str, argv: list[str], env_extra: dict, file_limit: int = 0) -> list[dict]:
    run_dir = work / "runs" / "checkpoints" / name
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2",
           "-m", "benchmarks.checkpoint_stall", "--runner", str(run_dir / "result.json"),
           "--file_limit", str(file_limit), "--", *argv, "--output_dir", str(run_dir / "out")]
    print(f"[bench] checkpoints: {name}", flush=True)
    timed_process(cmd, {**runner_env(1, work), **env_extra}, run_dir / "log.txt")
    return sorted(read_results(run_dir / "result.json"), key=lambda r: r["rank"])


def stall_jobs(args, base: list[str], work: Path) -> list[dict]:
    rows = []
    flags = base + ["--max_train_step", str(STALL_STEPS), "--save_steps", str(SAVE_EVERY), "--save_model", "True"]
    modes = [("sync", "False"), ("async", "True")]
    for repeat in range(args.repeats):
        for mode, value in modes[repeat % 2:] + modes[:repeat % 2]:
            ranks = job(work, f"stall-{mode}-{repeat}", flags + ["--async_checkpoint", value], {})
            timed = [[s["s"] for s in r["stalls"] if s["step"] % SAVE_EVERY == 0] for r in ranks]
            rows.append({"kind": "stall", "mode": mode, "repeat": repeat,
                         "stall_s": [max(per_save) for per_save in zip(*timed)],  # the slowest rank holds all
                         "process_s": max(r["process_s"] for r in ranks)})
    return rows


def memory_jobs(args, base: list[str], work: Path) -> list[dict]:
    before = {"PYTHONPATH": os.pathsep.join([str(export_revision(args.before, work)), str(REPO)])}
    live = {"MALLOC_MMAP_THRESHOLD_": LIVE_ONLY_MMAP_THRESHOLD}
    flags = base + ["--max_train_step", "1"]
    cases = [(f"{args.before}", "fp32", before, 0), ("this", "fp32", {}, 0),
             ("this", "fp32", {}, SMALL_FILES), (f"{args.before}", "bf16 mixed", before, 0),
             ("this", "bf16 mixed", {}, 0)]
    rows = []
    for rev, precision, env, limit in cases:
        extra = ["--mixed_precision", "True"] if precision != "fp32" else []
        name = f"save-{rev}-{precision.replace(' ', '-')}-{limit or 'default'}"
        ranks = job(work, name, flags + extra, {**live, **env}, limit)
        out = work / "runs" / "checkpoints" / name / "out"
        written = sum(p.stat().st_size for p in out.glob("model*.safetensors"))
        rows.append({"kind": "save", "revision": rev, "precision": precision, "file_limit": limit,
                     "files": len(list(out.glob("model*.safetensors"))), "written_bytes": written,
                     **{k: ranks[0]["final_save"][k] for k in ("s", "rss_before", "peak", "params")}})
    return rows


def render(rows: list[dict], model_mib: float) -> str:
    stall = {}
    for row in rows:
        if row["kind"] == "stall":
            stall.setdefault(row["mode"], []).append(row)
    lines = ["(a) stall per step checkpoint (slowest rank; median over the periodic ones of every job):", "",
             table(["step checkpoints", "jobs", "saves timed", "median stall s", "min / max s", "job wall s (median)"],
                   [[mode, str(len(jobs)), str(sum(len(j["stall_s"]) for j in jobs)),
                     f"{statistics.median(s for j in jobs for s in j['stall_s']):.2f}",
                     f"{min(s for j in jobs for s in j['stall_s']):.2f} / {max(s for j in jobs for s in j['stall_s']):.2f}",
                     f"{statistics.median(j['process_s'] for j in jobs):.1f}"] for mode, jobs in stall.items()])]
    saves = [r for r in rows if r["kind"] == "save"]
    lines += ["", f"(b) rank 0 during the final save (model: {saves[0]['params'] / 1e6:.1f}M parameters, "
              f"{model_mib:.0f} MiB in fp32):", "",
              table(["revision", "precision", "file limit", "files", "written MiB", "RSS before MiB", "peak MiB",
                     "peak - before MiB", "save s"],
                    [[r["revision"], r["precision"], f"{r['file_limit'] / 2**20:.0f} MiB" if r["file_limit"] else "default",
                      str(r["files"]), f"{r['written_bytes'] / 2**20:.0f}", f"{r['rss_before'] / 2**20:.0f}",
                      f"{r['peak'] / 2**20:.0f}", f"{(r['peak'] - r['rss_before']) / 2**20:.0f}", f"{r['s']:.1f}"]
                     for r in saves])]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runner", help="(internal) run one rank, writing RESULT.rankN")
    parser.add_argument("--file_limit", type=int, default=0, help="(internal, with --runner)")
    parser.add_argument("--size", default="small")
    parser.add_argument("--repeats", type=int, default=2, help="jobs per mode in (a)")
    parser.add_argument("--before", default="48767cc", help="the revision whose final save (b) compares with")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--work", default=str(WORK))
    args, rest = parser.parse_known_args()
    if args.runner:
        run_rank(args.runner, rest[1:] if rest[:1] == ["--"] else rest, args.file_limit)
        return
    work = Path(args.work)
    settings = Settings(peft=False, micro_batch=1, context=args.context)
    model = build_model(args.size, work / "models" / args.size)
    data = write_subset(work / "data" / f"samsum-{settings.dialogues}", settings.dialogues)
    base = shardtune_args(model, data, work / "unused", settings)
    base = base[:base.index("--output_dir")] + ["--enable_fsdp", "--overwrite_output_dir"]
    rows = stall_jobs(args, base, work) + memory_jobs(args, base, work)
    results = work / "results" / "checkpoints.jsonl"
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model_mib = sum(p.stat().st_size for p in model.glob("*.safetensors")) / 2**20
    print(render(rows, model_mib))


if __name__ == "__main__":
    main()
