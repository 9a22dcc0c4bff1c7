"""Bad input: every kind of malformed record is named by file and record index;
--on_bad_record skip leaves it out, counts it, and trains on the rest; an empty or
fully truncated split fails before training."""
import json

import pytest

from conftest import SHIM, check, error_lines, python, run_cli
from shardtune.config.parse import parse_args
from shardtune.data import build_split
from shardtune.errors import UserError
from shardtune.modeling.load import load_tokenizer

GOOD = {"id": "g", "dialogue": "Anna: Are we meeting at noon?\r\nBen: Yes, see you there.", "summary": "Anna and Ben meet at noon."}
BAD_BYTES = b"\xff\xfe bad"


def _json_array(bad_record) -> bytes:
    return json.dumps([GOOD, bad_record, GOOD]).encode()


def _jsonl(bad_line: bytes) -> bytes:
    return json.dumps(GOOD).encode() + b"\n" + bad_line + b"\n" + json.dumps(GOOD).encode() + b"\n"


def _csv(bad_line: bytes) -> bytes:
    good = b'g,"Anna: Are we meeting at noon?\r\nBen: Yes.",Anna and Ben meet.\r\n'
    return b"id,dialogue,summary\r\n" + good + bad_line + b"\r\n" + good


# (train file name, its bytes, what the error names); the bad record is always record 1
CASES = {
    "missing field": ("train.json", _json_array({"id": "b", "dialogue": "x"}), "train.json: record 1: missing field 'summary'"),
    "wrong type": ("train.json", _json_array({**GOOD, "summary": 5}), "train.json: record 1: field 'summary' must be a string, got int"),
    "null field": ("train.json", _json_array({**GOOD, "dialogue": None}), "train.json: record 1: field 'dialogue' must be a string, got null"),
    "not an object": ("train.json", _json_array("just text"), "train.json: record 1: expected an object"),
    "undecodable bytes in a JSON array": (
        "train.json", _json_array({**GOOD, "summary": "@@"}).replace(b"@@", BAD_BYTES), "train.json: record 1: bytes are not valid UTF-8"),
    "invalid JSON line": ("train.jsonl", _jsonl(b'{"id": "b", "dialogue": '), "train.jsonl: record 1 (line 2): invalid JSON"),
    "undecodable bytes in JSON lines": (
        "train.jsonl", _jsonl(json.dumps({**GOOD, "summary": "@@"}).encode().replace(b"@@", BAD_BYTES)),
        "train.jsonl: record 1 (line 2): bytes are not valid UTF-8"),
    "CSV row with a missing column": ("train.csv", _csv(b"b,only two"), "train.csv: record 1 (line 4): wrong number of columns"),
    "CSV stray quote": ("train.csv", _csv(b'b,"quoted"tail,summary'), "train.csv: record 1 (line 4): invalid CSV"),
    "undecodable bytes in CSV": ("train.csv", _csv(b"b,dialogue " + BAD_BYTES + b",summary"), "train.csv: record 1 (line 4): bytes are not valid UTF-8"),
}


@pytest.fixture(scope="module")
def tok(tiny_model):
    return load_tokenizer(str(tiny_model))


def _samsum_dir(tmp_path, name, data):
    d = tmp_path / "samsum"
    d.mkdir()
    (d / name).write_bytes(data)
    (d / "val.json").write_text(json.dumps([GOOD]))
    return d


def _cfgs(d, *extra):
    return parse_args(["--samsum_dataset.data_path", str(d), "--data_cache_dir", "none", "--context_length", "256", *extra])


@pytest.mark.parametrize("case", list(CASES))
def test_bad_record_is_named_then_skipped(case, tmp_path, tok):
    name, data, needle = CASES[case]
    d = _samsum_dir(tmp_path, name, data)
    with pytest.raises(UserError) as err:
        build_split(_cfgs(d), tok, "train")
    msg = str(err.value)
    assert needle in msg and str(d / name) in msg and "--on_bad_record skip" in msg
    split = build_split(_cfgs(d, "--on_bad_record", "skip"), tok, "train")
    assert split.stats.bad_records == 1 and split.stats.examples == 2  # the two good records are kept
    assert needle in split.stats.notes[0]


def test_invalid_json_array_is_an_error_even_when_skipping(tmp_path, tok):
    d = _samsum_dir(tmp_path, "train.json", b'[{"id": "1", "dialogue": "A: hi", "summary": "ok"},\n {"id": "2", "dialogue": ')
    with pytest.raises(UserError, match="train.json: invalid JSON at line 2"):
        build_split(_cfgs(d, "--on_bad_record", "skip"), tok, "train")


