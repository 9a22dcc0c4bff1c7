"""Every dataset on the real files: templates and label masks token by token (expected ids
built here, independently, from the Llama 2 tokenizer), alpaca's split, SAMSum in every
file format, the custom-dataset contract, and short fine-tunes under torchrun."""
import copy
import csv
import json
import textwrap

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import REPO, SHIM, check, python, read_metrics, torchrun, assert_close
from shardtune.config.parse import parse_args
from shardtune.config.schema import DATASETS
from shardtune.data import alpaca, build_split, custom, eval_loader, grammar, samsum, train_loader
from shardtune.data.records import BadRecords
from shardtune.errors import UserError
from shardtune.commands.prepare import prepare_grammar

BOS, EOS = 1, 2  # Llama 2's ids


@pytest.fixture(scope="module")
def llama2_padded(llama2_tok):
    tok = copy.deepcopy(llama2_tok)  # the session's tokenizer stays as shipped
    tok.pad_token = tok.eos_token
    return tok


@pytest.fixture(scope="module")
def grammar_csvs(tmp_path_factory, shared_data):
    out = tmp_path_factory.mktemp("grammar")
    prepare_grammar(shared_data / "jfleg", out, shared_data / "c4_200m" / "output.jsonl")
    return out / "grammar_train.csv", out / "grammar_validation.csv"


def _assert_prompt_target(tok, ex, prompt, target):
    p_ids = [BOS] + tok.encode(prompt, add_special_tokens=False)
    t_ids = tok.encode(target, add_special_tokens=False) + [EOS]
    assert ex["input_ids"] == p_ids + t_ids
    assert ex["labels"] == [-100] * len(p_ids) + t_ids  # every prompt token masked, every target token trained


def _read(src, tok, mode="error"):
    return src.read(tok, BadRecords(mode))


def test_all_guide_datasets_are_registered():
    assert set(DATASETS) == {"samsum_dataset", "grammar_dataset", "alpaca_dataset", "custom_dataset", "chat_dataset",
                             "mixture_dataset", "preference_dataset"}


def test_grammar_labels_token_by_token(grammar_csvs, llama2_padded):
    train_csv, val_csv = grammar_csvs
    for path in (train_csv, val_csv):
        rows = list(csv.DictReader(path.open(encoding="utf-8", newline="")))
        examples = _read(grammar.source(None, str(path)), llama2_padded)
        assert len(examples) == len(rows)
        for i in list(range(40)) + list(range(len(rows) - 20, len(rows))):  # JFLEG rows and the C4 tail
            prompt = "Correct this to standard English: " + rows[i]["input"] + "\n---\nCorrected: "
            _assert_prompt_target(llama2_padded, examples[i], prompt, rows[i]["target"])


def test_alpaca_split_templates_and_labels(shared_data, llama2_padded):
    path = shared_data / "alpaca" / "alpaca_data_200.json"
    records = json.loads(path.read_text())
    cfg = parse_args(["--alpaca_dataset.data_path", str(path)]).datasets["alpaca_dataset"]
    train = _read(alpaca.source(cfg, "train"), llama2_padded)
    val = _read(alpaca.source(cfg, "val"), llama2_padded)
    assert (len(train), len(val)) == (190, 10)  # validation = the first 5% (int(200 / 20))
    head = ("Below is an instruction that describes a task{}. "
            "Write a response that appropriately completes the request.\n\n### Instruction:\n{}")
    with_input = 0
    for ex, rec in zip(val + train, records):
        if rec["input"]:
            with_input += 1
            prompt = head.format(", paired with an input that provides further context", rec["instruction"])
            prompt += "\n\n### Input:\n" + rec["input"] + "\n\n### Response:"
        else:
            prompt = head.format("", rec["instruction"]) + "\n\n### Response:"
        _assert_prompt_target(llama2_padded, ex, prompt, rec["output"])
    assert with_input == 118  # both templates are exercised (README of the data: 118 of 200 have input)
    with pytest.raises(UserError, match="unknown alpaca split 'dev'"):
        alpaca.source(cfg, "dev")


