"""Checkpoints that survive crashes and pre-emption.

- `AtomicCheckpointIO`: Lightning's TorchCheckpointIO writes straight onto the final name, so
  a job killed mid-save leaves a truncated `last.ckpt`. This writes a temporary file in the same
  folder, fsyncs it and renames it over the target, so the previous checkpoint stays loadable.
- `PreemptionCheckpoint`: Lightning turns SIGTERM into a SystemExit with status 0 and saves
  nothing. This saves a checkpoint on SIGTERM and exits with 143 (128 + SIGTERM), so schedulers
  and scripts see that the run did not finish.
- `find_resume_checkpoint`: Lightning's `ckpt_path="last"` looks at `last*.ckpt` by file time
  and ignores SLURM's `hpc_ckpt_*.ckpt`; this picks the newest loadable checkpoint by the
  global step stored inside it.
"""

from __future__ import annotations

import os
import signal
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

__all__ = ["AtomicCheckpointIO", "PreemptionCheckpoint", "find_resume_checkpoint", "read_global_step"]

SIGTERM_EXIT_CODE = 128 + signal.SIGTERM


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO that writes to a temporary file, fsyncs, then renames onto the target."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO does not take storage_options, got {storage_options!r}")
        if not _is_local_file_protocol(str(path)):
            return super().save_checkpoint(checkpoint, path)  # remote stores: their own semantics
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        finally:
            if tmp.exists():
                tmp.unlink()


def _fsync_dir(folder: Path) -> None:
    """Persist a rename: fsync the directory entry (POSIX only)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PreemptionCheckpoint(Callback):
    """On SIGTERM: save `<dirpath>/last.ckpt` (every rank joins the save) and exit with status 143.

    Args:
        dirpath: where to save; default: the ModelCheckpoint's folder, else `<default_root_dir>/checkpoints`.
        filename: checkpoint file name.
    """

    def __init__(self, dirpath: str | None = None, filename: str = "last.ckpt") -> None:
        self.dirpath = dirpath
        self.filename = filename

    def _target(self, trainer: L.Trainer) -> Path:
        if self.dirpath is not None:
            return Path(self.dirpath) / self.filename
        ckpt = trainer.checkpoint_callback
        if isinstance(ckpt, ModelCheckpoint) and ckpt.dirpath is not None:
            return Path(ckpt.dirpath) / self.filename
        return Path(trainer.default_root_dir) / "checkpoints" / self.filename

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        path = self._target(trainer)
        trainer.save_checkpoint(path)
        rank_zero_info(f"SIGTERM: saved {path} at step {trainer.global_step}; exiting with status {SIGTERM_EXIT_CODE}")
        exception.code = SIGTERM_EXIT_CODE  # Lightning re-raises this SystemExit after the hooks


def read_global_step(path: str | os.PathLike) -> int | None:
    """The global step stored in a checkpoint, or None if the file is not a loadable checkpoint."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(ckpt["global_step"])
    except Exception as err:  # truncated, foreign or corrupt files are not resume candidates
        warnings.warn(f"skipping checkpoint {path}: not loadable ({type(err).__name__}: {err})", stacklevel=2)
        return None


def find_resume_checkpoint(*folders: str | os.PathLike) -> str | None:
    """Newest loadable `*.ckpt` under `folders` by stored global step (file time breaks ties), or None."""
    candidates = []
    for folder in folders:
        if folder is None or not Path(folder).is_dir():
            continue
        for path in Path(folder).rglob("*.ckpt"):
            if path.name.startswith("."):
                continue  # temporary files of an interrupted atomic save
            step = read_global_step(path)
            if step is not None:
                candidates.append((step, path.stat().st_mtime, str(path)))
    if not candidates:
        return None
    return max(candidates)[2]
