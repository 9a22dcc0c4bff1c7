"""grammar_dataset: grammatical error correction from llama-recipes' CSV files.

Each CSV has the columns `input,target` (what `shardtune prepare grammar` writes from
JFLEG and C4_200M). train_split and test_split are the CSV paths.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from .records import BadRecords, read_records, valid_records
from .source import Source, data_size, file_digest, sliced
from .tokenize import FlatExamples, prompt_target

PROMPT = "Correct this to standard English: {input}\n---\nCorrected: "
FIELDS = ("input", "target")


def _csv_path(path: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(
            f"grammar CSV {path} does not exist; build it with `shardtune prepare grammar --jfleg DIR --out DIR` "
            "and pass --grammar_dataset.train_split DIR/grammar_train.csv --grammar_dataset.test_split DIR/grammar_validation.csv"
        )
    return p


def tokenize(records: list[dict], tokenizer) -> FlatExamples:
    return prompt_target(tokenizer, [PROMPT.format(input=r["input"]) for r in records], [r["target"] for r in records])


def source(dataset_config, split: str) -> Source:
    """`split` is the CSV path (the config's train_split or test_split)."""
    path = _csv_path(split)

    def records(bad: BadRecords) -> tuple[list[dict], int]:
        return valid_records(read_records(path, bad), FIELDS, str(path), bad), 0

    return sliced(str(path), f"file:{file_digest(path)}", PROMPT, records,
                  lambda tokenizer, recs, bad, start: tokenize(recs, tokenizer), size=data_size(path))
