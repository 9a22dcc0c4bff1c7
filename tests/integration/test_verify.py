"""shardtune verify: passes on a configuration whose losses do not depend on the rank split
(LoRA under FSDP), and fails on one whose losses genuinely do (LoRA dropout kept: each rank
draws its own masks, so 2 ranks drop other activations than 1 rank does)."""
import json
import sys

from conftest import error_lines, run_cmd, step_losses

FLAGS = ["--enable_fsdp", "--use_peft", "--peft_method", "lora", "--num_workers_dataloader", "0",
         "--samsum_dataset.train_split", "validation", "--context_length", "256", "--batch_size_training", "2",
         "--lr", "5e-2"]


def _verify(tiny_model, shared_data, work_dir, extra):
    cmd = [sys.executable, "-m", "shardtune.cli", "verify", "--nproc_per_node", "2", "--verify_steps", "3", "--json",
           "--work_dir", str(work_dir), *FLAGS, "--model_name", str(tiny_model),
           "--samsum_dataset.data_path", str(shared_data / "samsum"), *extra]
    proc = run_cmd(cmd)
    one, two = step_losses(work_dir / "world1"), step_losses(work_dir / "world2")
    # the comparison, recomputed here from both runs' metrics files
    largest = max(abs(one[s] - two[s]) / max(1.0, abs(one[s])) for s in one)
    return proc, one, two, largest


def test_verify_passes_when_losses_match(tiny_model, shared_data, tmp_path):
    proc, one, two, largest = _verify(tiny_model, shared_data, tmp_path, [])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(one) == sorted(two) == [1, 2, 3]
    assert one[1] != one[3]  # it trained
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["passed"] and report["max_difference"] == largest <= report["tolerance"]


def test_verify_fails_when_the_loss_depends_on_the_rank_split(tiny_model, shared_data, tmp_path):
    proc, one, two, largest = _verify(tiny_model, shared_data, tmp_path,
                                      ["--keep_dropout", "--lora_config.lora_dropout", "0.5"])
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 1
    assert not report["passed"] and report["max_difference"] == largest > report["tolerance"]
    assert len(error_lines(proc.stderr)) == 1
