"""FSDP options of the guide on CPU/gloo with real torchrun processes: sharding
strategies, memory flags, freezing, precision, fp16 loss scaling and invalid combinations."""
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, SHIM, assert_close, check, error_lines, python, read_metrics, run_cli, step_losses, torchrun

LORA = ["--use_peft", "--peft_method", "lora", "--lora_config.lora_dropout", "0"]


def _args(tiny_model, out, *extra):
    return ["--model_name", str(tiny_model), "--output_dir", str(out), "--num_epochs", "1", "--num_workers_dataloader", "0",
            "--context_length", "128", "--run_validation", "False", "--save_metrics", "--log_every", "5",
            "--lr", "2e-3", "--fsdp_activation_checkpointing", "False", *extra]


def _losses(out):
    return list(step_losses(out).values())


@pytest.fixture(scope="module")
def one_rank_lora(tmp_path_factory, tiny_model):
    out = tmp_path_factory.mktemp("ref") / "out"
    check(python(SHIM, LORA + _args(tiny_model, out, "--max_train_step", "5", "--batch_size_training", "4")))
    return _losses(out)


LOW_PRECISIONS = {"bf16_mixed": ["--mixed_precision", "True"], "pure_bf16": ["--pure_bf16", "--optimizer", "anyprecision"],
                  "fp16": ["--use_fp16"]}


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory, tiny_model):
    """Every 2-rank run below in one launch (tests/workers/train_probe.py --then): a launch's
    start-up costs more than these tiny runs. name -> output directory."""
    tmp = tmp_path_factory.mktemp("fsdp")
    fsdp_lora = [*LORA, "--enable_fsdp", "--max_train_step", "5", "--batch_size_training", "2"]
    runs = {
        "SHARD_GRAD_OP": [*fsdp_lora, "--sharding_strategy", "SHARD_GRAD_OP"],
        "NO_SHARD": [*fsdp_lora, "--sharding_strategy", "NO_SHARD"],
        # activation checkpointing and CPU offload together: either changing the numbers shows
        "memory": [*fsdp_lora, "--fsdp_activation_checkpointing", "True", "--fsdp_cpu_offload"],
        "freeze": ["--enable_fsdp", "--max_train_step", "3", "--batch_size_training", "2", "--freeze_layers",
                   "--num_freeze_layers", "1", "--checkpoint_type", "FULL_STATE_DICT"],
        "dcp_root": ["--enable_fsdp", "--max_train_step", "2", "--batch_size_training", "2",
                     "--dist_checkpoint_root_folder", str(tmp / "dcp")],
        **{name: [*LORA, "--enable_fsdp", "--batch_size_training", "2", "--num_epochs", "2", "--lr", "1e-2", *flags]
           for name, flags in LOW_PRECISIONS.items()},
    }
    argv = []
    for name, flags in runs.items():
        # _args first: a flag given twice takes its last value, so each run's own flags win
        argv += ["--then", str(tmp / f"{name}.safetensors"), *_args(tiny_model, tmp / name), *flags]
    check(torchrun(2, REPO / "tests" / "workers" / "train_probe.py", argv[1:]))
    return {name: tmp / name for name in runs} | {"dcp": tmp / "dcp"}


@pytest.mark.parametrize("strategy", ["SHARD_GRAD_OP", "NO_SHARD"])
def test_sharding_strategies_match_one_rank(strategy, one_rank_lora, two_rank_runs):
    """FULL_SHARD at 4 ranks and HYBRID_SHARD on a 2 x 2 mesh are checked against one
    rank in test_multinode.py."""
    assert_close(_losses(two_rank_runs[strategy]), one_rank_lora, rtol=1e-5, where=strategy)


def test_memory_flags_do_not_change_losses(one_rank_lora, two_rank_runs):
    assert_close(_losses(two_rank_runs["memory"]), one_rank_lora, rtol=1e-5, where="memory")


def test_freeze_layers_keeps_frozen_weights_bitwise(two_rank_runs, tiny_model):
    out = two_rank_runs["freeze"]
    base, tuned = load_file(tiny_model / "model.safetensors"), load_file(out / "model.safetensors")
    assert base.keys() == tuned.keys()
    frozen = [k for k in base if k.startswith("model.layers.0.")]
    trained = [k for k in base if k.startswith("model.layers.1.") and k.endswith("proj.weight")]
    assert frozen and trained
    for k in frozen:
        assert torch.equal(base[k], tuned[k]), k
    for k in trained + ["lm_head.weight"]:
        assert not torch.equal(base[k], tuned[k]), k


