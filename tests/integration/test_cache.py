"""Tokenization cache: a second run tokenizes nothing; the key follows the tokenizer, the
data, the template and context_length; files are safetensors written atomically; under
torchrun the ranks divide the tokenizing, map one packed file, and each names a bad record."""
import csv
import json
import logging
import textwrap

import pytest
import torch
from safetensors import safe_open

from conftest import check, torchrun
from shardtune.config.parse import parse_args
from shardtune.data import build_split
from shardtune.modeling.load import load_tokenizer

COUNTING = '''
import time

class Counting:
    """A real tokenizer that counts the texts it is asked to encode."""

    def __init__(self, tok, delay=0.0):
        self._tok, self.texts, self.delay = tok, 0, delay

    def __call__(self, texts, **kw):
        self.texts += len(texts) if isinstance(texts, list) else 1
        time.sleep(self.delay)
        return self._tok(texts, **kw)

    def encode(self, text, **kw):
        self.texts += 1
        return self._tok.encode(text, **kw)

    def __len__(self):
        return len(self._tok)

    def __getattr__(self, name):
        return getattr(self._tok, name)
'''
exec(COUNTING)  # the same class here and in the torchrun worker below


@pytest.fixture(scope="module")
def tok(tiny_model):
    return load_tokenizer(str(tiny_model))


def _samsum_args(shared_data, cache_dir, *extra):
    # the real validation file (818 dialogues) as the train split keeps this fast
    return parse_args(["--samsum_dataset.data_path", str(shared_data / "samsum"), "--samsum_dataset.train_split",
                       "validation", "--context_length", "512", "--data_cache_dir", str(cache_dir), *extra])


def test_second_run_tokenizes_nothing(tmp_path, tok, shared_data, caplog):
    cfgs = _samsum_args(shared_data, tmp_path)
    first_tok = Counting(tok)  # noqa: F821 (defined by exec above)
    first = build_split(cfgs, first_tok, "train")
    assert first_tok.texts == 2 * 818 and first.stats.tokenized == 818 and not first.stats.from_cache
    second_tok = Counting(tok)  # noqa: F821
    with caplog.at_level(logging.INFO, logger="shardtune.data"):
        second = build_split(cfgs, second_tok, "train")
    assert second_tok.texts == 0 and second.stats.tokenized == 0 and second.stats.from_cache
    assert "loaded from the cache" in caplog.text and "nothing tokenized" in caplog.text
    assert second.stats.examples == 818 and second.stats.tokens == first.stats.tokens
    for key, value in first.dataset.arrays().items():
        assert torch.equal(value, second.dataset.arrays()[key]), key


def test_cache_key_follows_what_the_result_depends_on(tmp_path, tok, tiny_llama2_tok, shared_data):
    cache = tmp_path / "cache"
    data = tmp_path / "samsum"
    data.mkdir()
    records = json.loads((shared_data / "samsum" / "val.json").read_text())[:40]
    (data / "val.json").write_text(json.dumps(records))

    def run(tokenizer, *extra):
        cfgs = parse_args(["--samsum_dataset.data_path", str(data), "--samsum_dataset.train_split", "validation",
                           "--data_cache_dir", str(cache), *extra])
        return build_split(cfgs, tokenizer, "train").stats.from_cache

    def files():
        return sorted(p.name for p in (cache / "data").iterdir())

    assert run(tok) is False and len(files()) == 1
    assert run(tok) is True and len(files()) == 1
    assert run(tok, "--context_length", "256") is False and len(files()) == 2
    assert run(tok, "--batching_strategy", "padding") is False and len(files()) == 3
    assert run(load_tokenizer(str(tiny_llama2_tok))) is False and len(files()) == 4  # another tokenizer
    records[5]["summary"] += " Changed."
    (data / "val.json").write_text(json.dumps(records))
    assert run(tok) is False and len(files()) == 5  # new content, same file name
    # the same data read by another dataset template gets its own entry
    with (data / "g.csv").open("w", newline="") as f:
        csv.writer(f).writerows([("input", "target")] + [(r["dialogue"], r["summary"]) for r in records])
    assert run(tok, "--dataset", "grammar_dataset", "--grammar_dataset.train_split", str(data / "g.csv")) is False
    assert all(name.endswith(".safetensors") for name in files()) and len(files()) == 6  # no temp files left


