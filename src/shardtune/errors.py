"""User errors: one line on stderr and a non-zero exit, never a traceback."""
from __future__ import annotations

import functools
import os
import sys
from typing import Callable


class UserError(Exception):
    """Something the user can fix. The message says what is wrong and what to do."""


def _say(line: str) -> None:
    # One write per line: print() writes the text and the newline separately, and on an
    # unbuffered stderr that several ranks share, their error lines would interleave.
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def exit_on_user_error(main: Callable[..., int | None]) -> Callable[..., int]:
    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs) or 0
        except UserError as err:
            rank = os.environ.get("RANK")
            where = f"[rank {rank}] " if rank not in (None, "0") else ""
            _say(f"shardtune: error: {where}{err}")
            return 2
        except KeyboardInterrupt:
            _say("shardtune: interrupted")
            return 130

    return wrapper
