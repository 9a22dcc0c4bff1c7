"""Shared fixtures: a tiny HF Llama and tiny models of other families built at test time,
the real data in ../shared/data,
a helper that launches real torchrun process groups on CPU (gloo), and a real two-node
slurm cluster on this machine."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SHARDTUNE_SHARED_DATA", REPO.parent / "shared" / "data"))
SHIM = REPO / "llama_finetuning.py"



# session fixtures that start real processes: a test that uses one is an integration test
LAUNCHING_FIXTURES = {"tiny_lora", "slurm_cluster"}


def pytest_collection_modifyitems(items) -> None:
    """Tests that start real processes (torchrun, slurm, kill and resume) are marked
    `integration`, so `pytest -m "not integration"` is the quick loop: every test under
    tests/integration/, every test that uses a launching fixture, and the few marked by hand.
    CI runs both."""
    for item in items:
        if (Path(str(item.fspath)).parent.name == "integration"
                or LAUNCHING_FIXTURES & set(getattr(item, "fixturenames", ()))):
            item.add_marker(pytest.mark.integration)

def _env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", SHARDTUNE_DEVICE=os.environ.get("SHARDTUNE_TEST_DEVICE", "cpu"))
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def subprocess_env(extra: dict | None = None) -> dict:
    """The environment test subprocesses run in, plus `extra`."""
    return {**_env(), **(extra or {})}


def run_cmd(args: list[str], timeout: int = 600, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, env=subprocess_env(extra_env),
                          timeout=timeout, cwd=REPO)


def torchrun(nproc: int, script: str | Path, args: list[str], timeout: int = 600,
             extra_env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
           "--nproc_per_node", str(nproc), str(script), *args]
    return run_cmd(cmd, timeout, extra_env)


def python(script: str | Path, args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    return run_cmd([sys.executable, str(script), *args], timeout)


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-6000:]}"
    return proc


def assert_close(actual, expected, rtol: float, atol: float = 0.0, where: str = "") -> None:
    """|a - b| <= atol + rtol * max(|a|, |b|) for every number, pairing floats, lists and dicts
    (same keys) element by element: floats are compared relative to their size, so a tolerance
    that holds for a loss near 0.02 also holds for a reward near 4 or a log-probability near -300."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), f"{where}: {actual} vs {expected}"
        for k in expected:
            assert_close(actual[k], expected[k], rtol, atol, f"{where}[{k!r}]")
        return
    if isinstance(expected, (list, tuple)):
        assert isinstance(actual, (list, tuple)) and len(actual) == len(expected) > 0, f"{where}: {actual} vs {expected}"
        for i, (a, b) in enumerate(zip(actual, expected)):
            assert_close(a, b, rtol, atol, f"{where}[{i}]")
        return
    a, b = float(actual), float(expected)
    assert abs(a - b) <= atol + rtol * max(abs(a), abs(b)), f"{where}: {a!r} vs {b!r} (rtol {rtol}, atol {atol})"


def metric_events(out_dir: Path, event: str | None = None) -> list[dict]:
    """The records of out_dir/metrics.jsonl (read as shardtune plot reads them), all or those of one event."""
    from shardtune.metrics.logs import read_metrics as read_records

    return [r for r in read_records(Path(out_dir) / "metrics.jsonl") if event is None or r["event"] == event]


