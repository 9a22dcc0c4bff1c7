"""Sharded preparation (data/shards.py): the packed split is pack()'s output, bit for bit,
whatever the number of workers that tokenized its shards; it is a plain safetensors file
read back through memory maps; a failing worker's error reaches the one waiting for it."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from shardtune.config.parse import parse_args
from shardtune.data import split_source, shards
from shardtune.data.packing import ChunkDataset, pack
from shardtune.data.records import BadRecords
from shardtune.errors import UserError


@pytest.fixture
def small_shards(monkeypatch):
    monkeypatch.setattr(shards, "SHARD_RECORDS", 100)  # several shards from a small file


def _prepared(src, tok, out, context_length, packing, drop_last, workers, mode="error"):
    """Workers 1..W-1 tokenize their shards first, as other ranks would; worker 0 then packs."""
    plan = shards.Plan(src, out, context_length, packing, drop_last, mode, "test")
    for w in range(1, workers):
        shards.work(plan, tok, w, workers)
    stats = shards.prepare(plan, tok, 0, workers)
    return ChunkDataset.mapped(out)[0], stats


def _reference(src, tok, context_length, packing, drop_last, mode="error"):
    """What the data stage stored before shards: pack() of every example in memory, flattened."""
    bad = BadRecords(mode)
    chunks, stats = pack(src.read(tok, bad), context_length, packing=packing, drop_last=drop_last)
    stats.bad_records, stats.notes = bad.count, bad.messages

    def flat(key):
        return torch.cat([c[key] for c in chunks]).to(torch.int32)

    offsets = torch.cumsum(torch.tensor([0] + [len(c["input_ids"]) for c in chunks]), 0)
    return ChunkDataset(flat("input_ids"), flat("labels"), flat("position_ids"), offsets), stats


def _assert_same(got, got_stats, want, want_stats):
    for name, array in want.arrays().items():
        assert torch.equal(got.arrays()[name], array), name
    for name in ("examples", "tokens", "truncated", "skipped_no_target", "chunks", "target_tokens", "bad_records",
                 "dropped_last", "notes"):
        assert getattr(got_stats, name) == getattr(want_stats, name), name


@pytest.mark.parametrize("context_length,packing,drop_last,worker_counts", [
    (256, True, True, (1, 2, 4)),  # truncation, skipped examples, best-fit packing, the last chunk dropped
    (64, False, False, (1, 3)),  # one example per row
])
def test_samsum_split_is_packs_output_at_any_worker_count(tmp_path, shared_data, llama2_tok, small_shards,
                                                          context_length, packing, drop_last, worker_counts):
    cfgs = parse_args(["--samsum_dataset.data_path", str(shared_data / "samsum"),
                       "--samsum_dataset.train_split", "validation"])
    src = split_source(cfgs, "train")  # 818 dialogues: 9 shards of 100
    want, want_stats = _reference(src, llama2_tok, context_length, packing, drop_last)
    assert want_stats.truncated and want_stats.skipped_no_target
    for workers in worker_counts:
        out = tmp_path / f"w{workers}.safetensors"
        got, stats = _prepared(src, llama2_tok, out, context_length, packing, drop_last, workers)
        _assert_same(got, stats, want, want_stats)
        assert [p.name for p in tmp_path.iterdir()] == [out.name]  # the shards are removed once packed
        out.unlink()


def test_chat_bad_records_found_while_tokenizing_are_counted_in_record_order(tmp_path, llama2_tok, small_shards):
    lines = []
    for i in range(350):
        turns = [{"role": "user", "content": f"question {i} " * (i % 7 + 1)}]
        if i % 90 != 5:  # these have no assistant turn: bad, found by the tokenizing step
            turns.append({"role": "assistant", "content": f"answer {i}"})
        lines.append(json.dumps({"messages": turns}))
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(lines) + "\n")
    cfgs = parse_args(["--dataset", "chat_dataset", "--chat_dataset.data_path", str(data),
                       "--chat_dataset.template", "llama2"])
    src = split_source(cfgs, "train")
    want, want_stats = _reference(src, llama2_tok, 128, True, False, "skip")
    assert want_stats.bad_records == 3  # records 95, 185, 275 (record 5 is in the validation 5%)
    got, stats = _prepared(src, llama2_tok, tmp_path / "chat.safetensors", 128, True, False, 3, "skip")
    _assert_same(got, stats, want, want_stats)


def test_prepared_file_is_safetensors_and_maps_without_copying(tmp_path, shared_data, llama2_tok):
    cfgs = parse_args(["--dataset", "alpaca_dataset", "--alpaca_dataset.data_path",
                       str(shared_data / "alpaca" / "alpaca_data_200.json")])
    out = tmp_path / "alpaca.safetensors"
    got, _ = _prepared(split_source(cfgs, "train"), llama2_tok, out, 512, True, False, 2)
    by_library = load_file(str(out))
    for name, array in got.arrays().items():
        assert torch.equal(by_library[name], array), name
    for name in ("input_ids", "labels", "position_ids"):  # each array lies in a mapping of the file
        assert _mapped_from(getattr(got, name).data_ptr()) == str(out), name


def _mapped_from(address: int) -> str:
    for line in open("/proc/self/maps"):
        span, *_, path = line.split(maxsplit=5)
        low, high = (int(x, 16) for x in span.split("-"))
        if low <= address < high:
            return path.strip()
    return ""


def test_a_failing_worker_stops_the_one_waiting_for_it(tmp_path, llama2_tok, small_shards):
    lines = [json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})] * 300
    lines[150] = json.dumps({"messages": [{"role": "user", "content": "no answer"}]})  # in shard 1, worker 1's
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(lines) + "\n")
    cfgs = parse_args(["--dataset", "chat_dataset", "--chat_dataset.data_path", str(data),
                       "--chat_dataset.template", "llama2", "--chat_dataset.validation_path", str(data)])
    plan = shards.Plan(split_source(cfgs, "train"), tmp_path / "out.safetensors", 128, True, False, "error", "run1")
    with pytest.raises(UserError, match="record 150"):
        shards.work(plan, llama2_tok, 1, 2)
    with pytest.raises(UserError, match=r"another worker could not prepare the split: .*chat.jsonl: record 150"):
        shards.prepare(plan, llama2_tok, 0, 2)


def test_prepare_num_proc_fills_the_cache_a_run_then_maps(tmp_path, shared_data, llama2_tok, small_shards, capsys):
    from shardtune.commands.prepare import main as prepare_main
    from shardtune.data import build_split

    flags = ["--model_name", str(shared_data / "tokenizers" / "llama2"), "--samsum_dataset.data_path",
             str(shared_data / "samsum"), "--samsum_dataset.train_split", "validation", "--context_length", "256",
             "--run_validation", "False", "--data_cache_dir", str(tmp_path)]
    assert prepare_main(["--num_proc", "3", *flags]) == 0
    assert "train: 818 examples" in capsys.readouterr().out
    cfgs = parse_args(flags)
    cached = build_split(cfgs, llama2_tok, "train")
    assert cached.stats.from_cache
    want, _ = _reference(split_source(cfgs, "train"), llama2_tok, 256, True, False)
    for name, array in want.arrays().items():
        assert torch.equal(cached.dataset.arrays()[name], array), name
    with pytest.raises(UserError, match="nothing would be kept"):
        prepare_main(["--num_proc", "2", *flags[:-1], "none"])


def test_a_training_process_tokenizes_a_large_split_in_a_child(tmp_path, shared_data, llama2_tok, monkeypatch):
    """Past CHILD_MIN_BYTES a training process (dist given) reads and tokenizes in a forkserver
    child; the split is the in-process one, bit for bit, and a bad record is the same one line."""
    from shardtune.data import build_split
    from shardtune.device import Dist

    monkeypatch.setattr(shards, "CHILD_MIN_BYTES", 1)
    monkeypatch.setattr(shards, "work", _refuse)  # only a child may tokenize now
    one = Dist(0, 0, 1, 1, torch.device("cpu"), "gloo")
    flags = ["--samsum_dataset.data_path", str(shared_data / "samsum"), "--samsum_dataset.train_split", "validation",
             "--context_length", "256", "--data_cache_dir", str(tmp_path / "cache")]
    split = build_split(parse_args(flags), llama2_tok, "train", dist=one)
    assert not split.stats.from_cache and split.stats.examples == 818
    want, want_stats = _reference(split_source(parse_args(flags), "train"), llama2_tok, 256, True, False)
    _assert_same(split.dataset, split.stats, want, want_stats)

    bad = tmp_path / "bad" / "val.json"
    bad.parent.mkdir()
    records = json.loads((shared_data / "samsum" / "val.json").read_text())
    records[3]["summary"] = None
    bad.write_text(json.dumps(records))
    with pytest.raises(UserError, match=r"^\S*val.json: record 3: field 'summary' must be a string, got null"):
        build_split(parse_args([*flags, "--samsum_dataset.data_path", str(bad.parent)]), llama2_tok, "train", dist=one)


def _refuse(*args, **kwargs):
    raise AssertionError("tokenized in the training process")


def test_a_packed_split_on_a_shared_cache_is_published_once(tmp_path):
    """Two nodes packing one split into a cache they share: the first file published stays
    (the second node keeps what a reader may have mapped: same key, same content), a corrupt
    file is replaced, and a failed write leaves the target as it was."""
    import mmap
    import os

    from shardtune.data import mapped, shards

    out = tmp_path / "split.packed"
    arrays = {"input_ids": np.arange(8, dtype=np.int32), "offsets": np.array([0, 8], dtype=np.int64)}

    def pack(meta: dict) -> None:
        with mapped.write(out, {k: (v.dtype, len(v)) for k, v in arrays.items()}, meta,
                          keep_existing=shards.packed) as filling:
            for k, v in arrays.items():
                filling[k][:] = v

    pack({"stats": {"node": 0}})
    first = os.stat(out).st_ino
    with open(out, "rb") as f:
        reader = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # a rank of node 0 maps it
    pack({"stats": {"node": 1}})
    assert os.stat(out).st_ino == first and mapped.read(out)[1]["stats"] == {"node": 0}
    assert bytes(reader[:]) == out.read_bytes()
    reader.close()
    out.write_bytes(b"garbage")
    pack({"stats": {"node": 1}})
    assert mapped.read(out)[1]["stats"] == {"node": 1}
    with pytest.raises(RuntimeError):
        with mapped.write(out, {"input_ids": (np.int32, 8)}, {}, keep_existing=shards.packed):
            raise RuntimeError("the disk filled up")
    assert mapped.read(out)[1]["stats"] == {"node": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["split.packed"]  # no temporary left


@pytest.fixture
def one_mib_disk(tmp_path):
    """A real 1 MiB filesystem (tmpfs; the suite runs as root, as CI does)."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], check=True)
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_is_one_line_not_a_crash(one_mib_disk, shared_data, llama2_tok):
    """Preparing into a cache on a disk too small: before, the memory-mapped writer met the
    full disk as SIGBUS, killing the process without a word; now one line, and no partial file
    (the shard folder's claim stays for a relaunch to reuse what was finished)."""
    from shardtune.data import build_split

    cfgs = parse_args(["--samsum_dataset.data_path", str(shared_data / "samsum"), "--samsum_dataset.train_split",
                       "validation", "--context_length", "512", "--data_cache_dir", str(one_mib_disk)])
    with pytest.raises(UserError, match="no room for .*--data_cache_dir"):
        build_split(cfgs, llama2_tok, "train")
    files = [p for p in one_mib_disk.rglob("*") if p.is_file()]
    assert not [p for p in files if p.name.endswith(".tmp") or p.suffix == ".safetensors"], files
