"""EveryNSteps: the shared base of the callbacks that sample every N optimizer steps (SampleGrid, FIDCallback).

It normalises the sampler argument to a list (default HeunODE(steps=17), EDM's 35 NFE), records
the training images' (C, H, W) from the first batch as the shape to sample, and calls
`on_every_n_steps` after each batch that completed an optimizer step whose count is a multiple of
`every_n_steps`.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Callback

from diffusion_pl.sampling import HeunODE, Sampler

__all__ = ["EveryNSteps"]


class EveryNSteps(Callback):
    """Calls `on_every_n_steps(trainer, pl_module)` every `every_n_steps` optimizer steps; subclasses implement it."""

    def __init__(self, every_n_steps: int, sampler: Sampler | list[Sampler] | None) -> None:
        super().__init__()
        self.every_n_steps = every_n_steps
        samplers = sampler if sampler is not None else HeunODE(steps=17)
        self.samplers: list[Sampler] = list(samplers) if isinstance(samplers, (list, tuple)) else [samplers]
        self.image_shape: tuple[int, ...] | None = None  # (C, H, W) of the training images: the shape to sample
        self._step_at_batch_start = -1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_at_batch_start = trainer.global_step
        if self.image_shape is None:
            self.image_shape = tuple(batch[0].shape[1:])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        # only when this batch completed an optimizer step: under gradient accumulation the step count
        # stays put for several batches (step 0 included, and the resumed step after a restart)
        if step != self._step_at_batch_start and step % self.every_n_steps == 0:
            self.on_every_n_steps(trainer, pl_module)

    def on_every_n_steps(self, trainer: L.Trainer, pl_module) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement on_every_n_steps")
