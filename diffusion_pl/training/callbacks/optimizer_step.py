"""OptimizerStepCallback: the base of callbacks that act once per optimizer step, after it.

Lightning has no callback hook for "an optimizer step completed": `on_before_optimizer_step` runs before
it, and `on_train_batch_end` runs after every batch, also the micro-batches of gradient accumulation,
which leave `trainer.global_step` where it was. The base compares the step count at the start and the
end of each batch and calls `on_optimizer_step_end` only where it moved. That also keeps step 0 and,
after a restart, the resumed step from firing: their batches end before any step completes (a resumed
run reaches step N + 1 before it first fires, and never fires N again).

Users: EveryNSteps (diffusion_pl/evaluation/every_n.py: sample grids and FID every N steps), PowerEMA
(callbacks/power_ema.py: the power-function EMA update and its snapshots) and DeferredRequeue
(callbacks/checkpointing.py: SLURM's save and requeue at a step boundary).
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

__all__ = ["OptimizerStepCallback"]


class OptimizerStepCallback(Callback):
    """Calls `on_optimizer_step_end(trainer, pl_module)` at the end of each batch that completed an optimizer step.

    Subclasses implement that one hook. One that also overrides `on_train_batch_start` or
    `on_train_batch_end` must call the base's.
    """

    def __init__(self) -> None:
        super().__init__()
        self._step_at_batch_start = -1

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step != self._step_at_batch_start:
            self.on_optimizer_step_end(trainer, pl_module)

    def on_optimizer_step_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After the batch whose optimizer step made `trainer.global_step` what it is now (the count of steps done)."""
        raise NotImplementedError(f"{type(self).__name__} must implement on_optimizer_step_end")
