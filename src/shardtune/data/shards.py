"""Preparing a split in shards: tokenize slices of the records in parallel, pack from lengths.

A split's records are cut into shards of SHARD_RECORDS (a fixed size, so a shard's content
never depends on how many workers prepared it). A worker tokenizes a shard, truncates and
filters its examples exactly as packing.pack() does, and writes the surviving segments as
flat int32 arrays (mapped.py) beside the split's cache file. Packing then reads only the
shards' lengths, runs the same best_fit_decreasing, and copies each shard's tokens into
place in the output file through memory maps. So memory holds the raw records and one
shard's tokens, never a Python list of every token, and the result is pack()'s, bit for
bit, whether 1, 2 or N workers prepared it.

Workers coordinate through the file system only: worker w tokenizes shards w, w+W, ...;
worker 0 waits for every shard file and packs; the others wait for the packed file. No
collective is entered, so a preparation longer than --dist_timeout cannot trip it; a
failing worker leaves a marker file with its one-line error, which the waiting ones raise.

Several jobs may prepare one split on one host (a sweep with the same data and tokenizer),
and a launch may find what an interrupted one left. So worker 0 prepares holding an
exclusive lock (flock) on a file beside the split, and first looks again for a packed
split: another job may have packed it meanwhile, and then it is used. Otherwise worker 0
claims the shard folder for its launch (an owner file naming the launch; markers of other
launches are removed, and shards they finished are kept), and only then do the other
workers of that launch tokenize in it. They never take a file at the target path for the
result until it reads as a packed split, so a stale or corrupt one is waited out, not mapped.

A training process that prepares a large split (CHILD_MIN_BYTES of raw data or more) does
its reading and tokenizing in a child process (fresh_start_method), so the raw records never enter the training process: its
resident memory stays what training needs, whatever the corpus size. Packing reads only
the shards, so it stays in the training process.
"""
from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import multiprocessing
import os
import shutil
import socket
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..errors import UserError
from ..files import atomic_path
from . import mapped
from .packing import PackStats, best_fit_decreasing
from .records import BadRecords
from .source import Source
from .tokenize import IGNORE_INDEX, FlatExamples

log = logging.getLogger(__name__)

SHARD_RECORDS = 2048  # records per shard: one worker's unit of work and of memory
# raw data from which a training process tokenizes in a child (a child costs ~3 s to start)
CHILD_MIN_BYTES = 32 * 2**20
_POLL_S = 0.2
_SUMMED = ("examples", "truncated", "skipped_no_target", "tokens", "target_tokens", "bad_records")


def segments(examples: list[dict] | FlatExamples, context_length: int) -> tuple[dict[str, np.ndarray], dict]:
    """pack()'s truncation and filtering, on arrays: the segments that keep a target token,
    with labels[0] of each set to IGNORE_INDEX; and the counts pack() keeps."""
    if isinstance(examples, FlatExamples):
        ids, labels, lens = examples
        n, total = len(lens), len(ids)
    else:
        n = len(examples)
        lens = np.fromiter((len(e["input_ids"]) for e in examples), np.int64, n)
        total = int(lens.sum())
        ids = np.fromiter(itertools.chain.from_iterable(e["input_ids"] for e in examples), np.int32, total)
        labels = np.fromiter(itertools.chain.from_iterable(e["labels"] for e in examples), np.int32, total)
    inside = np.arange(total) - np.repeat(np.cumsum(lens) - lens, lens) < context_length
    ids, labels = ids[inside], labels[inside]
    kept = np.minimum(lens, context_length)
    starts = np.cumsum(kept) - kept
    labels[starts[kept > 0]] = IGNORE_INDEX  # never train the jump from the previous example
    trained = np.concatenate([[0], np.cumsum(labels != IGNORE_INDEX)])
    targets = trained[starts + kept] - trained[starts]
    keep = targets > 0
    tokens = np.repeat(keep, kept)
    arrays = {"input_ids": ids[tokens], "labels": labels[tokens],
              "lengths": kept[keep].astype(np.int32), "targets": targets[keep].astype(np.int32)}
    counts = {"examples": n, "truncated": int((lens > context_length).sum()), "skipped_no_target": int((~keep).sum()),
              "tokens": int(kept[keep].sum()), "target_tokens": int(targets[keep].sum())}
    return arrays, counts


