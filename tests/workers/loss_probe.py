"""Test worker (run under torchrun): on a real FSDP2 (or DDP) model built by the recipe, the loss
and full gradients of shardtune's loss (head and CE only at labelled positions, chunked)
and of the plain path (full logits, then CE), on the same batch. Rank 0 saves both.

    loss_probe.py OUT_FILE CE_CHUNK_TOKENS FLAGS..."""
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

from shardtune import device, parallel
from shardtune.recipes import sft
from shardtune.modeling import loss, load as model_lib
from shardtune.config.parse import parse_args
from shardtune.data import build_split
from shardtune.data.packing import collate


def grads(model) -> dict[str, torch.Tensor]:
    return {name: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
            for name, p in model.named_parameters() if p.grad is not None}


def main() -> None:
    out_file, chunk, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    loss.CE_CHUNK_TOKENS = chunk
    cfgs = parse_args(argv)
    dist = device.setup(require_distributed=cfgs.train.enable_fsdp)
    spec = model_lib.load_spec(cfgs.train.model_name)
    tokenizer = model_lib.load_tokenizer(cfgs.train.model_name)
    split = build_split(cfgs, tokenizer, "train", dist)
    batch = collate([split.dataset[2 * dist.rank + i] for i in range(2)], tokenizer.pad_token_id)
    precision = parallel.resolve_precision(cfgs, dist.supports_fast_bf16())
    model, _ = sft.setup_model(cfgs, dist, spec, precision)
    model.train()

    ours = loss.token_loss_sum(model, batch, dist.device)
    ours.backward()
    ours_grads = grads(model)
    model.zero_grad(set_to_none=True)

    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    plain = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                            ignore_index=-100, reduction="sum")
    plain.backward()
    plain_grads = grads(model)
    if dist.is_main:
        tensors = {"loss/ours": ours.detach().reshape(1), "loss/plain": plain.detach().reshape(1)}
        tensors.update({f"ours/{k}": v for k, v in ours_grads.items()})
        tensors.update({f"plain/{k}": v for k, v in plain_grads.items()})
        save_file({k: v.contiguous() for k, v in tensors.items()}, out_file)
    device.teardown()


if __name__ == "__main__":
    main()
