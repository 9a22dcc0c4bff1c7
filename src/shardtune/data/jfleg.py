"""JFLEG's parallel text files read as (source, reference) pairs, with tokenised English
spacing undone. Shared by `shardtune prepare grammar` (grammar_dataset CSVs) and
data.preference_pairs (preference records), so both see the same sentences."""
from __future__ import annotations

import re
from pathlib import Path

from ..errors import UserError

# Ordered (pattern, replacement) pairs for tokenised English.
_SPACING = tuple((re.compile(p), r) for p, r in (
    (r" n't\b", "n't"),  # do n't -> don't
    (r" '(s|re|m|ll|ve|d)\b", r"'\1"),  # it 's -> it's
    (r"(?<=\S) ' (?=\S)", "' "),  # twenty years ' time -> years' time
    (r"(?<!\S)\d(?: \d)+(?!\S)", lambda m: m.group(0).replace(" ", "")),  # 2 0 0 6 -> 2006
    (r" ([.,!?:;%)])", r"\1"),  # space before closing punctuation
    (r"\( ", "("),
))


def normalize_spacing(text: str) -> str:
    for pattern, repl in _SPACING:
        text = pattern.sub(repl, text)
    return text.strip()


def read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise UserError(f"{path} does not exist; --jfleg must be the JFLEG directory (with dev/ and test/)")
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise UserError(f"{path}: line {line}: bytes are not valid UTF-8; re-save the file as UTF-8") from None


def _split_dir(jfleg: Path, name: str) -> Path:
    """JFLEG's layout is DIR/dev/dev.src; a flat DIR/dev.src is accepted too."""
    return jfleg / name if (jfleg / name / f"{name}.src").is_file() else jfleg


def jfleg_pairs(jfleg: Path, name: str, refs: int) -> list[tuple[str, str]]:
    """(source, reference) pairs of one JFLEG split, source-major, using refs 0..refs-1."""
    d = _split_dir(jfleg, name)
    sources = read_lines(d / f"{name}.src")
    references = []
    for j in range(refs):
        ref = read_lines(d / f"{name}.ref{j}")
        if len(ref) != len(sources):
            raise UserError(f"{d / f'{name}.ref{j}'} has {len(ref)} lines but {name}.src has {len(sources)}; the files must be parallel")
        references.append(ref)
    return [(src, references[j][i]) for i, src in enumerate(sources) for j in range(refs)]