class Plan:
    """Where one split's shards and packed file go, and how the split is read."""

    def __init__(self, src: Source, out: Path, context_length: int, packing: bool, drop_last: bool,
                 on_bad_record: str, run_id: str = "", rebuild: Optional[Callable[[], Source]] = None) -> None:
        self.src, self.out, self.context_length = src, out, context_length
        # () -> src again, in a child process: a Source holds closures, which do not pickle
        self.rebuild = rebuild
        self.packing, self.drop_last, self.on_bad_record = packing, drop_last, on_bad_record
        # per node (torchrun's GROUP_RANK): on a filesystem shared by nodes, each node prepares
        # (and removes) its own shards; the first packed file published is kept (mapped.write keep_existing)
        node = f"{socket.gethostname()}-{os.environ.get('GROUP_RANK', '0')}"
        self.dir = out.with_name(f"{out.name}.{node}.shards")
        self.lock = out.with_name(f"{out.name}.{node}.lock")  # held by the worker 0 that prepares
        # names this launch's failure markers and its claim on self.dir, so that what another
        # launch left there, or another job writes, is never taken for this one's
        self.run_id = run_id

    def __getstate__(self) -> dict:
        if self.rebuild is None:
            raise TypeError("a Plan without `rebuild` cannot be sent to another process")
        return {**self.__dict__, "src": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.src = self.rebuild()

    def shard(self, i: int) -> Path:
        return self.dir / f"{i:06d}.safetensors"

    def _marker(self, worker: int) -> Path:
        return self.dir / f"failed-{self.run_id}-{worker}.txt"

    def _owner(self) -> Path:
        return self.dir / "owner.txt"


def read_records(plan: Plan) -> tuple[list, int, BadRecords]:
    """The split's records (each worker reads them; tokenizing is what is divided)."""
    bad = BadRecords(plan.on_bad_record)
    if plan.src.records is None:  # read whole: a hub id or a user's code
        return [], 0, bad
    records, start = plan.src.records(bad)
    return records, start, bad


def num_shards(plan: Plan, records: list) -> int:
    return -(-len(records) // SHARD_RECORDS) if plan.src.records is not None else 1


def tokenize_shard(plan: Plan, tokenizer, records: list, start: int, i: int) -> None:
    """Tokenize and write shard i (skipped when a previous, interrupted run wrote it)."""
    if plan.shard(i).is_file():
        return
    bad = BadRecords(plan.on_bad_record)
    if plan.src.records is None:
        examples = plan.src.read(tokenizer, bad)
    else:
        a = i * SHARD_RECORDS
        examples = plan.src.tokenize(tokenizer, records[a:a + SHARD_RECORDS], bad, start + a)
    arrays, counts = segments(examples, plan.context_length)
    del examples
    mapped.save(plan.shard(i), arrays, {**counts, "bad_records": bad.count, "notes": bad.messages})


def work(plan: Plan, tokenizer, worker: int, workers: int, loaded: Optional[tuple] = None) -> tuple[int, BadRecords]:
    """Worker `worker` of `workers`: its shards (of `loaded` records when the caller read them
    already); a failure leaves a marker for the others."""
    try:
        records, start, bad = loaded or read_records(plan)
        n = num_shards(plan, records)
        for i in range(worker, n, workers):
            tokenize_shard(plan, tokenizer, records, start, i)
        return n, bad
    except BaseException as err:
        if workers > 1:
            plan.dir.mkdir(parents=True, exist_ok=True)
            plan._marker(worker).write_text(str(err) if isinstance(err, UserError) else
                                            f"worker {worker} failed: {type(err).__name__}: {err}")
        raise


def fresh_start_method() -> str:
    """How a training process starts helpers (DataLoader workers, preparation): never fork.
    By then it runs communication threads (gloo or NCCL, tqdm), and a fork taken while one of
    them holds a lock leaves the child deadlocked. A fork server (a fresh single-threaded
    process) or spawn starts them instead."""
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def work_in_child(plan: Plan, tokenizer, worker: int, workers: int) -> tuple[int, BadRecords]:
    """work() in a fresh child process, so that this process never holds the raw records."""
    context = multiprocessing.get_context(fresh_start_method())
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_work_and_report, args=(plan, tokenizer, worker, workers, send), daemon=True)
    child.start()
    send.close()
    try:
        outcome = receive.recv()
    except EOFError:  # it died without a word (killed, out of memory)
        child.join()
        raise UserError(f"the data preparation process died (exit code {child.exitcode}); "
                        "see its error above, or prepare the split ahead with `shardtune prepare`") from None
    child.join()
    if outcome[0] == "error":
        raise UserError(outcome[1])
    _, n, count, messages = outcome
    bad = BadRecords(plan.on_bad_record)
    bad.count, bad.messages = count, messages
    return n, bad


def _work_and_report(plan: Plan, tokenizer, worker: int, workers: int, send) -> None:
    try:
        n, bad = work(plan, tokenizer, worker, workers)
        send.send(("done", n, bad.count, bad.messages))
    except UserError as err:
        send.send(("error", str(err)))
    except BaseException as err:  # noqa: BLE001 - the parent turns it into one line
        send.send(("error", f"preparing the data failed: {type(err).__name__}: {err}"))


def wait_for(plan: Plan, paths: Callable[[], list[Path]], peers_alive: Callable[[], bool] = lambda: True) -> None:
    """Poll until every path exists; raise the error of a worker that failed meanwhile."""
    while not all(p.is_file() for p in paths()):
        _check_peers(plan, peers_alive)
        time.sleep(_POLL_S)


def _check_peers(plan: Plan, peers_alive: Callable[[], bool]) -> None:
    """Raise the error of a worker of this launch that failed."""
    if not peers_alive():
        raise UserError("a preparation process died before writing its shards; see its error above")
    for marker in sorted(plan.dir.glob(f"failed-{plan.run_id}-*.txt")) if plan.dir.is_dir() else ():
        raise UserError(f"another worker could not prepare the split: {marker.read_text().strip()}")


def packed(path: Path) -> bool:
    """Whether path holds a packed split (an old run's or another job's: same key, same content)."""
    try:
        return "stats" in mapped.read(path)[1]
    except (OSError, ValueError, KeyError):
        return False


@contextlib.contextmanager
def _locked(path: Path):
    """Hold an exclusive flock on `path`; the file is removed when released, so no lock file
    outlives a preparation. A waiter can then wake holding the removed file: it checks that
    the path still names the file it locked, and otherwise locks the new one."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another job on this host is preparing this split; waiting for it (%s)", path)
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # before the unlock, so nobody locks a file about to go
        os.close(fd)


def _claim(plan: Plan) -> None:
    """Make plan.dir this launch's (under the lock): drop other launches' failure markers,
    keep the shards they finished (a shard file is whole or absent), name the launch."""
    plan.dir.mkdir(parents=True, exist_ok=True)
    for marker in plan.dir.glob("failed-*.txt"):
        if not marker.name.startswith(f"failed-{plan.run_id}-"):
            marker.unlink(missing_ok=True)
    with atomic_path(plan._owner()) as tmp:
        tmp.write_text(plan.run_id)


def _claimed(plan: Plan) -> bool:
    try:
        return plan._owner().read_text() == plan.run_id
    except FileNotFoundError:
        return False


def _follow(plan: Plan, tokenizer, worker: int, workers: int, loaded: Optional[tuple],
            peers_alive: Callable[[], bool], in_child: bool) -> None:
    """A worker other than 0: tokenize its shards once worker 0 of its launch has claimed the
    shard folder (never in another job's), and return once plan.out holds a packed split."""
    worked = False
    while not packed(plan.out):
        if not worked and _claimed(plan):
            work_in_child(plan, tokenizer, worker, workers) if in_child else \
                work(plan, tokenizer, worker, workers, loaded)
            worked = True
            continue
        _check_peers(plan, peers_alive)
        time.sleep(_POLL_S)


def pack_shards(plan: Plan, n: int, load_bad: BadRecords, meta: dict) -> PackStats:
    """Pack the n shards into plan.out (pack()'s chunks, in pack()'s order); the shards are
    then removed. Returns the split's PackStats."""
    stats = PackStats(context_length=plan.context_length, bad_records=load_bad.count, notes=list(load_bad.messages))
    lengths, targets = [], []
    for i in range(n):  # the small per-segment arrays only; tokens are read shard by shard below
        arrays, m = mapped.read(plan.shard(i))
        lengths.append(np.array(arrays["lengths"], np.int64))
        targets.append(np.array(arrays["targets"], np.int64))
        for name in _SUMMED:
            setattr(stats, name, getattr(stats, name) + m[name])
        stats.notes += m["notes"]
    stats.notes = stats.notes[:20]
    stats.tokenized = stats.examples
    per_shard = [len(x) for x in lengths]
    lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    groups = best_fit_decreasing(lengths.tolist(), plan.context_length) if plan.packing else \
        [[i] for i in range(len(lengths))]
    used = [int(lengths[g].sum()) for g in groups]
    if plan.packing and plan.drop_last and groups and used[-1] < plan.context_length:
        last = groups.pop()
        stats.dropped_last, stats.tokens = len(last), stats.tokens - used.pop()
        stats.target_tokens -= int(np.concatenate(targets)[last].sum())
    stats.chunks = len(groups)
    _write_packed(plan, per_shard, lengths, groups, used, {**meta, "stats": asdict(stats)})
    shutil.rmtree(plan.dir, ignore_errors=True)
    return stats


def _write_packed(plan: Plan, per_shard: list[int], lengths: np.ndarray, groups: list[list[int]], used: list[int],
                  meta: dict) -> None:
    order = np.fromiter(itertools.chain.from_iterable(groups), np.int64, sum(map(len, groups)))
    dest = np.full(len(lengths), -1, np.int64)  # where each segment starts in the output; -1 = dropped
    dest[order] = np.cumsum(lengths[order]) - lengths[order]
    total = int(sum(used))
    offsets = np.concatenate([[0], np.cumsum(used, dtype=np.int64)]).astype(np.int64)
    shapes = {"input_ids": (np.int32, total), "labels": (np.int32, total), "position_ids": (np.int32, total),
              "offsets": (np.int64, len(offsets))}
    # the cache may be on a filesystem nodes share: durable before published, never renamed over a packed split
    with mapped.write(plan.out, shapes, meta, keep_existing=packed) as out:
        out["offsets"][:] = offsets
        first = 0
        for i, count in enumerate(per_shard):  # one shard's tokens at a time
            shard, _ = mapped.read(plan.shard(i))
            seg_len, seg_dest = lengths[first:first + count], dest[first:first + count]
            first += count
            within = np.arange(int(seg_len.sum())) - np.repeat(np.cumsum(seg_len) - seg_len, seg_len)
            placed = np.repeat(seg_dest >= 0, seg_len)
            target = (np.repeat(seg_dest, seg_len) + within)[placed]
            out["input_ids"][target] = shard["input_ids"][placed]
            out["labels"][target] = shard["labels"][placed]
            out["position_ids"][target] = within[placed]
            del shard
            out.release()  # written pages go to the file, not this process's RSS


def prepare(plan: Plan, tokenizer, worker: int = 0, workers: int = 1, meta: Optional[dict] = None,
            loaded: Optional[tuple] = None, peers_alive: Callable[[], bool] = lambda: True,
            in_child: bool = False) -> Optional[PackStats]:
    """This worker's part of preparing plan.out; worker 0 packs and returns the stats, the
    others return None once plan.out holds the split, and so does worker 0 when another job
    packed it meanwhile. in_child: read and tokenize in a child process."""
    if worker != 0:
        _follow(plan, tokenizer, worker, workers, loaded, peers_alive, in_child)
        return None
    start = time.perf_counter()
    with _locked(plan.lock):
        if packed(plan.out):
            return None
        _claim(plan)
        n, load_bad = work_in_child(plan, tokenizer, worker, workers) if in_child else \
            work(plan, tokenizer, worker, workers, loaded)
        wait_for(plan, lambda: [plan.shard(i) for i in range(n)], peers_alive)
        stats = pack_shards(plan, n, load_bad, meta or {})
    log.info("prepared %d examples in %d shards by %d worker(s) in %.1fs", stats.examples, n, workers,
             time.perf_counter() - start)
    return stats


def prepare_in_processes(plan: Plan, tokenizer, processes: int, meta: Optional[dict] = None) -> Optional[PackStats]:
    """prepare() by `processes` local processes (`shardtune prepare --num_proc`): the records
    are read once, then forked children tokenize their shards beside this process. None when
    another job prepared the split meanwhile."""
    if processes < 2:
        return prepare(plan, tokenizer, 0, 1, meta)
    loaded = read_records(plan)
    fork = multiprocessing.get_context("fork")  # children inherit the records and the tokenizer
    children = [fork.Process(target=_child, args=(plan, tokenizer, w, processes, loaded), daemon=True)
                for w in range(1, processes)]
    for child in children:
        child.start()
    try:
        return prepare(plan, tokenizer, 0, processes, meta, loaded,
                       peers_alive=lambda: all(c.exitcode in (None, 0) for c in children))
    finally:
        for child in children:
            child.join(timeout=5)
            if child.is_alive():
                child.kill()


def _child(plan: Plan, tokenizer, worker: int, workers: int, loaded: tuple) -> None:
    parent = os.getppid()
    try:
        _follow(plan, tokenizer, worker, workers, loaded, lambda: os.getppid() == parent, in_child=False)
    except UserError:
        os._exit(1)  # the marker carries the message to the parent, which reports it once


def run_id() -> str:
    """A new id for a preparation by this process (and children it forks); a launch's ranks
    share device.Dist.launch instead."""
    return uuid.uuid4().hex
