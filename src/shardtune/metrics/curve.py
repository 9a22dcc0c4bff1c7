"""loss.png: train and eval loss (left panel) and perplexity (right panel) over optimizer
steps. Rank 0 draws it at the end of a run; `shardtune plot metrics.jsonl` redraws it from
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
        elif record.get("event") == "eval":
            curves.eval_steps.append(record["step"])
            curves.eval_loss.append(record["eval_loss"])
    return curves


def draw(curves: Curves, out: Path):
    """Two panels: loss, and perplexity on a log scale. Returns the figure it saved."""
    # imported here: only the run's end draws (a third of a second off every process's start);
    # a bare Figure renders with Agg: no pyplot, no display
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), layout="constrained")
    loss_ax, ppl_ax = fig.subplots(1, 2)
    for ax, transform, title in ((loss_ax, float, "loss"), (ppl_ax, perplexity, "perplexity")):
        ax.plot(curves.train_steps, [transform(v) for v in curves.train_loss], label="train", linewidth=1)
        ax.plot(curves.eval_steps, [transform(v) for v in curves.eval_loss], "o-", label="eval")
        ax.set_xlabel("optimizer step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    ppl_ax.set_yscale("log")
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
        if "eval/loss" in scalars:
            self.curves.eval_steps.append(step)
            self.curves.eval_loss.append(scalars["eval/loss"])

    def close(self) -> None:
        curves = read_curves(self.history) if self.history and self.history.is_file() else self.curves
        if curves.train_steps or curves.eval_steps:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            draw(curves, self.out)
            log.info("loss curves drawn to %s", self.out)