def test_cache_file_is_safetensors_and_a_corrupt_one_is_rebuilt(tmp_path, tok, shared_data, caplog):
    cfgs = _samsum_args(shared_data, tmp_path)
    first_ids = build_split(cfgs, tok, "train").dataset.input_ids.clone()  # the split maps the file written over below
    (path,) = list((tmp_path / "data").iterdir())
    with safe_open(str(path), framework="pt") as f:  # plain tensors + JSON metadata: nothing to unpickle
        assert set(f.keys()) == {"input_ids", "labels", "position_ids", "offsets"}
        assert json.loads(f.metadata()["shardtune"])["stats"]["examples"] == 818
    path.write_bytes(b"\x00garbage")
    with caplog.at_level(logging.WARNING, logger="shardtune.data"):
        again = build_split(cfgs, tok, "train")
    assert "ignoring unreadable data cache" in caplog.text
    assert not again.stats.from_cache and again.stats.tokenized == 818
    assert torch.equal(again.dataset.input_ids, first_ids)
    assert build_split(cfgs, tok, "train").stats.from_cache  # rewritten


def test_cache_can_be_disabled(tmp_path, tok, monkeypatch):
    monkeypatch.setenv("SHARDTUNE_CACHE", str(tmp_path / "env"))
    build_split(parse_args([]), tok, "train")
    assert len(list((tmp_path / "env" / "data").iterdir())) == 1  # "" means $SHARDTUNE_CACHE
    split = build_split(parse_args(["--data_cache_dir", "none"]), tok, "train")
    assert not split.stats.from_cache and split.stats.tokenized == 80


WORKER = COUNTING + textwrap.dedent('''
    import hashlib, json, sys
    from shardtune import device
    from shardtune.config.parse import parse_args
    from shardtune.data import build_split
    from shardtune.errors import exit_on_user_error
    from shardtune.modeling.load import load_tokenizer

    @exit_on_user_error
    def main():
        out, delay, argv = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
        cfgs = parse_args(argv)
        dist = device.setup(timeout_s=cfgs.train.dist_timeout)
        try:
            tok = Counting(load_tokenizer(cfgs.train.model_name), delay)
            result = {}
            for split in ("train", "validation"):
                data = build_split(cfgs, tok, split, dist)
                dist.barrier()  # a collective right after: it must not time out however long preparing took
                digest = hashlib.sha256(data.dataset.input_ids.numpy().tobytes()).hexdigest()
                result[split] = {"from_cache": data.stats.from_cache, "examples": data.stats.examples, "digest": digest}
            result["texts"] = tok.texts
            with open(f"{out}/rank{dist.rank}.json", "w") as f:
                json.dump(result, f)
        finally:
            device.teardown()

    sys.exit(main())
''')


def test_under_torchrun_the_ranks_share_the_tokenizing_and_map_one_file(tmp_path, tiny_model, shared_data):
    """SAMSum train is 8 shards: each rank tokenizes 4; the validation split is 1 shard. Every
    tokenizer call sleeps 0.5 s, so each rank prepares for longer than --dist_timeout (3 s),
    and the barrier after each split still passes: no rank waited in a collective meanwhile."""
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    args = [str(tmp_path), "0.5", "--model_name", str(tiny_model), "--samsum_dataset.data_path",
            str(shared_data / "samsum"), "--samsum_dataset.test_split", "test", "--context_length", "512",
            "--data_cache_dir", str(tmp_path / "cache"), "--dist_timeout", "3"]
    check(torchrun(2, worker, args))
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["texts"] > 0 and r1["texts"] > 0 and r0["texts"] + r1["texts"] == 2 * (14732 + 819)
    for split, n in (("train", 14732), ("validation", 819)):
        assert not r0[split]["from_cache"] and not r1[split]["from_cache"]
        assert r0[split]["examples"] == r1[split]["examples"] == n and r0[split]["digest"] == r1[split]["digest"]
    assert [p.name for p in (tmp_path / "cache" / "data").iterdir() if not p.name.endswith(".safetensors")] == []


def test_under_torchrun_a_bad_record_stops_every_rank(tmp_path, tiny_model):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    d = tmp_path / "samsum"
    d.mkdir()
    (d / "train.jsonl").write_text('{"id": "1", "dialogue": "A: hi", "summary": "Hi."}\n{"id": "2"\n')
    proc = torchrun(2, worker, [str(tmp_path), "0", "--model_name", str(tiny_model), "--samsum_dataset.data_path", str(d),
                                "--data_cache_dir", str(tmp_path / "cache")], timeout=300)
    assert proc.returncode != 0
    errors = [l for l in proc.stderr.splitlines() if l.startswith("shardtune: error:")]
    assert len(errors) == 2, proc.stderr
    for rank in (0, 1):  # each rank reads the records, so each names the bad one
        assert any(l.startswith(f"shardtune: error: [rank {rank} on ") and
                   "train.jsonl: record 1 (line 2): invalid JSON" in l for l in errors), proc.stderr
