"""custom_dataset: the llama-recipes contract for a user's own dataset file.

`--custom_dataset.file path/to/file.py[:function]` names a Python file. It is executed as
code (only because the user named it), and `get_custom_dataset(dataset_config, tokenizer,
split)` (or the named function) is called. It returns a list, a Hugging Face Dataset or a
torch Dataset of dicts with `input_ids` and `labels` (-100 = not trained), optionally
`attention_mask` (positions with mask 0 are padding and are dropped). If the file also
defines `get_data_collator(tokenizer)`, its collator builds the batches.

Custom splits are not cached: shardtune cannot see what the user's code reads.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import sys
import traceback
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterable, Optional

import torch

from ..errors import UserError
from .packing import causal_pairs
from .records import BadRecords
from .source import Source
from .tokenize import IGNORE_INDEX, Example

DEFAULT_FUNCTION = "get_custom_dataset"
COLLATOR_FUNCTION = "get_data_collator"


def parse_file_spec(spec: str) -> tuple[Path, str]:
    """`file.py` or `file.py:function` -> (path, function name)."""
    path, sep, func = spec.rpartition(":")
    if not sep:
        path, func = spec, ""
    path = Path(path).expanduser()
    if path.suffix != ".py":
        raise UserError(f"--custom_dataset.file {spec!r} must be a .py file, optionally followed by :function_name")
    if not path.is_file():
        raise UserError(f"custom dataset file {path} does not exist; check --custom_dataset.file")
    return path, func or DEFAULT_FUNCTION


def _module_name(path: Path) -> str:
    return "shardtune_custom_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]


@contextlib.contextmanager
def user_code(path: Path, what: str):
    """An exception raised by the user's file becomes one line naming the file, the line and
    the error (--debug adds the traceback); shardtune's own UserErrors pass through."""
    try:
        yield
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"{path}: {what} raised {type(err).__name__}{_user_line(err, path)}: "
                        f"{(str(err).strip().splitlines() or [''])[0]}; fix the custom dataset file "
                        "(--debug shows the traceback)") from err


def _user_line(err: Exception, path: Path) -> str:
    """' at line N' of the user's file: where its code raised, or a syntax error's line."""
    if isinstance(err, SyntaxError) and err.lineno and Path(err.filename or "") == path:
        return f" at line {err.lineno}"
    lines = [frame.lineno for frame in traceback.extract_tb(err.__traceback__) if Path(frame.filename) == path]
    return f" at line {lines[-1]}" if lines else ""


def load_module(path: Path) -> ModuleType:
    """Execute the user's file as a module (it is code: this runs it)."""
    name = _module_name(path)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # as importlib's recipe does: dataclasses and pickle look modules up here
    with user_code(path, "loading it"):
        spec.loader.exec_module(module)
    return module


def _as_list(value: Any, field: str) -> list:
    if hasattr(value, "tolist") and not isinstance(value, (list, tuple)):  # torch or numpy
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise TypeError(f"field {field!r} must be a list of ints")
    return list(value)


def to_example(item: Any, vocab_size: int) -> Example:
    """One returned item as an Example; raises TypeError/ValueError describing what is wrong."""
    if not isinstance(item, Mapping):  # dict, BatchEncoding, ...
        raise TypeError(f"expected a dict with input_ids and labels, got {type(item).__name__}")
    for name in ("input_ids", "labels"):
        if name not in item:
            raise KeyError(f"missing field {name!r}")
    ids, labels = _as_list(item["input_ids"], "input_ids"), _as_list(item["labels"], "labels")
    if len(ids) != len(labels):
        raise ValueError(f"input_ids has {len(ids)} tokens but labels has {len(labels)}")
    if item.get("attention_mask") is not None:
        mask = _as_list(item["attention_mask"], "attention_mask")
        if len(mask) != len(ids):
            raise ValueError(f"attention_mask has {len(mask)} entries for {len(ids)} tokens")
        keep = [i for i, m in enumerate(mask) if m]
        ids, labels = [ids[i] for i in keep], [labels[i] for i in keep]
    if any(not 0 <= t < vocab_size for t in ids):
        raise ValueError(f"input_ids holds ids outside the tokenizer's vocabulary [0, {vocab_size})")
    if any(l != IGNORE_INDEX and not 0 <= l < vocab_size for l in labels):
        raise ValueError(f"labels must be token ids or {IGNORE_INDEX}")
    return {"input_ids": ids, "labels": labels}


