"""device.teardown really ends the process group: gloo's worker threads end, so none is
left to release a tensor while the interpreter shuts down (which aborts the process,
"terminate called without an active exception", after an otherwise successful run).
The probe waits (bounded) for the threads to finish rather than counting them once:
with either half of the teardown fix removed they never finish, and the test fails."""
import json
import sys

import pytest

from conftest import REPO, check, torchrun

PROBE = REPO / "tests" / "workers" / "teardown_probe.py"
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads in /proc/self/task")


def _results(tmp_path):
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


@linux_only
def test_teardown_ends_the_group_when_fsdp_is_imported_late(tmp_path, tiny_model):
    check(torchrun(2, PROBE, [str(tmp_path), "tokenizer", str(tiny_model)]))
    for r in _results(tmp_path):
        assert r["got"] == "hello" and r["during"] > 0  # the group's threads were running
        assert not r["initialized_after"] and r["after"] == 0, r


@linux_only
def test_teardown_ends_the_group_after_an_fsdp_run(tmp_path, tiny_model):
    out = tmp_path / "adapter"
    check(torchrun(2, PROBE, [str(tmp_path), "finetune", "--enable_fsdp", "--use_peft", "--peft_method", "lora",
                              "--model_name", str(tiny_model), "--output_dir", str(out), "--num_epochs", "1",
                              "--max_train_step", "2", "--max_eval_step", "1", "--batch_size_training", "1",
                              "--context_length", "128", "--num_workers_dataloader", "0"]))
    assert (out / "adapter_model.safetensors").is_file()
    for r in _results(tmp_path):
        assert r["rc"] == 0 and not r["initialized_after"] and r["after"] == 0, r
