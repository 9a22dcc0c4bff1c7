"""Preference tuning (DPO, IPO, SimPO, ORPO) of a decoder-only model with PEFT and FSDP2:
the second shardtune recipe, on the same library as supervised fine-tuning (recipes/sft.py).

    torchrun --nproc_per_node N -m shardtune.dpo --enable_fsdp --model_name DIR --use_peft \
        --dataset preference_dataset --preference_dataset.data_path pairs.jsonl --output_dir OUT

Every flag of finetune applies unchanged (FSDP, PEFT, QLoRA, precision, accumulation,
checkpoints, resume, signals, metrics, trackers); batch sizes count pairs. What is new:
  * preference pairs ...................... --dataset preference_dataset --preference_dataset.*
                                            (TRL's plain and conversational layouts, TRL's token ids)
  * the loss .............................. --dpo_config.loss_type sigmoid|cdpo|ipo|simpo|orpo,
                                            --dpo_config.beta / label_smoothing / simpo_gamma / orpo_alpha
  * the reference model ................... --dpo_config.reference base (LoRA: the adapter disabled, no
                                            copy; a continued adapter: its frozen copy; full fine-tuning:
                                            a frozen copy sharded like the policy) | precomputed (one pass
                                            before training, cached) | DIR; always in eval mode
  * dropout ............................... --dpo_config.disable_dropout (default True, as TRL)
  * packed pairs .......................... --batching_strategy packing (chosen and rejected as separate
                                            examples in shared rows, each attending to itself)
  * TRL's metrics ......................... loss, rewards/{chosen,rejected,accuracies,margins},
                                            logps/{chosen,rejected} per step and at evaluation

Shape: sft.setup with this recipe's data stage and objective -> sft.fit -> sft.save.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as tdist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .. import data, device
from ..config.schema import Configs
from ..config.validate import Batching, check_supported
from ..data import cache
from ..data.packing import PackStats
from ..data.pairs import PairDataset, collate_pairs, fit_pairs
from ..data.records import BadRecords
from ..data.sampler import EvalSampler
from ..errors import UserError, exit_on_user_error
from ..files import atomic_path
from ..loop import eval_mode
from ..metrics import throughput
from ..modeling import load as model_lib
from ..modeling.preference import PROMPT_NLL, REFERENCE_FREE, PairLoss, PreferenceLoss, reference_logps
from ..parallel import release_gathered
from . import sft

log = logging.getLogger("shardtune.dpo")

REFERENCE_CACHE_VERSION = 1


# ---- data -----------------------------------------------------------------------------

def read_pairs(cfgs: Configs, tokenizer, split: str) -> data.SplitData:
    t = cfgs.train
    src = data.split_source(cfgs, split)
    bad = BadRecords(t.on_bad_record)
    pairs, truncated, dropped = fit_pairs(src.read(tokenizer, bad), t.context_length, bad, cfgs.dpo.truncation_mode)
    if not pairs:
        first = f" (first bad record: {bad.messages[0]})" if bad.messages else ""
        raise UserError(f"{src.name}: the {split} split has no usable preference pairs{first}; check the data, or "
                        "raise --context_length")
    dataset = PairDataset(pairs)
    tokens = sum(dataset.lengths())
    stats = PackStats(examples=len(pairs), tokens=tokens, chunks=len(pairs), bad_records=bad.count,
                      truncated=truncated, skipped_no_target=dropped, notes=bad.messages, tokenized=len(pairs),
                      context_length=t.context_length)
    log.info("%s split from %s: %d pairs, %d tokens, %d bad records skipped; %d pairs cut to --context_length %d, "
             "%d dropped (the prompt alone fills it)", split, src.name, len(pairs), tokens, bad.count, truncated,
             t.context_length, dropped)
    return data.SplitData(dataset, stats, src.name, data_source=src)


def setup_pair_data(cfgs: Configs, dist: device.Dist, tokenizer, batching: Batching) -> tuple:
    """sft.setup_data's contract, for pairs: the sampler draws pairs, the collate lays them out."""
    t = cfgs.train
    train_split = read_pairs(cfgs, tokenizer, "train")
    eval_split = read_pairs(cfgs, tokenizer, "validation") if t.run_validation else None
    collate = functools.partial(collate_pairs, pad_id=tokenizer.pad_token_id, context_length=t.context_length,
                                packing=t.batching_strategy == "packing",
                                chosen_prompt_targets=cfgs.dpo.loss_type in PROMPT_NLL)
    for split in (train_split, eval_split):
        if split is not None:
            split.collate_fn = collate
    loader, sampler = data.train_loader(train_split, batching.micro, batching.accum, dist.world_size, dist.rank,
                                        t.seed, tokenizer.pad_token_id, t.num_workers_dataloader, dist.is_accelerator)
    eval_loaders = (data.eval_loaders(eval_split, t.val_batch_size, dist.world_size, dist.rank,
                                      tokenizer.pad_token_id, t.num_workers_dataloader, dist.is_accelerator)
                    if eval_split else {})
    log.info("global batch %d pairs = micro batch %d x %d ranks x %d accumulation; %d steps per epoch",
             sampler.global_batch, batching.micro, dist.world_size, batching.accum, sampler.steps_per_epoch)
    return train_split, eval_split, loader, sampler, eval_loaders


