"""Data preparation at scale: shardtune's sharded preparation against `datasets.map(batched=True)`
with the same tokenizer and template, and a training rank's RSS at 1x and 20x corpus.

The corpus is SAMSum train repeated COPIES times, one line of each dialogue varied per copy
(so no two records are equal), written as JSON lines to a scratch directory at benchmark
time; it is never committed. Every measured run is its own process, started in turn
(shardtune, datasets, shardtune, ...), and reported as the median of --repeats runs; peak
RSS is the largest process of the run (os.wait4's ru_maxrss, children included).

    python benchmarks/data_prep.py prep --copies 10 --procs 1,2 --repeats 3
    python benchmarks/data_prep.py train_rss --copies 1,20 [--in_run]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SHARDTUNE_SHARED_DATA", REPO.parent / "shared" / "data"))
TOKENIZER = SHARED / "tokenizers" / "llama2"
SCRATCH = Path(os.environ.get("BENCH_SCRATCH", tempfile.gettempdir())) / "shardtune-data-bench"
ENV = {**os.environ, "PYTHONPATH": str(REPO / "src"), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
       "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


def corpus(copies: int) -> Path:
    """SAMSum train x copies as JSON lines: copy k's dialogues start with a line naming k."""
    out = SCRATCH / f"samsum-x{copies}"
    if (out / "train.jsonl").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    records = json.loads((SHARED / "samsum" / "train.json").read_text())
    tmp = out / "train.jsonl.tmp"
    with open(tmp, "w") as f:
        for k in range(copies):
            for r in records:
                f.write(json.dumps({"id": f"{r['id']}-{k}", "dialogue": f"(Chat log {k}, kept for review)\n{r['dialogue']}",
                                    "summary": r["summary"]}) + "\n")
    os.replace(tmp, out / "train.jsonl")
    (out / "val.json").write_text((SHARED / "samsum" / "val.json").read_text())
    return out


def _flags(data: Path, cache: Path) -> list[str]:
    return ["--model_name", str(TOKENIZER), "--samsum_dataset.data_path", str(data), "--context_length", "4096",
            "--run_validation", "False", "--data_cache_dir", str(cache)]


def run_shardtune(data: Path, procs: int) -> dict:
    """One `shardtune prepare --num_proc N` into an empty cache; records/s and tokens/s."""
    from shardtune.commands.prepare import prepare_splits
    from shardtune.data import build_split
    from shardtune.config.parse import parse_args
    from shardtune.modeling.load import load_tokenizer

    cache = Path(tempfile.mkdtemp(dir=SCRATCH))
    start = time.perf_counter()
    prepare_splits(["--num_proc", str(procs), *_flags(data, cache)])
    seconds = time.perf_counter() - start
    stats = build_split(parse_args(_flags(data, cache)), load_tokenizer(str(TOKENIZER)), "train").stats
    shutil.rmtree(cache)
    return {"seconds": seconds, "records": stats.examples, "tokens": stats.tokens}


def run_datasets(data: Path, procs: int) -> dict:
    """load_dataset(json) + map(batched=True, num_proc=N): the same prompt, tokenizer and labels."""
    import datasets
    from transformers import AutoTokenizer

    from shardtune.data.samsum import PROMPT
    from shardtune.data.tokenize import tokenize_prompt_target

    cache = tempfile.mkdtemp(dir=SCRATCH)
    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    start = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=str(data / "train.jsonl"), split="train", cache_dir=cache)

    def encode(batch: dict) -> dict:
        ex = tokenize_prompt_target(tok, [PROMPT.format(dialog=d) for d in batch["dialogue"]], batch["summary"])
        return {"input_ids": [e["input_ids"] for e in ex], "labels": [e["labels"] for e in ex]}

    ds = ds.map(encode, batched=True, num_proc=procs if procs > 1 else None, remove_columns=ds.column_names)
    seconds = time.perf_counter() - start
    tokens, records = sum(len(x) for x in ds.with_format("numpy")["input_ids"]), len(ds)
    del ds
    shutil.rmtree(cache)
    return {"seconds": seconds, "records": records, "tokens": int(tokens)}


