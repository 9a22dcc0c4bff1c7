"""Watching a run: every step's tokens/s, MFU and gradient norm in metrics.jsonl; the same
scalars in TensorBoard and in an offline wandb run, read back with their own readers;
loss.png and `shardtune plot`; --eval_steps and best/; under torchrun only rank 0 writes.
Tiny model, CPU: one single-process run and one 2-rank FSDP2 run with the same global batch."""
import json
import math
import re
import sys

import matplotlib.image
import pytest
from transformers import AutoModelForCausalLM

from conftest import (SHIM, check, error_lines, examples_in_chunk, read_metrics, read_wandb_run, run_cli, run_cmd,
                      tensorboard_scalars, torchrun, wandb_offline_run)
from shardtune.config.validate import check_supported
from shardtune.data import build_split, train_loader
from shardtune.modeling.load import load_tokenizer
from shardtune.metrics import curve as plot, throughput
from shardtune.config.parse import parse_args
from shardtune.checkpoint import state as ckpt_state
from shardtune.errors import UserError

STEPS = 4
CONTEXT = 128
PEAK_TFLOPS = 0.001
COMMON = ["--num_epochs", "1", "--max_train_step", str(STEPS), "--context_length", str(CONTEXT),
          "--num_workers_dataloader", "0", "--save_metrics", "--log_every", "2", "--eval_steps", "2",
          "--max_eval_step", "2", "--lr", "1e-3", "--fsdp_activation_checkpointing", "False",
          "--use_tensorboard", "--use_wandb", "--wandb_config.project", "watch-test",
          "--peak_tflops", str(PEAK_TFLOPS)]
STEP_TAGS = ("train/loss", "train/perplexity", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/mfu",
             "train/peak_memory_mib")


def wandb_env(root) -> dict:
    """An offline wandb that keeps everything under root."""
    return {"WANDB_MODE": "offline", "WANDB_DIR": str(root), "WANDB_CONFIG_DIR": str(root / "config"),
            "WANDB_CACHE_DIR": str(root / "cache"), "WANDB_DATA_DIR": str(root / "data"), "WANDB_SILENT": "true"}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_model):
    """A single-process full fine-tune, global batch 4; returns (root, output_dir)."""
    root = tmp_path_factory.mktemp("watch1")
    out = root / "out"
    check(run_cmd([sys.executable, str(SHIM), *COMMON, "--batch_size_training", "4",
                   "--model_name", str(tiny_model), "--output_dir", str(out)], extra_env=wandb_env(root)))
    return root, out


