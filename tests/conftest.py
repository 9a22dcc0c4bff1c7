"""Shared fixtures: a tiny HF Llama built at test time, the real data in ../shared/data,
and a helper that launches real torchrun process groups on CPU (gloo)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SHARDTUNE_SHARED_DATA", REPO.parent / "shared" / "data"))
SHIM = REPO / "llama_finetuning.py"


def _env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", SHARDTUNE_DEVICE="cpu")
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_cmd(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, env=_env(), timeout=timeout, cwd=REPO)


def torchrun(nproc: int, script: str | Path, args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
           "--nproc_per_node", str(nproc), str(script), *args]
    return run_cmd(cmd, timeout)


def python(script: str | Path, args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    return run_cmd([sys.executable, str(script), *args], timeout)


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-6000:]}"
    return proc


def read_metrics(out_dir: Path) -> tuple[list[dict], list[dict]]:
    lines = [json.loads(l) for l in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [l for l in lines if l["event"] == "step"], [l for l in lines if l["event"] == "epoch"]


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Tokenization caches of test runs stay out of the user's ~/.cache."""
    os.environ["SHARDTUNE_CACHE"] = str(tmp_path_factory.mktemp("shardtune-cache"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "samsum" / "train.json").is_file():
        pytest.fail(f"real test data not found at {SHARED_DATA}; CI provides ../shared/data beside the clone")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """Tiny Llama, briefly pretrained on the bundled text so that fine-tuning has signal."""
    from shardtune.tiny import build_tiny

    return build_tiny(str(tmp_path_factory.mktemp("tiny") / "model"), pretrain_steps=200)


@pytest.fixture(scope="session")
def tiny_llama2_tok(tmp_path_factory, shared_data) -> Path:
    """A tiny model that uses the real Llama 2 tokenizer (vocab 32000)."""
    from shardtune.tiny import build_tiny

    return build_tiny(str(tmp_path_factory.mktemp("tiny2") / "model"), tokenizer=str(shared_data / "tokenizers" / "llama2"))
