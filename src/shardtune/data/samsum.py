"""SAMSum dialogue summarization with llama-recipes' exact prompt template."""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from ..errors import UserError
from .records import check_fields, read_records
from .tokenize import Example, tokenize_prompt_target

PROMPT = "Summarize this dialog:\n{dialog}\n---\nSummary:\n"
FIELDS = ("dialogue", "summary")
# The corpus names its validation file val.json; hub copies call the split "validation".
_SPLIT_FILES = {"train": "train", "validation": "val", "val": "val", "test": "test"}
_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


def _split_key(split: str) -> str:
    return _SPLIT_FILES.get(split, split)


def load_records(data_path: str, split: str) -> tuple[list[dict], str]:
    """Records of one split and a name for error messages."""
    if data_path == "sample":
        raw = resources.files("shardtune").joinpath("sample_data/samsum_sample.json").read_text(encoding="utf-8")
        key = "validation" if _split_key(split) == "val" else split
        return json.loads(raw)[key], f"bundled sample ({key})"
    path = Path(data_path)
    if path.is_dir():
        stem = _split_key(split)
        for suffix in _SUFFIXES:
            f = path / f"{stem}{suffix}"
            if f.is_file():
                return read_records(f), str(f)
        raise UserError(f"no {stem}.json/.jsonl/.csv/.parquet in {path}; point --samsum_dataset.data_path at the SAMSum directory")
    if path.suffix.lower() in _SUFFIXES or path.exists() or data_path.startswith((".", "/", "~")):
        if not path.exists():
            raise UserError(f"data path {data_path} does not exist; check --samsum_dataset.data_path")
        return read_records(path), str(path)
    return _load_hub(data_path, split), data_path


def _load_hub(name: str, split: str) -> list[dict]:
    import datasets

    try:
        return list(datasets.load_dataset(name, split=split))
    except Exception as err:  # offline, unknown id, missing split: all one message for the user
        raise UserError(
            f"cannot load dataset {name!r} split {split!r} from the hub ({type(err).__name__}); "
            "pass a local directory with --samsum_dataset.data_path"
        ) from None


def get_split(dataset_config, tokenizer, split: str) -> tuple[list[Example], str]:
    records, source = load_records(dataset_config.data_path, split)
    check_fields(records, FIELDS, source)
    prompts = [PROMPT.format(dialog=r["dialogue"]) for r in records]
    targets = [r["summary"] for r in records]
    return tokenize_prompt_target(tokenizer, prompts, targets), source
