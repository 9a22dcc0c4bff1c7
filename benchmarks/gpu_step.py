"""One training run of the GPU check, as torchrun's script: shardtune's finetune command
(what llama_finetuning.py runs) under torch.cuda.set_sync_debug_mode("warn"), counting the
host syncs it warns about.

    torchrun --standalone --nproc_per_node 1 benchmarks/gpu_step.py FINETUNE_ARGS...

With GPU_CHECK_STEP_JSON=PATH, rank 0 writes there at exit: the device name, whether sync
debug mode was on, the number of sync warnings and the code sites that caused the most.
A wrapper, not a recipe flag: counting syncs is the check's measurement, and src/ stays
what users run. The count covers the whole process (loading, sharding, saving too); the
sites say which of them are in the training loop (shardtune/loop.py, modeling/loss.py).
"""
from __future__ import annotations

import collections
import importlib.util
import json
import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # as llama_finetuning.py does

SYNC_WARNING = r".*synchronizing CUDA operation"  # c10's TORCH_WARN text in sync debug mode "warn"


def _site(filename: str) -> str:
    """A warning's file, from the package down (shardtune/loop.py, torch/...)."""
    for marker in ("site-packages/", "/src/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


def main(argv: list[str]) -> int:
    import torch

    record = {"device": "cpu", "sync_debug": False, "sync_warnings": None, "sync_sites": {},
              "loss_png": "drawn by the recipe"}
    sites: collections.Counter = collections.Counter()
    if os.environ.get("SHARDTUNE_DEVICE") != "cpu" and torch.cuda.is_available():
        record["device"] = torch.cuda.get_device_name(int(os.environ.get("LOCAL_RANK", 0)))
        shown = warnings.showwarning

        def count(message, category, filename, lineno, file=None, line=None):
            if "synchronizing CUDA operation" in str(message):
                sites[f"{_site(filename)}:{lineno}"] += 1
            else:
                shown(message, category, filename, lineno, file, line)

        # "always": Python would otherwise show (and so count) each site only once
        warnings.filterwarnings("always", message=SYNC_WARNING)
        warnings.showwarning = count
        torch.cuda.set_sync_debug_mode("warn")
        record["sync_debug"] = True
    if importlib.util.find_spec("matplotlib") is None:
        # The recipe draws loss.png when the run closes its metrics, after the save; without
        # matplotlib that import error would fail a run whose work is done. Not the check's subject.
        from shardtune.metrics import curve

        curve.draw = lambda curves, out: record.update(loss_png="skipped: matplotlib is not installed")

    from shardtune.commands.finetune import main as finetune

    try:
        return finetune(argv)
    finally:
        # a run that fails under torchrun leaves through os._exit (errors.exit_now), so only
        # runs that end normally, or raise in one process, write this
        out = os.environ.get("GPU_CHECK_STEP_JSON")
        if out and os.environ.get("RANK", "0") == "0":
            record["sync_warnings"] = sum(sites.values()) if record["sync_debug"] else None
            record["sync_sites"] = dict(sites.most_common(10))
            Path(out).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
