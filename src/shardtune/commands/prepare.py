"""`shardtune prepare [TRAINING FLAGS] --num_proc N`: tokenize and pack the run's splits into
the data cache ahead of the run, with N processes (the run then maps them; nothing is
tokenized again). Takes the training flags (or --config YAML) the run will use.

`shardtune prepare grammar --jfleg DIR [--c4 FILE] --out DIR`: the grammar_dataset CSVs.
(`shardtune prepare preference`: preference_dataset pairs, see data/preference_pairs.py.)

Follows llama-recipes' grammar_dataset_process notebook:
  * train = JFLEG dev: each source sentence paired with each of its 4 references
    (one row per pair, source-major), then the optional C4_200M pairs;
  * validation = JFLEG test: each source sentence paired with its first reference (ref0),
    one row per sentence;
  * sentence spacing is normalised (tokenised " ," -> ",", " n't" -> "n't", ...), with
    the notebook's wrong mappings (" :" -> "!", " ;" -> "!", " v" -> "n't") left out;
  * rows with an empty input or target are left out (the notebook did the same).
Output: OUT/grammar_train.csv and OUT/grammar_validation.csv with the header input,target.
"""
from __future__ import annotations

import argparse
import csv
import io
import time
from pathlib import Path

from .. import data
from ..config.parse import parse_args
from ..data import cache
from ..data.jfleg import jfleg_pairs, normalize_spacing, read_lines
from ..data.preference_pairs import prepare_preferences
from ..data.records import BadRecords, read_records, valid_records
from ..errors import UserError
from ..files import atomic_path
from ..modeling.load import load_tokenizer

TRAIN_CSV, VALIDATION_CSV = "grammar_train.csv", "grammar_validation.csv"
NUM_REFS = 4

def c4_pairs(path: Path) -> list[tuple[str, str]]:
    """C4_200M pairs: JSON lines with src/trg (or input/output), or a TSV of incorrect<TAB>correct."""
    if path.suffix.lower() in (".tsv", ".txt"):
        return _c4_tsv(path)
    records = read_records(path, BadRecords("error"))
    keys = ("input", "output") if records and isinstance(records[0], dict) and "src" not in records[0] else ("src", "trg")
    return [(r[keys[0]], r[keys[1]]) for r in valid_records(records, keys, str(path), BadRecords("error"))]


def _c4_tsv(path: Path) -> list[tuple[str, str]]:
    text = "\n".join(read_lines(path))
    pairs = []
    for i, row in enumerate(csv.reader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE)):
        if i == 0 and [c.strip().lower() for c in row] in (["input", "output"], ["src", "trg"]):
            continue  # a header row
        if len(row) != 2:
            raise UserError(f"{path}: line {i + 1}: expected 2 tab-separated columns (incorrect, correct), found {len(row)}")
        pairs.append((row[0], row[1]))
    return pairs


def write_csv(path: Path, pairs: list[tuple[str, str]]) -> int:
    """Normalise and write the pairs atomically; returns the number of rows written."""
    rows = [(normalize_spacing(a), normalize_spacing(b)) for a, b in pairs]
    rows = [r for r in rows if r[0] and r[1]]
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["input", "target"])
        writer.writerows(rows)
    return len(rows)


def prepare_grammar(jfleg: Path, out: Path, c4: Path | None = None) -> dict[str, int]:
    if not jfleg.is_dir():
        raise UserError(f"--jfleg {jfleg} is not a directory; point it at the JFLEG checkout (with dev/ and test/)")
    train = jfleg_pairs(jfleg, "dev", NUM_REFS)
    jfleg_rows = len(train)
    if c4 is not None:
        if not c4.is_file():
            raise UserError(f"--c4 {c4} does not exist")
        train += c4_pairs(c4)
    counts = {"train": write_csv(out / TRAIN_CSV, train),
              "validation": write_csv(out / VALIDATION_CSV, jfleg_pairs(jfleg, "test", 1))}
    counts["jfleg_train_pairs"], counts["c4_pairs"] = jfleg_rows, len(train) - jfleg_rows
    return counts


def prepare_splits(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="shardtune prepare", description="tokenize and cache a run's splits ahead of it")
    p.add_argument("--num_proc", type=int, default=1, help="processes that tokenize in parallel")
    a, training_flags = p.parse_known_args(argv)
    if a.num_proc < 1:
        raise UserError("--num_proc must be at least 1")
    cfgs = parse_args(training_flags)
    if cache.cache_root(cfgs.train.data_cache_dir) is None:
        raise UserError("--data_cache_dir none: nothing would be kept; prepare writes the cache a run reads")
    tokenizer = load_tokenizer(cfgs.train.tokenizer_name or cfgs.train.model_name)
    for split in ("train", "validation") if cfgs.train.run_validation else ("train",):
        start = time.perf_counter()
        prepared = data.build_split(cfgs, tokenizer, split, processes=a.num_proc)
        s = prepared.stats
        print(f"{split}: {s.examples} examples, {s.tokens} tokens in {s.chunks} chunks from {prepared.source}; "
              f"{'already cached' if s.from_cache else f'prepared by {a.num_proc} process(es)'} "
              f"in {time.perf_counter() - start:.1f}s")
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] not in (["grammar"], ["preference"], ["-h"], ["--help"]):
        return prepare_splits(argv)
    p = argparse.ArgumentParser(prog="shardtune prepare", description="build dataset files in llama-recipes' formats")
    sub = p.add_subparsers(dest="dataset", required=True)
    _add_preference_parser(sub)
    g = sub.add_parser("grammar", help="grammar_dataset CSVs from JFLEG (+ optional C4_200M pairs)")
    g.add_argument("--jfleg", required=True, type=Path, help="JFLEG directory with dev/ and test/")
    g.add_argument("--c4", type=Path, help="C4_200M pairs to append to train: JSON lines (src/trg) or TSV")
    g.add_argument("--out", required=True, type=Path, help="output directory")
    a = p.parse_args(argv)
    if a.dataset == "preference":
        return _main_preference(a)
    counts = prepare_grammar(a.jfleg, a.out, a.c4)
    print(f"wrote {a.out / TRAIN_CSV} ({counts['train']} rows: {counts['jfleg_train_pairs']} JFLEG dev pairs, "
          f"{counts['c4_pairs']} C4 pairs) and {a.out / VALIDATION_CSV} ({counts['validation']} rows)")
    print(f"train with: --dataset grammar_dataset --grammar_dataset.train_split {a.out / TRAIN_CSV} "
          f"--grammar_dataset.test_split {a.out / VALIDATION_CSV}")
    return 0


def _add_preference_parser(sub) -> None:
    g = sub.add_parser("preference", help="preference_dataset pairs (.jsonl) from JFLEG and/or SAMSum")
    g.add_argument("--jfleg", type=Path, help="JFLEG directory: dev corrections chosen over the learner's sentence")
    g.add_argument("--samsum", type=Path, help="one SAMSum file (e.g. train.json): each dialogue's summary chosen "
                                               "over another dialogue's")
    g.add_argument("--seed", type=int, default=0, help="draws the other dialogue of each SAMSum pair")
    g.add_argument("--out", required=True, type=Path, help="output .jsonl file")


def _main_preference(a) -> int:
    counts = prepare_preferences(a.out, a.jfleg, a.samsum, a.seed)
    print(f"wrote {a.out} ({counts['jfleg']} JFLEG pairs, {counts['samsum']} SAMSum pairs)")
    print(f"train with: shardtune dpo --dataset preference_dataset --preference_dataset.data_path {a.out}")
    return 0