def reference_flops_per_token(tiny_model) -> list[float]:
    """Model FLOPs per token of each logged window (--log_every 2 steps), counted here from the
    chunks the one-process run trains on (same data, seed and sampler): a full fine-tune's 6
    per decoder matrix at every token, 6 per head weight at each labelled position, and
    12 x layers x width per causal query-key pair within each packed example."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    cfg = model.config
    decoder = sum(p.numel() for p in model.model.layers.parameters() if p.ndim == 2)
    head = model.lm_head.weight.numel()
    cfgs = parse_args([*COMMON, "--batch_size_training", "4", "--model_name", str(tiny_model)])
    tok = load_tokenizer(str(tiny_model))
    split = build_split(cfgs, tok, "train")
    _, sampler = train_loader(split, 4, 1, 1, 0, cfgs.train.seed, tok.pad_token_id, 0)
    sampler.set_epoch(0)
    steps = list(sampler)
    windows = []
    for first in range(0, STEPS, 2):
        chunks = [split.dataset[i] for step in steps[first:first + 2] for i in step]
        tokens = sum(len(c["input_ids"]) for c in chunks)
        targets = sum(int((c["labels"][1:] != -100).sum()) for c in chunks)
        pairs = sum(len(ids) * (len(ids) + 1) // 2 for c in chunks for ids, _ in examples_in_chunk(c))
        flops = 6 * decoder * tokens + 6 * head * targets + 12 * cfg.num_hidden_layers * cfg.hidden_size * pairs
        windows += [flops / tokens] * 2
    return windows


def test_steps_carry_tokens_per_s_mfu_and_grad_norm(one_process, tiny_model):
    steps, _ = read_metrics(one_process[1])
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
    for s, flops in zip(steps, reference_flops_per_token(tiny_model)):
        assert s["tokens_per_s"] > 0
        # mfu x peak / tokens_per_s: the window's FLOPs per token, its seconds cancel
        assert s["mfu"] == pytest.approx(flops * s["tokens_per_s"] / (PEAK_TFLOPS * 1e12), rel=1e-6)  # float32
        assert math.isfinite(s["grad_norm"]) and s["grad_norm"] > 0  # logged without --gradient_clipping
        assert s["perplexity"] == pytest.approx(math.exp(s["loss"]), rel=1e-12)
        assert s["peak_memory_mib"] > 0


def test_eval_steps_evaluate_at_those_steps_and_best_follows(one_process, tiny_model):
    out = one_process[1]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [line for line in lines if line["event"] == "eval"]
    assert [e["step"] for e in evals] == [2, 4]  # the epoch end at step 4 reuses step 4's evaluation
    (epoch,) = [line for line in lines if line["event"] == "epoch"]
    assert epoch["eval_loss"] == evals[-1]["eval_loss"]
    best = min(evals, key=lambda e: e["eval_loss"])
    run_dir = out / "checkpoints" / f"fine-tuned-{tiny_model.name}"
    assert ckpt_state.best_target(run_dir).name == ckpt_state.step_dir_name(best["step"])
    loop = ckpt_state.open_checkpoint(run_dir / f"step_{STEPS:06d}").info.loop
    assert (loop["best_eval_loss"], loop["best_step"]) == (best["eval_loss"], best["step"])


def test_tensorboard_holds_the_scalars_at_their_steps(one_process):
    steps, _ = read_metrics(one_process[1])
    scalars = tensorboard_scalars(one_process[1] / "tensorboard")
    for tag in STEP_TAGS:
        assert [step for step, _ in scalars[tag]] == list(range(1, STEPS + 1)), tag
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([s["loss"] for s in steps], rel=1e-6)  # float32
    assert [v for _, v in scalars["train/grad_norm"]] == pytest.approx([s["grad_norm"] for s in steps], rel=1e-6)
    evals = [json.loads(line) for line in (one_process[1] / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e["event"] == "eval"]
    assert [step for step, _ in scalars["eval/loss"]] == [e["step"] for e in evals]
    assert [v for _, v in scalars["eval/loss"]] == pytest.approx([e["eval_loss"] for e in evals], rel=1e-6)


def test_offline_wandb_run_holds_the_scalars(one_process):
    root, out = one_process
    steps, _ = read_metrics(out)
    run, history = wandb_offline_run(root)
    assert run.project == "watch-test"
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["train_config"]["max_train_step"] == STEPS
    assert sorted(history) == list(range(1, STEPS + 1))
    for s in steps:
        row = history[s["step"]]
        assert set(STEP_TAGS) <= set(row)
        assert row["train/loss"] == s["loss"] and row["train/mfu"] == s["mfu"]
    evals = [e for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if e["event"] == "eval"]
    assert {step: row["eval/loss"] for step, row in history.items() if "eval/loss" in row} == {
        e["step"]: e["eval_loss"] for e in evals}


def test_loss_png_and_plot_command(one_process, tmp_path, capfd):
    out = one_process[1]
    image = matplotlib.image.imread(out / "loss.png")
    assert image.ndim == 3 and image.shape[1] > image.shape[0] > 100  # two panels side by side
    steps, _ = read_metrics(out)
    fig = plot.draw(plot.read_curves(out / "metrics.jsonl"), tmp_path / "again.png")
    assert len(fig.axes) == 2
    loss_train, loss_eval = fig.axes[0].lines
    assert list(loss_train.get_xdata()) == [s["step"] for s in steps]
    assert list(loss_train.get_ydata()) == [s["loss"] for s in steps]
    assert list(loss_eval.get_xdata()) == [2, 4]
    assert list(fig.axes[1].lines[0].get_ydata()) == pytest.approx([math.exp(s["loss"]) for s in steps])

    # the command (in this process) redraws the same picture, also from a file whose last line a crash tore
    torn = tmp_path / "metrics.jsonl"
    torn.write_text((out / "metrics.jsonl").read_text() + '{"event": "st')
    code, stdout, _ = run_cli(capfd, ["plot", torn, "-o", tmp_path / "cli.png"])
    assert code == 0 and matplotlib.image.imread(tmp_path / "cli.png").shape == image.shape, stdout

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"event": "st\n' + (out / "metrics.jsonl").read_text())
    code, _, err = run_cli(capfd, ["plot", broken])
    assert code == 2 and len(error_lines(err)) == 1
    assert "line 1" in error_lines(err)[0] and "Traceback" not in err

    # a preference loss (dpo's steps log rewards, no perplexity): the loss panel alone
    dpo = tmp_path / "dpo.jsonl"
    dpo.write_text("".join(json.dumps({"event": "step", "step": s, "loss": 0.7 - s / 10, "rewards/accuracies": 0.5})
                           + "\n" for s in (1, 2, 3)))
    fig = plot.draw(plot.read_curves(dpo), tmp_path / "dpo.png")
    assert [ax.get_title() for ax in fig.axes] == ["loss"]
    assert list(fig.axes[0].lines[0].get_ydata()) == pytest.approx([0.6, 0.5, 0.4])


def test_two_ranks_only_rank0_writes(tmp_path, tiny_model, one_process):
    """FSDP2 on 2 ranks with the same global batch: one event file, one wandb run, and the
    same losses and gradient norms (the sharded norm reduced across ranks) as one process."""
    out = tmp_path / "out"
    check(torchrun(2, SHIM, [*COMMON, "--enable_fsdp", "--batch_size_training", "2",
                             "--model_name", str(tiny_model), "--output_dir", str(out)], extra_env=wandb_env(tmp_path)))
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert len(list(tmp_path.glob("wandb/offline-run-*"))) == 1
    _, history = wandb_offline_run(tmp_path)
    assert sorted(history) == list(range(1, STEPS + 1))
    two, _ = read_metrics(out)
    one, _ = read_metrics(one_process[1])
    assert [s["step"] for s in two] == list(range(1, STEPS + 1))
    assert [s["loss"] for s in two] == pytest.approx([s["loss"] for s in one], rel=1e-5)
    assert [s["grad_norm"] for s in two] == pytest.approx([s["grad_norm"] for s in one], rel=1e-4)
    # the same global batches: both ranks' FLOPs against 2 devices' peak
    assert [s["mfu"] / s["tokens_per_s"] for s in two] == pytest.approx(
        [s["mfu"] / s["tokens_per_s"] / 2 for s in one], rel=1e-6)
    assert (out / "loss.png").is_file()


def test_resumed_run_continues_its_wandb_run(tmp_path, tiny_model, one_process):
    """Stopped after step 2 (its checkpoint carries the wandb run id) and resumed: the second
    offline run has the first one's id, and logs steps 3 and 4 with the uninterrupted run's losses."""
    args = [sys.executable, str(SHIM), *COMMON, "--batch_size_training", "4", "--model_name", str(tiny_model),
            "--output_dir", str(tmp_path / "out")]
    check(run_cmd(args + ["--max_train_step", "2"], extra_env=wandb_env(tmp_path)))
    check(run_cmd(args + ["--resume", "auto"], extra_env=wandb_env(tmp_path)))
    # the two attempts, in the order of the steps they logged (not of their directory names' clock)
    (first, first_history), (second, second_history) = sorted(
        (read_wandb_run(f) for f in tmp_path.glob("wandb/offline-run-*/run-*.wandb")), key=lambda run: min(run[1]))
    assert first.run_id and second.run_id == first.run_id
    assert sorted(first_history) == [1, 2] and sorted(second_history) == [3, 4]
    uninterrupted = {s["step"]: s["loss"] for s in read_metrics(one_process[1])[0]}
    assert [second_history[step]["train/loss"] for step in (3, 4)] == pytest.approx(
        [uninterrupted[3], uninterrupted[4]], rel=1e-5)


def test_model_flops_counts_frozen_weights_at_4_and_trainable_at_6(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model.model.layers[0].requires_grad_(False)
    model.get_input_embeddings().requires_grad_(False)
    counts = throughput.model_flops(model, model.config)
    frozen, trainable = (sum(p.numel() for p in layers.parameters() if p.ndim == 2)
                         for layers in (model.model.layers[:1], model.model.layers[1:]))
    assert (counts.frozen, counts.trainable) == (frozen, trainable) and frozen > 0 and trainable > 0
    assert (counts.head_frozen, counts.head_trainable) == (0, model.lm_head.weight.numel())  # the head trains
    assert counts.of_batch(1, 0, 0) == 6 * trainable + 4 * frozen


def test_peak_table_tells_variants_apart():
    names = {"NVIDIA H100 80GB HBM3": "H100", "NVIDIA H100 PCIe": "H100 PCIe", "NVIDIA H100 NVL": "H100 NVL",
             "NVIDIA H200": "H200", "NVIDIA A100-SXM4-80GB": "A100", "NVIDIA A10G": "A10", "NVIDIA L40S": "L40S",
             "NVIDIA L4": "L4", "NVIDIA GeForce RTX 4090": "4090"}
    table = dict(throughput.PEAK_TFLOPS)
    for device, entry in names.items():
        assert throughput.peak_tflops(device) == table[entry], device
    assert throughput.peak_tflops("cpu") is None


@pytest.mark.parametrize("flags, needle", [
    (["--eval_steps", "5", "--run_validation", "False"], "--eval_steps evaluates the validation split"),
    (["--eval_steps", "-1"], "--eval_steps must be >= 0"),
    (["--peak_tflops", "-3"], "--peak_tflops must be >= 0"),
    (["--wandb_config.mode", "sideways"], "unknown --wandb_config.mode 'sideways'"),
])
def test_bad_watch_flags(flags, needle):
    with pytest.raises(UserError, match=re.escape(needle)):
        check_supported(parse_args(flags))


def test_resume_rewinds_eval_lines_and_purges_tensorboard(tmp_path):
    """What a killed run logged past its checkpoint (step 2) is gone after the resume: the
    metrics file's step and eval lines, and the TensorBoard points (purge_step)."""
    from shardtune.metrics.logs import MetricsWriter
    from shardtune.metrics.sinks import TensorBoardSink

    path, log_dir = tmp_path / "metrics.jsonl", tmp_path / "tb"
    killed = MetricsWriter(path, sinks=[TensorBoardSink(log_dir, resume_step=None)])
    for step in (1, 2, 3):
        killed.write("step", epoch=1, step=step, loss=10.0 + step)
        killed.write("eval", epoch=1, step=step, eval_loss=20.0 + step)
    killed.close()

    resumed = MetricsWriter(path, sinks=[TensorBoardSink(log_dir, resume_step=2)])
    resumed.rewind(2, 0)
    for step in (3, 4):
        resumed.write("step", epoch=1, step=step, loss=30.0 + step)
    resumed.close()
    curves = plot.read_curves(path)
    assert (curves.train_steps, curves.train_loss) == ([1, 2, 3, 4], [11.0, 12.0, 33.0, 34.0])
    assert (curves.eval_steps, curves.eval_loss) == ([1, 2], [21.0, 22.0])
    scalars = tensorboard_scalars(log_dir)
    assert scalars["train/loss"] == [(1, 11.0), (2, 12.0), (3, 33.0), (4, 34.0)]
    assert scalars["eval/loss"] == [(1, 21.0), (2, 22.0)]
