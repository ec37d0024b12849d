"""The one user-error type of the project, and how every command prints it.

`UserError` means "the input was wrong": a bad option, a missing or corrupt file, data that does
not fit the network. Its message is one line naming what was wrong and what was expected. Every
`diffusion-pl` command catches it, prints `diffusion-pl <command>: error: <message>` on stderr and
exits with status 2; set `DIFFUSION_PL_TRACEBACK=1` to see the traceback instead. Anything else
is a bug and keeps its traceback.

Subclasses also derive from the built-in type that code outside the project would expect
(`ValueError` for bad values, `FileNotFoundError` for missing files), so `except ValueError`
keeps working.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

__all__ = ["UserError", "UserValueError", "MissingFileError", "DataError", "NonFiniteLossError", "TRACEBACK_ENV", "one_line",
           "find_user_error", "run_command"]

TRACEBACK_ENV = "DIFFUSION_PL_TRACEBACK"
EXIT_USER_ERROR = 2


class UserError(Exception):
    """A bad input; the message is one line naming the input and what was expected."""


class UserValueError(UserError, ValueError):
    """A bad value (an option, a config entry, a file's content)."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class NonFiniteLossError(UserError, FloatingPointError):
    """Training stopped on a non-finite loss (the run, not the code, went wrong)."""


class DataError(UserError, RuntimeError):
    """The training data cannot be read or decoded (raised inside data loader workers too)."""


def one_line(err: BaseException, width: int | None = None) -> str:
    """The first line of an error's message (its type name when empty), cut to `width` characters if given.

    An error re-raised by a DataLoader worker carries the worker's traceback in its message; the
    original message is its last line, which is what the user needs to see.
    """
    text = str(err)
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return first if width is None or len(first) <= width else first[: width - 3] + "..."


def find_user_error(err: BaseException) -> UserError | None:
    """`err` or the UserError it was raised from (Lightning and DataLoader workers wrap errors)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, UserError):
            return err
        if "Original Traceback" in str(err) and "diffusion_pl.utils.errors." in str(err):
            return UserError(one_line(err))  # re-raised from a DataLoader worker
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def run_command(command: str, run: Callable[[], object]) -> int:
    """Exit status of a command's body: 0 when it returns, 2 (one line on stderr) on a UserError."""
    try:
        run()
        return 0
    except Exception as err:
        user = find_user_error(err)
        if user is None or os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            raise
        print(f"diffusion-pl {command}: error: {one_line(user)}", file=sys.stderr)
        return EXIT_USER_ERROR
