"""Checkpoint stage.

  manifest  complete-or-invisible directories: temporary sibling, fsync, manifest, one rename
  outputs   the final adapter / Hugging Face model in output_dir, and output_dir claims
  state     step checkpoints (DCP + RNG + loop state) for exact resume, retention, best/
  convert   a step checkpoint -> an adapter or HF directory; merge LoRA into the base
"""
from . import manifest, outputs, state
from .outputs import check_writable, claim_output_dir, full_trainable_state

__all__ = ["manifest", "outputs", "state", "check_writable", "claim_output_dir", "full_trainable_state"]
