"""Checkpoints that survive crashes and pre-emption.

- `AtomicCheckpointIO`: Lightning's TorchCheckpointIO writes straight onto the final name, so
  a job killed mid-save leaves a truncated `last.ckpt`. This writes a temporary file in the same
  folder, fsyncs it and renames it over the target, so the previous checkpoint stays loadable.
- `PreemptionCheckpoint`: Lightning turns SIGTERM into a SystemExit with status 0 and saves
  nothing. This saves a checkpoint on SIGTERM and exits with 143 (128 + SIGTERM), so schedulers
  and scripts see that the run did not finish.
- `FinalCheckpoint`: ModelCheckpoint(every_n_train_steps=N) never saves the steps after the last
  multiple of N; this saves them when fit ends.
- `DeferredRequeue`: Lightning saves SLURM's `hpc_ckpt_N.ckpt` inside the SIGUSR1 handler, possibly in
  the middle of an optimizer step; this moves the save (and the requeue) to the next step boundary.
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

from diffusion_pl.training.callbacks.optimizer_step import OptimizerStepCallback
from diffusion_pl.utils import lightning_compat
from diffusion_pl.utils.checkpoint import read_checkpoint
from diffusion_pl.utils.errors import UserError
from diffusion_pl.utils.fileio import atomic_path

__all__ = ["AtomicCheckpointIO", "DeferredRequeue", "FinalCheckpoint", "PreemptionCheckpoint", "checkpoint_step", "find_resume_checkpoint",
           "read_global_step"]

SIGTERM_EXIT_CODE = 128 + signal.SIGTERM


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO that writes to a temporary file, fsyncs, then renames onto the target."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO does not take storage_options, got {storage_options!r}")
        if not _is_local_file_protocol(str(path)):
            return super().save_checkpoint(checkpoint, path)  # remote stores: their own semantics
        with atomic_path(path, durable=True) as tmp, open(tmp, "wb") as f:
            torch.save(checkpoint, f)


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


class FinalCheckpoint(Callback):
    """Save at the end of fit whatever the ModelCheckpoints have not saved yet.

    ModelCheckpoint(every_n_train_steps=N) saves only at multiples of N, and its `save_last` at train
    end is skipped once any checkpoint was written, so a run whose max_steps is not a multiple of N
    loses its last steps. This saves the step-named checkpoint (when the callback keeps them) and
    `last.ckpt` (when save_last is set) at the final step, through the callback's own saving code so
    its bookkeeping (last_model_path, best_k_models) stays right. It must come before the
    ModelCheckpoints in `trainer.callbacks` (DiffusionCLI puts it first).
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for callback in trainer.checkpoint_callbacks:
            if not isinstance(callback, ModelCheckpoint) or trainer.global_step == 0:
                continue
            if lightning_compat.last_step_saved(callback) == trainer.global_step:
                continue  # it saved this very step already
            lightning_compat.save_now(callback, trainer)


class DeferredRequeue(OptimizerStepCallback):
    """SLURM auto-requeue at an optimizer-step boundary, on every rank at the same step.

    Lightning saves `hpc_ckpt_N.ckpt` inside its SIGUSR1 handler, wherever the signal lands: after
    `optimizer.step()` but before the step is counted, the checkpoint holds step N+1's weights with
    global_step N, and the requeued job repeats a step. This replaces that handler, once training
    starts, with one that only records the signal; Lightning's own save and `scontrol requeue` then
    run at the end of the next batch that completed an optimizer step (the flag is max-reduced over
    ranks, so all ranks save the same step). Does nothing outside SLURM auto-requeue.
    """

    def __init__(self) -> None:
        super().__init__()
        self._requeue = None
        self._requested = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        found = lightning_compat.slurm_requeue(trainer)
        if found is None or os.name != "posix":
            return
        signum, self._requeue = found
        signal.signal(signum, self._record)  # Lightning's teardown restores the handlers it found

    def _record(self, signum: int, frame: Any) -> None:
        self._requested = True

    def on_optimizer_step_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._requeue is None:
            return  # not under SLURM requeue
        requested = torch.tensor(float(self._requested), device=pl_module.device)
        if trainer.world_size > 1:
            requested = trainer.strategy.reduce(requested, reduce_op="max")
        if requested.item() > 0:
            self._requested = False
            self._requeue()


def checkpoint_step(path: str | os.PathLike) -> int:
    """The global step stored in a checkpoint; a one-line UserError when the file is not a loadable checkpoint."""
    # trust_config: only the step is read here, nothing the saved config names is imported
    return read_checkpoint(path, trust_config=True).global_step


def read_global_step(path: str | os.PathLike) -> int | None:
    """The global step stored in a checkpoint, or None (with a warning) if it is not a loadable checkpoint."""
    try:
        return checkpoint_step(path)
    except UserError as err:  # truncated, foreign or corrupt files (or one gone meanwhile) are not resume candidates
        warnings.warn(f"skipping {err}", stacklevel=2)
        return None


def find_resume_checkpoint(*folders: str | os.PathLike, recursive: bool = True) -> str | None:
    """Newest loadable `*.ckpt` under `folders` by stored global step (file time breaks ties), or None."""
    candidates = []
    for folder in folders:
        if folder is None or not Path(folder).is_dir():
            continue
        for path in sorted(set(Path(folder).rglob("*.ckpt") if recursive else Path(folder).glob("*.ckpt"))):
            if path.name.startswith("."):
                continue  # temporary files of an interrupted atomic save
            step = read_global_step(path)
            if step is not None:
                candidates.append((step, path.stat().st_mtime, str(path)))
    if not candidates:
        return None
    return max(candidates)[2]
