"""The resume policy: where a run's step checkpoints live, which one --resume picks, whether
it belongs to this model and method, and the batch split that continues its data position."""
from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from ..config.schema import Configs
from ..config.validate import Batching, resolve_batching
from ..errors import UserError
from ..modeling.load import ModelSpec
from ..optim.build import schedule_info
from . import state as ckpt_state

log = logging.getLogger("shardtune.finetuning")


def checkpoint_dir(cfgs: Configs) -> Path:
    """llama-recipes' ROOT/FOLDER-MODELNAME; ROOT defaults to output_dir/checkpoints while
    dist_checkpoint_root_folder keeps its placeholder default."""
    t = cfgs.train
    root = (Path(t.dist_checkpoint_root_folder) if cfgs.was_set(t, "dist_checkpoint_root_folder")
            else Path(t.output_dir) / "checkpoints")
    return root / f"{t.dist_checkpoint_folder}-{Path(t.model_name.rstrip('/')).name}"


def find_resume(cfgs: Configs, run_dir: Path) -> Optional[ckpt_state.Checkpoint]:
    resume = cfgs.train.resume
    if not resume:
        return None
    if resume == "auto":
        steps = ckpt_state.complete_steps(run_dir)
        return ckpt_state.open_checkpoint(steps[-1]) if steps else None
    return ckpt_state.open_checkpoint(Path(resume))


def model_fingerprint(spec: ModelSpec) -> str:
    return spec.fingerprint


def check_resumable(ckpt: ckpt_state.Checkpoint, cfgs: Configs, spec: ModelSpec) -> None:
    t, saved = cfgs.train, ckpt.info
    if saved.model.config_sha256 != model_fingerprint(spec):
        raise UserError(f"{ckpt.path} was trained from another model ({saved.model.path}); "
                        "pass the same --model_name to resume it")
    method = t.peft_method if t.use_peft else None
    if saved.peft_method != method:
        raise UserError(f"{ckpt.path} holds a {saved.peft_method or 'full fine-tuning'} run; resume it with "
                        "the same --use_peft/--peft_method")


# What a checkpoint's data position (global samples drawn) and its optimizer state mean: with
# another value, resuming would continue into other data, or train another objective, silently.
SAME_ON_RESUME = {"train_config": ("dataset", "seed", "context_length", "batching_strategy"),
                  "mixture_dataset": ("datasets",), "dpo_config": None}  # None: every field


def check_same_data(ckpt: ckpt_state.Checkpoint, cfgs: Configs, data_identity: Optional[str]) -> None:
    """Refuse, naming each difference, to resume with other data or settings than the
    checkpoint was trained with (data_identity: data.split_identity of this run's train split),
    unless --resume_with_changes asks for it."""
    saved, now = ckpt.info.config, {type(c).__name__: asdict(c) for c in cfgs.all()}
    changed = []
    for group, names in SAME_ON_RESUME.items():
        if group == "mixture_dataset" and cfgs.train.dataset != group:
            continue
        before, after = saved.get(group, {}), now.get(group, {})
        for name in names or sorted(after):
            if name in before and before[name] != after.get(name):  # a field newer than the checkpoint: no claim
                changed.append(f"{group}.{name} {before[name]!r} -> {after.get(name)!r}")
    if ckpt.info.data and data_identity and ckpt.info.data != data_identity:
        changed.append("the training data's contents")
    if not changed:
        return
    if cfgs.train.resume_with_changes:
        log.warning("resuming %s with changes (--resume_with_changes): %s", ckpt.path, "; ".join(changed))
        return
    raise UserError(f"{ckpt.path} was trained with other settings: {'; '.join(changed)}; resume with the same, or "
                    "pass --resume_with_changes to continue with these on purpose")


def batching_for(cfgs: Configs, world: int, ckpt: Optional[ckpt_state.Checkpoint]) -> Batching:
    """The configured split, or, when resuming, one that keeps the checkpoint's global batch
    (the data position is in global samples): micro batch x accumulation adapt to the world."""
    batching = resolve_batching(cfgs)
    if ckpt is None:
        return batching
    saved = ckpt.info.global_batch
    if batching.micro * batching.accum * world == saved:
        return batching
    if saved % world:
        valid = [w for w in range(1, saved + 1) if saved % w == 0]
        raise UserError(f"{ckpt.path} was trained with global batch {saved}, which {world} ranks cannot split; "
                        f"resume with a world size in {valid}")
    share = saved // world
    micro = max(m for m in range(1, min(batching.micro, share) + 1) if share % m == 0)
    log.info("resuming global batch %d on %d ranks: micro batch %d x %d accumulation", saved, world, micro, share // micro)
    return Batching(micro=micro, accum=share // micro)


def check_schedule(ckpt: ckpt_state.Checkpoint, cfgs: Configs, steps_per_epoch: int) -> None:
    """The schedule a checkpoint was trained with against the one now configured: another
    scheduler is an error, other warmup or length a warning."""
    saved = ckpt.info.schedule
    now = schedule_info(cfgs, steps_per_epoch)
    if saved["lr_scheduler"] != now["lr_scheduler"]:
        raise UserError(f"{ckpt.path} was trained with --lr_scheduler {saved['lr_scheduler']}; resume it with "
                        "the same --lr_scheduler")
    changed = [k for k in now if k in saved and saved[k] != now[k]]
    if changed:
        log.warning("resuming with a different schedule (%s): the learning rate follows the new one from here",
                    ", ".join(f"{k} {saved[k]} -> {now[k]}" for k in changed))