def test_low_precision_trains(two_rank_runs):
    for name in LOW_PRECISIONS:
        epochs = read_metrics(two_rank_runs[name])[1]
        assert all(math.isfinite(l) for l in _losses(two_rank_runs[name])), name
        assert epochs[1]["train_loss"] < epochs[0]["train_loss"], (name, epochs)


def test_fp16_scaler_skips_step_with_inf_on_one_rank(tmp_path, tiny_model):
    out, rec = tmp_path / "out", tmp_path / "rec.safetensors"
    check(torchrun(2, REPO / "tests" / "workers" / "inject_inf.py", [str(rec)] + LORA + _args(
        tiny_model, out, "--enable_fsdp", "--max_train_step", "4", "--batch_size_training", "2",
        "--use_fp16", "--lr", "1e-2")))
    for rank in (0, 1):  # the inf was injected on rank 0 only; both must skip
        d = load_file(f"{rec}.rank{rank}")
        n = len([k for k in d if k.startswith("final_")])

        def same(a, b):
            return all(torch.equal(d[f"{a}_{i}"], d[f"{b}_{i}"]) for i in range(n))

        assert not same("before1", "before2"), "step 1 should apply"
        assert same("before2", "before3"), f"rank {rank} applied the poisoned step 2"
        assert not same("before3", "before4"), "step 3 should apply"


@pytest.mark.parametrize("flags, needle", [
    (["--use_fp16", "--pure_bf16"], "contradict"),
    (["--quantization", "8bit", "--enable_fsdp"], "not supported"),
    (["--freeze_layers"], "applies to full fine-tuning"),
    (["--fsdp_cpu_offload"], "needs --enable_fsdp"),
    (["--sharding_strategy", "HALF_SHARD"], "unknown --sharding_strategy"),
])
def test_invalid_combinations(flags, needle, tmp_path, tiny_model, capfd):
    code, _, err = run_cli(capfd, ["finetune", *LORA, *_args(tiny_model, tmp_path / "o", *flags)])  # in this process
    assert code != 0 and "Traceback" not in err
    assert len(error_lines(err)) == 1 and needle in error_lines(err)[0], err


def test_hybrid_group_must_divide_world(tmp_path, tiny_model):
    proc = torchrun(2, SHIM, LORA + _args(tiny_model, tmp_path / "o", "--enable_fsdp", "--sharding_strategy",
                                          "HYBRID_SHARD", "--sharding_group_size", "3"))
    assert proc.returncode != 0
    # torchrun prints its own launcher traceback on any child failure; ours print one line
    assert "src/shardtune" not in proc.stderr and "[rank0]: Traceback" not in proc.stderr
    assert any("HYBRID_SHARD needs sharding_group_size" in l for l in error_lines(proc.stderr)), proc.stderr


def test_full_finetune_step_checkpoint_matches_hf_output(two_rank_runs, tiny_model):
    """The epoch-end step checkpoint (DCP, with the optimizer) under
    dist_checkpoint_root_folder holds the same trained weights as the HF directory."""
    import torch.distributed.checkpoint as dcp

    from shardtune.checkpoint import state as ckpt_state
    from shardtune.checkpoint.convert import read_trainable

    out, root = two_rank_runs["dcp_root"], two_rank_runs["dcp"]
    run_dir = root / f"fine-tuned-{tiny_model.name}"
    assert [p.name for p in ckpt_state.complete_steps(run_dir)] == ["step_000002"]
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]  # no temporaries left
    saved = read_trainable(ckpt_state.open_checkpoint(run_dir / "step_000002"))  # one process, no group
    hf = load_file(out / "model.safetensors")
    for k, v in hf.items():
        assert torch.equal(saved[k], v), k
    assert not torch.equal(hf["model.layers.0.self_attn.q_proj.weight"],
                           load_file(tiny_model / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"])
    meta = dcp.FileSystemReader(str(run_dir / "step_000002" / "dcp")).read_metadata()
    assert any(k.startswith("optim.") and k.endswith("exp_avg_sq") for k in meta.state_dict_metadata)
