#!/usr/bin/env bash
# The GPU check (BENCHMARKS.md, "GPU check"): one command, about 8 minutes, on a machine with
# one CUDA GPU and only this checkout (no ../shared/data, no network). It builds a ~1.1B
# Llama and its data, runs shardtune's one-GPU paths under torchrun (LoRA with CPU offload,
# full fine-tune with and without accumulation, save and --resume auto, 4-bit under FSDP,
# tokens/s and MFU), each with its own timeout, then the single-process core tests on the
# GPU, and writes gpu_check.json and gpu_check.md to $OUT (else benchmarks/work/gpu).
# Not yet run on a GPU. Options: see benchmarks/gpu_check.py (--smoke: the same on CPU).
#
# The interpreter must already have torch with CUDA (nothing is downloaded): $PYTHON, else
# this checkout's .venv, else python3 / python on PATH. Missing shardtune dependencies are
# tried with `pip install -e .` (torch held), and a failure is reported, not fatal.
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    for candidate in .venv/bin/python python3 python; do
        if command -v "$candidate" >/dev/null; then PYTHON=$candidate; break; fi
    done
fi
exec "${PYTHON:?no python found: set PYTHON}" -m benchmarks.gpu_check "$@"