# ---- the reference model ----------------------------------------------------------------

def frozen_copy(recipe: sft.Recipe, model_dir: Optional[str]) -> torch.nn.Module:
    """The reference as a model of its own: every weight frozen, sharded like the policy."""
    cfgs = copy.deepcopy(recipe.cfgs)
    t = cfgs.train
    t.use_peft, t.quantization, t.freeze_layers, t.compile, t.from_peft_checkpoint = False, None, False, False, ""
    cfgs.fsdp.fsdp_activation_checkpointing = False  # nothing to recompute without a backward
    if cfgs.fsdp.sharding_strategy == "SHARD_GRAD_OP":  # it keeps gathers for a backward this copy never runs
        cfgs.fsdp.sharding_strategy = "FULL_SHARD"
    spec = model_lib.load_spec(model_dir) if model_dir else model_lib.load_spec(recipe.cfgs.train.model_name)
    if model_dir:
        model_lib.check_vocab(recipe.tokenizer, spec)
    model, _ = sft.setup_model(cfgs, recipe.dist, spec, recipe.precision, frozen=True)
    model.eval()
    return model


REFERENCE_ADAPTER = "reference"  # the frozen copy of the starting adapter (TRL's "ref" adapter)


def continues_adapter(cfgs: Configs) -> bool:
    """The policy starts from a trained adapter, which is then also the reference (as TRL's)."""
    d, t = cfgs.dpo, cfgs.train
    return bool(t.use_peft and t.from_peft_checkpoint) and d.loss_type not in REFERENCE_FREE and \
        d.reference in ("base", "precomputed")


