"""The attention paths of packed rows, side by side (gpu_check's `attention_paths` step):
shardtune's packed attention (on CUDA in bf16: torch's varlen flash attention, one call per
layer; elsewhere SDPA once per example) against the per-example path and transformers' SDPA
with the block-diagonal mask, on the same packed batch. Prints one JSON line: for each path
the median forward+backward time and the largest difference of its output and its
query/key/value gradients from the masked path.

    python -m benchmarks.gpu_attention [--device cuda] [--rows 4] [--seq 2048]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from types import SimpleNamespace
from unittest import mock

import torch

from shardtune.modeling import attention


def packed_lengths(rows: int, seq: int, generator: torch.Generator) -> attention.Lengths:
    """Rows filled with examples of 64-512 tokens (SAMSum-like), the last one cut to fit."""
    out = []
    for _ in range(rows):
        sizes, left = [], seq
        while left:
            n = min(left, int(torch.randint(64, 513, (), generator=generator)))
            sizes.append(n)
            left -= n
        out.append(tuple(sizes))
    return tuple(out)


def block_mask(lengths: attention.Lengths, seq: int, device) -> torch.Tensor:
    mask = torch.zeros(len(lengths), 1, seq, seq, dtype=torch.bool, device=device)
    for row, sizes in enumerate(lengths):
        start = 0
        for n in sizes:
            mask[row, 0, start:start + n, start:start + n] = torch.ones(n, n, dtype=torch.bool, device=device).tril()
            start += n
    return mask


def run(path: str, module, q, k, v, lengths, mask) -> tuple[torch.Tensor, list[torch.Tensor]]:
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    if path == "masked":
        out = attention.sdpa_attention_forward(module, q, k, v, mask, scaling=module.scaling)[0]
    elif path == "per_example":
        with mock.patch.object(attention, "_varlen_runs", lambda query: False):
            out = attention.packed_sdpa(module, q, k, v, None, packed_lengths=lengths, scaling=module.scaling)[0]
    else:
        out = attention.packed_sdpa(module, q, k, v, None, packed_lengths=lengths, scaling=module.scaling)[0]
    out.float().square().sum().backward()
    return out.detach(), [t.grad for t in (q, k, v)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    heads, kv_heads, dim = 32, 4, 64  # TinyLlama's grouped-query shape
    generator = torch.Generator().manual_seed(0)
    lengths = packed_lengths(args.rows, args.seq, generator)
    q = torch.randn(args.rows, heads, args.seq, dim, generator=generator).to(device, dtype)
    k, v = (torch.randn(args.rows, kv_heads, args.seq, dim, generator=generator).to(device, dtype) for _ in range(2))
    module = SimpleNamespace(is_causal=True, num_key_value_groups=heads // kv_heads, scaling=dim ** -0.5, training=True)
    mask = block_mask(lengths, args.seq, device)
    reference_out, reference_grads = run("masked", module, q, k, v, lengths, mask)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "dtype": str(dtype),
              "rows": args.rows, "seq": args.seq, "examples": sum(len(r) for r in lengths),
              "varlen_runs": attention._varlen_runs(q)}
    for path in ("packed", "per_example", "masked"):
        out, grads = run(path, module, q, k, v, lengths, mask)
        times = []
        for _ in range(args.repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            run(path, module, q, k, v, lengths, mask)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        report[path] = {
            "ms": round(1000 * statistics.median(times), 3),
            "max_diff_out": (out.float() - reference_out.float()).abs().max().item(),
            "max_diff_grad": max((g.float() - r.float()).abs().max().item() for g, r in zip(grads, reference_grads)),
        }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
