"""Model loading under FSDP2: each rank reads only its own rows of every tensor."""
import json

from conftest import REPO, check, torchrun


def test_each_rank_reads_only_its_rows_and_gets_the_right_ones(tiny_model):
    """3 ranks: hidden 64 and 32-row k/v projections split unevenly (22/22/20, 11/11/10), on a
    1-D mesh and on a (1, 3) HSDP mesh (Replicate, Shard(0)). Every shard equals the one
    distribute_tensor cuts from the whole tensor, and every one was read as a row slice."""
    proc = check(torchrun(3, REPO / "tests" / "workers" / "load_probe.py", [str(tiny_model)]))
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["rank"] for r in reports) == [0, 1, 2]
    for report in reports:
        for strategy in ("FULL_SHARD", "HYBRID_SHARD"):
            result = report[strategy]
            assert result["mismatched"] == [], (strategy, report["rank"])
            assert result["sliced"] == result["params"] > 0, (strategy, result)
            assert result["uneven"] > 0  # the uneven split is exercised
