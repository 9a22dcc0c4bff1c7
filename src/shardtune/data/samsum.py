"""SAMSum dialogue summarization with llama-recipes' exact prompt template.

data_path: "sample" (bundled), a directory of train/val/test files (.json, .jsonl, .csv,
.parquet or .arrow) or of train/val/test directories of such shards, a single file, or a
hub id (online, via datasets.load_dataset).
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from ..errors import UserError
from .records import SUFFIXES, BadRecords, read_records, valid_records
from .source import Source, data_size, file_digest, sliced
from .tokenize import Example, FlatExamples, prompt_target

PROMPT = "Summarize this dialog:\n{dialog}\n---\nSummary:\n"
FIELDS = ("dialogue", "summary")
# The corpus names its validation file val.json; hub copies call the split "validation".
_SPLIT_FILES = {"train": "train", "validation": "val", "val": "val", "test": "test"}


def _split_key(split: str) -> str:
    return _SPLIT_FILES.get(split, split)


def _sample_file():
    return resources.files("shardtune").joinpath("sample_data/samsum_sample.json")


def bundled_sample() -> dict[str, list[dict]]:
    """The sample shipped with shardtune: {"train"|"validation"|"test": [records]}."""
    return json.loads(_sample_file().read_text(encoding="utf-8"))


def _data_file(data_path: str, split: str) -> Path | None:
    """The local file (or directory of shards) of a split, or None for a hub id."""
    path = Path(data_path).expanduser()
    if path.is_dir():
        stem = _split_key(split)
        for suffix in SUFFIXES:
            f = path / f"{stem}{suffix}"
            if f.is_file():
                return f
        if (path / stem).is_dir():
            return path / stem
        raise UserError(f"no {stem}.json/.jsonl/.csv/.parquet/.arrow or {stem}/ in {path}; "
                        "point --samsum_dataset.data_path at the SAMSum directory")
    if path.name.lower().endswith(SUFFIXES) or path.exists() or data_path.startswith((".", "/", "~")):
        if not path.exists():
            raise UserError(f"data path {data_path} does not exist; check --samsum_dataset.data_path")
        return path
    return None


def _tokenize_slice(tokenizer, records: list[dict], bad: BadRecords, start: int) -> FlatExamples:
    # records were checked when read: none is bad here
    return prompt_target(tokenizer, [PROMPT.format(dialog=r["dialogue"]) for r in records], [r["summary"] for r in records])


def _tokenize(records: list[dict], tokenizer) -> list[Example]:
    return _tokenize_slice(tokenizer, records, BadRecords(), 0).examples()


def source(dataset_config, split: str) -> Source:
    data_path = dataset_config.data_path
    if data_path == "sample":
        key = "validation" if _split_key(split) == "val" else split
        name = f"bundled sample ({key})"

        def sample_records(bad: BadRecords) -> tuple[list[dict], int]:
            splits = bundled_sample()
            if key not in splits:
                raise UserError(f"the bundled sample has no {key!r} split; choose train, validation or test")
            return valid_records(splits[key], FIELDS, name, bad), 0

        return sliced(name, f"sample:{key}:{file_digest(_sample_file())}", PROMPT, sample_records, _tokenize_slice)
    path = _data_file(data_path, split)
    if path is None:
        return Source(data_path, None, PROMPT, lambda tok, bad: _tokenize(
            valid_records(_load_hub(data_path, split), FIELDS, f"{data_path} ({split})", bad), tok))

    def file_records(bad: BadRecords) -> tuple[list[dict], int]:
        return valid_records(read_records(path, bad), FIELDS, str(path), bad), 0

    return sliced(str(path), f"file:{file_digest(path)}", PROMPT, file_records, _tokenize_slice, size=data_size(path))


def _load_hub(name: str, split: str) -> list[dict]:
    import datasets

    try:
        return list(datasets.load_dataset(name, split=split))
    except Exception as err:  # offline, unknown id, missing split: all one message for the user
        raise UserError(
            f"cannot load dataset {name!r} split {split!r} from the hub ({type(err).__name__}); "
            "pass a local directory with --samsum_dataset.data_path"
        ) from None


def get_split(dataset_config, tokenizer, split: str, bad: BadRecords | None = None) -> tuple[list[Example], str]:
    src = source(dataset_config, split)
    return src.read(tokenizer, bad or BadRecords()), src.name
