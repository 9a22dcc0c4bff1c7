"""What the benchmark drivers share (bench.py, distributed.py, mfu.py): the runners, one
size's Workload, and running a runner as a timed process with its result read back."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .workload import LLAMA2_TOKENIZER, REPO, Settings, build_model, packed_batches, write_subset

WORK = REPO / "benchmarks" / "work"
TORCHTUNE_PYTHON = REPO / "benchmarks" / ".venv-torchtune" / "bin" / "python"

# runner name -> (module, extra arguments)
RUNNERS = {
    "shardtune": ("benchmarks.run_shardtune", []),
    "shardtune_compile": ("benchmarks.run_shardtune", ["--shardtune_flag=--compile"]),
    "handloop": ("benchmarks.run_handloop", []),
    "hf_trainer_padded": ("benchmarks.run_hf_trainer", ["--mode", "padded"]),
    "hf_trainer_packed": ("benchmarks.run_hf_trainer", ["--mode", "packed"]),
    "torchtune": ("benchmarks.run_torchtune", []),
}


class BenchError(RuntimeError):
    """A runner failed: the report would be wrong, so the run stops with its output."""


def runner_env(threads: int, work: Path) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", SHARDTUNE_DEVICE="cpu", SHARDTUNE_CACHE=str(work / "cache"))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO), env.get("PYTHONPATH", "")])
    return env


def timed_process(cmd: list[str], env: dict, log: Path) -> float:
    """Runs cmd to completion (output to log); its whole wall-clock time in seconds."""
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    elapsed = time.perf_counter() - start
    if proc.returncode:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-40:])
        raise BenchError(f"{' '.join(cmd[:4])} ... exited {proc.returncode}; log {log}:\n{tail}")
    return elapsed


def read_results(path: Path) -> list[dict]:
    """A runner's JSON line, or one per rank (path.rankN) under torchrun."""
    files = [path] if path.exists() else sorted(path.parent.glob(path.name + ".rank*"))
    if not files:
        raise BenchError(f"no result was written to {path}")
    return [json.loads(f.read_text()) for f in files]


class Workload:
    """One size's model, data and packed batches, built once per driver run."""

    def __init__(self, size: str, settings: Settings, work: Path) -> None:
        from .batchfile import save_batches

        self.size, self.settings, self.work = size, settings, work
        self.model = build_model(size, work / "models" / size)
        self.data = write_subset(work / "data" / f"samsum-{settings.dialogues}", settings.dialogues)
        self.batches = work / f"batches-{size}-{settings.dialogues}-{settings.micro_batch}-{settings.max_steps}.safetensors"
        save_batches(packed_batches(self.model, self.data, settings), self.batches)

    def command(self, python: str, module: str, extra: list[str], run_dir: Path, threads: int,
                settings: Settings | None = None) -> list[str]:
        return [python, "-m", module, *extra, "--size", self.size, "--model", str(self.model),
                "--data", str(self.data), "--batches", str(self.batches),
                "--settings", (settings or self.settings).to_json(), "--work", str(run_dir),
                "--result", str(run_dir / "result.json"), "--threads", str(threads)]

    def run(self, runner: str, run_dir: Path, threads: int) -> dict:
        module, extra = RUNNERS[runner]
        python = sys.executable
        if runner == "torchtune":
            python = str(TORCHTUNE_PYTHON)
            extra = extra + ["--tokenizer", str(LLAMA2_TOKENIZER)]
        run_dir.mkdir(parents=True, exist_ok=True)
        process_s = timed_process(self.command(python, module, extra, run_dir, threads),
                                  runner_env(threads, self.work), run_dir / "log.txt")
        (result,) = read_results(run_dir / "result.json")
        return {**result, "runner": runner, "process_s": process_s}
