"""The dpo recipe on real processes: packing, world size and accumulation change nothing;
QLoRA (NF4 under FSDP2) trains the same at 1 and 2 ranks; resume is bitwise at the same world
size and exact at another. Two launches (2 ranks, then 1) run every case in turn."""
import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, check, free_port, metric_events, torchrun

WORKER = REPO / "tests" / "workers" / "dpo_runs.py"
KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")


def steps(out):
    return [{k: s[k] for k in KEYS} for s in metric_events(out, "step")]


def assert_close(a, b, tol):
    """Per step, to tol; relative past 1 (summed log-probabilities are in the hundreds, where
    fp32 itself resolves ~1e-5)."""
    assert len(a) == len(b) and a
    for step, (x, y) in enumerate(zip(a, b), 1):
        assert max(abs(x[k] - y[k]) / max(1.0, abs(y[k])) for k in KEYS) <= tol, f"step {step}: {x} vs {y}"


def trained(out):
    return load_file(out / "trained.safetensors")


def assert_same_weights(a, b, tol):
    assert a.keys() == b.keys() and a
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= tol


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model, tiny_nf4_model, preference_files):
    root = tmp_path_factory.mktemp("dpo")
    common = ["--model_name", str(tiny_model), "--enable_fsdp", "--use_peft", "--peft_method", "lora",
              "--lora_config.lora_dropout", "0", "--dataset", "preference_dataset",
              "--preference_dataset.data_path", str(preference_files["grammar"]), "--run_validation", "False",
              "--num_epochs", "1", "--max_train_step", "6", "--lr", "5e-3", "--weight_decay", "0",
              "--mixed_precision", "False", "--context_length", "512", "--save_metrics", "--log_every", "1",
              "--fsdp_activation_checkpointing", "False", "--num_workers_dataloader", "0"]
    nf4 = common + ["--model_name", str(tiny_nf4_model), "--quantization", "4bit", "--run_validation", "True",
                    "--preference_dataset.validation_path", str(preference_files["samsum"]), "--max_eval_step", "2",
                    "--on_bad_record", "skip"]  # some SAMSum dialogues are longer than the context

    peft = ["--use_peft", "--peft_method", "lora", "--lora_config.lora_dropout", "0"]
    full = [f for f in " ".join(common).replace(" ".join(peft), "").split()] + ["--lr", "5e-4"]

    def launch(nproc, plan):
        args = []
        for name, flags in plan:
            args += (["--then"] if args else []) + [str(root / name), *flags]
        check(torchrun(nproc, WORKER, args, timeout=900))

    launch(2, [("two", common + ["--batch_size_training", "2"]),
               ("two_padded", common + ["--batch_size_training", "2", "--batching_strategy", "padding"]),
               ("two_accum", common + ["--batch_size_training", "2", "--micro_batch_size", "1"]),
               ("two_cut", common + ["--batch_size_training", "2", "--max_train_step", "3", "--save_steps", "3"]),
               ("two_cut", common + ["--batch_size_training", "2", "--resume", "auto"]),
               ("nf4_two", nf4 + ["--batch_size_training", "2"]),
               ("two_precomputed", common + ["--batch_size_training", "2", "--dpo_config.reference", "precomputed"]),
               ("two_reference_dir", common + ["--batch_size_training", "2", "--dpo_config.reference", str(tiny_model)]),
               ("full_two", full + ["--batch_size_training", "2"]),
               ("full_two_precomputed", full + ["--batch_size_training", "2", "--dpo_config.reference", "precomputed"]),
               ])
    saved = next((root / "two_cut" / "checkpoints").glob("*/step_000003"))
    launch(1, [("one", common + ["--batch_size_training", "4"]),
               ("one_resumed", common + ["--batch_size_training", "4", "--resume", str(saved)]),
               ("nf4_one", nf4 + ["--batch_size_training", "4"])])
    return root


def test_packing_ranks_and_accumulation_change_nothing(runs):
    two = steps(runs / "two")
    assert len(two) == 6 and two[-1]["loss"] < two[0]["loss"]  # it trained
    for other in ("one", "two_padded", "two_accum"):
        assert_close(steps(runs / other), two, 1e-5)
        assert_same_weights(trained(runs / other), trained(runs / "two"), 1e-5)


def test_resume_is_bitwise_at_the_same_world_size_and_exact_at_another(runs):
    two = steps(runs / "two")
    assert steps(runs / "two_cut") == two  # killed after step 3's checkpoint, resumed: the same floats
    assert_same_weights(trained(runs / "two_cut"), trained(runs / "two"), 0.0)
    resumed = steps(runs / "one_resumed")  # saved at 2 ranks, resumed at 1
    assert_close(resumed, two[3:], 1e-5)
    assert_same_weights(trained(runs / "one_resumed"), trained(runs / "two"), 1e-5)


