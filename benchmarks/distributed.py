"""The Distributed section: data-parallel efficiency (2 ranks x 1 thread against 1 rank x
2 threads, same global batch; plain data parallel (DDP) and FSDP2), a full fine-tune of
"small" at world size 2 under FULL_SHARD and NO_SHARD (peak RSS per rank while training,
with glibc's default malloc and with every allocation mmapped, which returns freed memory
at once, so that the peak is that of live memory), and model load time at world size 1, 2, 4."""
from __future__ import annotations

import statistics
import sys
from dataclasses import replace
from pathlib import Path

from .harness import Workload, read_results, runner_env, timed_process
from .measure import LIVE_ONLY_MMAP_THRESHOLD
from .report import table
from .workload import Settings, build_model

FULL_FT_STEPS = 6
LOAD_WORLDS = (1, 2, 4)


def torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
            "--nproc_per_node", str(nproc)]


LIVE_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": LIVE_ONLY_MMAP_THRESHOLD}


def shardtune_job(workload: Workload, name: str, world: int, threads: int, settings: Settings,
                  flags: list[str], env: dict | None = None) -> dict:
    """One shardtune run (torchrun when world > 1); rank 0's result with every rank's RSS."""
    run_dir = workload.work / "runs" / "distributed" / name
    run_dir.mkdir(parents=True, exist_ok=True)
    launcher = torchrun(world) if world > 1 else [sys.executable]
    cmd = workload.command("python", "benchmarks.run_shardtune", [f"--shardtune_flag={f}" for f in flags],
                           run_dir, threads, settings)
    process_s = timed_process(launcher + cmd[1:], {**runner_env(threads, workload.work), **(env or {})},
                              run_dir / "log.txt")
    ranks = sorted(read_results(run_dir / "result.json"), key=lambda r: r["rank"])
    return {**ranks[0], "name": name, "process_s": process_s, "rss_per_rank": [r["peak_rss_mib"] for r in ranks],
            "training_rss_per_rank": [r["extra"]["training_peak_rss_mib"] for r in ranks]}


