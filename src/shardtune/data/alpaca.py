"""alpaca_dataset: Stanford Alpaca instructions with both of its prompt templates.

Validation is the first 5% of the records (int(n / 20), llama-recipes' current split);
training is the rest. Example = bos + prompt, then output + eos; the prompt is not trained.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from .records import BadRecords, read_records, valid_records
from .source import Source, data_size, file_digest, sliced
from .tokenize import FlatExamples, prompt_target

# Stanford Alpaca's PROMPT_DICT, as llama-recipes uses it.
PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
FIELDS = ("instruction", "output")
_TRAIN, _EVAL = ("train",), ("val", "validation", "eval", "test")


def prompt_for(record: dict) -> str:
    """The template with input when the record has a non-empty input, else the one without."""
    if record.get("input", ""):
        return PROMPT_INPUT.format(instruction=record["instruction"], input=record["input"])
    return PROMPT_NO_INPUT.format(instruction=record["instruction"])


def split_bounds(num_records: int, split: str) -> tuple[int, int]:
    """[start, end) of a split: validation is the first 5% of the file, train the rest."""
    eval_len = num_records // 20
    if split in _TRAIN:
        return eval_len, num_records
    if split in _EVAL:
        return 0, eval_len
    raise UserError(f"unknown alpaca split {split!r}; use train or val (the first 5% of the records)")


def source(dataset_config, split: str) -> Source:
    path = Path(dataset_config.data_path).expanduser()
    if not path.exists():
        raise UserError(f"alpaca data {path} does not exist; pass --alpaca_dataset.data_path path/to/alpaca_data.json")
    split_bounds(0, split)  # reject an unknown split name before anything is read

    def records(bad: BadRecords) -> tuple[list[dict], int]:
        records = read_records(path, bad)
        start, end = split_bounds(len(records), split)
        return valid_records(records[start:end], FIELDS, str(path), bad, optional=("input",), start=start), start

    def tokenize(tokenizer, good: list[dict], bad: BadRecords, start: int) -> FlatExamples:
        return prompt_target(tokenizer, [prompt_for(r) for r in good], [r["output"] for r in good])

    which = "train" if split in _TRAIN else "val"
    return sliced(f"{path} ({which})", f"file:{file_digest(path)}:{which}", PROMPT_INPUT + PROMPT_NO_INPUT,
                  records, tokenize, size=data_size(path))