def test_samsum_reads_jsonl_csv_parquet_like_json(shared_data, llama2_padded, tmp_path):
    records = json.loads((shared_data / "samsum" / "val.json").read_text())
    (tmp_path / "jsonl").mkdir()
    (tmp_path / "jsonl" / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "csv").mkdir()
    with (tmp_path / "csv" / "val.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "dialogue", "summary"])
        writer.writeheader()
        writer.writerows(records)  # dialogues hold \r\n: quoted multi-line fields
    (tmp_path / "parquet").mkdir()
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "parquet" / "val.parquet")

    def examples(data_path):
        cfg = parse_args(["--samsum_dataset.data_path", str(data_path)]).dataset
        return _read(samsum.source(cfg, "validation"), llama2_padded)

    reference = examples(shared_data / "samsum")
    assert len(reference) == 818
    for fmt in ("jsonl", "csv", "parquet"):
        assert examples(tmp_path / fmt) == reference, fmt
    assert examples(tmp_path / "csv" / "val.csv") == reference  # a single file works too


def test_samsum_hub_id_offline_is_a_clear_error(llama2_padded, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    cfg = parse_args(["--samsum_dataset.data_path", "knkarthick/samsum"]).dataset
    src = samsum.source(cfg, "train")
    assert src.fingerprint is None  # hub data is not cached by shardtune
    with pytest.raises(UserError, match="cannot load dataset 'knkarthick/samsum' split 'train' from the hub"):
        _read(src, llama2_padded)


CUSTOM_FILE = """
import torch
from datasets import Dataset

def _rows(tok):
    rows = []
    for text, answer in [("Say hi.", "Hi!"), ("Count to three.", "One two three."), ("Name a colour.", "Blue.")]:
        p = [tok.bos_token_id] + tok.encode(text, add_special_tokens=False)
        a = tok.encode(answer, add_special_tokens=False) + [tok.eos_token_id]
        rows.append({"input_ids": p + a, "labels": [-100] * len(p) + a, "attention_mask": [1] * (len(p) + len(a))})
    return rows

def get_custom_dataset(dataset_config, tokenizer, split):
    return _rows(tokenizer)

def as_hf(dataset_config, tokenizer, split):
    return Dataset.from_list(_rows(tokenizer))

class TorchSet(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows
    def __len__(self):
        return len(self.rows)
    def __getitem__(self, i):
        return {k: torch.tensor(v) for k, v in self.rows[i].items()}

def as_torch(dataset_config, tokenizer, split):
    return TorchSet(_rows(tokenizer))

def padded(dataset_config, tokenizer, split):
    rows = _rows(tokenizer)
    rows[0] = {k: v + [0, 0] for k, v in rows[0].items()}  # two padding positions, attention_mask 0
    rows[0]["input_ids"][-2:] = [tokenizer.pad_token_id] * 2
    return rows
"""


def _custom_cfgs(path, *extra):
    return parse_args(["--dataset", "custom_dataset", "--custom_dataset.file", str(path), "--data_cache_dir", "none", *extra])


def test_custom_dataset_return_types_and_function_name(tmp_path, llama2_padded):
    f = tmp_path / "my_data.py"
    f.write_text(CUSTOM_FILE)
    expected = []
    for text, answer in [("Say hi.", "Hi!"), ("Count to three.", "One two three."), ("Name a colour.", "Blue.")]:
        p = [BOS] + llama2_padded.encode(text, add_special_tokens=False)
        a = llama2_padded.encode(answer, add_special_tokens=False) + [EOS]
        expected.append({"input_ids": p + a, "labels": [-100] * len(p) + a})
    for spec in (f"{f}", f"{f}:as_hf", f"{f}:as_torch", f"{f}:padded"):
        cfg = _custom_cfgs(spec).dataset
        assert _read(custom.source(cfg, "train"), llama2_padded) == expected, spec
    with pytest.raises(UserError, match="has no function nope"):
        custom.source(_custom_cfgs(f"{f}:nope").dataset, "train")
    with pytest.raises(UserError, match="must be a .py file"):
        custom.source(_custom_cfgs(tmp_path / "data.json").dataset, "train")


def test_custom_collator_batches_carry_counts(tmp_path, llama2_padded):
    f = tmp_path / "with_collator.py"
    f.write_text(CUSTOM_FILE + textwrap.dedent("""
        def get_data_collator(tokenizer):
            def collate(items):
                longest = -(-max(len(it["input_ids"]) for it in items) // 8) * 8  # pad to a multiple of 8
                pad = lambda v, x: v + [x] * (longest - len(v))
                return {"input_ids": torch.tensor([pad(it["input_ids"], tokenizer.pad_token_id) for it in items]),
                        "labels": torch.tensor([pad(it["labels"], -100) for it in items]),
                        "attention_mask": torch.tensor([pad(it["attention_mask"], 0) for it in items])}
            return collate
    """))
    cfgs = _custom_cfgs(f, "--context_length", "64")
    split = build_split(cfgs, llama2_padded, "train")
    assert split.collate_fn is not None
    # one spawned worker: the collator pickles as (file, tokenizer) and is rebuilt there
    loader, _ = train_loader(split, 3, 1, 1, 0, 0, llama2_padded.pad_token_id, 1)
    assert loader.multiprocessing_context.get_start_method() != "fork"  # forking a threaded process can hang
    (batch,) = list(loader)
    assert batch["input_ids"].shape[1] % 8 == 0  # the user's collator built it
    assert batch["num_targets"] == sum(sum(l != -100 for l in it["labels"][1:]) for it in split.dataset.items)
    assert batch["num_tokens"] == int(batch["attention_mask"].sum())
    lengths = [len(it["input_ids"]) for it in split.dataset.items]
    assert batch["num_attention_pairs"] == sum(n * (n + 1) // 2 for n in lengths)  # causal, per example
    # 3 examples over 2 ranks x batch 2: rank 1 gets example 2 and a filler with no targets, no tokens
    (rank1,) = list(eval_loader(split, 2, 2, 1, llama2_padded.pad_token_id, 0))
    last = split.dataset.items[2]
    assert rank1["input_ids"].shape[0] == 2
    assert rank1["num_targets"] == sum(l != -100 for l in last["labels"][1:])
    assert rank1["num_tokens"] == len(last["input_ids"])
    assert rank1["num_attention_pairs"] == lengths[2] * (lengths[2] + 1) // 2


BASE = ["--num_workers_dataloader", "0", "--use_peft", "--peft_method", "lora", "--lora_config.lora_dropout", "0", "--num_epochs", "1",
        "--fsdp_activation_checkpointing", "False", "--save_metrics", "--log_every", "1", "--lr", "2e-3"]


def test_alpaca_padding_two_ranks_matches_one_rank(tmp_path, tiny_model, shared_data):
    """A fine-tune on the 200 real records under torchrun; with batching_strategy=padding
    (length-grouped batches) the per-step losses match one process with the same global batch."""
    args = BASE + ["--model_name", str(tiny_model), "--dataset", "alpaca_dataset",
                   "--alpaca_dataset.data_path", str(shared_data / "alpaca" / "alpaca_data_200.json"),
                   "--batching_strategy", "padding", "--context_length", "384", "--max_train_step", "5",
                   "--max_eval_step", "2", "--data_cache_dir", str(tmp_path / "cache")]
    two = check(torchrun(2, SHIM, args + ["--enable_fsdp", "--batch_size_training", "2", "--output_dir", str(tmp_path / "two")]))
    assert "190 examples" in two.stdout and "10 examples" in two.stdout
    one = check(python(SHIM, args + ["--batch_size_training", "4", "--output_dir", str(tmp_path / "one")]))
    assert "loaded from the cache" in one.stdout  # the torchrun run cached both splits
    (two_steps, two_epochs), (one_steps, _) = read_metrics(tmp_path / "two"), read_metrics(tmp_path / "one")
    a, b = [s["loss"] for s in two_steps], [s["loss"] for s in one_steps]
    assert len(a) == 5
    assert_close(a, b, rtol=1e-5)
    assert two_epochs[0]["eval_loss"] == two_epochs[0]["eval_loss"]  # evaluated, not NaN


def test_example_custom_dataset_trains(tmp_path, tiny_model):
    out = tmp_path / "out"
    proc = check(python(SHIM, BASE + ["--model_name", str(tiny_model), "--dataset", "custom_dataset",
                                      "--custom_dataset.file", str(REPO / "examples" / "custom_dataset.py"),
                                      "--batch_size_training", "2", "--context_length", "512", "--max_train_step", "3",
                                      "--max_eval_step", "2", "--output_dir", str(out)]))
    assert "80 examples" in proc.stdout and "16 examples" in proc.stdout  # the bundled sample's train/validation
    steps, epochs = read_metrics(out)
    assert len(steps) == 3 and all(s["loss"] == s["loss"] for s in steps)
    assert epochs[0]["eval_loss"] is not None
