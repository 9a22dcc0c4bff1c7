"""device.teardown really ends the process group: gloo's worker threads are joined, so none
is left to release a tensor while the interpreter shuts down (which aborts the process)."""
import json
import sys

import pytest

from conftest import REPO, check, torchrun


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads in /proc/self/task")
def test_teardown_joins_the_process_group_threads(tmp_path, tiny_model):
    check(torchrun(2, REPO / "tests" / "workers" / "teardown_probe.py", [str(tmp_path), str(tiny_model)]))
    for rank in (0, 1):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert r["got"] == "hello"
        assert r["during"] > r["before"]  # the group's threads were running
        assert r["after"] == r["before"], r
