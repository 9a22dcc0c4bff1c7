"""The benchmark harness cannot rot: its driver, in quick mode, runs shardtune and the
hand-written loop on a micro Llama (Llama 2 tokenizer, real SAMSum) and emits well-formed
results that agree with each other."""
from __future__ import annotations

import json
import math
import sys

from conftest import REPO, check, run_cmd


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
    assert abs(by_runner["shardtune"]["first_loss"] - by_runner["handloop"]["first_loss"]) < 1e-4
    report = (work / "results" / "report.md").read_text()
    assert "## Throughput" in report and "| micro | shardtune |" in report
