"""Private or version-dependent APIs of torch, transformers and peft that shardtune relies on,
in one place, so that an upgrade breaks here with a clear message instead of deep in a run.
tests/test_compat.py exercises each entry against the installed versions.

Checked against: torch 2.13.0, transformers 5.24.0 and 5.25.0, peft 0.21.2 (constraints.txt).
"""
from __future__ import annotations

import torch


# ---- torch.compile (dynamo) ---------------------------------------------------------------

def allow_checkpointed_side_effects() -> None:
    """Let dynamo compile a checkpointed decoder layer whose forward mutates Python state.

    From transformers 5.25 on, every attention module's forward runs inside the `kernels`
    package's `use_kernelized_func` wrapper, which sets a module-level CompileableContextVar
    on entry and resets it on exit (it routes rotary embedding calls to hub kernels). Under
    torch.utils.checkpoint dynamo refuses to trace a mutation of state from outside the
    checkpoint, because eager checkpointing would replay it in backward's recomputation; it
    then graph-breaks and runs the whole layer eagerly. The set/reset pair leaves the
    variable as it found it, and nothing in the layer's tensors depends on it, so not
    replaying it in backward computes the same gradients. The flag is process-wide; the
    training process compiles nothing but the decoder layers."""
    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True


def graph_breaks() -> list[str]:
    """One line per distinct reason dynamo gave for a graph break in this process so far:
    the code around each break ran eagerly. The counter is keyed by the full message."""
    from torch._dynamo.utils import counters

    return [_summary(reason) for reason in counters["graph_break"]]


def _summary(reason: str) -> str:
    """The message's title and its developer context ('Attempted to mutate ...')."""
    lines = [line.strip() for line in reason.splitlines() if line.strip()]
    context = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Developer debug context:")), "")
    return f"{lines[0]}: {context}" if context else lines[0] if lines else reason
