"""preference_dataset: token ids equal to what trl's DPOTrainer builds from the same records
(plain and conversational, with the real Llama 2 tokenizer), bad records named by file and
record, the splits, the finetune/dpo flag check, and the pairs `prepare preference` derives
from the real JFLEG and SAMSum files in ../shared/data."""
import json
from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer

from conftest import llama3_chat_tokenizer, run_cli
from shardtune.config.parse import parse_args
from shardtune.data import check_flags, grammar, samsum
from shardtune.data.chat_templates import TEMPLATES
from shardtune.data.jfleg import normalize_spacing
from shardtune.data.preference import source, tokenize_pairs
from shardtune.data.preference_pairs import jfleg_preferences, samsum_preferences
from shardtune.data.records import BadRecords
from shardtune.errors import UserError


@pytest.fixture(scope="module")
def llama2_bos(shared_data):
    """As a Llama 2 checkpoint's tokenizer_config.json sets it: BOS added by default."""
    return AutoTokenizer.from_pretrained(shared_data / "tokenizers" / "llama2", add_bos_token=True)


def trl_ids(tokenizer, records: list[dict]) -> list[dict]:
    """TRL's own preparation of the records: DPOTrainer._prepare_dataset (a private method,
    called here only) on a stand-in trainer that holds what the method reads."""
    from datasets import Dataset
    from trl.trainer.dpo_trainer import DPOTrainer

    args = SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_start")
    prepared = DPOTrainer._prepare_dataset(SimpleNamespace(_tokenizer=tokenizer), Dataset.from_list(records),
                                           tokenizer, args, "test")
    return [{k: row[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for row in prepared]


def ours(tokenizer, records: list[dict], template=None, system_prompt="") -> list[dict]:
    pairs = tokenize_pairs(tokenizer, records, "pairs.jsonl", BadRecords("error"), template, system_prompt)
    assert [p["origin"] for p in pairs] == [f"pairs.jsonl record {i}" for i in range(len(records))]
    return [{k: p[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for p in pairs]


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# Prompts that end inside a word or on a space: the tokens at the join merge, so the split
# must come where the ids diverge (TRL's common-prefix rule), not at len(tokenize(prompt)).
EDGE_PLAIN = [
    {"prompt": "The capital of Fra", "chosen": "nce is Paris.", "rejected": "nce is Rome."},
    {"prompt": "Q: 2+2?\nA:", "chosen": " 4</s>", "rejected": " 5"},  # chosen already ends with eos
    {"prompt": "Say hi. ", "chosen": "hi", "rejected": "no"},
]


@pytest.mark.parametrize("bos", [False, True], ids=["tokenizer.model", "add_bos_token"])
def test_plain_ids_equal_trl(request, preference_files, bos):
    tok = request.getfixturevalue("llama2_bos" if bos else "llama2_tok")
    records = read_jsonl(preference_files["grammar"])[:20] + read_jsonl(preference_files["samsum"])[:10] + EDGE_PLAIN
    got, want = ours(tok, records), trl_ids(tok, records)
    assert got == want
    # the cases the common-prefix rule exists for are really here: grammar's "Corrected: "
    # ends on a space, which SentencePiece joins to the next word
    cut = [len(g["prompt_ids"]) < len(tok(r["prompt"])["input_ids"]) for g, r in zip(got, records)]
    assert all(cut[:20]) and cut[-3] and cut[-1]
    assert all(g["chosen_ids"][-1] == g["rejected_ids"][-1] == tok.eos_token_id for g in got)
    assert all((g["prompt_ids"][:1] == [tok.bos_token_id]) == bos for g in got)


CONVERSATIONS = [
    {"prompt": [{"role": "user", "content": "Capital of France?"}],
     "chosen": [{"role": "assistant", "content": "Paris."}], "rejected": [{"role": "assistant", "content": "Rome."}]},
    {"prompt": [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Sky colour?"},
                {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "And grass?"}],
     "chosen": [{"role": "assistant", "content": "Green."}],
     "rejected": [{"role": "assistant", "content": "Well, it depends on the season"}]},
]


def test_conversational_ids_equal_trl_with_llama2_template(llama2_tok):
    # TRL renders with the tokenizer's own template: give it the one shardtune passes by name
    templated = AutoTokenizer.from_pretrained(llama2_tok.name_or_path)
    templated.chat_template = TEMPLATES["llama2"].jinja
    records = CONVERSATIONS + [{**CONVERSATIONS[0], "prompt": [{"role": "system", "content": "Be terse."},
                                                               *CONVERSATIONS[0]["prompt"]]}]
    want = trl_ids(templated, records)
    assert ours(llama2_tok, records, template="llama2") == want
    assert ours(templated, records) == want  # the tokenizer's own template: the same ids
    # --preference_dataset.system_prompt is the system turn written into the record
    assert ours(llama2_tok, CONVERSATIONS[:1], "llama2", system_prompt="Be terse.") == want[2:]
    assert want[0]["chosen_ids"][-1] == llama2_tok.eos_token_id  # the template's own </s>, no appended one


def test_conversational_ids_equal_trl_with_tokenizers_own_template():
    tok = llama3_chat_tokenizer()  # byte-level BPE with Llama 3's specials and chat template
    assert ours(tok, CONVERSATIONS) == trl_ids(tok, CONVERSATIONS)


def test_bad_records_named_by_file_and_record(tmp_path, llama2_tok):
    user = [{"role": "user", "content": "Hi?"}]
    lines = [
        json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}),  # 0 good
        json.dumps({"prompt": "p", "chosen": "a"}),  # 1 missing rejected
        json.dumps({"prompt": 3, "chosen": "a", "rejected": "b"}),  # 2 prompt not a string
        json.dumps({"prompt": "p", "chosen": "", "rejected": "b"}),  # 3 empty chosen
        json.dumps({"prompt": [], "chosen": [], "rejected": []}),  # 4 empty lists
        json.dumps({"prompt": user, "chosen": [{"role": "assistant", "content": "x"}] * 2,
                    "rejected": [{"role": "assistant", "content": "y"}]}),  # 5 two messages
        json.dumps({"prompt": user, "chosen": [{"role": "user", "content": "x"}],
                    "rejected": [{"role": "assistant", "content": "y"}]}),  # 6 not the assistant's
        json.dumps({"prompt": user, "chosen": "x", "rejected": [{"role": "assistant", "content": "y"}]}),  # 7 mixed
        "{not json",  # 8
        json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"}),  # 9 no preference
        json.dumps({"prompt": user, "chosen": [{"role": "assistant", "content": "x"}],
                    "rejected": [{"role": "assistant", "content": "y"}]}),  # 10 good
        json.dumps({"prompt": "p", "chosen": "same</s>", "rejected": "same"}),  # 11 the same once EOS is added
    ]
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    bad = BadRecords("skip")
    pairs = tokenize_pairs(llama2_tok, [json.loads(l) if l.startswith("{\"") else None for l in lines], str(path),
                           bad, template="llama2")
    assert [p["origin"] for p in pairs] == [f"{path} record 0", f"{path} record 10"]
    named = [m.split(": record ")[1].split(":")[0] for m in bad.messages]
    assert all(m.startswith(f"{path}: record ") for m in bad.messages)
    assert named == ["1", "2", "3", "4", "5", "6", "7", "9", "11"]  # 8 is the reader's to report

    # through the dataset's source: the reader names the unreadable line; error mode stops at the first bad one
    cfg = parse_args(["--dataset", "preference_dataset", "--preference_dataset.data_path", str(path),
                      "--preference_dataset.template", "llama2"]).dataset
    skipped = BadRecords("skip")
    assert len(source(cfg, "train").read(llama2_tok, skipped)) == 2 and skipped.count == 10
    # the file is read before its records are checked, so the unreadable line is the first error
    with pytest.raises(UserError, match=rf"^{path}: record 8 \(line 9\): invalid JSON.*; fix the record"):
        source(cfg, "train").read(llama2_tok, BadRecords("error"))
    path.write_text("\n".join(lines[:8] + lines[9:]) + "\n")
    with pytest.raises(UserError, match=rf"^{path}: record 1: missing field 'rejected'; fix the record"):
        source(cfg, "train").read(llama2_tok, BadRecords("error"))
    broken = tmp_path / "broken.json"
    broken.write_text('[{"prompt": "p", ')
    cfg.data_path = str(broken)
    with pytest.raises(UserError, match=rf"^{broken}: invalid JSON"):
        source(cfg, "train").read(llama2_tok, BadRecords("skip"))


def test_splits_and_fingerprint(tmp_path, preference_files, llama2_tok):
    data = tmp_path / "pairs.jsonl"
    data.write_bytes(preference_files["grammar"].read_bytes())  # 40 records: validation = the first 2
    cfg = parse_args(["--dataset", "preference_dataset", "--preference_dataset.data_path", str(data)]).dataset
    validation, train = source(cfg, "validation"), source(cfg, "train")
    assert [p["origin"] for p in validation.read(llama2_tok, BadRecords())] == [f"{data} record {i}" for i in (0, 1)]
    assert [p["origin"] for p in train.read(llama2_tok, BadRecords())] == [f"{data} record {i}" for i in range(2, 40)]
    data.write_text("\n".join(data.read_text().splitlines()[:-1]) + "\n")  # other content, other cache key
    assert source(cfg, "train").fingerprint != train.fingerprint
    cfg.validation_path = str(preference_files["samsum"])
    assert len(source(cfg, "validation").read(llama2_tok, BadRecords())) == 40
    with pytest.raises(UserError, match="unknown preference_dataset split 'dev'"):
        source(cfg, "dev")


def test_finetune_and_dpo_each_refuse_the_other_kind_of_dataset():
    pairs = parse_args(["--dataset", "preference_dataset"]).train
    with pytest.raises(UserError, match=r"^preference_dataset holds preference pairs; train it with `shardtune dpo`$"):
        check_flags(pairs)
    check_flags(pairs, pairs=True)
    with pytest.raises(UserError, match=r"^dpo trains preference pairs: use --dataset preference_dataset "):
        check_flags(parse_args(["--dataset", "samsum_dataset"]).train, pairs=True)


def test_pairs_from_real_jfleg(shared_data):
    records = jfleg_preferences(shared_data / "jfleg")
    # expected independently from the raw parallel files
    dev = shared_data / "jfleg" / "dev"
    sources = (dev / "dev.src").read_text().splitlines()
    refs = [(dev / f"dev.ref{j}").read_text().splitlines() for j in range(4)]
    expected = []
    for i, src in enumerate(sources):
        wrong = normalize_spacing(src)
        fixes = [normalize_spacing(r[i]) for r in refs]
        expected += [(wrong, fix) for k, fix in enumerate(fixes) if fix and fix != wrong and fix not in fixes[:k]]
    assert [(r["rejected"], r["chosen"]) for r in records] == expected
    assert 1000 < len(records) < 4 * len(sources)  # JFLEG: many corrections, some equal to the source
    assert all(r["prompt"] == grammar.PROMPT.format(input=r["rejected"]) for r in records)


def test_pairs_from_real_samsum(shared_data):
    path = shared_data / "samsum" / "val.json"
    raw = json.loads(path.read_text())
    summary_of = {r["dialogue"]: r["summary"] for r in raw}
    records = samsum_preferences(path)
    assert len(records) > 0.99 * len(raw)
    for r in records:
        dialogue = r["prompt"][len("Summarize this dialog:\n"):-len("\n---\nSummary:\n")]
        assert r["prompt"] == samsum.PROMPT.format(dialog=dialogue)
        assert r["chosen"] == summary_of[dialogue] != r["rejected"] and r["rejected"] in summary_of.values()
    assert samsum_preferences(path) == records and samsum_preferences(path, seed=1) != records


def test_prepare_preference_command(capsys, tmp_path, shared_data):
    out = tmp_path / "prefs.jsonl"
    code, stdout, _ = run_cli(capsys, ["prepare", "preference", "--jfleg", shared_data / "jfleg",
                                       "--samsum", shared_data / "samsum" / "val.json", "--out", out])
    assert code == 0
    lines = read_jsonl(out)
    n_jfleg, n_samsum = len(jfleg_preferences(shared_data / "jfleg")), len(samsum_preferences(shared_data / "samsum" / "val.json"))
    assert len(lines) == n_jfleg + n_samsum and f"({n_jfleg} JFLEG pairs, {n_samsum} SAMSum pairs)" in stdout
    assert all(r["chosen"] != r["rejected"] for r in lines)
