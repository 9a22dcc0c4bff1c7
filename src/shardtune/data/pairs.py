"""Preference pairs as the DPO recipe batches them.

A pair is (prompt, chosen, rejected) token ids (data/preference.py reads them). It becomes two
examples, prompt+chosen and prompt+rejected, labelled on the completion only: TRL's
DPOTrainer scores exactly those tokens. The sampler draws pairs (batch sizes count pairs), and
the collate lays a micro-batch's 2P examples out in rows:

  * packing: best-fit-decreasing into rows of context_length, several examples per row,
    each with restarting position_ids, so each attends only to itself (as SFT packing);
  * padding: one example per row.

Both give the same per-example sums of log-probabilities, so a packed step equals a padded
one. `example_ids` says which example each token belongs to: chosen of pair k is example k,
rejected is P + k (TRL's [chosen..., rejected...] order).

ORPO's NLL term covers the chosen example's prompt too (TRL's ORPOTrainer: "over the full
prompt and response"): with chosen_prompt_targets the chosen prompts are labelled as well,
and `completion_mask` keeps every per-example sum to the completion.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.utils.data import Dataset

from .packing import best_fit_decreasing, collate
from .records import BadRecords
from .tokenize import IGNORE_INDEX


TRUNCATION_MODES = ("keep_start", "refuse")


def fit_pairs(pairs: list[dict], context_length: int, bad: BadRecords,
              truncation_mode: str = "keep_start") -> tuple[list[dict], int, int]:
    """(the pairs that fit the context, how many of them were truncated, how many were dropped).
    A longer pair, with keep_start (TRL's max_length truncation): each completion is cut to
    what the context leaves after the prompt, and a pair whose prompt alone fills the context
    is dropped (nothing left to score); with refuse: a bad record (a truncated completion
    scores another answer than the record's)."""
    kept, truncated, dropped = [], 0, 0
    for pair in pairs:
        if not pair["chosen_ids"] or not pair["rejected_ids"]:
            bad.report(f"{pair['origin']}: an empty completion after tokenization")
            continue
        room = context_length - len(pair["prompt_ids"])
        if max(len(pair["chosen_ids"]), len(pair["rejected_ids"])) <= room:
            kept.append(pair)
        elif truncation_mode == "refuse":
            longest = len(pair["prompt_ids"]) + max(len(pair["chosen_ids"]), len(pair["rejected_ids"]))
            bad.report(f"{pair['origin']}: prompt + completion is {longest} tokens, more than --context_length "
                       f"{context_length} (--dpo_config.truncation_mode keep_start cuts it instead)")
        elif room <= 0:
            dropped += 1
        else:
            kept.append({**pair, "chosen_ids": pair["chosen_ids"][:room], "rejected_ids": pair["rejected_ids"][:room]})
            truncated += 1
    return kept, truncated, dropped


class PairDataset(Dataset):
    """Pairs stored flat: one int32 tensor per field plus offsets. Optional reference
    log-probabilities [n, 2] (chosen, rejected) ride along when precomputed."""

    FIELDS = ("prompt_ids", "chosen_ids", "rejected_ids")

    def __init__(self, pairs: list[dict]) -> None:
        self.arrays, self.offsets = {}, {}
        for key in self.FIELDS:
            lengths = torch.tensor([0] + [len(p[key]) for p in pairs], dtype=torch.long)
            self.offsets[key] = torch.cumsum(lengths, 0)
            flat = [tok for p in pairs for tok in p[key]]
            self.arrays[key] = torch.tensor(flat, dtype=torch.int32)
        self.reference_logps: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self.offsets["prompt_ids"]) - 1

    def _field(self, key: str, i: int) -> torch.Tensor:
        a, b = int(self.offsets[key][i]), int(self.offsets[key][i + 1])
        return self.arrays[key][a:b].long()

    def __getitem__(self, i: int) -> dict:
        item = {key: self._field(key, max(i, 0)) for key in self.FIELDS}
        item["weight"] = 0.0 if i < 0 else 1.0  # EvalSampler's filler (-1) counts for nothing
        if self.reference_logps is not None:
            item["reference_logps"] = self.reference_logps[max(i, 0)]
        return item

    def lengths(self) -> list[int]:
        """Tokens of each pair's two examples."""
        prompt = 2 * (self.offsets["prompt_ids"][1:] - self.offsets["prompt_ids"][:-1])
        chosen = self.offsets["chosen_ids"][1:] - self.offsets["chosen_ids"][:-1]
        rejected = self.offsets["rejected_ids"][1:] - self.offsets["rejected_ids"][:-1]
        return (prompt + chosen + rejected).tolist()


def _example(prompt: torch.Tensor, completion: torch.Tensor, label_prompt: bool = False) -> dict:
    ids = torch.cat([prompt, completion])
    completion_mask = torch.arange(len(ids)) >= len(prompt)
    completion_mask[0] = False  # the first token predicts nothing (and is never a target in TRL either)
    targets = torch.arange(len(ids)) > 0 if label_prompt else completion_mask
    labels = torch.where(targets, ids, IGNORE_INDEX)
    return {"input_ids": ids, "labels": labels, "position_ids": torch.arange(len(ids)),
            "completion_mask": completion_mask}


def collate_pairs(pairs: list[dict], pad_id: int, context_length: int, packing: bool,
                  chosen_prompt_targets: bool = False) -> dict:
    """A micro-batch of pairs -> rows of examples (see the module docstring), with the
    counts the loop and the preference loss read on the host."""
    examples = ([_example(p["prompt_ids"], p["chosen_ids"], chosen_prompt_targets) for p in pairs]
                + [_example(p["prompt_ids"], p["rejected_ids"]) for p in pairs])
    lengths = [len(e["input_ids"]) for e in examples]
    rows = best_fit_decreasing(lengths, context_length) if packing else [[i] for i in range(len(examples))]
    chunks, owners, masks = [], [], []
    for row in rows:
        chunks.append({key: torch.cat([examples[i][key] for i in row]) for key in ("input_ids", "labels", "position_ids")})
        owners.append(torch.cat([torch.full((lengths[i],), i) for i in row]))
        masks.append(torch.cat([examples[i]["completion_mask"] for i in row]))
    batch = collate(chunks, pad_id)
    example_ids = torch.full_like(batch["input_ids"], -1)
    for r, owner in enumerate(owners):
        example_ids[r, :len(owner)] = owner
    weights = torch.tensor([p["weight"] for p in pairs], dtype=torch.float32)
    completion_lengths = torch.tensor([int(e["completion_mask"].sum()) for e in examples], dtype=torch.float32)
    chosen_targets = [int((e["labels"] != IGNORE_INDEX).sum()) for e in examples[:len(pairs)]]
    batch.update(
        example_ids=example_ids, pair_weights=weights, completion_lengths=completion_lengths,
        num_pairs=int(weights.sum()),
        # ORPO's NLL is a mean over the chosen examples' targets (prompt too, with chosen_prompt_targets)
        num_chosen_targets=int(sum(n * weights[k] for k, n in enumerate(chosen_targets))),
    )
    if chosen_prompt_targets:  # some targets are prompt tokens: the per-example sums skip them
        completion_mask = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
        for r, mask in enumerate(masks):
            completion_mask[r, :len(mask)] = mask
        batch["completion_mask"] = completion_mask
    if "reference_logps" in pairs[0]:
        ref = torch.stack([p["reference_logps"] for p in pairs])  # [P, 2]
        batch["reference_logps"] = torch.cat([ref[:, 0], ref[:, 1]])
    return batch
