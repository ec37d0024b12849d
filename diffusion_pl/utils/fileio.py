"""Files the project writes: atomically (temporary file in the same folder, then rename) and hashed.

A reader (a resumed `sample`, a FID cache lookup, `--ckpt_path last`) must never see half a file:
every writer writes a hidden temporary file beside the target and renames it over the target,
which POSIX makes atomic within one file system.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_path", "sha256_file"]


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


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, durable: bool = False) -> Iterator[Path]:
    """A temporary path to write `path` through; renamed onto `path` when the block ends without error.

    The temporary name is `.<stem>.tmp-<pid><suffix>` in the same folder: hidden (listings and resume
    logic skip it), unique per process, and with the target's extension, so writers that infer the
    format from it (PNG, npz) still do. With `durable`, the file and the rename are fsynced (checkpoints
    that must survive a power cut). On an error the temporary file is removed and the target untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()
