"""Any local dataset that Hugging Face `datasets` writes reads as a source: a single Arrow
file, a save_to_disk directory (its Arrow shards in state.json's order), a directory of
JSON-lines or parquet shards. Each gives the examples of the same records in one JSON
file, and a bad record in a shard is named by its shard file and its index there."""
import bz2
import gzip
import json
import lzma

import datasets
import pyarrow as pa
import pytest

from shardtune.config.parse import parse_args
from shardtune.data import source
from shardtune.data.records import BadRecords
from shardtune.data.source import file_digest
from shardtune.errors import UserError


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
    (empty / ".DS_Store").write_text("hidden: not data")
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


def _json_lines(records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def test_compressed_json_reads_as_a_file_and_in_a_directory(tmp_path, llama2_tok, val_records):
    one = tmp_path / "json"
    one.mkdir()
    (one / "val.json").write_text(json.dumps(val_records))
    want, _, _ = _examples(llama2_tok, one)
    shards = tmp_path / "shards" / "val"
    shards.mkdir(parents=True)
    (shards / "part-0.jsonl").write_bytes(_json_lines(val_records[:100]))
    (shards / "part-1.jsonl.gz").write_bytes(gzip.compress(_json_lines(val_records[100:200])))
    (shards / "part-2.json.bz2").write_bytes(bz2.compress(json.dumps(val_records[200:250]).encode()))
    (shards / "part-3.ndjson.xz").write_bytes(lzma.compress(_json_lines(val_records[250:])))
    for hidden in (".DS_Store", "_SUCCESS"):  # what Finder and Spark leave beside the data
        (shards / hidden).write_text("")
    got, _, src = _examples(llama2_tok, shards.parent)
    assert got == want
    single = tmp_path / "single"
    single.mkdir()
    (single / "val.jsonl.gz").write_bytes(gzip.compress(_json_lines(val_records)))
    assert _examples(llama2_tok, single)[0] == want  # data_path DIR finds val.jsonl.gz
    # a bad record in a compressed shard is named by that file and its index there
    lines = _json_lines(val_records[100:200]).decode().splitlines()
    lines[7] = json.dumps({"dialogue": "a", "summary": 3})
    gz = shards / "part-1.jsonl.gz"
    gz.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    with pytest.raises(UserError) as err:
        _examples(llama2_tok, shards.parent)
    assert str(err.value).startswith(f"{gz}: record 7: field 'summary' must be a string")


@pytest.mark.parametrize("stray", ["notes.txt", "part-1.json.zst", "more/part-2.jsonl", "part-1.parquet.gz"])
def test_a_data_directory_refuses_what_it_would_not_read(tmp_path, llama2_tok, val_records, stray):
    shards = tmp_path / "shards" / "val"
    shards.mkdir(parents=True)
    (shards / "part-0.jsonl").write_bytes(_json_lines(val_records[:10]))
    (shards / stray).parent.mkdir(exist_ok=True)
    (shards / stray).write_bytes(_json_lines(val_records[10:20]))
    with pytest.raises(UserError) as err:
        _examples(llama2_tok, shards.parent)
    message = str(err.value)
    assert str(shards / stray.split("/")[0]) in message and "\n" not in message
