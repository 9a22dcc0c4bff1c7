"""The benchmark harness cannot rot: its driver, in quick mode, runs shardtune and the
hand-written loop on a micro Llama (Llama 2 tokenizer, real SAMSum) and emits well-formed
results that agree with each other."""
from __future__ import annotations

import json
import math
import sys

from conftest import REPO, check, run_cmd, assert_close


def test_quick_bench_emits_results(tmp_path, shared_data):
    work = tmp_path / "work"
    proc = check(run_cmd([sys.executable, "-m", "benchmarks.bench", "--quick", "--sizes", "micro",
                          "--runners", "shardtune,handloop", "--sections", "throughput", "--threads", "1",
                          "--dialogues", "80", "--work", str(work)], timeout=900))
    rows = [json.loads(line) for line in (work / "results" / "throughput.jsonl").read_text().splitlines()]
    assert sorted(r["runner"] for r in rows) == ["handloop", "shardtune"], proc.stdout[-2000:]
    for row in rows:
        assert row["size"] == "micro" and row["steps"] == 4 and row["timed_steps"] >= 1
        for key in ("s_per_step", "tokens_per_s", "all_tokens_per_s", "process_s", "peak_rss_mib"):
            assert math.isfinite(row[key]) and row[key] > 0, (key, row)
        assert row["all_tokens_per_s"] >= row["tokens_per_s"]
        assert row["process_s"] > row["s_per_step"] * row["timed_steps"]
    by_runner = {r["runner"]: r for r in rows}
    # Same weights, same packed batches, LoRA's B starts at zero: step 1 is the base model's
    # loss on the same tokens, computed by two independent loops.
    assert_close(by_runner["shardtune"]["first_loss"], by_runner["handloop"]["first_loss"], rtol=1e-4)
    report = (work / "results" / "report.md").read_text()
    assert "## Throughput" in report and "| micro | shardtune |" in report


def test_gpu_check_script_runs_its_path_on_cpu(tmp_path):
    """benchmarks/gpu_check.sh is meant for a lent GPU; --smoke takes the same path (model
    build, data, a torchrun rank under FSDP2 with its metrics read back, the attention
    comparison) with a micro model on CPU, so the script is known to work before a GPU is
    ever lent. The other training steps differ only in their flags; the tests step only in
    its pytest command."""
    check(run_cmd(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--smoke", "--out", str(tmp_path),
                   "--work", str(tmp_path / "work"), "--only", "perf_eager,attention_paths"],
                  timeout=600, extra_env={"PYTHON": sys.executable}))
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = {step["name"]: step for step in report["steps"]}
    assert list(steps) == ["environment", "assets", "attention_paths", "perf_eager"]
    assert all(step["status"] == "ok" for step in steps.values()), report
    perf = steps["perf_eager"]["figures"]
    assert perf["tokens_per_s"] > 0 and math.isfinite(perf["final_loss"])
    attention = steps["attention_paths"]["figures"]
    assert attention["per_example_max_diff_grad"] <= 1e-4 and attention["packed_max_diff_out"] <= 1e-5
    assert "| perf_eager | ok |" in (tmp_path / "gpu_check.md").read_text()
