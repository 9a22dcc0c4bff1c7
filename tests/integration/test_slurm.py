"""Multi-node under slurm. scripts/multi_node.slurm, submitted as users submit it to a real
two-node slurm cluster on this machine (one CPU rank per node), trains the same per-step
losses as a local two-rank torchrun and writes an adapter that plain PEFT loads. And srun
without torchrun, which would start independent copies of the run, stops with one line."""
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, SHIM, assert_close, check, free_port, read_metrics, run_cmd, subprocess_env, torchrun

SCRIPT = REPO / "scripts" / "multi_node.slurm"
FLAGS = ["--enable_fsdp", "--use_peft", "--peft_method", "lora", "--num_epochs", "1", "--max_train_step", "3",
         "--batch_size_training", "1", "--context_length", "128", "--num_workers_dataloader", "0",
         "--save_metrics", "--run_validation", "False"]


def _train_flags(tiny_model, out):
    return FLAGS + ["--model_name", str(tiny_model), "--output_dir", str(out / "adapter"),
                    "--data_cache_dir", str(out / "cache")]


def test_multi_node_slurm_job_matches_local_torchrun(slurm_cluster, tmp_path, tiny_model):
    job_dir = tmp_path / "slurm"
    job_dir.mkdir()
    env = subprocess_env({
        "GPUS_PER_NODE": "1",  # one CPU rank per node
        "HEAD_NODE_ADDR": "127.0.0.1",  # n1 and n2 are names slurm knows, not DNS
        "RDZV_PORT": str(free_port()),
        "SHARDTUNE_TORCHRUN": f"{sys.executable} -m torch.distributed.run",
    })
    # --gpus-per-node=0 overrides the script's GPU request: this cluster's nodes have none.
    # --time: a hung job ends in minutes (it takes seconds).
    job_id = slurm_cluster.submit(["--nodes=2", "--gpus-per-node=0", "--time=5", f"--chdir={job_dir}",
                                   f"--output={job_dir}/slurm-%j.out", str(SCRIPT), *_train_flags(tiny_model, job_dir)],
                                  env=env)

    def report(info):
        log = "\n".join(f.read_text(errors="replace")[-6000:] for f in job_dir.glob("slurm-*.out"))
        return f"{info}\nJOB LOG:\n{log}\nDAEMONS:\n{slurm_cluster.log_tail()}"

    try:
        info = slurm_cluster.wait_job(job_id, timeout=420)
    except TimeoutError as err:
        pytest.fail(report(err))
    assert "JobState=COMPLETED" in info and "ExitCode=0:0" in info, report(info)
    assert "NodeList=n[1-2]" in info and "NumNodes=2" in info, info

    local = tmp_path / "local"
    check(torchrun(2, SHIM, _train_flags(tiny_model, local)))

    slurm_steps, _ = read_metrics(job_dir / "adapter")
    local_steps, _ = read_metrics(local / "adapter")
    slurm_losses, local_losses = [s["loss"] for s in slurm_steps], [s["loss"] for s in local_steps]
    assert len(slurm_losses) == len(local_losses) == 3, (slurm_losses, local_losses)
    assert_close(slurm_losses, local_losses, rtol=1e-5)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), job_dir / "adapter")
    saved = load_file(job_dir / "adapter" / "adapter_model.safetensors")
    loaded = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    assert saved and loaded.keys() == saved.keys(), (sorted(loaded), sorted(saved))
    assert all(torch.equal(loaded[k].to(saved[k].dtype), saved[k]) for k in saved)
    assert any(saved[k].abs().sum() > 0 for k in saved if "lora_B" in k)  # trained: B starts at zero

def _finetuning(tiny_model, tmp_path, slurm_env):
    return run_cmd([sys.executable, "-m", "shardtune.finetuning", *_train_flags(tiny_model, tmp_path)],
                   timeout=120, extra_env=slurm_env)


def test_srun_without_torchrun_is_refused(tmp_path, tiny_model):
    # what `srun --nodes 2 --ntasks-per-node 1 python -m shardtune.finetuning ...` gives each copy
    proc = _finetuning(tiny_model, tmp_path, {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2",
                                              "SLURM_PROCID": "1", "SLURM_STEP_ID": "0"})
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [l for l in proc.stderr.splitlines() if l.startswith("shardtune: error:")]
    assert len(errors) == 1, proc.stderr
    assert "srun started 2 independent copies" in errors[0] and "srun torchrun" in errors[0], errors[0]
    assert not (tmp_path / "adapter").exists()


def test_one_command_in_a_multi_task_batch_script_is_not_mistaken_for_srun(tmp_path, tiny_model):
    # The batch script of a 2-task job has SLURM_NTASKS=2 but runs a plain command once; here
    # the remaining complaint is the usual one about --enable_fsdp without torchrun.
    proc = _finetuning(tiny_model, tmp_path, {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_PROCID": "0"})
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    errors = [l for l in proc.stderr.splitlines() if l.startswith("shardtune: error:")]
    assert len(errors) == 1 and "needs a distributed launch" in errors[0], proc.stderr