def test_qlora_dpo_one_and_two_ranks_and_plain_peft_loads_it(runs, tiny_nf4_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    one, two = steps(runs / "nf4_one"), steps(runs / "nf4_two")
    assert_close(one, two, 1e-4)
    assert two[-1]["rewards/margins"] != 0.0  # the policy moved away from its reference
    evals = metric_events(runs / "nf4_two", "eval")
    assert evals and 0.0 <= evals[-1]["eval_rewards/accuracies"] <= 1.0
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_nf4_model), runs / "nf4_two")
    saved = load_file(runs / "nf4_two" / "adapter_model.safetensors")
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(saved) > 0
    for name, value in saved.items():
        key = name.replace(".weight", ".default.weight")
        assert torch.equal(loaded[key], value), name


def test_eval_reports_the_preference_accuracy_of_a_trained_adapter(runs, capsys, tiny_model, preference_files):
    """`shardtune eval` on the pairs, against plain peft: padded rows, the reference by
    disable_adapter, the implicit rewards' accuracy and the sigmoid loss."""
    import torch.nn.functional as F
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import run_cli
    from shardtune.config.schema import preference_dataset
    from shardtune.data.preference import source
    from shardtune.data.records import BadRecords

    pairs_file = preference_files["grammar"]
    code, out, _ = run_cli(capsys, ["eval", "--model_name", tiny_model, "--peft_model", runs / "two", "--dataset",
                                    "preference_dataset", "--preference_dataset.data_path", pairs_file,
                                    "--split", "train", "--max_samples", "12", "--context_length", "512",
                                    "--val_batch_size", "5"])
    assert code == 0
    report = json.loads(out.strip().splitlines()[-1])
    pairs = source(preference_dataset(data_path=str(pairs_file)), "train").read(
        AutoTokenizer.from_pretrained(tiny_model), BadRecords())[:12]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), runs / "two").eval()

    def logp(prompt, completion):
        ids = torch.tensor([prompt + completion])
        logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        return logps[len(prompt) - 1:].gather(1, ids[0, len(prompt):, None]).sum().item()

    rewards = []
    with torch.no_grad():
        for p in pairs:
            policy = [logp(p["prompt_ids"], p[k]) for k in ("chosen_ids", "rejected_ids")]
            with model.disable_adapter():
                ref = [logp(p["prompt_ids"], p[k]) for k in ("chosen_ids", "rejected_ids")]
            rewards.append((0.1 * (policy[0] - ref[0]), 0.1 * (policy[1] - ref[1])))
    accuracy = sum(c > r for c, r in rewards) / len(rewards)
    loss = sum(-F.logsigmoid(torch.tensor(c - r)).item() for c, r in rewards) / len(rewards)
    assert report["num_pairs"] == 12
    assert report["preference_accuracy"] == pytest.approx(accuracy, abs=1e-9)
    assert report["loss"] == pytest.approx(loss, abs=1e-5)
    assert report["rewards/margins"] == pytest.approx(sum(c - r for c, r in rewards) / len(rewards), abs=1e-5)


def test_a_precomputed_reference_equals_the_live_one(runs):
    """LoRA: the adapter-disabled forward, done once before training; full fine-tuning: the
    policy before its first step, instead of a frozen copy. Cached beside the prepared data.
    A reference directory holding the base gives the same too."""
    assert_close(steps(runs / "two_precomputed"), steps(runs / "two"), 1e-5)
    assert_close(steps(runs / "two_reference_dir"), steps(runs / "two"), 1e-5)  # the base, as a frozen sharded copy
    full = steps(runs / "full_two")
    assert_close(steps(runs / "full_two_precomputed"), full, 1e-5)
    assert full[-1]["rewards/margins"] != 0.0
    assert list((Path(os.environ["SHARDTUNE_CACHE"]) / "data").glob("reference-logps-*.safetensors"))