def _items(result: Any, where: str) -> Iterable:
    if isinstance(result, (str, bytes, dict)) or not hasattr(result, "__iter__") and not hasattr(result, "__getitem__"):
        raise UserError(f"{where} returned {type(result).__name__}; return a list, a datasets.Dataset or a torch Dataset of dicts")
    if hasattr(result, "__len__") and hasattr(result, "__getitem__"):
        return (result[i] for i in range(len(result)))  # map-style: torch Datasets need not define __iter__
    return iter(result)


def examples_from(result: Any, where: str, vocab_size: int, bad: BadRecords) -> list[Example]:
    out = []
    for i, item in enumerate(_items(result, where)):
        try:
            out.append(to_example(item, vocab_size))
        except (TypeError, ValueError, KeyError) as err:
            msg = err.args[0] if err.args else str(err)
            bad.report(f"{where}: record {i}: {msg}")
    return out


def source(dataset_config, split: str) -> Source:
    path, func_name = parse_file_spec(dataset_config.file)
    module = load_module(path)
    func = getattr(module, func_name, None)
    if not callable(func):
        raise UserError(f"{path} has no function {func_name}(dataset_config, tokenizer, split); define it or name it as {path}:function")
    where = f"{path}:{func_name} ({split})"

    def read(tokenizer, bad: BadRecords) -> list[Example]:
        with user_code(path, f"{func_name}(dataset_config, tokenizer, {split!r})"):  # also its items' reads
            return examples_from(func(dataset_config, tokenizer, split), where, len(tokenizer), bad)

    has_collator = callable(getattr(module, COLLATOR_FUNCTION, None))
    return Source(where, None, f"custom:{path}:{func_name}", read,
                  functools.partial(CustomCollator, path) if has_collator else None)


class CustomCollator:
    """The user's get_data_collator(tokenizer), adapted to what the training loop reads: it
    adds num_targets, num_tokens and num_attention_pairs, and gives eval filler items (see
    ChunkDataset) all -100 labels. DataLoader workers start as fresh processes, so this pickles as (file, tokenizer)
    and a worker rebuilds the user's collator by running the user's file again."""

    def __init__(self, path: Path, tokenizer) -> None:
        self.path, self.tokenizer = path, tokenizer
        self._user: Optional[Callable[[list[dict]], dict]] = None

    def __getstate__(self) -> dict:
        return {"path": self.path, "tokenizer": self.tokenizer, "_user": None}

    def user_collate(self) -> Callable[[list[dict]], dict]:
        if self._user is None:
            module = sys.modules.get(_module_name(self.path)) or load_module(self.path)
            with user_code(self.path, f"{COLLATOR_FUNCTION}(tokenizer)"):
                self._user = getattr(module, COLLATOR_FUNCTION)(self.tokenizer)
        return self._user

    def __call__(self, items: list[dict]) -> dict:
        # each item is one example (packing.truncate_each), however the user's collator lays them out
        real = [len(it["input_ids"]) for it in items if not it.get("dummy")]
        cleaned = []
        for it in items:
            plain = {k: v for k, v in it.items() if k != "dummy"}
            if it.get("dummy"):
                plain["labels"] = [IGNORE_INDEX] * len(plain["labels"])
            cleaned.append(plain)
        collate = self.user_collate()
        with user_code(self.path, f"the collator from {COLLATOR_FUNCTION}"):
            batch = {k: torch.as_tensor(v) if isinstance(v, list) else v for k, v in dict(collate(cleaned)).items()}
        if "input_ids" not in batch or "labels" not in batch:
            raise UserError("the custom get_data_collator must return a batch with input_ids and labels")
        batch["num_targets"] = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        batch["num_tokens"] = sum(real)
        batch["num_attention_pairs"] = sum(causal_pairs(n) for n in real)
        return batch
