"""--lr_scheduler cosine|linear with --warmup_steps: the LR each optimizer step used, as
metrics.jsonl records it, equals transformers' own schedule for the same settings; a
resume continues the schedule (and the losses) exactly. Single processes, tiny model."""
import re

import pytest
import torch
from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

from conftest import SHIM, check, python, read_metrics
from shardtune.config.validate import check_supported
from shardtune.config.parse import parse_args
from shardtune.errors import UserError

LR = 1e-2
COMMON = ["--use_peft", "--peft_method", "lora", "--lora_config.lora_dropout", "0", "--lr", str(LR),
          "--context_length", "128", "--batch_size_training", "4", "--num_workers_dataloader", "0",
          "--run_validation", "False", "--save_metrics", "--log_every", "1"]


def reference_lrs(make, steps: int, **kwargs) -> list[float]:
    """The LR of each of `steps` optimizer steps, from transformers with a dummy optimizer."""
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    sched = make(opt, **kwargs)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def _train(model, out, *flags):
    check(python(SHIM, COMMON + ["--model_name", str(model), "--output_dir", str(out), *flags]))
    return read_metrics(out)


def test_cosine_warmup_per_step_and_exact_resume(tmp_path, family_models):
    model = family_models("llama3")
    flags = ["--lr_scheduler", "cosine", "--warmup_steps", "2", "--num_epochs", "1", "--max_train_step", "6",
             "--save_steps", "3", "--save_total_limit", "0"]
    steps, _ = _train(model, tmp_path / "a", *flags)
    expected = reference_lrs(get_cosine_schedule_with_warmup, 6, num_warmup_steps=2, num_training_steps=6)
    assert [s["lr"] for s in steps] == pytest.approx(expected, rel=1e-12, abs=0)
    assert expected[0] == 0 and expected[2] == LR and expected[5] < expected[3]  # warmup, peak, decay

    # from the step-3 checkpoint (state.json carries the scheduler): steps 4-6 as before
    ckpt = tmp_path / "a" / "checkpoints" / f"fine-tuned-{model.name}" / "step_000003"
    resumed, _ = _train(model, tmp_path / "b", *flags, "--resume", str(ckpt))
    assert [s["step"] for s in resumed] == [4, 5, 6]
    assert [s["lr"] for s in resumed] == [s["lr"] for s in steps[3:]]
    assert [s["loss"] for s in resumed] == [s["loss"] for s in steps[3:]]


def test_linear_warmup_decays_over_all_epochs(tmp_path, family_models):
    """Without max_train_step the schedule spans num_epochs x steps per epoch, and nothing
    is stepped at the epoch boundary."""
    steps, epochs = _train(family_models("llama3"), tmp_path / "out", "--lr_scheduler", "linear",
                           "--warmup_steps", "3", "--num_epochs", "2")
    per_epoch = epochs[0]["steps"]
    assert len(epochs) == 2 and per_epoch >= 4 and len(steps) == 2 * per_epoch
    expected = reference_lrs(get_linear_schedule_with_warmup, 2 * per_epoch, num_warmup_steps=3,
                             num_training_steps=2 * per_epoch)
    assert [s["lr"] for s in steps] == pytest.approx(expected, rel=1e-12, abs=0)


@pytest.mark.parametrize("flags, needle", [
    (["--lr_scheduler", "exponential"], "unknown --lr_scheduler 'exponential'; choose one of step, cosine"),
    (["--lr_scheduler", "cosine", "--warmup_steps", "-1"], "--warmup_steps must be >= 0"),
    (["--warmup_steps", "10"], "--warmup_steps needs a per-step schedule"),  # StepLR has no warmup
])
def test_bad_schedule_flags(flags, needle):
    with pytest.raises(UserError, match=re.escape(needle)):
        check_supported(parse_args(flags))
