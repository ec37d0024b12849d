"""Files the project writes: atomically (temporary file in the same folder, then rename) and hashed.

A reader (a resumed `sample`, a FID cache lookup, `--ckpt_path last`) must never see half a file:
every writer writes a hidden temporary file beside the target and renames it over the target,
which POSIX makes atomic within one file system. A process killed mid-write (SIGKILL, a power cut)
leaves its temporary file behind; the next write into that folder removes those whose writer is gone.
A full disk or a folder that cannot be written ends in one line naming the file (`WriteError`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import socket
import tempfile
import zlib
from pathlib import Path
from typing import Iterator

from diffusion_pl.utils.errors import WRITE_ERRNOS, write_error

__all__ = ["atomic_path", "sha256_file", "writable_folder", "remove_stale_temporaries"]

# which machine wrote a temporary file: a folder on a shared file system is written by several hosts,
# and a PID is only alive or dead on its own host
_HOST = f"{zlib.crc32(socket.gethostname().encode()):08x}"
_TEMPORARY = re.compile(r"^\..+\.tmp-(?P<pid>\d+)(?:-(?P<host>[0-9a-f]{8}))?(?:\.[^.]*)?$")
_swept: set[Path] = set()  # folders swept by this process (once each: a folder of 50k samples is listed once)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(folder: Path) -> None:
    """Persist a rename: fsync the directory entry (POSIX only)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (signal 0 probes without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OverflowError:  # not a PID this system can have
        return False
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files of `atomic_path` in `folder` whose writer no longer runs (killed mid-write);
    returns them. Files written from another host, or by a live process, are left alone."""
    folder, removed = Path(folder), []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        match = _TEMPORARY.match(name)
        if match is None or match["host"] not in (None, _HOST) or int(match["pid"]) == os.getpid():
            continue
        if not _alive(int(match["pid"])):
            with contextlib.suppress(OSError):  # another process swept it first, or it is not ours to remove
                (folder / name).unlink()
                removed.append(folder / name)
    return removed


def writable_folder(path: str | os.PathLike, what: str = "folder") -> Path:
    """`path` if it is, or can be created as, a folder this process can write into; else a one-line WriteError
    naming `what` (e.g. "--out") and the reason. Creates nothing: checked before slow work, so that a bad output
    fails at once, and a failed command leaves no empty folder behind."""
    path = Path(path)
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        shown = "it" if existing == path else existing
        raise write_error(OSError(errno.ENOTDIR, f"{shown} is a file"), f"{what} {path}")
    try:  # by writing: the permission bits alone miss read-only mounts and ACLs, and root passes them all
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        if err.errno not in WRITE_ERRNOS:
            raise
        shown = "" if existing == path else f" ({existing})"
        raise write_error(OSError(err.errno, f"{err.strerror}{shown}"), f"{what} {path}") from None
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, durable: bool = False) -> Iterator[Path]:
    """A temporary path to write `path` through; renamed onto `path` when the block ends without error.

    The temporary name is `.<stem>.tmp-<pid>-<host><suffix>` in the same folder: hidden (listings and
    resume logic skip it), unique per process, and with the target's extension, so writers that infer
    the format from it (PNG, npz) still do. With `durable`, the file and the rename are fsynced
    (checkpoints that must survive a power cut). On an error the temporary file is removed and the target
    untouched; a full disk or an unwritable folder is a WriteError naming `path`. The first write of a
    process into a folder removes the temporary files that killed writers left there.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}-{_HOST}{path.suffix}")
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.parent not in _swept:
                remove_stale_temporaries(path.parent)
                _swept.add(path.parent)
            yield tmp
            if durable:
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
            os.replace(tmp, path)
            if durable:
                _fsync_dir(path.parent)
        except OSError as err:
            if not _is_write_error(err, path, tmp):
                raise
            raise write_error(err, path) from err
    finally:
        if tmp.exists():
            tmp.unlink()


def _is_write_error(err: OSError, path: Path, tmp: Path) -> bool:
    """An error of writing `path` (not, say, of reading a source inside the block): a full disk from anywhere,
    a refused folder or file when it names the target, its temporary file or a folder above them."""
    if err.errno not in WRITE_ERRNOS:
        return False
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) or err.filename is None:
        return True
    named = Path(os.fspath(err.filename))
    return named in (path, tmp) or named in path.parents
