"""The places where diffusion_pl relies on Lightning internals, in one file.

Each function names the private attribute it reads; tests/utils/test_lightning_compat.py fails loudly
when a Lightning upgrade renames or removes one of them.
"""

from __future__ import annotations

from typing import Any, Callable

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from lightning.pytorch.core.saving import _load_state
from lightning.pytorch.utilities.migration.utils import _pl_migrate_checkpoint

__all__ = ["INSTANTIATOR", "batches_processed", "built_by_cli", "last_step_saved", "module_from_checkpoint",
           "save_now", "slurm_requeue"]


# what LightningCLI stores as `_instantiator` in a saved config: Lightning rebuilds the module from the config with it
# (it is on Lightning's allowlist, lightning.pytorch.core.saving._ALLOWED_INSTANTIATORS)
INSTANTIATOR = "lightning.pytorch.cli.instantiate_module"


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


def built_by_cli() -> bool:
    """Whether the LightningModule being constructed is built by LightningCLI from a config.

    LightningCLI sets the context variable `hparams_mixin._given_hyperparameters` to the config while
    it instantiates the model; it is None otherwise.
    """
    return _given_hyperparameters.get() is not None


def batches_processed(trainer: L.Trainer) -> int:
    """Training batches the trainer has run: `fit_loop.epoch_loop.batch_progress.total.processed`.

    Incremented right after training_step, before on_train_batch_end, so the value is right whether
    a checkpoint is written there, at validation end or after fit.
    """
    return int(trainer.fit_loop.epoch_loop.batch_progress.total.processed)


def module_from_checkpoint(cls: type[L.LightningModule], checkpoint: dict[str, Any]) -> L.LightningModule:
    """`cls.load_from_checkpoint` on a checkpoint dict already read (diffusion_pl.utils.checkpoint), on the CPU.

    Lightning's `_load_from_checkpoint` reads the file itself; this runs the rest of it on the dict:
    `_pl_migrate_checkpoint` (older Lightning layouts), then `core.saving._load_state` (the saved
    `_instantiator` builds `cls` from `hyper_parameters`, then on_load_checkpoint and a strict load_state_dict).
    A dict without a Lightning version (not written by a Trainer) has nothing to migrate.
    """
    if "pytorch-lightning_version" in checkpoint:
        checkpoint = _pl_migrate_checkpoint(checkpoint)
    return _load_state(cls, checkpoint)
