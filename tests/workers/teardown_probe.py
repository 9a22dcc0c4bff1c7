"""Records how many threads this rank has before device.setup() and after device.teardown(),
with the tokenizer loaded in between (transformers then imports torch.distributed.fsdp)."""
import json
import os
import sys

from shardtune import device
from shardtune.model import load_tokenizer


def threads() -> int:
    return len(os.listdir("/proc/self/task"))


def main() -> None:
    out, model_dir = sys.argv[1], sys.argv[2]
    before = threads()
    dist = device.setup()
    import torch.distributed as tdist

    load_tokenizer(model_dir)
    box = ["hello" if dist.is_main else None]
    tdist.broadcast_object_list(box, src=0)
    during = threads()
    device.teardown()
    with open(f"{out}/rank{dist.rank}.json", "w") as f:
        json.dump({"before": before, "during": during, "after": threads(), "got": box[0]}, f)


if __name__ == "__main__":
    main()
