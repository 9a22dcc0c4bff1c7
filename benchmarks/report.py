"""The markdown report: the machine, the commands, and one table per section."""
from __future__ import annotations

import os
import platform
import statistics
import sys

THROUGHPUT_COLUMNS = (
    ("tokens_per_s", "non-pad tokens/s", "{:.0f}"), ("all_tokens_per_s", "all tokens/s", "{:.0f}"),
    ("s_per_step", "s/step", "{:.2f}"), ("process_s", "process s", "{:.1f}"),
    ("peak_rss_mib", "peak RSS MiB", "{:.0f}"), ("first_loss", "first loss", "{:.3f}"),
    ("final_loss", "final loss", "{:.3f}"),
)


def machine() -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "load_before": " ".join(f"{x:.1f}" for x in os.getloadavg()),
            "python": platform.python_version(), "torch": torch.__version__,
            "packages": _versions(("transformers", "peft", "accelerate", "trl"))}


def _versions(names) -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in names:
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            pass
    return ", ".join(found)


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def throughput_table(rows: list[dict]) -> str:
    """Medians over the repeats, one row per (size, runner)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["size"], row["runner"]), []).append(row)
    out = []
    for (size, runner), runs in groups.items():
        cells = [fmt.format(statistics.median(r[key] for r in runs)) for key, _, fmt in THROUGHPUT_COLUMNS]
        out.append([size, runner, str(len(runs)), str(runs[0]["steps"]), *cells])
    return table(["size", "runner", "runs", "steps", *(title for _, title, _ in THROUGHPUT_COLUMNS)], out)


def render(info: dict, args, settings, sections: dict) -> str:
    from . import distributed, dpo, mfu, profile_step

    parts = [
        "## Machine", "",
        f"- CPU: {info['cpu']}, {info['cores']} logical cores; load average (1, 5, 15 min) "
        f"{info['load_before']} before, {info['load_after']} after",
        f"- Python {info['python']}, torch {info['torch']}, {info['packages']}",
        "", "## Command", "", "```", " ".join(["python -m benchmarks.bench", *sys.argv[1:]]), "```", "",
        f"Settings: {settings.to_json()}", "",
    ]
    if "throughput" in sections:
        parts += ["## Throughput", "", throughput_table(sections["throughput"]), ""]
    if "mfu" in sections:
        parts += ["## Needed FLOPs against the GEMM peak", "", mfu.render(sections["mfu"]), ""]
    if "distributed" in sections:
        parts += ["## Distributed", "", distributed.render(sections["distributed"]), ""]
    if "profile" in sections:
        parts += ["## Profile of one shardtune step", "", profile_step.render(sections["profile"]), ""]
    if "dpo" in sections:
        parts += ["## DPO: shardtune vs TRL DPOTrainer", "", dpo.render(sections["dpo"]), ""]
    return "\n".join(parts)
