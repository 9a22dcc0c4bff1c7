"""Where the scalars of a run go besides metrics.jsonl: TensorBoard and Weights & Biases.

Every sink takes the same two calls, so the loop never knows which are on. Only rank 0
builds sinks; the other ranks get none.
"""
from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Protocol

from ..config.schema import Configs
from ..errors import UserError

log = logging.getLogger(__name__)

WANDB_MODES = (None, "online", "offline", "disabled")


class MetricsSink(Protocol):
    def log(self, step: int, scalars: dict[str, float]) -> None:
        """Scalars by tag ("train/loss", "eval/loss", ...) at an optimizer step."""

    def close(self) -> None:
        """Flush and release; called once, at the end of the run."""


class TensorBoardSink:
    def __init__(self, log_dir: Path, resume_step: int | None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("--use_tensorboard needs the tensorboard package: pip install tensorboard") from None
        # purge_step: a resumed run hides what the killed run logged past its checkpoint,
        # as metrics.jsonl is rewound
        purge = resume_step + 1 if resume_step is not None else None
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge)
        log.info("TensorBoard scalars in %s (tensorboard --logdir %s)", log_dir, log_dir)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, global_step=step)

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    def __init__(self, cfgs: Configs, resume_run_id: str | None) -> None:
        try:
            import wandb
        except ImportError:
            raise UserError("--use_wandb needs the wandb package: pip install wandb") from None
        init_args = {k: v for k, v in asdict(cfgs.wandb).items() if v is not None}  # None: wandb's own default
        if resume_run_id:
            # a resumed run continues the wandb run of the checkpoint it resumes from. Steps the
            # killed run logged past its checkpoint are logged again with the same values (the
            # resume is exact); wandb keeps the first of each.
            init_args.update(id=resume_run_id, resume="allow")
        config = {type(c).__name__: asdict(c) for c in cfgs.all()}
        self.run = wandb.init(**init_args, config=config)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


def check_flags(cfgs: Configs) -> None:
    if cfgs.wandb.mode not in WANDB_MODES:
        raise UserError(f"unknown --wandb_config.mode {cfgs.wandb.mode!r}; choose online, offline or disabled")


def build_sinks(cfgs: Configs, resume_step: int | None, wandb_run_id: str | None = None) -> list[MetricsSink]:
    """The sinks the flags turn on (call on rank 0 only); a resumed run passes the step and
    the wandb run id of its checkpoint."""
    t = cfgs.train
    sinks: list[MetricsSink] = []
    if t.use_tensorboard:
        sinks.append(TensorBoardSink(Path(t.tensorboard_dir or Path(t.output_dir) / "tensorboard"), resume_step))
    if t.use_wandb:
        sinks.append(WandbSink(cfgs, wandb_run_id))
    return sinks


def wandb_run_id(sinks: list[MetricsSink]) -> str | None:
    """The id of the wandb run these sinks log to, for checkpoints to carry (None on ranks > 0)."""
    return next((sink.run.id for sink in sinks if isinstance(sink, WandbSink)), None)