def _measured(args: list[str]) -> dict:
    """Run this script's subcommand in a child; its JSON result plus the peak RSS."""
    proc = subprocess.Popen([sys.executable, __file__, *args], env=ENV, stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status:
        raise SystemExit(f"{args} failed ({status})")
    return {**json.loads(out.strip().splitlines()[-1]), "peak_rss_mib": usage.ru_maxrss / 1024,
            "cpu_s": usage.ru_utime + usage.ru_stime}


def prep(copies: int, procs: list[int], repeats: int) -> None:
    data = corpus(copies)
    runs: dict[tuple, list[dict]] = {}
    for _ in range(repeats):
        for n in procs:
            for impl in ("shardtune", "datasets"):
                runs.setdefault((impl, n), []).append(_measured([f"one_{impl}", str(data), str(n)]))
    print(f"corpus: SAMSum train x{copies}; median of {repeats} runs\n")
    print("| implementation | processes | seconds (runs) | records/s | tokens/s | CPU s | peak RSS MiB (max process) |")
    print("|---|---|---|---|---|---|---|")
    for (impl, n), rs in sorted(runs.items(), key=lambda kv: (kv[0][1], kv[0][0] != "shardtune")):
        s = statistics.median(r["seconds"] for r in rs)
        each = ", ".join(f"{r['seconds']:.1f}" for r in rs)
        print(f"| {impl} | {n} | {s:.1f} ({each}) | "
              f"{rs[0]['records'] / s:,.0f} | {rs[0]['tokens'] / s:,.0f} | "
              f"{statistics.median(r['cpu_s'] for r in rs):.1f} | "
              f"{statistics.median(r['peak_rss_mib'] for r in rs):,.0f} |")


TRAIN_FLAGS = ["--enable_fsdp", "--use_peft", "--peft_method", "lora", "--batch_size_training", "4",
               "--context_length", "4096", "--num_epochs", "1", "--max_train_step", "10", "--run_validation", "False",
               "--save_model", "False", "--num_workers_dataloader", "0", "--save_metrics"]


def train_rss(copies_list: list[int], in_run: bool = False) -> None:
    """Per-rank peak RSS of a 2-rank training run (tiny model, llama2 tokenizer) whose train
    split was prepared beforehand (`shardtune prepare --num_proc 2`), or, with in_run, by the
    run's own ranks into an empty cache, at each corpus size."""
    from shardtune.modeling.tiny import build_tiny

    model = SCRATCH / "tiny-llama2"
    if not (model / "config.json").is_file():
        build_tiny(str(model), tokenizer=str(TOKENIZER))
    print("| corpus | train chunks | peak RSS per rank, MiB |")
    print("|---|---|---|")
    for copies in copies_list:
        data, cache, out = corpus(copies), SCRATCH / f"cache-x{copies}", Path(tempfile.mkdtemp(dir=SCRATCH))
        shutil.rmtree(cache, ignore_errors=True)
        flags = ["--model_name", str(model), "--samsum_dataset.data_path", str(data), "--data_cache_dir", str(cache)]
        if not in_run:
            subprocess.run([sys.executable, "-m", "shardtune.cli", "prepare", "--num_proc", "2", *flags,
                            *TRAIN_FLAGS[1:]], env=ENV, check=True, capture_output=True)
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "shardtune.finetuning", *flags, *TRAIN_FLAGS, "--output_dir", str(out)],
                       env={**ENV, "SHARDTUNE_DEVICE": "cpu"}, check=True, capture_output=True)
        epoch = next(json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()
                     if json.loads(l)["event"] == "epoch")
        print(f"| SAMSum train x{copies} | {_chunks(cache)} | {epoch['peak_memory_mib_per_rank']} |")


def _chunks(cache: Path) -> int:
    from shardtune.data import mapped

    (path,) = (cache / "data").glob("*.safetensors")
    return len(mapped.read(path)[0]["offsets"]) - 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["prep", "train_rss", "one_shardtune", "one_datasets"])
    p.add_argument("args", nargs="*")
    p.add_argument("--copies", default="10")
    p.add_argument("--procs", default="1,2")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--in_run", action="store_true", help="train_rss: the run's ranks prepare the split")
    a = p.parse_args()
    SCRATCH.mkdir(parents=True, exist_ok=True)
    if a.what == "prep":
        prep(int(a.copies), [int(n) for n in a.procs.split(",")], a.repeats)
    elif a.what == "train_rss":
        train_rss([int(c) for c in a.copies.split(",")], a.in_run)
    else:
        run = run_shardtune if a.what == "one_shardtune" else run_datasets
        print(json.dumps(run(Path(a.args[0]), int(a.args[1]))))


if __name__ == "__main__":
    main()
