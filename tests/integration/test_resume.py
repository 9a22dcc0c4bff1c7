"""Runs that survive (real processes, CPU/gloo, tiny model): SIGKILL mid-step and
mid-save, then --resume auto, end bitwise equal to an uninterrupted run (LoRA on a
weighted mixture of two datasets, with per-component evaluation, and full fine-tuning);
resume at another world size continues its losses, on a mixture; SIGTERM checkpoints
and exits 0; a NaN stops the run and keeps the last good checkpoint; outputs convert,
merge and load in plain transformers / peft; a used output_dir is never touched."""
import hashlib
import json
import signal
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import (REPO, SHARED_DATA, SHIM, check, error_lines, kill_group, metric_events, python, run_cli, run_cmd,
                      start_python,
                      start_torchrun, step_losses, torchrun, wait_for_file)
from shardtune.checkpoint import state as ckpt_state

FAULT = REPO / "tests" / "workers" / "fault_probe.py"
PROBE = REPO / "tests" / "workers" / "train_probe.py"
STEPS = 6
COMMON = ["--num_epochs", "1", "--max_train_step", str(STEPS), "--context_length", "128",
          "--num_workers_dataloader", "0", "--save_metrics", "--log_every", "1", "--run_validation", "False",
          "--save_steps", "2", "--lr", "1e-2"]
# two components of unequal size, each prepared and cached on its own, drawn 0.6 / 0.4
MIXTURE = ["--dataset", "mixture_dataset", "--mixture_dataset.datasets", "samsum_dataset:0.6,alpaca_dataset:0.4",
           "--alpaca_dataset.data_path", str(SHARED_DATA / "alpaca" / "alpaca_data_200.json")]
METHODS = {"lora_mixture": ["--use_peft", "--peft_method", "lora",  # lora_dropout 0.05: the RNG must resume too
                            *MIXTURE, "--run_validation", "True", "--eval_steps", "2"],
           "full": ["--fsdp_activation_checkpointing", "False"]}


def _args(tiny_model, out, *extra):
    return COMMON + ["--model_name", str(tiny_model), "--output_dir", str(out), *extra]


def _run_dir(out, tiny_model) -> Path:
    return out / "checkpoints" / f"fine-tuned-{tiny_model.name}"


def _steps(out, tiny_model) -> list[str]:
    return [p.name for p in ckpt_state.complete_steps(_run_dir(out, tiny_model))]


def _final_weights(out) -> dict:
    name = "adapter_model.safetensors" if (out / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(out / name)


@pytest.mark.parametrize("method", METHODS)
def test_killed_mid_step_then_mid_save_resumes_bitwise_exact(tmp_path, tiny_model, method):
    flags = ["--enable_fsdp", "--batch_size_training", "2"] + METHODS[method]
    ref = tmp_path / "ref"
    check(torchrun(2, SHIM, _args(tiny_model, ref, *flags)))

    out, marks = tmp_path / "out", tmp_path / "marks"
    marks.mkdir()
    # 1. SIGKILL every process while step 5 runs: steps 2 and 4 are checkpointed
    proc = start_torchrun(2, FAULT, [json.dumps({"pause_at": 5, "dir": str(marks)})] + _args(tiny_model, out, *flags))
    wait_for_file(marks / "paused", proc)
    kill_group(proc)
    assert _steps(out, tiny_model) == ["step_000002", "step_000004"]
    # 2. resume, and SIGKILL while step 6's checkpoint is written but not yet published
    proc = start_torchrun(2, FAULT, [json.dumps({"stall_publish_at": 6, "dir": str(marks)})]
                          + _args(tiny_model, out, *flags, "--resume", "auto"))
    wait_for_file(marks / "stalled", proc)
    kill_group(proc)
    run_dir = _run_dir(out, tiny_model)
    assert (run_dir / ".tmp-step_000006" / "dcp" / ".metadata").exists()  # complete but unpublished
    assert _steps(out, tiny_model) == ["step_000002", "step_000004"]
    assert not (out / "adapter_model.safetensors").exists() and not (out / "model.safetensors").exists()
    # 3. resume from step 4 again: the torn temporary is ignored and cleaned
    probe_file = tmp_path / "probe.safetensors"
    check(torchrun(2, PROBE, [str(probe_file)] + _args(tiny_model, out, *flags, "--resume", "auto")))
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]
    assert _steps(out, tiny_model) == ["step_000004", "step_000006"]  # save_total_limit 2

    assert step_losses(out) == step_losses(ref) and len(step_losses(ref)) == STEPS
    if "--run_validation" in flags:  # each component's loss and the combined one, at steps 2, 4 and 6
        def evals(run):
            return {e["step"]: {k: e[k] for k in ("eval_loss", "eval_loss_by_dataset")} for e in metric_events(run, "eval")}
        assert evals(out) == evals(ref) and sorted(evals(ref)) == [2, 4, 6]
        for e in evals(ref).values():
            parts = e["eval_loss_by_dataset"]
            assert sorted(parts) == ["alpaca_dataset", "samsum_dataset"]
            assert min(parts.values()) < e["eval_loss"] < max(parts.values())  # a weighted mean of the two
    final, expected = _final_weights(out), _final_weights(ref)
    assert final.keys() == expected.keys()
    for key in expected:
        assert torch.equal(final[key], expected[key]), key

    # the last checkpoint converts to what plain transformers / peft load, with the trained logits
    probe = load_file(probe_file)
    converted = tmp_path / "converted"
    check(run_cmd([*_cli(), "convert", str(run_dir / "step_000006"), str(converted)]))
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    if method == "lora_mixture":
        model = PeftModel.from_pretrained(base, converted).eval()
        merged = tmp_path / "merged"
        check(run_cmd([*_cli(), "merge", "--model_name", str(tiny_model), "--peft_model", str(converted),
                       "--output_dir", str(merged)]))
        loaded = [model, AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()]
    else:
        loaded = [AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()]
    with torch.no_grad():
        for model in loaded:
            assert (model(input_ids=probe["probe"]).logits - probe["logits"]).abs().max().item() <= 1e-5


