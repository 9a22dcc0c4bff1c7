#!/usr/bin/env bash
# The GPU check of BENCHMARKS.md: ~1.1B Llama, bf16, LoRA and full fine-tune, eager and
# --compile, then the core tests on CUDA. Under 8 minutes on one H200; see gpu_check.py.
# PYTHON=/path/to/python picks the interpreter (default: python on PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" -m benchmarks.gpu_check "$@"