def read_metrics(out_dir: Path) -> tuple[list[dict], list[dict]]:
    return metric_events(out_dir, "step"), metric_events(out_dir, "epoch")


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
def llama2_tok(shared_data):
    """The real Llama 2 tokenizer (vocab 32000) as the hub ships it; shared by every test, so
    none may change it (copy.deepcopy it first)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(shared_data / "tokenizers" / "llama2")


@pytest.fixture(scope="session")
def preference_files(tmp_path_factory, shared_data) -> dict[str, Path]:
    """Small preference_dataset files derived from the real corpora by data.preference_pairs:
    "grammar" (the first 40 JFLEG dev pairs) and "samsum" (the first 40 SAMSum val pairs)."""
    from shardtune.data.preference_pairs import jfleg_preferences, samsum_preferences, write_jsonl

    out = tmp_path_factory.mktemp("preference")
    write_jsonl(out / "grammar.jsonl", jfleg_preferences(shared_data / "jfleg")[:40])
    write_jsonl(out / "samsum.jsonl", samsum_preferences(shared_data / "samsum" / "val.json")[:40])
    return {"grammar": out / "grammar.jsonl", "samsum": out / "samsum.jsonl"}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """Tiny Llama, briefly pretrained on the bundled text so that fine-tuning has signal."""
    from shardtune.modeling.tiny import build_tiny

    return build_tiny(str(tmp_path_factory.mktemp("tiny") / "model"), pretrain_steps=200)


@pytest.fixture(scope="session")
def tiny_llama2_tok(tmp_path_factory, shared_data) -> Path:
    """A tiny model that uses the real Llama 2 tokenizer (vocab 32000)."""
    from shardtune.modeling.tiny import build_tiny

    return build_tiny(str(tmp_path_factory.mktemp("tiny2") / "model"), tokenizer=str(shared_data / "tokenizers" / "llama2"))


@pytest.fixture(scope="session")
def tiny_lora(tmp_path_factory, tiny_model) -> Path:
    """A LoRA adapter for tiny_model, trained for 8 steps in one process on the bundled sample."""
    out = tmp_path_factory.mktemp("tiny_lora") / "adapter"
    check(run_cmd([sys.executable, "-m", "shardtune.finetuning", "--model_name", str(tiny_model), "--use_peft",
                   "--peft_method", "lora", "--output_dir", str(out), "--batch_size_training", "2",
                   "--context_length", "256", "--num_epochs", "1", "--max_train_step", "8", "--lr", "1e-2",
                   "--run_validation", "False", "--num_workers_dataloader", "0"]))
    return out


@pytest.fixture(scope="session")
def tiny_nf4_model(tmp_path_factory) -> Path:
    """Tiny Llama whose decoder-layer linear weights fit NF4's 64 x 256 blocks when split
    over 2 ranks (every projection 256 x 256 or 512 x 256). Its attention projections have
    biases (as Qwen2's do): a frozen NF4 weight beside a bias is loaded too."""
    from shardtune.modeling.tiny import build_tiny

    return build_tiny(str(tmp_path_factory.mktemp("tiny_nf4") / "model"), hidden_size=256, intermediate_size=512,
                      num_heads=4, num_kv_heads=4, pretrain_steps=50, attention_bias=True)


def examples_in_chunk(chunk) -> list[tuple]:
    """Split a packed chunk back into its (input_ids, labels) examples at the position_id resets."""
    pos = chunk["position_ids"].tolist()
    starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
    return [(chunk["input_ids"][a:b], chunk["labels"][a:b]) for a, b in zip(starts, starts[1:])]


def plain_loop_losses(model, chunks, steps: int, global_batch: int, lr: float, weight_decay: float,
                      seed: int) -> list[float]:
    """An independent reference for shardtune's loop: a plain (PEFT) model in one process,
    every example unpacked and on its own, the documented global sample order (a seeded
    permutation of the chunks), loss = summed token losses / target tokens of the step,
    torch.optim.AdamW."""
    import torch
    import torch.nn.functional as F

    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    order = torch.randperm(len(chunks), generator=torch.Generator().manual_seed(seed)).tolist()
    losses = []
    for step in range(steps):
        total, count = 0.0, 0
        opt.zero_grad()
        for idx in order[step * global_batch:(step + 1) * global_batch]:
            for ids, labels in examples_in_chunk(chunks[idx]):
                logits = model(input_ids=ids[None]).logits[0]
                total = total + F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum")
                count += int((labels[1:] != -100).sum())
        loss = total / count
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# Tiny random-init models of today's families, as AutoConfig.for_model builds them.
FAMILIES = {
    # Llama 3.1/3.2: grouped-query attention, llama3 RoPE scaling, tied embeddings (as 3.2 1B/3B)
    "llama3": ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                              "original_max_position_embeddings": 8192},
                         "max_position_embeddings": 131072, "tie_word_embeddings": True}),
    "mistral": ("mistral", {}),
    "qwen3": ("qwen3", {}),  # per-head RMSNorm on queries and keys
    "gemma": ("gemma", {}),  # embeddings scaled by sqrt(hidden) (a non-persistent buffer), tied head
}


def build_family_model(family: str, out: Path, tokenizer) -> Path:
    model_type, extra = FAMILIES[family]
    from transformers import AutoConfig, AutoModelForCausalLM
    import torch

    config = AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=None, **extra)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def family_models(tmp_path_factory):
    """family name -> a tiny model directory of that family (built on first use, once per session),
    with shardtune's tiny tokenizer."""
    from shardtune.modeling.tiny import train_tokenizer

    built: dict[str, Path] = {}
    tokenizer = []

    def get(family: str) -> Path:
        if family not in built:
            if not tokenizer:
                tokenizer.append(train_tokenizer())
            built[family] = build_family_model(family, tmp_path_factory.mktemp("families") / family, tokenizer[0])
        return built[family]

    return get


@pytest.fixture(scope="session", params=list(FAMILIES))
def family_model(request, family_models) -> Path:
    """Parametrized over FAMILIES; the directory's name is the family."""
    return family_models(request.param)


