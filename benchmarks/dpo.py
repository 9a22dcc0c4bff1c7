"""The DPO section: shardtune's dpo recipe (LoRA, packed) against TRL's DPOTrainer (padded,
its default), as TRL runs by default (gradient checkpointing on) and without checkpointing
(shardtune recomputes nothing in one process), on the same work: the same model, the first
PAIRS JFLEG grammar pairs (`shardtune prepare preference`'s), the same LoRA start (saved once,
loaded by all), global batch, steps, lr and beta, fp32 on CPU. Each runner is its own process
(benchmarks/run_dpo.py), interleaved over the repeats with the order rotating, medians reported.

Measured over the timed steps: non-pad tokens per wall-clock second and per CPU second of the
process (all count the tokens of prompt+chosen and prompt+rejected of what they trained; the
clock runs from a step's stamp to the next, so loading and setup are outside it), the
process's peak RSS (VmHWM), and the first and last step's loss: with the same pairs in the
same steps they agree (the first is ln 2 for all: LoRA's B starts at zero, so the policy is
the reference).
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from .harness import read_results, runner_env, timed_process
from .report import table
from .workload import SHARED_DATA, Settings, build_model

PAIRS = 64  # 8 steps: 12-70 s of a shardtune process, 1-3 minutes of a TRL one, on the shared 2-core machine
BATCH = 8  # pairs per optimizer step (16 sequences), no accumulation
QUICK_PAIRS = 16
LR, BETA = 1e-4, 0.1
RUNNERS = ("shardtune", "trl", "trl_no_checkpointing")
GOAL_SPEED, GOAL_MEMORY = 1.5, 0.8  # shardtune / TRL: tokens/s at least, peak RSS at most


def prepare(work: Path, model: Path, pairs: int, settings: Settings) -> dict[str, Path]:
    """The pairs file, the same pairs in shardtune's step order (TRL reads them
    sequentially), and the LoRA start, under work/dpo."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from shardtune.data.preference_pairs import jfleg_preferences, write_jsonl
    from shardtune.data.sampler import GlobalBatchSampler

    out = work / "dpo"
    records = jfleg_preferences(SHARED_DATA / "jfleg")[:pairs]
    paths = {"pairs": out / f"jfleg-{pairs}.jsonl", "ordered": out / f"jfleg-{pairs}-step-order.jsonl",
             "adapter": out / f"adapter-{model.name}"}
    write_jsonl(paths["pairs"], records)
    # the recipe's sampler at world size 1 (packing: no length grouping), epoch 0
    sampler = GlobalBatchSampler(len(records), BATCH, 1, 0, 1, settings.seed)
    write_jsonl(paths["ordered"], [records[i] for batch in sampler for i in batch])
    if not (paths["adapter"] / "adapter_config.json").is_file():
        torch.manual_seed(0)
        get_peft_model(AutoModelForCausalLM.from_pretrained(str(model)),
                       LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=0.0,
                                  target_modules=list(settings.lora_targets), task_type="CAUSAL_LM")
                       ).save_pretrained(str(paths["adapter"]))
    return paths


def run(args, settings: Settings, work: Path) -> list[dict]:
    size = args.dpo_size
    pairs = args.dpo_pairs or (QUICK_PAIRS if args.quick else PAIRS)
    model = build_model(size, work / "models" / size)
    paths = prepare(work, model, pairs, settings)
    rows = []
    for repeat in range(args.repeats):
        shift = repeat % len(RUNNERS)
        for runner in RUNNERS[shift:] + RUNNERS[:shift]:
            print(f"[bench] dpo {size} repeat {repeat + 1}/{args.repeats}: {runner}", flush=True)
            run_dir = work / "runs" / "dpo" / f"{runner}-{repeat}"
            run_dir.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "benchmarks.run_dpo", runner, "--model", str(model),
                   "--pairs", str(paths["pairs" if runner == "shardtune" else "ordered"]), "--adapter", str(paths["adapter"]),
                   "--batch", str(BATCH), "--lr", str(LR), "--beta", str(BETA), "--seed", str(settings.seed),
                   "--context", str(settings.context), "--warmup", str(settings.warmup_steps), "--size", size,
                   "--threads", str(args.threads), "--work", str(run_dir), "--result", str(run_dir / "result.json")]
            process_s = timed_process(cmd, runner_env(args.threads, work), run_dir / "log.txt")
            (result,) = read_results(run_dir / "result.json")
            rows.append({**result, "pairs": pairs, "batch": BATCH, "repeat": repeat, "process_s": process_s})
            with (work / "results" / "dpo.jsonl").open("a") as out:
                out.write(json.dumps(rows[-1]) + "\n")
    return rows


def medians(rows: list[dict]) -> dict[str, dict]:
    out = {}
    for runner in dict.fromkeys(r["runner"] for r in rows):
        runs = [r for r in rows if r["runner"] == runner]
        out[runner] = {key: statistics.median(r[key] for r in runs)
                       for key in ("tokens_per_s", "all_tokens_per_s", "s_per_step", "process_s", "peak_rss_mib")}
        out[runner].update({key: statistics.median(r["extra"][key] for r in runs)
                            for key in ("cpu_s_per_step", "cpu_tokens_per_s")})
        out[runner].update(runs=len(runs), steps=runs[0]["steps"], timed_steps=runs[0]["timed_steps"],
                           first_loss=runs[0]["first_loss"], last_loss=runs[0]["extra"]["last_loss"],
                           tokens=sum(runs[0]["extra"]["tokens"]), pairs=runs[0]["pairs"], size=runs[0]["size"])
    return out


def render(rows: list[dict]) -> str:
    m = medians(rows)
    ours = m["shardtune"]
    body = [[name, r["size"], str(r["pairs"]), str(r["runs"]), f"{r['steps']} ({r['timed_steps']})", str(r["tokens"]),
             f"{r['tokens_per_s']:.0f}", f"{r['all_tokens_per_s']:.0f}", f"{r['s_per_step']:.2f}",
             f"{r['cpu_s_per_step']:.2f}", f"{r['cpu_tokens_per_s']:.0f}",
             f"{r['process_s']:.1f}", f"{r['peak_rss_mib']:.0f}", f"{r['first_loss']:.4f}", f"{r['last_loss']:.4f}"]
            for name, r in m.items()]
    lines = [table(["runner", "model", "pairs", "runs", "steps (timed)", "non-pad tokens", "non-pad tokens/s",
                    "all tokens/s", "s/step", "CPU s/step", "non-pad tokens per CPU s", "process s", "peak RSS MiB",
                    "first loss", "last-step loss"], body), ""]
    for name in RUNNERS[1:]:
        if name in m:
            speed = ours["tokens_per_s"] / m[name]["tokens_per_s"]
            cpu = ours["cpu_tokens_per_s"] / m[name]["cpu_tokens_per_s"]
            memory = ours["peak_rss_mib"] / m[name]["peak_rss_mib"]
            met = "met" if speed >= GOAL_SPEED and memory <= GOAL_MEMORY else "not met"
            lines.append(f"- shardtune / {name}: **{speed:.2f}x** non-pad tokens/s (goal >= {GOAL_SPEED}x; "
                         f"{cpu:.2f}x per CPU second), **{memory:.2f}x** peak RSS (goal <= {GOAL_MEMORY}x): {met}")
    return "\n".join(lines)