def _cli():
    import sys

    return [sys.executable, "-m", "shardtune.cli"]


WORLD_FLAGS = ["--use_peft", "--peft_method", "lora", "--lora_config.lora_dropout", "0", *MIXTURE]


@pytest.fixture(scope="module")
def one_rank_reference(tmp_path_factory, tiny_model):
    """Uninterrupted, one process, global batch 4."""
    out = tmp_path_factory.mktemp("ws") / "ref"
    check(python(SHIM, _args(tiny_model, out, "--batch_size_training", "4", *WORLD_FLAGS)))
    return step_losses(out), _final_weights(out)


def _assert_continues(out, reference):
    losses, weights = step_losses(out), _final_weights(out)
    ref_losses, ref_weights = reference
    assert sorted(losses) == sorted(ref_losses) == list(range(1, STEPS + 1))
    assert max(abs(losses[s] - ref_losses[s]) for s in losses) <= 1e-5, (losses, ref_losses)
    assert max((weights[k] - ref_weights[k]).abs().max().item() for k in ref_weights) <= 1e-5


def test_saved_at_two_ranks_resumes_at_one(tmp_path, tiny_model, one_rank_reference):
    out = tmp_path / "out"
    check(torchrun(2, SHIM, _args(tiny_model, out, "--enable_fsdp", "--batch_size_training", "2", *WORLD_FLAGS,
                                  "--max_train_step", "3")))
    # one rank keeps the global batch of 4: micro batch 2 x 2 accumulation
    check(python(SHIM, _args(tiny_model, out, "--batch_size_training", "2", *WORLD_FLAGS, "--resume", "auto")))
    _assert_continues(out, one_rank_reference)


def test_saved_at_one_rank_resumes_at_four(tmp_path, tiny_model, one_rank_reference):
    out = tmp_path / "out"
    check(python(SHIM, _args(tiny_model, out, "--batch_size_training", "4", *WORLD_FLAGS, "--max_train_step", "3")))
    check(torchrun(4, SHIM, _args(tiny_model, out, "--enable_fsdp", "--batch_size_training", "4", *WORLD_FLAGS,
                                  "--resume", "auto")))
    _assert_continues(out, one_rank_reference)


def test_sigterm_checkpoints_exits_zero_and_resumes_exactly(tmp_path, tiny_model, one_rank_reference):
    out, marks = tmp_path / "out", tmp_path / "marks"
    marks.mkdir()
    args = _args(tiny_model, out, "--batch_size_training", "4", *WORLD_FLAGS)
    proc = start_python(FAULT, [json.dumps({"pause_at": 3, "dir": str(marks)})] + args)
    wait_for_file(marks / "paused", proc)
    proc.send_signal(signal.SIGTERM)
    (marks / "release").write_text("")
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert _steps(out, tiny_model) == ["step_000002", "step_000003"]  # step 3 finished, then saved
    assert not (out / "adapter_model.safetensors").exists()  # stopped, not finished
    check(python(SHIM, args + ["--resume", "auto"]))
    losses, weights = step_losses(out), _final_weights(out)
    assert losses == one_rank_reference[0]
    assert all(torch.equal(weights[k], v) for k, v in one_rank_reference[1].items())


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, tiny_model):
    out = tmp_path / "out"
    proc = torchrun(2, FAULT, [json.dumps({"nan_at": 4})] + _args(tiny_model, out, "--enable_fsdp", "--batch_size_training",
                                                                  "2", *WORLD_FLAGS))
    # torchrun prints its own launcher traceback on any child failure; ours print one line
    assert proc.returncode != 0 and "src/shardtune" not in proc.stderr
    errors = error_lines(proc.stderr)
    assert errors and all("step 4" in l and "step_000002" in l for l in errors), proc.stderr[-3000:]
    assert _steps(out, tiny_model) == ["step_000002"]
    assert not [p for p in _run_dir(out, tiny_model).iterdir() if p.name != "step_000002"]
    assert not (out / "adapter_model.safetensors").exists()


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_used_output_dir_is_refused_and_left_untouched(tmp_path, tiny_model, capfd):
    out = tmp_path / "out"
    check(python(SHIM, _args(tiny_model, out, "--batch_size_training", "4", *WORLD_FLAGS, "--max_train_step", "2")))
    before = _snapshot(out)
    assert "adapter_model.safetensors" in before
    for extra in ([], ["--dist_checkpoint_folder", "other"]):
        code, _, err = run_cli(capfd, ["finetune", *_args(tiny_model, out, "--batch_size_training", "4", *WORLD_FLAGS,
                                                          "--lr", "1e-3", *extra)])  # in this process
        assert code != 0 and "Traceback" not in err and len(error_lines(err)) == 1, err
        assert _snapshot(out) == before


