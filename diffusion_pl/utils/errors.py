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

import errno
import os
import sys
from typing import Callable

__all__ = ["UserError", "UserValueError", "MissingFileError", "DataError", "NonFiniteLossError", "WriteError",
           "TRACEBACK_ENV", "WRITE_ERRNOS", "one_line", "os_error_line", "write_error", "find_user_error", "lost_peer", "run_command"]

TRACEBACK_ENV = "DIFFUSION_PL_TRACEBACK"
EXIT_USER_ERROR = 2
# OSErrors of the machine, not of the code: a full disk or quota, a read-only or forbidden folder, a file
# where a folder was expected
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
WRITE_ERRNOS = frozenset({*_FULL, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR})


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


class WriteError(UserError, OSError):
    """A file or folder cannot be written: the disk is full, the folder is read-only, a file is in the way."""


def os_error_line(err: OSError, target: str | os.PathLike | None = None, writing: bool = True) -> str:
    """One line for an OSError of WRITE_ERRNOS met on `target` (default: the error's own file name): what could not
    be written (`writing`; else accessed), why, and what to do."""
    target = os.fspath(target if target is not None else err.filename or "a file")
    reason = err.strerror or type(err).__name__
    other = os.fspath(err.filename) if err.filename is not None else None
    if other is not None and other != target and err.errno not in _FULL:
        reason += f": {other}"
    verb = "written" if writing or err.errno in _FULL or err.errno == errno.EROFS else "accessed"
    if err.errno in _FULL:
        return (f"{target} cannot be written ({reason}): free space on that disk (or write elsewhere) and run "
                "again; no half-written file is left")
    if err.errno == errno.ENOTDIR:
        return f"{target} cannot be {verb} ({reason}): a file is in the way of a folder; expected a folder path"
    return f"{target} cannot be {verb} ({reason}): expected a path you may {'write' if verb == 'written' else 'use'}"


def write_error(err: OSError, target: str | os.PathLike | None = None, writing: bool = True) -> WriteError:
    """A WriteError of `err` (its errno kept) with the one line of `os_error_line`."""
    error = WriteError(os_error_line(err, target, writing))
    error.errno = err.errno
    return error


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
    """`err` or the UserError it was raised from (Lightning and DataLoader workers wrap errors); an OSError of
    WRITE_ERRNOS (a full disk, a read-only folder: the machine, not the code) counts as one."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, UserError):
            return err
        if isinstance(err, OSError) and err.errno in WRITE_ERRNOS:
            return write_error(err, writing=False)
        if "Original Traceback" in str(err) and "diffusion_pl.utils.errors." in str(err):
            return UserError(one_line(err))  # re-raised from a DataLoader worker
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


# what gloo and NCCL say when the process at the other end of a collective is gone (killed, crashed)
_PEER_GONE = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "NCCL communicator was aborted",
              "NCCL Error 6: remote process exited")


def lost_peer(err: BaseException) -> str | None:
    """The one-line reason when `err` (or an error it was raised from) is a collective that failed because another
    process of the distributed run is gone; None otherwise."""
    seen = set()
    while err is not None and id(err) not in seen:
        text = str(err)
        if isinstance(err, RuntimeError) and any(marker in text for marker in _PEER_GONE):
            return next(marker for marker in _PEER_GONE if marker in text)
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def run_command(command: str, run: Callable[[], object]) -> int:
    """Exit status of a command's body: 0 when it returns, 2 (one line on stderr) on a UserError, 1 (one line)
    when another process of a distributed run died (this one only lost its connection: the cause is in that
    process's log, and ~100 lines of gloo / NCCL traceback here would hide it)."""
    try:
        run()
        return 0
    except Exception as err:
        if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            raise
        user = find_user_error(err)
        if user is not None:
            print(f"diffusion-pl {command}: error: {one_line(user)}", file=sys.stderr)
            return EXIT_USER_ERROR
        gone = lost_peer(err)
        if gone is None:
            raise
        rank = os.environ.get("RANK", os.environ.get("LOCAL_RANK"))
        me = f" (this is rank {rank})" if rank is not None else ""
        print(f"diffusion-pl {command}: error: another process of this distributed run died ({gone}){me}: see the "
              f"other ranks' output or log for the first error (a crash, an out-of-memory kill, a scheduler's kill); "
              f"set {TRACEBACK_ENV}=1 to see where this one stopped", file=sys.stderr)
        return 1
