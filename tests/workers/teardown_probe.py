"""Checks that device.teardown() releases this rank's process group in two situations
that used to leave it alive: the tokenizer loaded after setup (transformers then imports
torch.distributed.fsdp), and a full FSDP2 fine-tune (torch's caches keep the mesh).

gloo's worker threads end shortly after their group is freed, not at the instant
teardown returns, so the probe waits for them (bounded) instead of sampling the count
once: a released group's threads are gone within the wait, a leaked group's never are.
"""
import json
import os
import sys
import time

from shardtune import device
from shardtune.modeling.load import load_tokenizer

THREAD_EXIT_WAIT_S = 30.0


def gloo_threads() -> int:
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            names.append(open(f"/proc/self/task/{tid}/comm").read())
        except FileNotFoundError:  # the thread ended while we listed
            pass
    return sum("gloo" in n for n in names)


def gloo_threads_after_wait() -> tuple[int, float]:
    """(gloo threads left, seconds waited): returns as soon as none is left."""
    start = time.monotonic()
    while (left := gloo_threads()) and time.monotonic() - start < THREAD_EXIT_WAIT_S:
        time.sleep(0.05)
    return left, round(time.monotonic() - start, 2)


def tokenizer_then_broadcast(model_dir: str) -> dict:
    dist = device.setup()
    import torch.distributed as tdist

    load_tokenizer(model_dir)
    box = ["hello" if dist.is_main else None]
    tdist.broadcast_object_list(box, src=0)
    during = gloo_threads()
    device.teardown()
    return {"got": box[0], "during": during}


def main() -> None:
    out, mode, rest = sys.argv[1], sys.argv[2], sys.argv[3:]
    if mode == "tokenizer":
        result = tokenizer_then_broadcast(rest[0])
    else:
        from shardtune.recipes import sft  # not earlier: it imports torch.distributed.fsdp

        result = {"rc": sft.main(rest)}
    import torch.distributed as tdist

    result["initialized_after"] = tdist.is_initialized()
    result["after"], result["waited_s"] = gloo_threads_after_wait()
    with open(f"{out}/rank{os.environ['RANK']}.json", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
