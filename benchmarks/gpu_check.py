"""The GPU check (`bash benchmarks/gpu_check.sh`): tokens/s and MFU of shardtune on one CUDA
GPU, bf16, for LoRA and full fine-tuning of a ~1.1B-parameter Llama (TinyLlama-1.1B's
shape, random init, context 2048), each eager and with --compile; then the core tests'
CUDA path. Needs only torch, transformers, peft and accelerate (pytest for the tests part)
and no network: the tokenizer is trained on the bundled text, the data is the bundled
SAMSum sample repeated. Sized for under 8 minutes on an H200.

    python -m benchmarks.gpu_check [--out DIR] [--steps 40] [--skip_tests]
    python -m benchmarks.gpu_check --smoke    # the same path on CPU: micro model, LoRA eager only

Writes DIR/gpu_check.json and DIR/gpu_check.md (default DIR: $OUT, else benchmarks/work/gpu).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# TinyLlama-1.1B: 22 layers, hidden 2048, GQA 32/4 heads, intermediate 5632, vocab 32000
SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096)
CONTEXT, MICRO_BATCH, WARMUP_STEPS = 2048, 4, 10
RUNS = [("lora", False), ("lora", True), ("full", False), ("full", True)]
# single-process tests that run the recipe on whatever device SHARDTUNE_TEST_DEVICE names
CORE_TESTS = ["tests/integration/test_parity.py::test_accumulation_matches_one_big_batch", "tests/integration/test_loss.py",
              "tests/unit/test_generate.py"]
SMOKE_SHAPE = dict(SHAPE, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2)


def build_model(out: Path, shape: dict, device: str) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from shardtune.modeling.tiny import train_tokenizer

    if (out / "config.json").is_file():
        return out
    tokenizer = train_tokenizer()  # its ids fit the 32,000-row embedding (check_vocab)
    config = LlamaConfig(**shape, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def write_data(out: Path, copies: int = 40) -> Path:
    """The bundled SAMSum sample, its train split repeated: enough packed 2048-token chunks
    for the timed steps without an epoch boundary in the window."""
    sample = json.loads((REPO / "src" / "shardtune" / "sample_data" / "samsum_sample.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    train = [{**rec, "id": f"{rec['id']}-{copy}"} for copy in range(copies) for rec in sample["train"]]
    (out / "train.json").write_text(json.dumps(train))
    (out / "val.json").write_text(json.dumps(sample["validation"]))
    return out


def run_one(method: str, compiled: bool, model: Path, data: Path, out: Path, steps: int, smoke: bool) -> dict:
    args = ["--enable_fsdp", "--model_name", str(model), "--samsum_dataset.data_path", str(data),
            "--context_length", str(CONTEXT), "--batch_size_training", str(MICRO_BATCH), "--num_epochs", "1",
            "--max_train_step", str(steps), "--run_validation", "False", "--save_model", "False",
            "--mixed_precision", str(not smoke), "--fsdp_activation_checkpointing", "False",
            "--num_workers_dataloader", "0", "--save_metrics", "--log_every", "1", "--lr", "1e-5",
            "--output_dir", str(out), "--overwrite_output_dir"]
    if method == "lora":
        args += ["--use_peft", "--peft_method", "lora"]
    if compiled:
        args += ["--compile"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           str(REPO / "llama_finetuning.py"), *args]
    env = {**os.environ, "SHARDTUNE_DEVICE": "cpu" if smoke else "cuda", "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    process_s = time.perf_counter() - start
    (out / "log.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        return {"method": method, "compile": compiled, "error": (proc.stderr or proc.stdout)[-2000:]}
    steps_seen = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    warmup = 1 if smoke else WARMUP_STEPS
    timed = [s for s in steps_seen if s.get("event") == "step" and s["step"] > warmup]
    return {"method": method, "compile": compiled, "steps": len(timed), "process_s": round(process_s, 1),
            "tokens_per_s": _median([s["tokens_per_s"] for s in timed]),
            "mfu": _median([s["mfu"] for s in timed if s.get("mfu") is not None]),
            "peak_memory_mib": max(s.get("peak_memory_mib", 0) for s in timed) if timed else None,
            "final_loss": timed[-1]["loss"] if timed else None}


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def run_core_tests(out: Path) -> dict:
    try:
        import pytest  # noqa: F401
    except ImportError:
        return {"skipped": "pytest is not installed"}
    env = {**os.environ, "SHARDTUNE_TEST_DEVICE": "cuda"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", *CORE_TESTS], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)
    (out / "core_tests.txt").write_text(proc.stdout + proc.stderr)
    return {"exit": proc.returncode, "summary": (proc.stdout.strip().splitlines() or [""])[-1]}


def markdown(rows: list[dict], device: str) -> str:
    lines = [f"GPU check on {device}, {time.strftime('%Y-%m-%d')}: ~1.1B Llama, bf16 compute, context {CONTEXT}, "
             f"micro batch {MICRO_BATCH}, world size 1 (NCCL), medians after {WARMUP_STEPS} warm-up steps", "",
             "| method | compile | tokens/s | MFU | peak MiB | process s |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['compile']} | failed | | | |")
            continue
        mfu = f"{r['mfu']:.3f}" if r["mfu"] is not None else "n/a"
        lines.append(f"| {r['method']} | {r['compile']} | {r['tokens_per_s'] or 0:.0f} | {mfu} | "
                     f"{r['peak_memory_mib'] or 0:.0f} | {r['process_s']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or REPO / "benchmarks" / "work" / "gpu"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--skip_tests", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="CPU, a micro model, LoRA eager only, 3 steps, no tests")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.skip_tests = 3, True
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA device; run it on a GPU machine", file=sys.stderr)
        return 2
    device = "cpu (smoke)" if args.smoke else torch.cuda.get_device_name()
    work = args.out / "work"
    model = build_model(work / ("model-micro" if args.smoke else "model-1b"), SMOKE_SHAPE if args.smoke else SHAPE,
                        "cpu" if args.smoke else "cuda")
    data = write_data(work / "data", copies=4 if args.smoke else 40)
    rows = []
    for method, compiled in [("lora", False)] if args.smoke else RUNS:
        rows.append(run_one(method, compiled, model, data, work / f"{method}-{'compile' if compiled else 'eager'}",
                            args.steps, args.smoke))
        print(json.dumps(rows[-1]), flush=True)
    report = {"device": device, "torch": torch.__version__, "runs": rows,
              "core_tests": {"skipped": "--skip_tests"} if args.skip_tests else run_core_tests(args.out)}
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    (args.out / "gpu_check.md").write_text(markdown(rows, device))
    print(markdown(rows, device))
    print(json.dumps(report["core_tests"]))
    failed = any("error" in r for r in rows) or report["core_tests"].get("exit", 0) != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
