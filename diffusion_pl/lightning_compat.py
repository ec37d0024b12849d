"""The places where diffusion_pl relies on Lightning internals, in one file.

Each function names the private attribute it reads; tests/test_lightning_compat.py fails loudly
when a Lightning upgrade renames or removes one of them.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

__all__ = ["last_step_saved", "save_now"]


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