def add_reference_adapter(cfgs: Configs, peft_model, start: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """sft.setup_model's add_params: with the live reference of a continued adapter, a second,
    frozen peft adapter holding the starting values (sharded with the layers it adapts);
    `precomputed` needs none: it runs the policy before the first step."""
    if cfgs.dpo.reference != "base" or not continues_adapter(cfgs):
        return {}
    peft_model.add_adapter(REFERENCE_ADAPTER, copy.deepcopy(peft_model.peft_config["default"]))
    values = {}
    for name, p in peft_model.named_parameters():
        source = name.replace(f".{REFERENCE_ADAPTER}.", ".default.")
        if source != name:
            p.requires_grad_(False)
            p.data = p.data.to(start[source].dtype)  # as the policy holds them: equal at step 1
            values[name] = start[source]
    return values


def reference_fn(recipe: sft.Recipe) -> tuple[Callable[[dict], torch.Tensor], torch.nn.Module]:
    """(batch -> the reference's per-example log-probabilities, called under no_grad and
    computed in eval mode (no dropout) as the precomputed pass does; the model it runs,
    unwrapped, whose FLOPs it costs)."""
    d, t, dev = recipe.cfgs.dpo, recipe.cfgs.train, recipe.dist.device
    model, unwrapped = recipe.train_model, recipe.peft_model
    if d.reference == "precomputed" and (not t.use_peft or continues_adapter(recipe.cfgs)):
        fn = reference_logps(model, dev)  # before any step or restore: the policy is the reference
    elif d.reference in ("base", "precomputed") and t.use_peft:
        adapter = REFERENCE_ADAPTER if continues_adapter(recipe.cfgs) else None  # None: the adapter disabled
        fn = reference_logps(model, dev, adapter_of=recipe.peft_model, adapter=adapter)
    else:  # validate.check_dpo: base (full fine-tuning) or a model directory
        model = unwrapped = frozen_copy(recipe, None if d.reference == "base" else str(Path(d.reference).expanduser()))
        fn = _resharded(model, reference_logps(model, dev))
    return functools.partial(_evaluated, model, fn), unwrapped


def _resharded(model: torch.nn.Module, fn: Callable) -> Callable:
    """A frozen copy's units that keep their weights gathered after forward (the root, an
    untied head) give them back in a backward it never runs: reshard after every forward, or
    they stay whole for the run."""
    def call(batch: dict) -> torch.Tensor:
        try:
            return fn(batch)
        finally:
            release_gathered(model)
    return call


def _evaluated(model: torch.nn.Module, fn: Callable, batch: dict) -> torch.Tensor:
    training = model.training
    eval_mode(model)
    try:
        return fn(batch)
    finally:
        model.train(training)


def _reference_cache(recipe: sft.Recipe, split: data.SplitData) -> Optional[Path]:
    """Reference log-probabilities are cached beside the prepared data, under a key covering
    the data, the tokenization and the reference model (weights config, precision, quantization)."""
    t = recipe.cfgs.train
    root = cache.cache_root(t.data_cache_dir)
    src = split.data_source
    if root is None or src.fingerprint is None:
        return None
    key = cache.cache_key({
        "version": REFERENCE_CACHE_VERSION, "data": src.fingerprint, "template": src.template,
        "tokenizer": cache.tokenizer_fingerprint(recipe.tokenizer), "context_length": t.context_length,
        "on_bad_record": t.on_bad_record, "truncation": recipe.cfgs.dpo.truncation_mode,
        "batching": t.batching_strategy, "model": str(recipe.spec.model_dir),
        "model_fingerprint": recipe.spec.fingerprint, "weights": _weights_digest(recipe.spec.model_dir),
        "precision": recipe.precision.name, "quantization": t.quantization, "fsdp": t.enable_fsdp,
        "adapter": _weights_digest(Path(t.from_peft_checkpoint)) if continues_adapter(recipe.cfgs) else None,
    })
    return root / f"reference-logps-{key[:32]}.safetensors"


def _weights_digest(model_dir: Path) -> str:
    """Names, sizes and modification times of the weight files: a retrained base gets a new key."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    return json.dumps([(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files])


def cached_reference(path: Optional[Path], pairs: int, dist: device.Dist) -> Optional[torch.Tensor]:
    """The cached values [pairs, 2], or None to compute them. Rank 0 reads and checks the file
    and its decision holds for every rank, whose copy of the values comes by broadcast: with a
    node-local cache another node may lack the file (or hold a stale one), and a rank that
    decided alone would enter the precompute pass while the others train."""
    values = _read_cache(path, pairs) if dist.is_main and path is not None else None
    if not dist.distributed:
        return values
    hit = torch.tensor([values is not None], dtype=torch.int32, device=dist.device)
    tdist.broadcast(hit, src=0)
    if not hit.item():
        return None
    values = values.to(dist.device) if dist.is_main else torch.empty(pairs, 2, device=dist.device)
    tdist.broadcast(values, src=0)
    return values.cpu()


def _read_cache(path: Path, pairs: int) -> Optional[torch.Tensor]:
    if not path.is_file():
        return None
    try:
        values = load_file(str(path))["reference_logps"]
    except (OSError, KeyError, SafetensorError) as err:
        log.warning("ignoring the unreadable reference cache %s (%s); computing it again", path, err)
        return None
    if values.shape != (pairs, 2) or values.dtype != torch.float32 or not values.isfinite().all():
        log.warning("ignoring the reference cache %s: it does not hold %d pairs' values; computing it again", path, pairs)
        return None
    return values


@torch.no_grad()
def precompute_reference(recipe: sft.Recipe, split: data.SplitData, name: str, fn: Callable) -> None:
    """One pass over the split before training; every rank ends with all pairs' values."""
    dist, t = recipe.dist, recipe.cfgs.train
    dataset = split.dataset
    path = _reference_cache(recipe, split)
    dataset.reference_logps = cached_reference(path, len(dataset), dist)
    if dataset.reference_logps is not None:
        log.info("%s split: reference log-probabilities from the cache %s", name, path)
        return
    # checked before the pass, not found after it; unwritable: computed and used, not cached (as the data stage)
    save_to = path if path is not None and dist.is_main and cache.writable(path.parent) else None
    collate = split.collate_fn
    sampler = EvalSampler(len(dataset), t.val_batch_size, dist.world_size, dist.rank)
    mine: list[tuple[int, float, float]] = []
    for indices in sampler:
        batch = collate([dataset[i] for i in indices])
        logps = fn(batch).double().cpu()
        n = len(indices)
        mine += [(i, logps[k].item(), logps[n + k].item()) for k, i in enumerate(indices) if i >= 0]
    release_gathered(recipe.train_model)
    everyone = [mine]
    if dist.distributed:
        everyone = [None] * dist.world_size
        tdist.all_gather_object(everyone, mine)
    values = torch.zeros(len(dataset), 2, dtype=torch.float32)
    for part in everyone:
        for i, c, r in part:
            values[i, 0], values[i, 1] = c, r
    dataset.reference_logps = values
    if save_to is not None:
        with atomic_path(save_to) as tmp:
            save_file({"reference_logps": values}, str(tmp))
    log.info("%s split: reference log-probabilities of %d pairs computed before training", name, len(dataset))


def disable_dropout(model: torch.nn.Module) -> None:
    """TRL's disable_dropout_in_model: every nn.Dropout, LoRA's lora_dropout among them, at p = 0."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def objective(recipe: sft.Recipe) -> PreferenceLoss:
    """The preference loss, with its reference ready (built, or precomputed into the data)."""
    d = recipe.cfgs.dpo
    if d.disable_dropout:
        disable_dropout(recipe.train_model)
    pair_loss = PairLoss(d.loss_type, d.beta, d.label_smoothing, d.simpo_gamma, d.orpo_alpha)
    fn = live_reference(recipe) if d.loss_type not in REFERENCE_FREE else None
    return PreferenceLoss(pair_loss, fn, mask_from_positions=sft.needs_unpacked(recipe.cfgs))


def live_reference(recipe: sft.Recipe) -> Optional[Callable[[dict], torch.Tensor]]:
    """The reference the steps run, or None once precomputed into the splits."""
    fn, model = reference_fn(recipe)
    if recipe.cfgs.dpo.reference == "precomputed":
        for name, split in (("train", recipe.train_split), ("validation", recipe.eval_split)):
            if split is not None:
                precompute_reference(recipe, split, name, fn)
        return None  # the batches carry the values
    if recipe.loop_cfg.flops is not None:  # MFU counts the reference's forward in every step
        recipe.loop_cfg.flops = dataclasses.replace(recipe.loop_cfg.flops,
                                                    reference=throughput.model_flops(model, model.config))
    return fn


# ---- run --------------------------------------------------------------------------------

def check(cfgs: Configs) -> None:
    check_supported(cfgs, pairs=True)


def setup(cfgs: Configs, dist: device.Dist, before_step: Callable | None = None) -> sft.Recipe:
    return sft.setup(cfgs, dist, before_step, data_stage=setup_pair_data, objective=objective,
                     add_params=functools.partial(add_reference_adapter, cfgs))


def run(cfgs: Configs, dist: device.Dist, before_step: Callable | None = None) -> sft.RunResult:
    """The whole recipe on configs not yet validated."""
    check(cfgs)
    return sft.run_checked(cfgs, dist, before_step, setup_recipe=setup)


@exit_on_user_error
def main(argv: list[str] | None = None, before_step: Callable | None = None) -> int:
    return sft.launch(argv, before_step, check,
                      functools.partial(sft.run_checked, setup_recipe=setup))


if __name__ == "__main__":
    import sys

    sys.exit(main())