@pytest.fixture(scope="module")
def start_runs(tmp_path_factory, tiny_model, tiny_nf4_model, tiny_lora, preference_files):
    """One 2-rank launch, one step each, with the base and the precomputed references: bf16
    mixed precision (forced on CPU) with LoRA, QLoRA and full fine-tuning; DPO continuing the
    SFT adapter tiny_lora (with dropout off, TRL's default, and kept on); QLoRA and DoRA
    continuing an adapter; last, a rerun whose cached reference only rank 0 can see."""
    root = tmp_path_factory.mktemp("dpo_start")
    common = ["--model_name", str(tiny_model), "--enable_fsdp", "--dataset", "preference_dataset",
              "--preference_dataset.data_path", str(preference_files["grammar"]), "--run_validation", "False",
              "--num_epochs", "1", "--max_train_step", "1", "--lr", "5e-3", "--context_length", "512",
              "--save_metrics", "--fsdp_activation_checkpointing", "False", "--num_workers_dataloader", "0",
              "--batch_size_training", "2"]
    lora = common + ["--use_peft", "--peft_method", "lora"]
    bf16 = ["--mixed_precision", "True"]
    nf4 = lora + ["--model_name", str(tiny_nf4_model), "--quantization", "4bit"]
    sft = lora + ["--from_peft_checkpoint", str(tiny_lora), "--mixed_precision", "False"]
    plan = {"lora": lora + bf16, "nf4": nf4 + bf16, "full": common + bf16, "sft": sft}
    args = []
    for name, flags in plan.items():
        for reference in ("base", "precomputed"):
            args += (["--then"] if args else []) + [str(root / f"{name}_{reference}"), *flags,
                                                    "--dpo_config.reference", reference]
    for reference in ("base", "precomputed"):
        args += ["--then", str(root / f"sft_dropout_{reference}"), *sft, "--dpo_config.disable_dropout", "False",
                 "--dpo_config.reference", reference]
    # QLoRA continuing an adapter (nf4_base's): its frozen copy is sharded beside the NF4 weights, unquantized
    args += ["--then", str(root / "nf4_continued_base"), *nf4, *bf16, "--from_peft_checkpoint", str(root / "nf4_base")]
    dora = lora + ["--lora_config.use_dora", "True", "--mixed_precision", "False"]  # the reference's magnitude: loaded
    args += ["--then", str(root / "dora"), *dora, "--then", str(root / "dora_continued"), *dora,
             "--from_peft_checkpoint", str(root / "dora")]
    # each rank its own cache: now rank 0's holds lora_precomputed's values, rank 1's nothing
    args += ["--then", str(root / "lora_precomputed_again"), *plan["lora"], "--dpo_config.reference", "precomputed"]
    check(torchrun(2, WORKER, args, timeout=900, extra_env={"RANK_LOCAL_CACHE": "1"}))
    return root


def first_loss(out):
    (first,) = steps(out)
    return first["loss"]


@pytest.mark.parametrize("reference", ["base", "precomputed"])
@pytest.mark.parametrize("case, tol", [("lora", 1e-3), ("nf4", 1e-3), ("full", 1e-3), ("sft", 1e-5)])
def test_the_first_step_starts_at_ln2(start_runs, case, tol, reference):
    """Policy = reference before the first update: loss ln 2 (bf16 to its resolution), also
    when DPO continues an SFT adapter (the reference is that adapter, as TRL's ref adapter;
    LoRA's default dropout 0.05 is off, as TRL's disable_dropout)."""
    assert first_loss(start_runs / f"{case}_{reference}") == pytest.approx(math.log(2), rel=tol)


@pytest.mark.parametrize("start, continued, tol", [("nf4_base", "nf4_continued_base", 1e-3),
                                                   ("dora", "dora_continued", 1e-5)])
def test_qlora_and_dora_continuing_an_adapter_start_at_ln2(start_runs, start, continued, tol):
    """Under FSDP2 with NF4 base weights, and with DoRA's magnitude, the starting adapter's
    frozen copy is the reference."""
    (first,), (after,) = steps(start_runs / start), steps(start_runs / continued)
    assert after["logps/chosen"] != pytest.approx(first["logps/chosen"], rel=1e-4)  # the adapter is not the base
    assert after["loss"] == pytest.approx(math.log(2), rel=tol)


def test_dropout_kept_on_request_acts_in_the_policy_only(start_runs):
    """--dpo_config.disable_dropout False: LoRA's dropout acts in the policy, never in the
    reference, which runs in eval mode live as when precomputed: both give the same reference
    log-probabilities (logps - rewards / beta; the policy's dropout masks differ by run)."""
    assert first_loss(start_runs / "sft_dropout_base") != pytest.approx(math.log(2), rel=1e-3)

    def reference(name):
        (first,) = steps(start_runs / name)
        return [first[f"logps/{k}"] - first[f"rewards/{k}"] / 0.1 for k in ("chosen", "rejected")]
    assert reference("sft_dropout_base") == pytest.approx(reference("sft_dropout_precomputed"), rel=1e-6)


