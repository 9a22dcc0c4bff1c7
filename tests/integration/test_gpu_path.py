"""The GPU path's properties that CPU/gloo can show, two real FSDP2 ranks per launch
(tests/workers/gpu_path_probe.py observes the run from inside): no host sync in a step
that does not log, gradient reduction per micro-batch by what trains, and frozen weights
in the compute dtype under mixed precision."""
import json

import pytest

from conftest import REPO, check, torchrun

PROBE = REPO / "tests" / "workers" / "gpu_path_probe.py"


COMMON = ["--enable_fsdp", "--num_epochs", "1", "--num_workers_dataloader", "0", "--context_length", "128",
          "--run_validation", "False", "--save_model", "False", "--fsdp_activation_checkpointing", "False",
          "--max_train_step", "4", "--log_every", "100",  # only the end of the run logs
          "--batch_size_training", "4", "--micro_batch_size", "2"]
RUNS = {"lora": ["--use_peft", "--peft_method", "lora", "--mixed_precision", "True"], "full": []}


@pytest.fixture(scope="module")
def probed(tmp_path_factory, tiny_model) -> dict[str, list[dict]]:
    """Both runs in one launch: method -> each rank's record."""
    tmp = tmp_path_factory.mktemp("gpu_path")
    argv = []
    for method, flags in RUNS.items():
        argv += ["--then"] * bool(argv) + [str(tmp / method), "--model_name", str(tiny_model),
                                           "--output_dir", str(tmp / f"out_{method}"), *COMMON, *flags]
    check(torchrun(2, PROBE, argv))
    return {method: [json.loads((tmp / f"{method}.rank{r}.json").read_text()) for r in range(2)] for method in RUNS}


@pytest.mark.parametrize("method", list(RUNS))
def test_steps_without_logging_make_no_host_sync_and_reduce_by_what_trains(method, probed):
    lora = method == "lora"
    for rank in probed[method]:
        assert rank["steps"] == 4
        # steps 1-3 end to step 4's backward: .item() on the stop flag or loss, transformers'
        # packed-sequence check, ... would each show here
        assert rank["host_syncs"] == {}
        calls = rank["grad_sync"]  # from step 2 on: 3 steps x 2 micro-batches
        if lora:
            # the adapter's unsharded gradients wait for the last micro-batch: one reduce per step
            assert calls == [["set_requires_gradient_sync", last] for _ in range(3) for last in (False, True)]
            # mixed precision: the frozen base in bf16, the adapter in fp32 master weights
            assert set(rank["dtypes"]) == {"bfloat16 frozen", "float32 trainable"}, rank["dtypes"]
        else:
            # full fine-tuning reduce-scatters every micro-batch; only HSDP's all-reduce waits
            assert calls == [call for _ in range(3) for last in (False, True)
                             for call in (["set_requires_gradient_sync", True], ["set_requires_all_reduce", last])]
            assert set(rank["dtypes"]) == {"float32 trainable"}, rank["dtypes"]
