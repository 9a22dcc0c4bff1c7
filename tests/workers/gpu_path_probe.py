"""Test worker (torchrun): what the GPU path must get right, observed on CPU in one run.

    gpu_path_probe.py OUT FLAGS... [--then OUT FLAGS...]...   (one launch, several runs)

Writes OUT.rank<r>.json for each run, with
  * host_syncs: ops that force a host-device sync on an accelerator (.item(), nonzero, ...)
    issued between one optimizer step and the next, counted by a TorchDispatchMode over the
    steps that do not log (the run logs only at its end). On CPU every tensor is a host
    tensor, so two kinds are left out by where they run: the batch's host-side preparation
    (HOST_SIDE: host tensors on every device), and torch's non-fused AdamW, which reads a
    host-side step counter inside optimizer.step() (on accelerators shardtune uses fused
    AdamW, optim.build.build_optimizer);
  * grad_sync: each set_requires_gradient_sync / set_requires_all_reduce call on the root
    FSDP module, in order (the real methods still run);
  * dtypes: parameter dtype -> [trainable count, frozen count] after setup.
"""
import json
import sys
import traceback
from collections import Counter

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode

from shardtune import device
from shardtune.config.parse import parse_args
from shardtune.recipes import sft
from several_runs import runs

# Host-side preparation of a batch: the collate's tensors stay in host memory on every
# device, so reading them never waits for the device.
HOST_SIDE = {("packing.py", "collate"), ("fetch.py", "fetch"), ("loss.py", "of"), ("attention.py", "packed_lengths")}
SYNC_OPS = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.is_nonzero", "aten.equal",
            "aten._unique2", "aten.unique_consecutive", "aten.unique_dim", "aten.repeat_interleave"}


class SyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.window = None  # the step whose window is open (None: not counting)
        self.in_optimizer = False
        self.found: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket) if hasattr(func, "overloadpacket") else str(func)
        if (self.window is not None and not self.in_optimizer and f"aten.{name.split('.')[-1]}" in SYNC_OPS
                and not any((f.filename.rpartition("/")[2], f.name) in HOST_SIDE for f in traceback.extract_stack())):
            self.found[f"step {self.window}: {name}"] += 1
        return func(*args, **(kwargs or {}))


counter = SyncCounter()
record: dict = {}


def spy(module, name):
    real = getattr(module, name)

    def call(flag, *args, **kwargs):
        record["grad_sync"].append([name, bool(flag)])
        return real(flag, *args, **kwargs)

    setattr(module, name, call)


def before_step(model, state):
    """After backward of step state.step + 1: the window from the previous step's
    before_step (optimizer step, after_step, forward and backward) closes here."""
    if state.step == 0:  # first call: record the setup, open the first window
        for p in model.parameters():
            key = str(p.dtype).replace("torch.", "") + (" trainable" if p.requires_grad else " frozen")
            record["dtypes"][key] = record["dtypes"].get(key, 0) + 1
        if hasattr(model, "set_requires_gradient_sync"):
            spy(model, "set_requires_gradient_sync")
            spy(model, "set_requires_all_reduce")
    counter.window = state.step + 1


if __name__ == "__main__":
    register_optimizer_step_pre_hook(lambda *a: setattr(counter, "in_optimizer", True))
    register_optimizer_step_post_hook(lambda *a: setattr(counter, "in_optimizer", False))
    plan = [(out_file, parse_args(argv)) for out_file, argv in runs(sys.argv[1:])]
    dist = device.setup(require_distributed=True)
    for out_file, cfgs in plan:
        counter.found.clear()
        counter.window = None
        record.update(grad_sync=[], dtypes={})
        with counter:
            result = sft.run(cfgs, dist, before_step=before_step)
        counter.window = None
        # the last window holds the final flush (the one logging step): not counted
        syncs = {k: v for k, v in counter.found.items() if not k.startswith(f"step {result.steps}:")}
        with open(f"{out_file}.rank{dist.rank}.json", "w") as f:
            json.dump({"host_syncs": syncs, **record, "steps": result.steps}, f)
    device.teardown()
