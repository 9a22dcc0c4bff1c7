"""shardtune verify: passes on a configuration whose losses do not depend on the rank split
(LoRA under FSDP), and fails on one whose losses genuinely do (LoRA dropout kept: each rank
draws its own masks, so 2 ranks drop other activations than 1 rank does)."""
import json

from conftest import error_lines, run_cli, step_losses

FLAGS = ["--enable_fsdp", "--use_peft", "--peft_method", "lora", "--num_workers_dataloader", "0",
         "--samsum_dataset.train_split", "validation", "--context_length", "256", "--batch_size_training", "2",
         "--lr", "5e-2"]


def _verify(capfd, tiny_model, shared_data, work_dir, extra):
    """`shardtune verify` from this process (its two runs are real launches): (exit code,
    stdout, stderr), both runs' step losses, and their largest difference recomputed here."""
    result = run_cli(capfd, ["verify", "--nproc_per_node", "2", "--verify_steps", "3", "--json", "--work_dir", work_dir,
                             *FLAGS, "--model_name", tiny_model, "--samsum_dataset.data_path", shared_data / "samsum",
                             *extra])
    one, two = step_losses(work_dir / "world1"), step_losses(work_dir / "world2")
    largest = max(abs(one[s] - two[s]) / max(1.0, abs(one[s])) for s in one)
    return result, one, two, largest


def test_verify_passes_when_losses_match(tiny_model, shared_data, tmp_path, capfd):
    (code, stdout, stderr), one, two, largest = _verify(capfd, tiny_model, shared_data, tmp_path, [])
    assert code == 0, stderr[-3000:]
    assert sorted(one) == sorted(two) == [1, 2, 3]
    assert one[1] != one[3]  # it trained
    report = json.loads(stdout.strip().splitlines()[-1])
    assert report["passed"] and report["max_difference"] == largest <= report["tolerance"]


def test_verify_fails_when_the_loss_depends_on_the_rank_split(tiny_model, shared_data, tmp_path, capfd):
    (code, stdout, stderr), one, two, largest = _verify(capfd, tiny_model, shared_data, tmp_path,
                                                        ["--keep_dropout", "--lora_config.lora_dropout", "0.5"])
    report = json.loads(stdout.strip().splitlines()[-1])
    assert code == 1
    assert not report["passed"] and report["max_difference"] == largest > report["tolerance"]
    assert len(error_lines(stderr)) == 1
