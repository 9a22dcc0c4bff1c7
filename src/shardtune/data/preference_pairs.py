"""Preference records (preference_dataset's plain layout) derived from public corpora, for
tests and demos of DPO without a human-preference dataset: `shardtune prepare preference`.

  * JFLEG: prompt = grammar_dataset's prompt around the learner's sentence, chosen = a
    human correction, rejected = the learner's sentence itself. Both sides get the same
    spacing normalisation as `prepare grammar`, so spacing is no signal; a correction equal
    to the source, or repeating an earlier one for the same source, is left out.
  * SAMSum: prompt = samsum_dataset's prompt around a dialogue, chosen = its reference
    summary, rejected = the summary of another dialogue drawn with a fixed seed (so the
    file is the same on every run); records with an empty dialogue or summary are left out.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from ..errors import UserError
from ..files import atomic_path
from . import grammar, samsum
from .jfleg import jfleg_pairs, normalize_spacing
from .records import BadRecords, read_records, valid_records

JFLEG_REFS = 4


def jfleg_preferences(jfleg: Path, split: str = "dev") -> list[dict]:
    """Records from one JFLEG split (dev or test), source-major, each correction in ref order."""
    if not Path(jfleg).is_dir():
        raise UserError(f"--jfleg {jfleg} is not a directory; point it at the JFLEG checkout (with dev/ and test/)")
    out, seen = [], set()
    for source, reference in jfleg_pairs(Path(jfleg), split, JFLEG_REFS):
        rejected, chosen = normalize_spacing(source), normalize_spacing(reference)
        if not rejected or not chosen or chosen == rejected or (rejected, chosen) in seen:
            continue
        seen.add((rejected, chosen))
        out.append({"prompt": grammar.PROMPT.format(input=rejected), "chosen": chosen, "rejected": rejected})
    return out


def samsum_preferences(path: Path, seed: int = 0) -> list[dict]:
    """Records from one SAMSum file (e.g. val.json: a JSON array of id/dialogue/summary)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--samsum {path} does not exist; pass one SAMSum file such as samsum/train.json")
    bad = BadRecords("error")
    usable = [r for r in valid_records(read_records(path, bad), ("dialogue", "summary"), str(path), bad)
              if r["dialogue"].strip() and r["summary"].strip()]
    if len(usable) < 2:
        raise UserError(f"{path}: needs at least two dialogues with summaries to pair a summary with another's")
    rng = random.Random(seed)
    out = []
    for i, record in enumerate(usable):
        other = rng.randrange(len(usable) - 1)
        other += other >= i  # any record but this one
        rejected = usable[other]["summary"]
        if rejected.strip() == record["summary"].strip():
            continue  # two dialogues with the same summary: no preference between them
        out.append({"prompt": samsum.PROMPT.format(dialog=record["dialogue"]), "chosen": record["summary"],
                    "rejected": rejected})
    return out


def write_jsonl(path: Path, records: list[dict]) -> int:
    """Write the records as JSON lines, atomically (a reader never sees half a file)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return len(records)


def prepare_preferences(out: Path, jfleg: Path | None = None, samsum_file: Path | None = None,
                        seed: int = 0) -> dict[str, int]:
    """One .jsonl of JFLEG dev records, then SAMSum records; returns the count of each."""
    if jfleg is None and samsum_file is None:
        raise UserError("pass --jfleg DIR and/or --samsum FILE: the corpora to derive preference pairs from")
    jfleg_records = jfleg_preferences(jfleg) if jfleg is not None else []
    samsum_records = samsum_preferences(samsum_file, seed) if samsum_file is not None else []
    write_jsonl(out, jfleg_records + samsum_records)
    return {"jfleg": len(jfleg_records), "samsum": len(samsum_records)}
