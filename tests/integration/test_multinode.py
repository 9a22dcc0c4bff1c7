"""Two "nodes" on one machine: two torchrun launches that meet by c10d rendezvous on
127.0.0.1, HYBRID_SHARD inside each; and failures that end runs instead of hanging them."""
import json
import re
import socket
import time

import pytest

from conftest import (REPO, SHIM, assert_close, check, error_lines, free_port, kill_group, python, start_launcher,
                      step_losses, torchrun, wait_for_file)

FAULT = REPO / "tests" / "workers" / "fault_probe.py"
STEPS = 4
FLAGS = ["--enable_fsdp", "--use_peft", "--peft_method", "lora", "--lora_config.lora_dropout", "0",
         "--num_epochs", "1", "--max_train_step", str(STEPS), "--context_length", "128", "--batch_size_training", "1",
         "--num_workers_dataloader", "0", "--save_metrics", "--log_every", "1", "--run_validation", "False",
         "--save_steps", "2", "--lr", "1e-2", "--fsdp_activation_checkpointing", "False"]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _two_nodes(script, args, rdzv_id):
    """Node launches as a user types them on two machines, here both on 127.0.0.1. The
    first hosts the rendezvous store (as the head node does); the second starts once it
    listens, so which node hosts it is known."""
    port = free_port()
    launcher = ["--nnodes", "2", "--nproc_per_node", "2", "--rdzv_backend", "c10d",
                "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", rdzv_id]
    head = start_launcher(launcher, script, args)
    deadline = time.monotonic() + 120
    while not _listening(port) and head.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    return [head, start_launcher(launcher, script, args)]


def _wait_all(procs, timeout=300):
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        results.append((proc.returncode, out, err))
    return results


@pytest.fixture(scope="module")
def four_rank_reference(tmp_path_factory, tiny_model):
    """One node, 4 ranks, FULL_SHARD: itself equal to one plain process (global batch 4)."""
    root = tmp_path_factory.mktemp("mn")
    check(torchrun(4, SHIM, FLAGS + ["--model_name", str(tiny_model), "--output_dir", str(root / "ref")]))
    one = [a for a in FLAGS if a != "--enable_fsdp"] + ["--batch_size_training", "4"]
    check(python(SHIM, one + ["--model_name", str(tiny_model), "--output_dir", str(root / "one")]))
    losses, single = step_losses(root / "ref"), step_losses(root / "one")
    assert sorted(losses) == sorted(single) == list(range(1, STEPS + 1))
    assert_close(losses, single, rtol=1e-5)
    return losses


def test_two_nodes_hybrid_shard_match_one_node_full_shard(tmp_path, tiny_model, four_rank_reference):
    out = tmp_path / "out"
    args = FLAGS + ["--model_name", str(tiny_model), "--output_dir", str(out), "--sharding_strategy", "HYBRID_SHARD"]
    for rc, _, err in _wait_all(_two_nodes(SHIM, args, "hsdp")):
        assert rc == 0, err[-4000:]
    losses = step_losses(out)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert_close(losses, four_rank_reference, rtol=1e-5)


def test_a_dead_node_ends_the_other_and_resume_continues(tmp_path, tiny_model, four_rank_reference):
    out, marks = tmp_path / "out", tmp_path / "marks"
    marks.mkdir()
    args = FLAGS + ["--model_name", str(tiny_model), "--output_dir", str(out), "--sharding_strategy", "HYBRID_SHARD"]
    nodes = _two_nodes(FAULT, [json.dumps({"pause_at": 3, "dir": str(marks)})] + args, "dead")
    wait_for_file(marks / "paused", nodes[0])
    kill_group(nodes[1])  # the whole second node: its launcher and both ranks
    (marks / "release").write_text("")
    start = time.monotonic()
    (rc, _, err), = _wait_all(nodes[:1], timeout=120)
    assert time.monotonic() - start < 60 and rc != 0
    errors = error_lines(err)
    assert errors and all(l.startswith("shardtune: error: [rank ") for l in errors), err[-4000:]
    # the next launch of both nodes continues from the step-2 checkpoint
    for rc, _, err in _wait_all(_two_nodes(SHIM, args + ["--resume", "auto"], "dead2")):
        assert rc == 0, err[-4000:]
    losses = step_losses(out)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert_close(losses, four_rank_reference, rtol=1e-5)


def test_a_failing_rank_ends_every_rank_with_its_error(tmp_path, tiny_model):
    out = tmp_path / "out"
    start = time.monotonic()
    proc = torchrun(2, FAULT, [json.dumps({"raise_at": 3, "rank": 1})]
                    + FLAGS + ["--model_name", str(tiny_model), "--output_dir", str(out)], timeout=120)
    assert time.monotonic() - start < 60 and proc.returncode != 0
    errors = error_lines(proc.stderr)
    assert any(l.startswith("shardtune: error: [rank 1 on ") and "injected failure at step 3" in l for l in errors), \
        proc.stderr[-4000:]


@pytest.mark.parametrize("strategy", ["HYBRID_SHARD", "NO_SHARD"])
def test_dist_timeout_reaches_the_mesh_sub_groups(strategy):
    proc = check(torchrun(2, REPO / "tests" / "workers" / "mesh_probe.py", ["77", strategy]))
    # both ranks print to one stdout: find each object, wherever the lines met
    timeouts = [json.loads(obj) for obj in re.findall(r"\{[^{}]*\}", proc.stdout)]
    assert timeouts == [{"replicate": 77.0, "shard": 77.0}] * 2
