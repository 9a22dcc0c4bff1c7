"""Preference losses (DPO and its variants) with TRL's meanings, as a loop.Objective.

Per pair, from the summed log-probabilities of the chosen (c) and rejected (r) completions
under the policy and, where the loss has one, the reference model:

  sigmoid  DPO (TRL's sigmoid): -log s(b*d), d = (c - ref_c) - (r - ref_r)
  cdpo     conservative DPO (Mitchell 2023; TRL's sigmoid before it dropped label_smoothing):
           -(1-e) log s(b*d) - e log s(-b*d), e = label_smoothing
  ipo      ((c - ref_c)/|c| - (r - ref_r)/|r| - 1/(2b))^2, per-token log-ratios as TRL's
  simpo    reference-free: -(1-e) log s(b*(c/|c| - r/|r|) - g), g = simpo_gamma (TRL's CPO simpo)
  orpo     reference-free: NLL of the chosen examples, prompt and response (mean over the
           batch's chosen targets, as TRL's ORPOTrainer)
           - a * log s(log-odds(c/|c|) - log-odds(r/|r|)), a = orpo_alpha (TRL's ORPO beta)

|c| is the completion's token count. Rewards as TRL logs them: b*(c - ref_c) for sigmoid and
ipo; b*c/|c| for simpo and a*c/|c| for orpo. The loss is the mean over the global batch of
pairs (ORPO's NLL over its chosen tokens), so it does not depend on world size or accumulation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .. import _compat
from ..data.tokenize import IGNORE_INDEX
from ..metrics.logs import PREFERENCE_STATS
from .loss import target_logps

LOSS_TYPES = ("sigmoid", "cdpo", "ipo", "simpo", "orpo")
REFERENCE_FREE = ("simpo", "orpo")
LABEL_SMOOTHED = ("cdpo", "simpo")  # the losses that read label_smoothing (TRL: CPO's simpo)
PROMPT_NLL = ("orpo",)  # an NLL term over the chosen prompt and response (TRL's ORPOTrainer)
STAT_NAMES = PREFERENCE_STATS  # in this order: PreferenceLoss.loss stacks them so


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends (TRL's formula)."""
    return torch.where(x > -0.6931472, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


@dataclass(frozen=True)
class PairLoss:
    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    orpo_alpha: float = 0.1

    def terms(self, c, r, ref_c, ref_r, len_c, len_r) -> tuple[torch.Tensor, ...]:
        """Per pair: (loss, chosen reward, rejected reward, chosen logps, rejected logps),
        the logps as the loss reads them (summed; averaged for simpo and orpo)."""
        b, e = self.beta, self.label_smoothing
        if self.loss_type in ("sigmoid", "cdpo", "ipo"):
            ratio_c, ratio_r = c - ref_c, r - ref_r
            if self.loss_type != "ipo":  # sigmoid: e is 0 (check_dpo)
                d = b * (ratio_c - ratio_r)
                loss = -(1 - e) * F.logsigmoid(d) - e * F.logsigmoid(-d)
            else:
                loss = (ratio_c / len_c - ratio_r / len_r - 1 / (2 * b)) ** 2
            return loss, b * ratio_c.detach(), b * ratio_r.detach(), c.detach(), r.detach()
        avg_c, avg_r = c / len_c, r / len_r
        if self.loss_type == "simpo":
            d = b * (avg_c - avg_r - self.simpo_gamma / b)
            loss = -(1 - e) * F.logsigmoid(d) - e * F.logsigmoid(-d)
            scale = b
        else:  # orpo: the odds-ratio term; the NLL is added by PreferenceLoss
            log_odds = (avg_c - avg_r) - (log1mexp(avg_c) - log1mexp(avg_r))
            loss = -self.orpo_alpha * F.logsigmoid(log_odds)
            scale = self.orpo_alpha
        return loss, scale * avg_c.detach(), scale * avg_r.detach(), avg_c.detach(), avg_r.detach()


def example_logps(model: torch.nn.Module, batch: dict, device: torch.device,
                  mask_from_positions: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each example's completion [2P], per-token log-probs [T] of
    every target), examples in the collate's order (chosen..., rejected...). mask_from_positions:
    one example per row, with an attention mask (prefix tuning)."""
    token_logps = target_logps(model, batch, device, mask_from_positions)
    owner = target_owner(batch)
    scored = token_logps
    if "completion_mask" in batch:  # ORPO labels the chosen prompts too: they are not in the sums
        scored = token_logps * at_targets(batch, batch["completion_mask"], False).to(device, non_blocking=True)
    sums = torch.zeros(len(batch["completion_lengths"]), device=device, dtype=token_logps.dtype)
    return sums.index_add(0, owner.to(device, non_blocking=True), scored), token_logps


def at_targets(batch: dict, per_token: torch.Tensor, fill) -> torch.Tensor:
    """per_token's value for each target token, in loss.Targets order (host tensors only):
    position i predicts token i + 1, so a target takes the value of the token it predicts."""
    labels = batch["labels"]
    shifted_labels = torch.full_like(labels, IGNORE_INDEX)
    shifted_labels[:, :-1] = labels[:, 1:]
    shifted = torch.full_like(per_token, fill)
    shifted[:, :-1] = per_token[:, 1:]
    return shifted.flatten()[shifted_labels.flatten() != IGNORE_INDEX]


def target_owner(batch: dict) -> torch.Tensor:
    """The example each target token belongs to, in loss.Targets order."""
    return at_targets(batch, batch["example_ids"], -1)


@dataclass
class PreferenceLoss:
    """loop.Objective for preference pairs. reference(batch) -> the reference's example logps
    [2P] under no_grad (None: reference-free, or precomputed and carried by the batch)."""

    pair_loss: PairLoss
    reference: Optional[Callable[[dict], torch.Tensor]] = None
    mask_from_positions: bool = False  # one example per row + attention_mask (prefix tuning)
    count_name: str = "pairs"
    stat_names: tuple[str, ...] = STAT_NAMES

    def counts(self, batch: dict) -> list[float]:
        return [batch["num_pairs"], batch["num_chosen_targets"]]

    def loss(self, model, batch, device, global_counts, world):
        pairs = len(batch["pair_weights"])
        ref = self._reference_logps(batch, device)  # first: nothing of the policy's graph is alive during it
        logps, token_logps = example_logps(model, batch, device, self.mask_from_positions)
        lengths = batch["completion_lengths"].to(device, non_blocking=True).clamp_min(1.0)
        weights = batch["pair_weights"].to(device, non_blocking=True)
        ref_c, ref_r = (ref[:pairs], ref[pairs:]) if ref is not None else (None, None)
        loss, rew_c, rew_r, shown_c, shown_r = self.pair_loss.terms(
            logps[:pairs], logps[pairs:], ref_c, ref_r, lengths[:pairs], lengths[pairs:])
        loss_sum = (loss * weights).sum()
        share = loss_sum * (world / global_counts[0])
        numerator = loss_sum.detach()
        if self.pair_loss.loss_type == "orpo":  # + the chosen tokens' NLL, a mean over the step's chosen tokens
            owner = target_owner(batch).to(device, non_blocking=True)
            chosen = owner < pairs
            nll_sum = -(token_logps * chosen * weights[owner.clamp_max(pairs - 1)]).sum()
            share = share + nll_sum * (world / global_counts[1])
            numerator = numerator + nll_sum.detach() * (global_counts[0] / global_counts[1])
        stats = torch.stack([rew_c, rew_r, (rew_c > rew_r).float(), rew_c - rew_r, shown_c, shown_r])
        return share, torch.cat([numerator[None], (stats * weights).sum(1)])

    def _reference_logps(self, batch: dict, device: torch.device) -> Optional[torch.Tensor]:
        if self.pair_loss.loss_type in REFERENCE_FREE:
            return None
        if "reference_logps" in batch:
            return batch["reference_logps"].to(device, non_blocking=True)
        with torch.no_grad():
            return self.reference(batch)


def reference_logps(model: torch.nn.Module, device: torch.device, adapter_of: Optional[torch.nn.Module] = None,
                    adapter: Optional[str] = None) -> Callable[[dict], torch.Tensor]:
    """batch -> the reference's per-example log-probabilities (call under no_grad): `model`'s,
    or, when `adapter_of` (the unwrapped PEFT model inside `model`) is given, `model`'s with
    the adapter layers switched to `adapter` (None: disabled, the base), so that the policy's
    own base weights serve as the reference without a copy."""
    if adapter_of is None:
        return lambda batch: example_logps(model, batch, device)[0]

    def switched(batch: dict) -> torch.Tensor:
        with _compat.adapter_layers_switched(adapter_of, adapter):
            return example_logps(model, batch, device)[0]
    return switched
