"""EveryNSteps: the shared base of the callbacks that sample every N optimizer steps (SampleGrid, FIDCallback).

It normalises the sampler argument to a list (default HeunODE(steps=17), EDM's 35 NFE), records
the training images' (C, H, W) from the first batch as the shape to sample, and calls
`on_every_n_steps` after each batch that completed an optimizer step whose count is a multiple of
`every_n_steps` (the step detection is OptimizerStepCallback's, training/callbacks/optimizer_step.py).
It also holds the optional autoguidance model (`guide_ckpt`, loaded and checked
against the trained module when fit starts, kept out of the callback's state), the guidance
interval and the guided channel count that both sampling callbacks pass to `generate`.
"""

from __future__ import annotations

import lightning as L

from diffusion_pl.utils.errors import UserValueError
from diffusion_pl.guidance import check_guidance_channels, check_guidance_interval
from diffusion_pl.evaluation.generation import guide_mismatch
from diffusion_pl.training.callbacks.optimizer_step import OptimizerStepCallback
from diffusion_pl.training.latent import sample_shape
from diffusion_pl.sampling.ode import HeunODE
from diffusion_pl.sampling.base import Sampler

__all__ = ["EveryNSteps"]


class EveryNSteps(OptimizerStepCallback):
    """Calls `on_every_n_steps(trainer, pl_module)` every `every_n_steps` optimizer steps; subclasses implement it."""

    def __init__(self, every_n_steps: int, sampler: Sampler | list[Sampler] | None, guide_ckpt: str | None = None,
                 guidance_interval: tuple[float, float] | None = None, trust_guide_config: bool = False,
                 guidance_channels: int | None = None) -> None:
        super().__init__()
        name = type(self).__name__
        self.guidance_interval = check_guidance_interval(guidance_interval, f"{name}: guidance_interval")
        self.guidance_channels = check_guidance_channels(guidance_channels, f"{name}: guidance_channels")
        self.guide_ckpt, self.trust_guide_config = guide_ckpt, trust_guide_config
        self._guide: list = []  # the guide DiffusionModule; a list keeps it out of Lightning's and deepcopy's view
        self.every_n_steps = every_n_steps
        samplers = sampler if sampler is not None else HeunODE(steps=17)
        self.samplers: list[Sampler] = list(samplers) if isinstance(samplers, (list, tuple)) else [samplers]
        self.image_shape: tuple[int, ...] | None = None  # (C, H, W) of the training images: the shape to sample

    @property
    def guide(self):
        """The autoguidance DiffusionModule (from `guide_ckpt`, loaded at setup), or None."""
        return self._guide[0] if self._guide else None

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        """Load `guide_ckpt` before training and refuse, in one line, a guide that cannot guide this module."""
        if stage != "fit" or self.guide_ckpt is None or self._guide:
            return
        from diffusion_pl.training.module import load_module

        guide = load_module(self.guide_ckpt, map_location="cpu", trust_config=self.trust_guide_config).eval()
        problem = guide_mismatch(pl_module, guide)
        if problem is not None:
            raise UserValueError(f"{type(self).__name__}: guide_ckpt {self.guide_ckpt} "
                                 f"{problem.replace('the model', 'the trained module')}: expected the same")
        self._guide.append(guide.requires_grad_(False))

    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        if self._guide:
            self._guide[0] = self.guide.to(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if self.image_shape is None:
            self.image_shape = sample_shape(pl_module, batch[0])  # a latent module's: the net's latent shape

    def on_optimizer_step_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self.on_every_n_steps(trainer, pl_module)

    def on_every_n_steps(self, trainer: L.Trainer, pl_module) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement on_every_n_steps")
