"""The run folder of `diffusion-pl fit`: one folder per run, one run per folder.

`trainer.default_root_dir` is the run folder. Unless a recipe names other places, everything a run
writes goes under it: `checkpoints/`, `samples/`, `phema/` (PowerEMA snapshots), `config.yaml`, the
TensorBoard events and SLURM's `hpc_ckpt_*.ckpt`. For the lifetime of the run global rank 0 holds an exclusive lock on
`<run>/.diffusion_pl.lock`, so a second `fit` into the same folder stops at once instead of
interleaving its checkpoints with the first one's. A folder that holds a previous run is only
reused with `--ckpt_path last` (continue it) or `--overwrite` (remove its outputs and start over).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from diffusion_pl.utils.errors import UserError
from diffusion_pl.utils.fileio import writable_folder

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the previous-run check still applies
    fcntl = None

__all__ = ["LOCK_NAME", "RunFolderError", "lock_run_folder", "previous_run_outputs", "release_run_folder",
           "remove_run_outputs"]

LOCK_NAME = ".diffusion_pl.lock"
# what `diffusion-pl fit` writes at the top of a run folder (TensorBoard's events, Lightning's files)
_RUN_FILES = ("config.yaml", "hparams.yaml", "metrics.csv")
_RUN_DIRS = ("checkpoints", "samples", "phema")
_RUN_PATTERNS = ("*.ckpt", "events.out.tfevents.*")


class RunFolderError(UserError):
    """The run folder is in use or holds a previous run."""


def lock_run_folder(folder: str | os.PathLike) -> int | None:
    """Take the run folder's exclusive lock for this process's lifetime; returns the descriptor to keep open.

    Raises RunFolderError when another live process holds it. The lock is released by the operating
    system when the process exits, however it exits (kill -9 included), so a stale lock never blocks.
    """
    folder = writable_folder(folder, "run folder (--trainer.default_root_dir)")
    folder.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        return None
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunFolderError(f"run folder {folder} is in use by another `diffusion-pl fit` (pid {holder}): "
                             "expected one run per folder; wait for it, or set --trainer.default_root_dir "
                             "to another folder") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def release_run_folder(fd: int | None) -> None:
    """Release a lock taken by lock_run_folder (closing the descriptor drops the flock)."""
    if fd is not None:
        os.close(fd)


def previous_run_outputs(*folders: str | os.PathLike | None) -> list[Path]:
    """What an earlier run left in these folders (checkpoints, config, logs, samples), sorted."""
    found: set[Path] = set()
    for folder in folders:
        if folder is None or not Path(folder).is_dir():
            continue
        folder = Path(folder)
        found.update(p for p in (folder / name for name in (*_RUN_FILES, *_RUN_DIRS)) if p.exists())
        for pattern in _RUN_PATTERNS:
            found.update(folder.glob(pattern))
    return sorted(found)


def remove_run_outputs(paths: list[Path]) -> None:
    """Delete a previous run's outputs (only those `previous_run_outputs` listed; other files stay)."""
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
