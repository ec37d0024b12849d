"""EveryNSteps: the shared base of the callbacks that sample every N optimizer steps (SampleGrid, FIDCallback).

It normalises the sampler argument to a list (default HeunODE(steps=17), EDM's 35 NFE), records
the training images' (C, H, W) from the first batch as the shape to sample, and calls
`on_every_n_steps` after each batch that completed an optimizer step whose count is a multiple of
`every_n_steps` (the step detection is OptimizerStepCallback's, training/callbacks/optimizer_step.py).
It also holds the callbacks' `Guidance` (diffusion_pl/guidance.py; in YAML `guidance: {weight: 1.5,
interval: [0.28, 2.9]}`) and, when its guide is a checkpoint path, the guide module, loaded and checked
against the trained module when fit starts and kept out of the callback's state.

Names: each sampler's results are filed under a label, `sampler_label(sampler)` (e.g. `heunode_17`), or
`<name>_<sampler label>` when the callback has a `name`. When fit starts, labels that an earlier callback of the
same class in `trainer.callbacks` already uses get `_2`, `_3`, ... appended, so two SampleGrids with the same
sampler write different files and logger tags (FIDCallback likewise for its metric names).

Time: `busy_seconds` totals the seconds spent in `on_every_n_steps`; TrainingMonitor
(diffusion_pl/training/callbacks/monitor.py) leaves it out of the training throughput.
"""

from __future__ import annotations

import time

import lightning as L
import torch

from diffusion_pl.guidance import Guidance
from diffusion_pl.evaluation.generation import check_sampler, sampler_label
from diffusion_pl.training.callbacks.optimizer_step import OptimizerStepCallback
from diffusion_pl.sampling.ode import HeunODE
from diffusion_pl.sampling.base import Sampler

__all__ = ["EveryNSteps"]


class EveryNSteps(OptimizerStepCallback):
    """Calls `on_every_n_steps(trainer, pl_module)` every `every_n_steps` optimizer steps; subclasses implement it."""

    def __init__(self, every_n_steps: int, sampler: Sampler | list[Sampler] | None,
                 guidance: Guidance | None = None, name: str | None = None) -> None:
        super().__init__()
        if name is not None and (not isinstance(name, str) or not name or any(c in name for c in "/\\ ")):
            raise ValueError(f"{type(self).__name__}: name {name!r} is invalid: expected a non-empty string without "
                             "slashes or spaces (it names files and logger tags)")
        self.name = name
        self.busy_seconds = 0.0  # time spent evaluating (on_every_n_steps), for TrainingMonitor
        name = type(self).__name__
        guidance = Guidance() if guidance is None else guidance
        if not isinstance(guidance, Guidance):
            raise ValueError(f"{name}: guidance {guidance!r} is a {type(guidance).__name__}: expected a "
                             "diffusion_pl.guidance.Guidance, e.g. Guidance(weight=1.5) (in YAML: guidance: {weight: 1.5})")
        self.guidance = guidance
        self._guide: list = []  # the guide DiffusionModule; a list keeps it out of Lightning's and deepcopy's view
        self.every_n_steps = every_n_steps
        samplers = sampler if sampler is not None else HeunODE(steps=17)
        self.samplers: list[Sampler] = list(samplers) if isinstance(samplers, (list, tuple)) else [samplers]
        self.image_shape: tuple[int, ...] | None = None  # (C, H, W) of the training images: the shape to sample
        self.labels: list[str] = self.base_labels()  # one per sampler; made unique among the run's callbacks at setup

    def base_labels(self) -> list[str]:
        """Each sampler's label before deduplication: `sampler_label`, prefixed by `name` when there is one."""
        return [sampler_label(s) if self.name is None else f"{self.name}_{sampler_label(s)}" for s in self.samplers]

    def unique_labels(self, trainer: L.Trainer) -> list[str]:
        """`base_labels`, with `_2`, `_3`, ... appended to those that a callback of the same class listed earlier in
        `trainer.callbacks` uses already (every rank computes the same, from the same list)."""
        taken: set[str] = set()
        for callback in trainer.callbacks:
            if type(callback) is not type(self):
                continue
            labels = []
            for label in callback.base_labels():
                unique, n = label, 1
                while unique in taken:
                    n += 1
                    unique = f"{label}_{n}"
                taken.add(unique)
                labels.append(unique)
            if callback is self:
                return labels
        return self.base_labels()  # not in the trainer's list (called directly)

    @property
    def guide(self):
        """The autoguidance DiffusionModule (from the guidance's checkpoint path, loaded at setup), or None."""
        return self._guide[0] if self._guide else None

    def sampling_guidance(self) -> Guidance:
        """What `generate` gets: the guidance, with the loaded guide in place of its checkpoint path."""
        return self.guidance.replace(guide=self.guide) if self._guide else self.guidance

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        """Make the labels unique; refuse, in one line, a sampler that cannot sample this module (a consistency
        model's with a diffusion sampler); load the guide checkpoint before training and refuse a guide that
        cannot guide this module."""
        self.labels = self.unique_labels(trainer)
        if stage == "fit":
            check_sampler(pl_module, self.samplers, f"{type(self).__name__}: the module")
        if stage != "fit" or self.guidance.guide_path is None or self._guide:
            return
        from diffusion_pl.evaluation.loading import load_guide

        name = type(self).__name__
        names = {"guide_ckpt": f"{name}: guidance.guide", "ckpt": "the trained module",
                 "guidance_channels": f"{name}: guidance.channels"}
        loaded = load_guide(pl_module, self.guidance, torch.device("cpu"), names=lambda key: names.get(key, key))
        self._guide.append(loaded.guide.requires_grad_(False))

    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        if self._guide:
            self._guide[0] = self.guide.to(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if self.image_shape is None:
            self.image_shape = pl_module.codec.sample_shape(batch[0].shape[1:])  # a latent module's: the latent shape

    def on_optimizer_step_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            start = time.perf_counter()
            try:
                self.on_every_n_steps(trainer, pl_module)
            finally:
                self.busy_seconds += time.perf_counter() - start

    def on_every_n_steps(self, trainer: L.Trainer, pl_module) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement on_every_n_steps")