def test_rank_0_decides_the_precomputed_cache_for_every_rank(start_runs):
    """A node-local cache that holds the values on rank 0's node only: rank 0's hit reaches
    rank 1 by broadcast (before: rank 1 computed them alone and the collectives mismatched)."""
    assert steps(start_runs / "lora_precomputed_again") == steps(start_runs / "lora_precomputed")
    cached = lambda rank: list((Path(os.environ["SHARDTUNE_CACHE"]) / f"rank{rank}" / "data").glob("reference-*"))
    assert cached(0) and not cached(1)
    # a hit: no cache file was (re)written after the run launched just before it
    before = (start_runs / "dora_continued" / "metrics.jsonl").stat().st_mtime
    assert max(f.stat().st_mtime for f in cached(0)) < before


def test_dpo_continuing_an_adapter_in_one_process_starts_at_ln2_and_saves_only_the_policy(
        capfd, tmp_path, tiny_model, tiny_lora, preference_files):
    """Without FSDP (one process) too, the starting adapter, frozen, is the reference; the
    output holds the trained adapter alone, as plain peft saves one."""
    from conftest import run_cli

    out = tmp_path / "out"
    code, _, err = run_cli(capfd, [  # capfd: the run enables faulthandler on the real stderr
        "dpo", "--model_name", tiny_model, "--use_peft", "--peft_method", "lora", "--from_peft_checkpoint", tiny_lora,
        "--dataset", "preference_dataset", "--preference_dataset.data_path", preference_files["grammar"],
        "--run_validation", "False", "--max_train_step", "1", "--batch_size_training", "2", "--context_length", "512",
        "--save_metrics", "--num_workers_dataloader", "0", "--output_dir", out])
    assert code == 0, err
    assert first_loss(out) == pytest.approx(math.log(2), rel=1e-5)
    assert (out / "adapter_model.safetensors").is_file() and not [p for p in out.iterdir() if p.is_dir()
                                                                  and (p / "adapter_config.json").exists()]
    assert load_file(out / "adapter_model.safetensors").keys() == load_file(tiny_lora / "adapter_model.safetensors").keys()


def test_an_unwritable_cache_leaves_the_precomputed_reference_uncached(capfd, tmp_path, tiny_model, preference_files):
    """--data_cache_dir where no directory can be made (under a file): the values computed
    before training are used, not cached, and the run trains."""
    from conftest import run_cli

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    out = tmp_path / "out"
    code, _, err = run_cli(capfd, [
        "dpo", "--model_name", tiny_model, "--use_peft", "--peft_method", "lora", "--dpo_config.reference",
        "precomputed", "--data_cache_dir", blocker / "cache", "--dataset", "preference_dataset",
        "--preference_dataset.data_path", preference_files["grammar"], "--run_validation", "False",
        "--max_train_step", "1", "--batch_size_training", "2", "--context_length", "512", "--save_metrics",
        "--num_workers_dataloader", "0", "--output_dir", out])
    assert code == 0, err
    assert first_loss(out) == pytest.approx(math.log(2), rel=1e-5)


def test_a_frozen_reference_copy_gives_its_gathered_weights_back(monkeypatch, tmp_path, tiny_model, preference_files):
    """Full fine-tuning's reference is a frozen sharded copy; with SHARD_GRAD_OP (and its root
    and untied head under any strategy) FSDP2 would keep its weights gathered after forward
    for a backward the copy never runs: the whole reference per rank, all run long. After a
    reference forward every unit of the copy is sharded again. One rank, in this process."""
    from torch.distributed.tensor import DTensor

    from shardtune import device
    from shardtune.config.parse import parse_args
    from shardtune.recipes import dpo

    monkeypatch.setenv("SHARDTUNE_DEVICE", "cpu")
    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(key, value)
    cfgs = parse_args(["--model_name", str(tiny_model), "--enable_fsdp", "--sharding_strategy", "SHARD_GRAD_OP",
                       "--dataset", "preference_dataset", "--preference_dataset.data_path",
                       str(preference_files["grammar"]), "--run_validation", "False", "--context_length", "512",
                       "--mixed_precision", "False", "--num_workers_dataloader", "0", "--batch_size_training", "2",
                       "--output_dir", str(tmp_path / "out")])
    dist = device.setup(require_distributed=True)
    try:
        dpo.check(cfgs)
        recipe = dpo.setup(cfgs, dist)
        reference = recipe.loop_cfg.objective.reference
        copy = reference.args[0]
        assert copy is not recipe.train_model
        with torch.no_grad():
            reference(next(iter(recipe.loader)))
        assert all(isinstance(p, DTensor) for p in copy.parameters())
    finally:
        device.teardown()
