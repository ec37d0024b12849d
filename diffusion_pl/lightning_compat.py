"""The places where diffusion_pl relies on Lightning internals, in one file.

Each function names the private attribute it reads; tests/test_lightning_compat.py fails loudly
when a Lightning upgrade renames or removes one of them.
"""

from __future__ import annotations

from typing import Callable

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint

__all__ = ["last_step_saved", "save_now", "slurm_requeue"]


def last_step_saved(callback: ModelCheckpoint) -> int:
    """Global step of the callback's latest save (0 before any): `ModelCheckpoint._last_global_step_saved`."""
    return int(callback._last_global_step_saved)


def save_now(callback: ModelCheckpoint, trainer: L.Trainer) -> None:
    """Save the step checkpoint (when top-k keeps any) and last.ckpt (when save_last) at the current step.

    Goes through `_monitor_candidates`, `_save_topk_checkpoint` and `_save_last_checkpoint`, the methods
    ModelCheckpoint itself uses at a step boundary, so its file names and records stay consistent.
    """
    candidates = callback._monitor_candidates(trainer)
    if callback.save_top_k != 0:
        callback._save_topk_checkpoint(trainer, candidates)
    if callback.save_last:
        callback._save_last_checkpoint(trainer, candidates)


def slurm_requeue(trainer: L.Trainer) -> tuple[int, Callable[[], None]] | None:
    """(requeue signal, Lightning's save-hpc_ckpt-and-requeue action) under SLURM auto-requeue, else None.

    Reads `trainer._accelerator_connector.cluster_environment` and calls
    `trainer._signal_connector._slurm_sigusr_handler_fn`, the handler Lightning installs for the signal.
    """
    environment = trainer._accelerator_connector.cluster_environment
    if not isinstance(environment, SLURMEnvironment) or not environment.auto_requeue:
        return None
    signum = environment.requeue_signal
    if signum is None:
        return None
    handler = trainer._signal_connector._slurm_sigusr_handler_fn
    return int(signum), lambda: handler(signum, None)