def test_alpaca_record_index_counts_from_the_file_start(tmp_path, tok, shared_data):
    records = json.loads((shared_data / "alpaca" / "alpaca_data_200.json").read_text())
    records[3]["output"] = ["not", "a", "string"]  # in validation (records 0-9)
    records[57]["input"] = 7  # in train; the optional field is type-checked when present
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(records))
    args = ["--dataset", "alpaca_dataset", "--alpaca_dataset.data_path", str(path), "--data_cache_dir", "none"]
    with pytest.raises(UserError, match="record 3: field 'output' must be a string, got list"):
        build_split(parse_args(args), tok, "validation")
    with pytest.raises(UserError, match="record 57: field 'input' must be a string, got int"):
        build_split(parse_args(args), tok, "train")
    skip = parse_args(args + ["--on_bad_record", "skip"])
    assert build_split(skip, tok, "train").stats.examples == 189
    assert build_split(skip, tok, "validation").stats.examples == 9


def test_grammar_csv_without_target_column(tmp_path, tok):
    path = tmp_path / "g.csv"
    path.write_text("input,correction\nI has a cat.,I have a cat.\n")
    cfgs = parse_args(["--dataset", "grammar_dataset", "--grammar_dataset.train_split", str(path), "--data_cache_dir", "none"])
    with pytest.raises(UserError, match="g.csv: record 0: missing field 'target'"):
        build_split(cfgs, tok, "train")


def test_custom_dataset_bad_item(tmp_path, tok):
    f = tmp_path / "bad.py"
    f.write_text("def get_custom_dataset(cfg, tok, split):\n"
                 "    good = {'input_ids': [1, 5, 6, 2], 'labels': [-100, 5, 6, 2]}\n"
                 "    return [good, {'input_ids': [1, 5, 6, 2], 'labels': [-100, 5, 6]}, {'input_ids': [1, 5]}, good]\n")
    args = ["--dataset", "custom_dataset", "--custom_dataset.file", str(f), "--data_cache_dir", "none"]
    with pytest.raises(UserError, match=r"bad.py:get_custom_dataset \(train\): record 1: input_ids has 4 tokens but labels has 3"):
        build_split(parse_args(args), tok, "train")
    split = build_split(parse_args(args + ["--on_bad_record", "skip"]), tok, "train")
    assert split.stats.bad_records == 2 and split.stats.examples == 2
    assert "record 2: missing field 'labels'" in split.stats.notes[1]


def test_every_example_truncated_away_is_an_error(tok):
    # the bundled sample's prompts are all longer than 12 tokens: nothing left to learn
    with pytest.raises(UserError, match=r"the train split has no usable examples \(80 read, 80 with no target tokens within context_length 12\); .*raise --context_length"):
        build_split(parse_args(["--context_length", "12", "--data_cache_dir", "none"]), tok, "train")


def test_all_records_bad_when_skipping_is_an_error(tmp_path, tok):
    d = _samsum_dir(tmp_path, "train.jsonl", b'{"id": 1}\n{"dialogue": "x"}\n')
    with pytest.raises(UserError, match="no usable examples .*2 bad records skipped .*record 0: missing field 'dialogue'"):
        build_split(_cfgs(d, "--on_bad_record", "skip"), tok, "train")


def test_unknown_on_bad_record_mode(tok):
    with pytest.raises(UserError, match="unknown --on_bad_record 'ignore'; choose error or skip"):
        build_split(parse_args(["--on_bad_record", "ignore"]), tok, "train")


def test_skip_mode_trains_on_the_rest(tmp_path, tiny_model, capfd):
    """End to end: one error line by default; with skip, training runs and the count is reported."""
    import json as _json
    from importlib import resources

    sample = _json.loads(resources.files("shardtune").joinpath("sample_data/samsum_sample.json").read_text())
    lines = [_json.dumps(r).encode() for r in sample["train"][:12]]
    lines[4] = b'{"id": "bad", "dialogue": '  # invalid JSON
    lines[7] = _json.dumps({"id": "x", "dialogue": "A: hi"}).encode()  # missing summary
    d = tmp_path / "samsum"
    d.mkdir()
    (d / "train.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (d / "val.json").write_text(_json.dumps(sample["validation"][:4]))
    args = ["--num_workers_dataloader", "0", "--use_peft", "--peft_method", "lora", "--model_name", str(tiny_model), "--samsum_dataset.data_path", str(d),
            "--output_dir", str(tmp_path / "out"), "--batch_size_training", "2", "--context_length", "512",
            "--num_epochs", "1", "--max_train_step", "2", "--max_eval_step", "1", "--data_cache_dir", str(tmp_path / "c")]
    code, _, err = run_cli(capfd, ["finetune", *args])  # in this process; the skipping run below is a real one
    assert code != 0 and "Traceback" not in err
    errors = error_lines(err)
    assert len(errors) == 1 and "train.jsonl: record 4 (line 5): invalid JSON" in errors[0], err
    proc = check(python(SHIM, args + ["--on_bad_record", "skip"]))
    assert "train split from" in proc.stdout and "10 examples" in proc.stdout
    assert "2 bad records skipped" in proc.stdout and "train split: 2 bad records were skipped" in proc.stdout
    assert "bad records skipped (--on_bad_record skip): train 2" in proc.stdout  # repeated at the end
    assert "saved the lora adapter" in proc.stdout