def data_parallel(args, settings: Settings, work: Path) -> list[dict]:
    """Global batch 4 either way: 1 rank with micro batch 4, or 2 ranks with 2 each."""
    workload = Workload(args.dp_size, settings, work)
    half = replace(settings, micro_batch=settings.micro_batch // 2)
    fsdp = ["--enable_fsdp", "--fsdp_activation_checkpointing", "False"]
    jobs = [("1 rank x 2 threads", 1, 2, settings, []), ("2 ranks x 1 thread (DDP)", 2, 1, half, []),
            ("2 ranks x 1 thread (FSDP2 FULL_SHARD)", 2, 1, half, fsdp)]
    rows = []
    for repeat in range(args.repeats):
        shift = repeat % len(jobs)
        for name, world, threads, job_settings, flags in jobs[shift:] + jobs[:shift]:
            print(f"[bench] distributed repeat {repeat + 1}/{args.repeats}: {name}", flush=True)
            rows.append({**shardtune_job(workload, f"dp-{world}x{threads}-{repeat}", world, threads, job_settings,
                                         flags), "job": name, "kind": "data_parallel"})
    return rows


def full_finetune(args, settings: Settings, work: Path) -> list[dict]:
    """Full fine-tune at world size 2, a few steps: FULL_SHARD against NO_SHARD, with the
    llama-recipes default of activation checkpointing on, under both malloc settings."""
    steps = min(settings.max_steps or FULL_FT_STEPS, FULL_FT_STEPS)
    ft = replace(settings, micro_batch=settings.micro_batch // 2, max_steps=steps, warmup_steps=1, peft=False)
    size = args.full_ft_size
    workload = Workload(size, ft, work)
    rows = []
    for malloc, env in (("glibc default", {}), ("live memory", LIVE_MEMORY_ENV)):
        for strategy in ("FULL_SHARD", "NO_SHARD"):
            print(f"[bench] distributed: full fine-tune {size} {strategy}, malloc {malloc}", flush=True)
            flags = ["--enable_fsdp", "--sharding_strategy", strategy, "--save_model", "False"]
            job = shardtune_job(workload, f"full-{strategy}-{'live' if env else 'default'}", 2, 1, ft, flags, env)
            rows.append({**job, "job": f"{strategy}, {malloc}", "kind": "full_finetune"})
    return rows


def load_times(args, work: Path) -> list[dict]:
    size = args.load_size
    model = build_model(size, work / "models" / size)
    rows = []
    for repeat in range(args.repeats):
        for world in LOAD_WORLDS:
            for method in ("shardtune", "hf"):
                print(f"[bench] load time repeat {repeat + 1}: {method} world {world}", flush=True)
                run_dir = work / "runs" / "load" / f"{method}-{world}-{repeat}"
                run_dir.mkdir(parents=True, exist_ok=True)
                cmd = torchrun(world) + ["-m", "benchmarks.run_load", "--method", method, "--model", str(model),
                                         "--result", str(run_dir / "result.json")]
                process_s = timed_process(cmd, runner_env(1, work), run_dir / "log.txt")
                ranks = read_results(run_dir / "result.json")
                rows.append({"kind": "load", "method": method, "world": world, "size": size, "process_s": process_s,
                             "load_s": max(r["load_s"] for r in ranks),
                             "rss_per_rank": [r["peak_rss_mib"] for r in sorted(ranks, key=lambda r: r["rank"])]})
    return rows


def run_all(args, settings: Settings, work: Path) -> list[dict]:
    return data_parallel(args, settings, work) + full_finetune(args, settings, work) + load_times(args, work)


def _median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def _group(rows: list[dict], kind: str, key: str) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for row in rows:
        if row["kind"] == kind:
            groups.setdefault(str(row[key]) if kind != "load" else f"{row['method']} world {row['world']}", []).append(row)
    return groups


def render(rows: list[dict]) -> str:
    dp = _group(rows, "data_parallel", "job")
    dp_rows = [[name, str(len(runs)), f"{_median(runs, 'tokens_per_s'):.0f}", f"{_median(runs, 's_per_step'):.2f}",
                f"{_median(runs, 'process_s'):.1f}", " / ".join(f"{x:.0f}" for x in runs[0]["rss_per_rank"]),
                f"{_median(runs, 'first_loss'):.4f}", f"{_median(runs, 'final_loss'):.4f}"]
               for name, runs in dp.items()]
    parts = [f"Data-parallel efficiency (shardtune, {rows[0]['size']}, LoRA, global batch 4):", "",
             table(["job", "runs", "non-pad tokens/s", "s/step", "process s", "peak RSS MiB per rank",
                    "first loss", "final loss"], dp_rows)]
    names = list(dp)
    base = _median(dp[names[0]], "tokens_per_s")
    parts += [""] + [f"- Efficiency, {name} / {names[0]}: {_median(dp[name], 'tokens_per_s') / base:.2f}"
                     for name in names[1:]]
    full = _group(rows, "full_finetune", "job")
    parts += ["", "Full fine-tune at world size 2 (no LoRA, activation checkpointing on):", "",
              table(["strategy, malloc", "model", "steps", "s/step", "peak RSS MiB per rank while training",
                     "whole process", "final loss"],
                    [[name, r[0]["size"], str(r[0]["steps"]), f"{r[0]['s_per_step']:.2f}",
                      " / ".join(f"{x:.0f}" for x in r[0]["training_rss_per_rank"]),
                      " / ".join(f"{x:.0f}" for x in r[0]["rss_per_rank"]), f"{r[0]['final_loss']:.4f}"]
                     for name, r in full.items()])]
    parts += [""]
    for malloc in ("glibc default", "live memory"):
        shard, replicate = full.get(f"FULL_SHARD, {malloc}"), full.get(f"NO_SHARD, {malloc}")
        if shard and replicate:
            ratio = max(shard[0]["training_rss_per_rank"]) / max(replicate[0]["training_rss_per_rank"])
            parts += [f"- FULL_SHARD / NO_SHARD, largest rank's training peak, {malloc}: {ratio:.2f}"]
    load = _group(rows, "load", "method")
    parts += ["", "Model load time (slowest rank; 1 thread per rank):", "",
              table(["method", "runs", "load s", "process s", "peak RSS MiB per rank (first run)"],
                    [[name, str(len(r)), f"{_median(r, 'load_s'):.2f}", f"{_median(r, 'process_s'):.1f}",
                      " / ".join(f"{x:.0f}" for x in r[0]["rss_per_rank"])] for name, r in load.items()])]
    return "\n".join(parts)
