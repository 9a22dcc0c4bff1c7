"""`shardtune prepare grammar` on the real JFLEG and C4_200M files, and a grammar fine-tune
on its CSVs under torchrun."""
import csv
import json
import sys

import pytest

from conftest import SHIM, check, error_lines, read_metrics, run_cli, run_cmd, torchrun
from shardtune.errors import UserError
from shardtune.commands.prepare import normalize_spacing, prepare_grammar


def _rows(path):
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        assert next(reader) == ["input", "target"]
        return list(reader)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, shared_data):
    out = tmp_path_factory.mktemp("grammar")
    proc = check(run_cmd([sys.executable, "-m", "shardtune.cli", "prepare", "grammar", "--jfleg", str(shared_data / "jfleg"),
                          "--c4", str(shared_data / "c4_200m" / "output.jsonl"), "--out", str(out)]))
    return out, proc


@pytest.mark.parametrize("raw, clean", [
    ("I do n't know , it is n't late .", "I don't know, it isn't late."),
    ("It 's John 's car ; they 're here : we 've left !", "It's John's car; they're here: we've left!"),
    ("Is it ( really ) 2 0 % ?", "Is it (really) 20%?"),
    ("In the 2 0 0 6 World Cup , 5 5 seconds .", "In the 2006 World Cup, 55 seconds."),
    ("in twenty years ' time . ", "in twenty years' time."),
    ("Call 555 1234 , a v shape .", "Call 555 1234, a v shape."),  # the reference's " v" -> "n't" is not copied
])
def test_spacing_normalisation(raw, clean):
    assert normalize_spacing(raw) == clean


def test_grammar_csvs_from_real_jfleg_and_c4(prepared, shared_data):
    out, proc = prepared
    jfleg = shared_data / "jfleg"
    src = (jfleg / "dev" / "dev.src").read_text().splitlines()
    refs = [(jfleg / "dev" / f"dev.ref{j}").read_text().splitlines() for j in range(4)]
    c4 = [json.loads(l) for l in (shared_data / "c4_200m" / "output.jsonl").read_text().splitlines()]
    train, val = _rows(out / "grammar_train.csv"), _rows(out / "grammar_validation.csv")
    assert len(src) == 754 and len(train) == 754 * 4 + len(c4) == 3031 and len(val) == 747
    assert "3031 rows: 3016 JFLEG dev pairs, 15 C4 pairs" in proc.stdout and "(747 rows)" in proc.stdout
    # each dev sentence with each of its 4 references, source-major, then the C4 pairs in order
    for i in range(754):
        for j in range(4):
            assert train[4 * i + j] == [normalize_spacing(src[i]), normalize_spacing(refs[j][i])]
    assert train[3016:] == [[normalize_spacing(r["src"]), normalize_spacing(r["trg"])] for r in c4]
    test_src = (jfleg / "test" / "test.src").read_text().splitlines()
    test_ref0 = (jfleg / "test" / "test.ref0").read_text().splitlines()
    assert val == [[normalize_spacing(s), normalize_spacing(r)] for s, r in zip(test_src, test_ref0)]
    # spot checks written out by hand
    assert train[0][0] == ("So I think we can not live if old people could not find siences and tecnologies "
                           "and they did not developped.")
    assert not any(" ," in a or " ." in a or " n't" in a for row in train + val for a in row)


def test_prepare_without_c4_and_with_a_tsv(tmp_path, shared_data):
    counts = prepare_grammar(shared_data / "jfleg", tmp_path / "a")
    assert counts["train"] == 3016 and counts["validation"] == 747 and counts["c4_pairs"] == 0
    tsv = tmp_path / "c4.tsv"
    tsv.write_text("input\toutput\nShe like cats .\tShe likes cats.\nHe go home\tHe goes home.\n")
    counts = prepare_grammar(shared_data / "jfleg", tmp_path / "b", tsv)
    assert counts["train"] == 3018 and _rows(tmp_path / "b" / "grammar_train.csv")[-2] == ["She like cats.", "She likes cats."]


def test_prepare_errors(tmp_path, shared_data, capfd):
    with pytest.raises(UserError, match="is not a directory"):
        prepare_grammar(tmp_path / "nope", tmp_path / "out")
    broken = tmp_path / "jfleg" / "dev"
    broken.mkdir(parents=True)
    (broken / "dev.src").write_text("a .\nb .\n")
    for j in range(4):
        (broken / f"dev.ref{j}").write_text("A.\n" if j == 2 else "A.\nB.\n")
    with pytest.raises(UserError, match=r"dev.ref2 has 1 lines but dev.src has 2"):
        prepare_grammar(tmp_path / "jfleg", tmp_path / "out")
    code, _, err = run_cli(capfd, ["prepare", "grammar", "--jfleg", tmp_path / "jfleg", "--out", tmp_path / "out"])
    assert code != 0 and len(error_lines(err)) == 1 and "Traceback" not in err


def test_grammar_finetune_two_ranks(prepared, tmp_path, tiny_model):
    out_csv, _ = prepared
    out = tmp_path / "out"
    proc = check(torchrun(2, SHIM, [
        "--enable_fsdp", "--use_peft", "--peft_method", "lora", "--model_name", str(tiny_model), "--num_workers_dataloader", "0",
        "--dataset", "grammar_dataset", "--grammar_dataset.train_split", str(out_csv / "grammar_train.csv"),
        "--grammar_dataset.test_split", str(out_csv / "grammar_validation.csv"), "--output_dir", str(out),
        "--batch_size_training", "2", "--context_length", "256", "--num_epochs", "1", "--max_train_step", "4",
        "--max_eval_step", "2", "--fsdp_activation_checkpointing", "False", "--save_metrics", "--log_every", "1",
        "--data_cache_dir", str(tmp_path / "cache"),
    ]))
    assert "3031 examples" in proc.stdout and "747 examples" in proc.stdout
    steps, epochs = read_metrics(out)
    assert len(steps) == 4 and all(s["loss"] == s["loss"] for s in steps)
    assert epochs[0]["eval_loss"] == epochs[0]["eval_loss"]
    assert (out / "adapter_model.safetensors").is_file()
