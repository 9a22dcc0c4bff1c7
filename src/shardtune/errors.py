"""User errors: one line on stderr and a non-zero exit, never a traceback."""
from __future__ import annotations

import functools
import os
import socket
import sys
import traceback
from typing import Callable, NoReturn


class UserError(Exception):
    """Something the user can fix. The message says what is wrong and what to do."""


DEBUG_FLAG = "--debug"
_debug = False  # set once per process by take_debug_flag


def take_debug_flag(argv: list[str]) -> list[str]:
    """argv without --debug. With it, a user error also prints its traceback, including the
    exception it was raised from (which the one-line message replaces)."""
    global _debug
    if DEBUG_FLAG in argv:
        _debug = True
    return [arg for arg in argv if arg != DEBUG_FLAG]


def _say(line: str) -> None:
    # One write per line: print() writes the text and the newline separately, and on an
    # unbuffered stderr that several ranks share, their error lines would interleave.
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def where() -> str:
    """'[rank R on HOST] ' in a multi-rank run, else ''."""
    rank, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE", "1")
    if rank is None or world == "1":
        return ""
    return f"[rank {rank} on {socket.gethostname()}] "


def _peer_lost(err: BaseException) -> bool:
    """A collective failed because another rank is gone (gloo or NCCL)."""
    import torch.distributed as tdist

    text = str(err)
    return isinstance(err, getattr(tdist, "DistError", ())) or any(
        needle in text for needle in ("Connection closed by peer", "Connection reset by peer", "NCCL error",
                                      "ProcessGroupGloo", "Broken pipe"))


def report(err: BaseException) -> int:
    """Say what went wrong in one line (a bug or an out-of-memory error also gets its
    stack first) and return the exit code."""
    if isinstance(err, UserError):
        if _debug:
            err.__suppress_context__ = False  # show what `raise UserError(...) from None` hid
            traceback.print_exception(err)
        _say(f"shardtune: error: {where()}{err}")
        return 2
    if isinstance(err, KeyboardInterrupt):
        _say("shardtune: interrupted")
        return 130
    first = (str(err).strip().splitlines() or [""])[0][:300]
    if where() and _peer_lost(err):
        _say(f"shardtune: error: {where()}lost a peer rank during a collective ({first}); the first failing "
             "rank's error says why; fix it and relaunch with --resume auto")
        return 1
    traceback.print_exception(err)
    _say(f"shardtune: error: {where()}{type(err).__name__}: {first}")
    return 1


def exit_now(err: BaseException) -> NoReturn:
    """Leave a distributed run at once. A normal exit would first wait for this rank's
    in-flight collectives, whose peers wait in turn for this rank, until the collective
    timeout; exiting closes the connections, so the peers fail (and torchrun stops them)
    within seconds."""
    code = report(err)
    sys.stdout.flush()
    os._exit(code)


def exit_on_user_error(main: Callable[..., int | None]) -> Callable[..., int]:
    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs) or 0
        except (UserError, KeyboardInterrupt) as err:
            return report(err)

    return wrapper
