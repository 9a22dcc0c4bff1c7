"""loss.png: train and eval loss (left panel) and, for a token loss, perplexity (right
panel) over optimizer steps; a preference loss (dpo) has no perplexity, so no right panel. Rank 0 draws it at the end of a run; `shardtune plot metrics.jsonl` redraws it from
the metrics file, also of a run that crashed (a torn last line is skipped)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path


from ..errors import UserError
from .logs import perplexity, read_metrics

log = logging.getLogger(__name__)


@dataclass
class Curves:
    train_steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_loss: list[float] = field(default_factory=list)
    token_loss: bool = False  # the steps logged a perplexity (finetune), not a preference loss (dpo)


def read_curves(path: Path) -> Curves:
    """The step and eval records of a metrics.jsonl file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist; pass the metrics.jsonl of a run trained with --save_metrics")
    curves = Curves()
    for record in read_metrics(path):
        if record.get("event") == "step":
            curves.train_steps.append(record["step"])
            curves.train_loss.append(record["loss"])
            curves.token_loss |= record.get("perplexity") is not None
        elif record.get("event") == "eval":
            curves.eval_steps.append(record["step"])
            curves.eval_loss.append(record["eval_loss"])
    return curves


def draw(curves: Curves, out: Path):
    """Two panels: loss, and perplexity on a log scale (for a token loss only). Returns the
    figure it saved."""
    # imported here: only the run's end draws (a third of a second off every process's start);
    # a bare Figure renders with Agg: no pyplot, no display
    from matplotlib.figure import Figure

    panels = [(float, "loss")] + ([(perplexity, "perplexity")] if curves.token_loss else [])
    fig = Figure(figsize=(5.5 * len(panels), 4), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (transform, title) in zip(axes, panels):
        ax.plot(curves.train_steps, [transform(v) for v in curves.train_loss], label="train", linewidth=1)
        ax.plot(curves.eval_steps, [transform(v) for v in curves.eval_loss], "o-", label="eval")
        ax.set_xlabel("optimizer step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        if title == "perplexity":
            ax.set_yscale("log")
    fig.savefig(out, dpi=100)
    return fig


class LossCurve:
    """A MetricsSink that draws loss.png when the run closes it: from the metrics file when
    the run keeps one (which also holds the steps before a resume), else from what it logged."""

    def __init__(self, out: Path, history: Path | None) -> None:
        self.out, self.history = out, history
        self.curves = Curves()

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if "train/loss" in scalars:
            self.curves.train_steps.append(step)
            self.curves.train_loss.append(scalars["train/loss"])
            self.curves.token_loss |= "train/perplexity" in scalars
        if "eval/loss" in scalars:
            self.curves.eval_steps.append(step)
            self.curves.eval_loss.append(scalars["eval/loss"])

    def close(self) -> None:
        curves = read_curves(self.history) if self.history and self.history.is_file() else self.curves
        if curves.train_steps or curves.eval_steps:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            draw(curves, self.out)
            log.info("loss curves drawn to %s", self.out)