# Meta's Llama 3 chat template, with {% generation %} around what assistant-only training
# trains, so transformers' return_assistant_tokens_mask gives an independent label reference.
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{%- else %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def llama3_chat_tokenizer(chat_template: bool = True):
    """shardtune's tiny byte-level BPE with Llama 3's special tokens (bos <|begin_of_text|>,
    eos <|eot_id|>, as Llama 3.1 instruct) and, unless told otherwise, its chat template."""
    from shardtune.modeling.tiny import train_tokenizer

    tok = train_tokenizer()
    tok.add_special_tokens({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                            "additional_special_tokens": ["<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"]})
    tok.chat_template = LLAMA3_CHAT_TEMPLATE if chat_template else None
    return tok


@pytest.fixture(scope="session")
def llama3_chat_model(tmp_path_factory) -> Path:
    """A tiny Llama 3 family model whose tokenizer.json has Llama 3's special tokens and chat template."""
    return build_family_model("llama3", tmp_path_factory.mktemp("llama3-chat"), llama3_chat_tokenizer())


def _slurm_helper():
    spec = importlib.util.spec_from_file_location("slurm_cluster", REPO / "tests" / "slurm" / "cluster.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def slurm_cluster():
    """A real two-node slurm cluster on this machine (tests/slurm/cluster.py: installs Debian's
    slurm-wlm and munge when missing). Skips the test, with the daemons' last log lines, when
    slurm cannot run here; stops its daemons and removes its directory afterwards."""
    helper = _slurm_helper()
    root = Path(tempfile.mkdtemp(prefix="shardtune-slurm-"))  # short: munge's socket path
    cluster = helper.Cluster(root)
    try:
        try:
            cluster.start()
        except helper.Unavailable as err:
            pytest.skip(f"cannot start a real slurm cluster here: {err}")
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def start_launcher(launcher_args: list[str], script: str | Path, args: list[str]) -> subprocess.Popen:
    """torchrun with these launcher flags, in the background; kill_group ends it and its
    ranks at once, as a lost node would."""
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher_args, str(script), *args]
    return subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def free_port() -> int:
    """A TCP port free on this host now (for torchrun's --master_port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_torchrun(nproc: int, script: str | Path, args: list[str]) -> subprocess.Popen:
    return start_launcher(["--standalone", "--nnodes", "1", "--nproc_per_node", str(nproc)], script, args)


def start_python(script: str | Path, args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(script), *args], env=_env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _descendants(pid: int) -> list[int]:
    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> tuple[str, str]:
    """Signal the launcher and every process under it (torchrun starts each rank in a
    session of its own, so a process-group kill would miss them)."""
    for pid in [proc.pid, *_descendants(proc.pid)]:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    return proc.communicate(timeout=120)


def wait_for_file(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Until `path` exists; fails early (with the process's output) if the process ends first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"process ended (exit {proc.returncode}) before {path.name} appeared:\n{out[-3000:]}\n{err[-5000:]}")
        if time.monotonic() > deadline:
            kill_group(proc)
            pytest.fail(f"{path.name} did not appear within {timeout}s")
        time.sleep(0.05)


def step_losses(out_dir: Path) -> dict[int, float]:
    steps, _ = read_metrics(out_dir)
    return {s["step"]: s["loss"] for s in steps}


def run_cli(capsys, args: list[str]) -> tuple[int, str, str]:
    """`shardtune ARGS` in this process: (exit code, stdout, stderr)."""
    from shardtune import cli

    capsys.readouterr()
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def plain_greedy(model, tokenizer, prompt_ids: list[int], max_new_tokens: int) -> str:
    """Greedy completion with plain transformers generate(), as a reference."""
    import torch

    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def error_lines(stderr: str) -> list[str]:
    """shardtune's error lines, also where one follows another rank's progress bar on the
    shared terminal line."""
    marker = "shardtune: error:"
    return [line[line.index(marker):] for line in stderr.splitlines() if marker in line]


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] of every scalar in a TensorBoard log directory, read back with
    tensorboard's own EventAccumulator."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def wandb_offline_run(wandb_dir: Path) -> tuple[object, dict[int, dict[str, float]]]:
    """(run record, {step: {key: value}}) of the one offline run under WANDB_DIR."""
    (run_file,) = Path(wandb_dir).glob("wandb/offline-run-*/run-*.wandb")
    return read_wandb_run(run_file)


def read_wandb_run(run_file: Path) -> tuple[object, dict[int, dict[str, float]]]:
    """(run record, {step: {key: value}}) of an offline run-ID.wandb file, parsed with wandb's
    own protobuf Record. wandb ships no Python reader for the file: it is a LevelDB-style
    log, a 7-byte header (":W&B", magic, version) then 32 KiB blocks of chunks, each with a
    7-byte header (crc32c, little-endian length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", f"{run_file} does not start with wandb's header"
    block, pos, parts, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's zero-filled tail
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            records.append(record)
            parts = b""
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    history: dict[int, dict[str, float]] = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            row = history.setdefault(record.history.step.num, {})
            for item in record.history.item:
                row[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return run, history
