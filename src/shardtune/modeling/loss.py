"""The training loss: summed next-token cross-entropy over target tokens, computed only
where there are targets and without ever holding [tokens, vocab] fp32 logits.

Only ~14% of SAMSum tokens carry labels, yet a causal LM's forward projects every
position onto the vocabulary. So the output head runs inside the model's own forward
(under FSDP2 the head is its own unit, or in the root's when tied to the embedding:
either way its weight is gathered there, and the loss leaves the unit as its output, so
FSDP's backward hooks fire on it as on logits), but two hooks on the head change what it
computes:

  * a pre-hook swaps its input, the hidden states [batch, seq, hidden], for an empty
    [0, hidden] batch and keeps the rows at labelled positions (gathered with indices
    counted on the host, so no device sync);
  * a forward hook returns, in place of the logits, the cross-entropy sum of those rows,
    computed in chunks of CE_CHUNK_TOKENS positions; each chunk's head + CE is
    checkpointed, so backward recomputes one chunk's logits at a time instead of keeping
    all of them.

The model then returns that loss as `logits`. A model that transforms its logits after
the head (Gemma 2's soft-capping) would transform the loss too; for those the head only
gets the labelled rows, and the loss is taken from the logits it returns.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .. import _compat
from ..data.tokenize import IGNORE_INDEX
from .attention import PACKED, packed_inputs

CE_CHUNK_TOKENS = 1024  # positions per head + CE chunk: 1024 x 32k vocab x fp32 = 128 MiB of logits
# config fields of transformers models that post-process the head's output
LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale")


@dataclass
class Targets:
    """The labelled positions of a batch, counted on the host: flat indices into
    [batch * seq] of the positions that predict a label, and those labels."""

    positions: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def of(cls, labels: torch.Tensor, device: torch.device) -> "Targets":
        shifted = labels.clone()
        shifted[:, :-1] = labels[:, 1:]  # position i predicts token i + 1
        shifted[:, -1] = IGNORE_INDEX  # the last position predicts nothing in this row
        flat = shifted.flatten()
        positions = (flat != IGNORE_INDEX).nonzero().squeeze(1)
        return cls(positions.to(device, non_blocking=True), flat[positions].to(device, non_blocking=True))


def model_inputs(model: torch.nn.Module, batch: dict, device: torch.device,
                 mask_from_positions: bool = False) -> dict:
    """The batch as the model's forward takes it, on the device."""
    # Packed batches carry restarting position_ids and no attention_mask (transformers then
    # isolates examples); a custom collator may send an attention_mask instead.
    inputs = {k: batch[k].to(device, non_blocking=True)
              for k in ("input_ids", "position_ids", "attention_mask") if batch.get(k) is not None}
    if mask_from_positions:
        # One example per row: real tokens are exactly where position == column. Send the
        # mask a plain peft user would, and let the model place positions after the prefix.
        pos = inputs.pop("position_ids")
        inputs["attention_mask"] = (pos == torch.arange(pos.shape[1], device=device)).long()
    elif "attention_mask" not in inputs and "position_ids" in inputs and _compat.attn_implementation(config_of(model)) == PACKED:
        # attention within each packed example only (attention.py), lengths read on the host
        inputs.update(packed_inputs(batch["position_ids"], config_of(model)))
    return inputs


def token_loss_sum(model: torch.nn.Module, batch: dict, device: torch.device,
                   mask_from_positions: bool = False) -> torch.Tensor:
    """Summed next-token cross-entropy over target tokens."""
    return _target_ce(model, batch, device, mask_from_positions, per_token=False)


def target_logps(model: torch.nn.Module, batch: dict, device: torch.device,
                 mask_from_positions: bool = False) -> torch.Tensor:
    """The log-probability of every target token, in Targets.of(batch["labels"]) order
    (preference losses sum them per example)."""
    return -_target_ce(model, batch, device, mask_from_positions, per_token=True)


def _target_ce(model: torch.nn.Module, batch: dict, device: torch.device, mask_from_positions: bool,
               per_token: bool) -> torch.Tensor:
    inputs = model_inputs(model, batch, device, mask_from_positions)
    targets = Targets.of(batch["labels"], device)
    head = output_head(model)
    fused = not any(getattr(config_of(model), name, None) for name in LOGIT_POSTPROCESSING)
    with _head_at_targets(head, targets, fused, per_token) as fused_loss:
        logits = model(**inputs, use_cache=False).logits
    if fused:
        if logits is not fused_loss[0]:  # fails loudly should a model start post-processing its logits
            raise RuntimeError(f"{type(head).__name__}'s output was changed after the head; add the config "
                               "field that does it to shardtune.loss.LOGIT_POSTPROCESSING")
        return logits
    return F.cross_entropy(logits.float(), targets.labels, reduction="none" if per_token else "sum")


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def output_head(model: torch.nn.Module) -> torch.nn.Module:
    """The vocabulary projection (lm_head; with tied embeddings it shares their weight)."""
    return _unwrapped(model).get_output_embeddings()


def config_of(model: torch.nn.Module):
    return _unwrapped(model).config


def _chunk_ce(head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor, reduction: str) -> torch.Tensor:
    # head.forward, not head(...): calling the module would run these hooks again
    return F.cross_entropy(head.forward(hidden).float(), labels, reduction=reduction)


def chunked_ce(head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
               per_token: bool = False) -> torch.Tensor:
    """CE(head(hidden), labels), summed over rows (per_token: one value per row),
    CE_CHUNK_TOKENS rows at a time; with grad enabled each chunk is checkpointed, so only
    one chunk's logits are alive at once."""
    reduction = "none" if per_token else "sum"
    parts = []
    # at least one (maybe empty) chunk, so a batch without targets still has a graph to backward
    for start in range(0, max(hidden.shape[0], 1), CE_CHUNK_TOKENS):
        rows = slice(start, start + CE_CHUNK_TOKENS)
        if torch.is_grad_enabled():
            parts.append(checkpoint(_chunk_ce, head, hidden[rows], labels[rows], reduction, use_reentrant=False))
        else:
            parts.append(_chunk_ce(head, hidden[rows], labels[rows], reduction))
    if per_token:
        return torch.cat(parts)
    total = hidden.new_zeros((), dtype=torch.float32)
    for part in parts:  # summed in chunk order, as before
        total = total + part
    return total


@contextlib.contextmanager
def _head_at_targets(head: torch.nn.Module, targets: Targets, fused: bool, per_token: bool = False):
    """While open, `head` sees only the labelled rows; fused: it returns their CE sum
    (per_token: each row's CE), also kept in the yielded list, instead of logits."""
    labelled: list[torch.Tensor] = []
    fused_loss: list[torch.Tensor] = []

    def gather(module, args):
        hidden = args[0]
        rows = hidden.flatten(0, -2).index_select(0, targets.positions)
        if not fused:
            return (rows,)
        labelled.append(rows)
        return (rows[:0],)  # the head's own forward then computes nothing

    def replace_output(module, args, output):
        fused_loss.append(chunked_ce(module, labelled.pop(), targets.labels, per_token))
        return fused_loss[-1]

    # FSDP2's pre-forward hook is prepended (it gathers the weight before `gather` runs); its
    # post-forward hook must see the loss, not the empty logits, to hook backward on it, so
    # replace_output goes before it.
    handles = [head.register_forward_pre_hook(gather)]
    if fused:
        handles.append(head.register_forward_hook(replace_output, prepend=True))
    try:
        yield fused_loss
    finally:
        for handle in handles:
            handle.remove()
