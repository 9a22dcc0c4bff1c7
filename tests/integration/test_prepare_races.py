"""Preparing a split as users run it (issue 28): a launch interrupted while it prepares, then
launched again; two jobs that prepare the same split on one host at once; a corrupt file at
the cache path. Each must end in a trained run, under real torchrun launches (2 ranks)."""
import signal
import subprocess
import time

import pytest

from conftest import SHIM, check, free_port, kill_group, start_launcher, start_torchrun


def _args(tiny_model, shared_data, out, cache, split="train"):
    return ["--enable_fsdp", "--use_peft", "--peft_method", "lora", "--model_name", str(tiny_model),
            "--dataset", "samsum_dataset", "--samsum_dataset.data_path", str(shared_data / "samsum"),
            "--samsum_dataset.train_split", split, "--output_dir", str(out), "--data_cache_dir", str(cache),
            "--batch_size_training", "2", "--context_length", "128", "--num_epochs", "1", "--max_train_step", "1",
            "--run_validation", "False", "--num_workers_dataloader", "0", "--fsdp_activation_checkpointing", "False"]


def _plain_torchrun() -> list[str]:
    # no --standalone: every such launch gets torchrun's run id "none", restart 0
    return ["--nnodes", "1", "--nproc_per_node", "2", "--master_port", str(free_port())]


def _trained(proc: subprocess.Popen, out, timeout: float = 240) -> None:
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stdout, stderr = kill_group(proc)
        pytest.fail(f"still running after {timeout}s (waiting for a preparation that never ends?):\n{stderr[-3000:]}")
    check(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    assert (out / "adapter_model.safetensors").is_file() and any((out / "checkpoints").rglob("step_000001"))


def _wait_for_first_shard(cache, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not any((cache / "data").glob("*.shards/0*.safetensors")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no shard was written"
        time.sleep(0.05)


def _packed(cache) -> list:
    """The packed split files in the cache, after checking that nothing else is left there
    (shard folders, lock files)."""
    files = sorted((cache / "data").iterdir())
    assert all(f.suffix == ".safetensors" for f in files), files
    return files


@pytest.fixture(scope="module")
def relaunched(tmp_path_factory, tiny_model, shared_data):
    """SAMSum train (8 shards) prepared by a launch that is interrupted (Ctrl-C) once its
    first shard is written, then by the same command again: (cache, out, what the interrupted
    launch left, the relaunch)."""
    root = tmp_path_factory.mktemp("relaunch")
    cache, out = root / "cache", root / "out"
    first = start_launcher(_plain_torchrun(), SHIM, _args(tiny_model, shared_data, out, cache))
    _wait_for_first_shard(cache, first)
    kill_group(first, signal.SIGINT)
    left = sorted(p.name for p in (cache / "data").rglob("*"))
    return cache, out, left, start_launcher(_plain_torchrun(), SHIM, _args(tiny_model, shared_data, out, cache))


def test_a_launch_interrupted_while_preparing_is_launched_again(relaunched):
    cache, out, left, second = relaunched
    assert any(name.startswith("failed-") for name in left), left  # it stopped inside preparation
    _trained(second, out)
    assert len(_packed(cache)) == 1


def test_a_corrupt_cache_file_is_rebuilt_by_every_rank(tmp_path, tiny_model, shared_data):
    from shardtune.commands.prepare import main as prepare

    args = _args(tiny_model, shared_data, tmp_path / "out", tmp_path / "cache", split="validation")
    assert prepare(args) == 0  # the cache filled ahead of the run, in this process
    (path,) = _packed(tmp_path / "cache")
    good = path.read_bytes()
    path.write_bytes(b"\x00garbage")
    _trained(start_torchrun(2, SHIM, args), tmp_path / "out")
    assert path.read_bytes() == good


def test_two_jobs_preparing_one_split_on_one_host(tmp_path, tiny_model, shared_data):
    cache, outs = tmp_path / "cache", [tmp_path / "a", tmp_path / "b"]
    jobs = [start_torchrun(2, SHIM, _args(tiny_model, shared_data, out, cache)) for out in outs]
    for job, out in zip(jobs, outs):
        _trained(job, out)
    assert len(_packed(cache)) == 1
