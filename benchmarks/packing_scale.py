"""Best-fit-decreasing packing at corpus scale: shardtune's packer against the sorted-list
version it replaced (bisect + list inserts, O(bins) per item), on synthetic lengths drawn
like SAMSum's (log-normal, median ~200 tokens), capacity 4096. Both must give the same bins.

    python -m benchmarks.packing_scale --items 400000 2000000 8000000
"""
from __future__ import annotations

import argparse
import bisect
import random
import time

from shardtune.data.packing import best_fit_decreasing


def sorted_list_bfd(lengths: list[int], capacity: int) -> list[list[int]]:
    """The previous packer (d1fb529..e69dd04): the open bins in a list sorted by free space."""
    bins, room = [], []
    for item in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        k = bisect.bisect_left(room, (lengths[item], -1))
        if k == len(room):
            bins.append([])
            free, target = capacity, len(bins) - 1
        else:
            free, target = room.pop(k)
        bins[target].append(item)
        bisect.insort(room, (free - lengths[item], target))
    if bins:
        used = [sum(lengths[i] for i in b) for b in bins]
        bins.append(bins.pop(min(range(len(bins)), key=lambda b: (used[b], -b))))
    return bins


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, nargs="+", default=[400_000, 2_000_000])
    parser.add_argument("--capacity", type=int, default=4096)
    args = parser.parse_args()
    rng = random.Random(0)
    print("| items | bins | shardtune s | sorted list s | ratio |\n|---|---|---|---|---|")
    for n in args.items:
        lengths = [min(args.capacity, max(1, int(rng.lognormvariate(5.3, 0.8)))) for _ in range(n)]
        start = time.perf_counter()
        ours = best_fit_decreasing(lengths, args.capacity)
        mid = time.perf_counter()
        theirs = sorted_list_bfd(lengths, args.capacity)
        end = time.perf_counter()
        assert ours == theirs, "the packers disagree"
        print(f"| {n:,} | {len(ours):,} | {mid - start:.1f} | {end - mid:.1f} | {(end - mid) / (mid - start):.2f}x |")


if __name__ == "__main__":
    main()
