"""SampleGrid: a fixed-seed grid of EMA samples every N steps, as a PNG and in the logger."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import torch
from torchvision.utils import make_grid, save_image

from diffusion_pl.evaluation.every_n import EveryNSteps
from diffusion_pl.training.callbacks.run_dir import run_dir
from diffusion_pl.utils.fileio import atomic_path
from diffusion_pl.evaluation.generation import generate
from diffusion_pl.evaluation.image_logging import log_image
from diffusion_pl.training.log_step import log_step
from diffusion_pl.training.sharding import is_sharded
from diffusion_pl.guidance import Guidance
from diffusion_pl.sampling.base import Sampler

__all__ = ["SampleGrid"]


class SampleGrid(EveryNSteps):
    """Every `every_n_steps` and at train end: `num_samples` EMA samples from fixed seeds, per sampler.

    Class-conditional models get one row per class (classes 0, 1, ...); unconditional ones a
    square-ish grid of `nrow` images per row. Written by rank 0 to
    <run folder>/samples/<label>_step<N>.png and logged as the image `samples/<label>` at step N to every logger
    that takes images (TensorBoard, W&B, MLflow, Comet: diffusion_pl/evaluation/image_logging.py). The label is
    the sampler's (`heunode_17`), `<name>_<sampler>` with a `name`, made unique among the run's SampleGrids
    (every_n.py). `guidance`: every guidance option in one value
    (diffusion_pl/guidance.py): the weight, a guide checkpoint (autoguidance by a smaller or less trained
    model of the same process and prediction, Karras et al. 2024), the noise-level interval, the guided
    channels (DiT's 3 of 4 latent channels) and x0 clipping (DDPM's sampling clips at 1).
    """

    def __init__(self, every_n_steps: int = 1000, num_samples: int = 64,
                 sampler: Sampler | list[Sampler] | None = None, seed: int = 0, guidance: Guidance | None = None,
                 nrow: int | None = None, at_train_end: bool = True, batch_size: int = 256,
                 name: str | None = None) -> None:
        if every_n_steps < 1 or num_samples < 1 or batch_size < 1:
            raise ValueError(f"SampleGrid: every_n_steps, num_samples, batch_size must be >= 1, got "
                             f"{every_n_steps}, {num_samples}, {batch_size}")
        if nrow is not None and nrow < 1:
            raise ValueError(f"SampleGrid: nrow must be >= 1 or None, got {nrow}")
        super().__init__(every_n_steps, sampler, guidance, name)
        self.num_samples, self.seed = num_samples, seed
        self.nrow, self.at_train_end, self.batch_size = nrow, at_train_end, batch_size
        self.folder: Path | None = None
        self._last_step = -1

    def on_fit_start(self, trainer, pl_module) -> None:
        super().on_fit_start(trainer, pl_module)
        self.folder = run_dir(trainer) / "samples"  # trainer.log_dir is a collective: every rank, here

    def on_every_n_steps(self, trainer: L.Trainer, pl_module) -> None:
        self.write(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.at_train_end:
            self.write(trainer, pl_module)

    def layout(self, num_classes: int | None) -> tuple[list[int], list[int] | None, int]:
        """(sample indices, class of each or None, images per row)."""
        n = self.num_samples
        if num_classes is None:
            return list(range(n)), None, self.nrow or max(1, math.ceil(math.sqrt(n)))
        rows = min(num_classes, n)
        cols = self.nrow or max(1, n // rows)
        return list(range(rows * cols)), [k for k in range(rows) for _ in range(cols)], cols

    @torch.no_grad()
    def write(self, trainer: L.Trainer, pl_module) -> list[Path]:
        """Sample and save one grid per sampler (rank 0; other ranks return at once, except under sharded training,
        where every rank samples the same grid: a sharded network's forward gathers its weights from all ranks)."""
        step = log_step(trainer)
        sharded = is_sharded(trainer.strategy)
        if (trainer.global_rank != 0 and not sharded) or step == self._last_step or self.image_shape is None:
            return []
        self._last_step = step
        indices, labels, nrow = self.layout(pl_module.num_classes)
        folder = self.folder or run_dir(trainer) / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for sampler, label in zip(self.samplers, self.labels):
            images = [u8 for _, u8, _, _ in generate(
                pl_module, sampler, indices, self.image_shape, seed=self.seed, guidance=self.sampling_guidance(),
                class_choices=labels, batch_size=self.batch_size, device=pl_module.device)]
            if trainer.global_rank != 0:
                continue
            grid = make_grid(torch.cat(images).cpu(), nrow=nrow, padding=1)  # uint8 (3, H', W')
            path = folder / f"{label}_step{step}.png"
            with atomic_path(path) as tmp:
                save_image(grid.float() / 255.0, tmp)
            log_image(trainer.loggers, f"samples/{label}", grid, step)
            paths.append(path)
        return paths