def test_impossible_world_size_names_the_valid_ones(tiny_model):
    from shardtune.config.parse import parse_args
    from shardtune.errors import UserError
    from shardtune.checkpoint.resume import batching_for

    saved = ckpt_state.RunState(loop={"step": 3}, scheduler={}, lrs=[1e-4], grad_scaler=None, world_size=1,
                                global_batch=4, micro_batch=4, accumulation=1,
                                model=ckpt_state.ModelRef("/model", "0" * 16), peft_method=None, config={})
    ckpt = ckpt_state.Checkpoint(Path("/ckpt/step_000003"), 3, saved)
    cfgs = parse_args(["--batch_size_training", "4"])
    assert batching_for(cfgs, 2, ckpt).micro * batching_for(cfgs, 2, ckpt).accum == 2
    with pytest.raises(UserError, match=r"\[1, 2, 4\]"):
        batching_for(cfgs, 3, ckpt)


def test_no_unsafe_torch_load_in_the_package():
    offenders = []
    for path in (REPO / "src").rglob("*.py"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if "torch.load(" in line and "weights_only=True" not in line:
                offenders.append(f"{path}:{n}")
            if "pickle.load" in line:
                offenders.append(f"{path}:{n}")
    assert not offenders


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_resume_refuses_other_data_or_settings_unless_asked(capfd, tmp_path, tiny_model):
    """A checkpoint's data position means "this many samples of this data in this order": a
    resume with other file contents, seed or dpo_config is refused in one line, the checkpoint
    untouched; --resume_with_changes continues on purpose. In this process: one rank suffices."""
    records = json.loads((SHARED_DATA / "alpaca" / "alpaca_data_200.json").read_text())[:24]
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(records, ensure_ascii=False))
    out = tmp_path / "out"
    args = ["finetune", "--model_name", tiny_model, "--use_peft", "--peft_method", "lora", "--dataset", "alpaca_dataset",
            "--alpaca_dataset.data_path", data, "--output_dir", out, "--batch_size_training", "2",
            *[a for a in COMMON if a not in ("--max_train_step", str(STEPS))], "--max_train_step", "2"]
    assert run_cli(capfd, args)[0] == 0
    run_dir = out / "checkpoints"
    before = _tree_digest(run_dir)
    more = args[:-1] + ["3", "--resume", "auto"]

    code, _, err = run_cli(capfd, more + ["--seed", "7"])
    assert code != 0 and len(error_lines(err)) == 1 and "train_config.seed 42 -> 7" in err, err
    records[3]["output"] += " (edited)"
    data.write_text(json.dumps(records, ensure_ascii=False))
    code, _, err = run_cli(capfd, more)
    assert code != 0 and len(error_lines(err)) == 1 and "contents" in err, err
    assert _tree_digest(run_dir) == before  # refused before anything was written

    from shardtune.checkpoint.resume import check_same_data
    from shardtune.config.parse import parse_args

    ckpt = ckpt_state.open_checkpoint(ckpt_state.complete_steps(next(run_dir.iterdir()))[-1])
    flags = ["--dataset", "alpaca_dataset", "--dpo_config.beta", "0.2"]
    with pytest.raises(Exception, match=r"dpo_config\.beta 0\.1 -> 0\.2"):
        check_same_data(ckpt, parse_args(flags), None)
    check_same_data(ckpt, parse_args(flags + ["--resume_with_changes"]), None)

    assert run_cli(capfd, more + ["--resume_with_changes"])[0] == 0
    assert sorted(step_losses(out)) == [1, 2, 3]


def test_a_model_saved_in_bf16_resumes_its_own_checkpoint(capfd, tmp_path, tiny_model):
    """Real Llama checkpoints are saved in bf16, and building the model writes the run's dtype
    into its config: the fingerprint a resume compares must be the config as read, or --resume
    refuses the run's own checkpoints as "another model"."""
    from transformers import AutoTokenizer

    bf16 = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_model).to(torch.bfloat16).save_pretrained(bf16)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(bf16)
    args = ["finetune", "--model_name", bf16, "--use_peft", "--peft_method", "lora", "--output_dir", tmp_path / "out",
            "--batch_size_training", "2", *[a for a in COMMON if a not in ("--max_train_step", str(STEPS))]]
    assert run_cli(capfd, args + ["--max_train_step", "2"])[0] == 0
    assert run_cli(capfd, args + ["--max_train_step", "3", "--resume", "auto"])[0] == 0
    assert sorted(step_losses(tmp_path / "out")) == [1, 2, 3]
