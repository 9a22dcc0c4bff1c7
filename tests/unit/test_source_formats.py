"""Any local dataset that Hugging Face `datasets` writes reads as a source: a single Arrow
file, a save_to_disk directory (its Arrow shards in state.json's order), a directory of
JSON-lines or parquet shards. Each gives the examples of the same records in one JSON
file, and a bad record in a shard is named by its shard file and its index there."""
import json

import datasets
import pyarrow as pa
import pytest
from transformers import AutoTokenizer

from shardtune.config.parse import parse_args
from shardtune.data import source
from shardtune.data.records import BadRecords
from shardtune.data.source import file_digest
from shardtune.errors import UserError


@pytest.fixture(scope="module")
def llama2_tok(shared_data):
    return AutoTokenizer.from_pretrained(shared_data / "tokenizers" / "llama2")


@pytest.fixture(scope="module")
def val_records(shared_data) -> list[dict]:
    return json.loads((shared_data / "samsum" / "val.json").read_text())[:300]


def _examples(tok, data_path, split="validation", mode="error"):
    cfgs = parse_args(["--samsum_dataset.data_path", str(data_path), "--on_bad_record", mode])
    bad = BadRecords(mode)
    src = source(cfgs, split)
    return src.read(tok, bad), bad, src


def _layouts(root, records):
    """The records in each layout `datasets` (or a user) writes, as samsum data paths."""
    one = root / "json"
    one.mkdir()
    (one / "val.json").write_text(json.dumps(records))
    table = datasets.Dataset.from_list(records)
    saved = root / "saved"
    table.save_to_disk(str(saved / "val"), num_shards=3)  # data-0000N-of-00003.arrow + state.json
    arrow_file = root / "single" / "val.arrow"  # one Arrow stream file, as datasets' cache holds
    arrow_file.parent.mkdir()
    with pa.OSFile(str(arrow_file), "wb") as sink, pa.ipc.new_stream(sink, table.data.schema) as writer:
        writer.write_table(table.data.table)
    jsonl = root / "jsonl" / "val"
    jsonl.mkdir(parents=True)
    for k in range(3):  # names sort as the order of the records
        part = records[k * 100:(k + 1) * 100]
        (jsonl / f"part-{k:02d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    parquet = root / "parquet" / "val"
    parquet.mkdir(parents=True)
    for k in range(2):
        datasets.Dataset.from_list(records[k * 150:(k + 1) * 150]).to_parquet(str(parquet / f"{k}.parquet"))
    return {"saved_to_disk": saved, "arrow_file": arrow_file.parent, "jsonl_shards": jsonl.parent,
            "parquet_shards": parquet.parent, "json": one}


def test_every_layout_gives_the_same_examples(tmp_path, llama2_tok, val_records):
    layouts = _layouts(tmp_path, val_records)
    want, _, _ = _examples(llama2_tok, layouts.pop("json"))
    assert len(want) == 300
    digests = set()
    for name, path in layouts.items():
        got, _, src = _examples(llama2_tok, path)
        assert got == want, name
        digests.add(src.fingerprint)
    assert len(digests) == len(layouts)  # each path's content is its own cache key
    # a directory's digest follows its files' content
    shard = tmp_path / "jsonl" / "val" / "part-01.jsonl"
    before = file_digest(shard.parent)
    shard.write_text(shard.read_text().replace('"summary": "', '"summary": "x', 1))
    assert file_digest(shard.parent) != before


def test_bad_record_in_a_shard_names_the_shard_file(tmp_path, llama2_tok, val_records):
    layouts = _layouts(tmp_path, val_records)
    shard = layouts["jsonl_shards"] / "val" / "part-01.jsonl"
    lines = shard.read_text().splitlines()
    lines[7] = json.dumps({"dialogue": "a", "summary": 3})
    shard.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError) as err:
        _examples(llama2_tok, layouts["jsonl_shards"])
    assert str(err.value).startswith(f"{shard}: record 7: field 'summary' must be a string")
    examples, bad, _ = _examples(llama2_tok, layouts["jsonl_shards"], mode="skip")
    assert len(examples) == 299 and bad.count == 1 and bad.messages[0].startswith(f"{shard}: record 7:")


def test_unreadable_layouts_are_one_line(tmp_path, llama2_tok, val_records):
    empty = tmp_path / "empty" / "val"
    empty.mkdir(parents=True)
    (empty / "notes.txt").write_text("not data")
    with pytest.raises(UserError, match="no data files"):
        _examples(llama2_tok, empty.parent)
    datasets.DatasetDict({"val": datasets.Dataset.from_list(val_records[:5])}).save_to_disk(str(tmp_path / "dd" / "val"))
    with pytest.raises(UserError, match="several splits"):
        _examples(llama2_tok, tmp_path / "dd")
    broken = tmp_path / "broken" / "val.arrow"
    broken.parent.mkdir()
    broken.write_bytes(b"ARROW1 but not really")
    with pytest.raises(UserError, match="cannot read Arrow data"):
        _examples(llama2_tok, broken.parent)


# Characters str.splitlines() breaks on, though inside a JSON string they are plain text;
# json.dumps(ensure_ascii=False), and so shardtune's own write_jsonl, writes them raw.
LINE_BREAKS_IN_STRINGS = "\u2028\u2029\x85\x1c\x1d\x1e\x0b\x0c"


def test_json_lines_split_on_newline_only(tmp_path, llama2_tok, val_records):
    from shardtune.data.preference_pairs import write_jsonl
    from shardtune.data.records import read_records

    records = [{**r, "dialogue": r["dialogue"].replace(" ", LINE_BREAKS_IN_STRINGS, 1)} for r in val_records[:40]]
    data = tmp_path / "samsum"
    data.mkdir()
    write_jsonl(data / "val.jsonl", records)
    assert read_records(data / "val.jsonl") == records
    crlf = tmp_path / "crlf.jsonl"
    crlf.write_bytes((data / "val.jsonl").read_bytes().replace(b"\n", b"\r\n"))  # Windows line ends
    assert read_records(crlf) == records
    examples, bad, _ = _examples(llama2_tok, data)  # an SFT dataset reads the file whole
    assert len(examples) == 40 and bad.count == 0
    pairs = [{"prompt": r["dialogue"], "chosen": r["summary"], "rejected": "No." + LINE_BREAKS_IN_STRINGS}
             for r in records]
    write_jsonl(tmp_path / "pairs.jsonl", pairs)
    cfgs = parse_args(["--dataset", "preference_dataset", "--preference_dataset.data_path",
                       str(tmp_path / "pairs.jsonl")])
    bad = BadRecords()
    assert len(source(cfgs, "train").read(llama2_tok, bad)) == 38 and bad.count == 0  # 40 less the 5% validation
