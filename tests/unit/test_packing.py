"""Best-fit-decreasing packing on the real SAMSum corpus: chunks are nearly full, every
example lands whole in exactly one chunk with its own position ids, the result is
deterministic, and it matches a plain re-implementation of best-fit-decreasing."""
import pytest

from shardtune.config.parse import parse_args
from shardtune.data import samsum
from shardtune.data.packing import pack
from shardtune.data.tokenize import IGNORE_INDEX


@pytest.fixture(scope="module")
def samsum_train(shared_data, llama2_tok):
    tok = llama2_tok
    cfg = parse_args(["--samsum_dataset.data_path", str(shared_data / "samsum")]).dataset
    examples, _ = samsum.get_split(cfg, tok, "train")
    return examples


def _reference_bfd(lengths, capacity):
    """Best-fit-decreasing the textbook way: a linear scan for the fullest bin that fits."""
    bins, used = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [b for b in range(len(bins)) if used[b] + lengths[i] <= capacity]
        if fits:
            best = max(fits, key=lambda b: (used[b], -b))
            bins[best].append(i)
            used[best] += lengths[i]
        else:
            bins.append([i])
            used.append(lengths[i])
    return sorted(sorted(b) for b in bins)


def _examples_of(chunk):
    pos = chunk["position_ids"].tolist()
    starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
    return [(tuple(chunk["input_ids"][a:b].tolist()), tuple(chunk["labels"][a:b].tolist()))
            for a, b in zip(starts, starts[1:])]


def test_chunks_are_full_and_hold_every_example_whole(samsum_train):
    chunks, stats = pack(samsum_train, context_length=512)
    assert stats.fill_ratio >= 0.95
    assert stats.fill_ratio == sum(len(c["input_ids"]) for c in chunks) / (512 * len(chunks))
    assert all(len(c["input_ids"]) <= 512 for c in chunks)
    # every example, truncated as documented and with its first label masked, exactly once
    expected = []
    for ex in samsum_train:
        ids, labels = ex["input_ids"][:512], [IGNORE_INDEX] + ex["labels"][1:512]
        if any(l != IGNORE_INDEX for l in labels):
            expected.append((tuple(ids), tuple(labels)))
    found = [seg for c in chunks for seg in _examples_of(c)]
    assert sorted(found) == sorted(expected)
    # the emptiest chunk is last (the one --drop_last drops)
    assert len(chunks[-1]["input_ids"]) == min(len(c["input_ids"]) for c in chunks)
    again, _ = pack(samsum_train, context_length=512)
    assert all((a["input_ids"] == b["input_ids"]).all() for a, b in zip(chunks, again)) and len(again) == len(chunks)


def test_matches_a_textbook_best_fit_decreasing(samsum_train):
    examples = [ex for ex in samsum_train[:3000] if len(ex["input_ids"]) <= 512]  # none truncated or skipped
    chunks, _ = pack(examples, context_length=512)
    index = {}
    for i, ex in enumerate(examples):  # duplicates map to the lowest index, as BFD ties go
        index.setdefault(tuple(ex["input_ids"]), []).append(i)
    groups = [sorted(index[ids].pop(0) for ids, _ in _examples_of(c)) for c in chunks]
    lengths = [len(ex["input_ids"]) for ex in examples]
    assert sorted(groups) == _reference_bfd(lengths, 512)


def test_best_fit_decreasing_matches_the_textbook_scan_on_edge_cases():
    """Random lengths, with zero-length items, items exactly at capacity and capacity 1:
    the same bins as the linear scan, the emptiest last."""
    import random

    from shardtune.data.packing import best_fit_decreasing

    rng = random.Random(0)
    for capacity in (1, 2, 7, 64, 4096):
        for n in (0, 1, 5, 300):
            lengths = [rng.choice([0, capacity, rng.randint(0, capacity)]) for _ in range(n)]
            bins = best_fit_decreasing(lengths, capacity)
            assert sorted(sorted(b) for b in bins) == _reference_bfd(lengths, capacity), (capacity, n)
            used = [sum(lengths[i] for i in b) for b in bins]
            assert not used or used[-1] == min(used)
