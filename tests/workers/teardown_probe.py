"""Counts this rank's gloo threads after device.teardown(), in two situations that used to
leave the process group alive: the tokenizer loaded after setup (transformers then imports
torch.distributed.fsdp), and a full FSDP2 fine-tune (torch's caches keep the mesh)."""
import json
import os
import sys

from shardtune import device
from shardtune.model import load_tokenizer


def gloo_threads() -> int:
    names = [open(f"/proc/self/task/{t}/comm").read() for t in os.listdir("/proc/self/task")]
    return sum("gloo" in n for n in names)


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
        from shardtune import finetuning  # not earlier: it imports torch.distributed.fsdp

        result = {"rc": finetuning.main(rest)}
    result["after"] = gloo_threads()
    with open(f"{out}/rank{os.environ['RANK']}.json", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
