"""SampleGrid: a fixed-seed grid of EMA samples every N steps, as a PNG and in the logger."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import torch
from torchvision.utils import make_grid, save_image

from diffusion_pl.evaluation.every_n import EveryNSteps
from diffusion_pl.utils.fileio import atomic_path
from diffusion_pl.evaluation.generation import generate, sampler_label
from diffusion_pl.sampling.base import Sampler

__all__ = ["SampleGrid", "run_dir"]


def run_dir(trainer: L.Trainer) -> Path:
    """The run folder: the logger's versioned log_dir when there is one, else default_root_dir."""
    return Path(trainer.log_dir or trainer.default_root_dir)


class SampleGrid(EveryNSteps):
    """Every `every_n_steps` and at train end: `num_samples` EMA samples from fixed seeds, per sampler.

    Class-conditional models get one row per class (classes 0, 1, ...); unconditional ones a
    square-ish grid of `nrow` images per row. Written by rank 0 to
    <run folder>/samples/<sampler>_step<N>.png and logged as an image (TensorBoard, or a logger with
    `log_image` such as WandbLogger). `clip_x0` clamps x0_hat to [-clip_x0, clip_x0] at every network
    evaluation (DDPM's sampling clips at 1); None samples unclipped. `guide_ckpt`: autoguidance by another
    checkpoint of the same process and prediction (a smaller or less trained model, Karras et al. 2024) with
    weight `guidance`; `guidance_interval`: (sigma_lo, sigma_hi), guide only at noise levels sigma/alpha in
    that range (Kynkäänniemi et al. 2024), for classifier-free guidance and autoguidance alike;
    `guidance_channels` K: guide only the first K output channels (DiT's 3 of 4 latent channels), None all.
    """

    def __init__(self, every_n_steps: int = 1000, num_samples: int = 64,
                 sampler: Sampler | list[Sampler] | None = None, seed: int = 0, guidance: float = 1.0,
                 nrow: int | None = None, at_train_end: bool = True, batch_size: int = 256,
                 clip_x0: float | None = None, guide_ckpt: str | None = None,
                 guidance_interval: tuple[float, float] | None = None, trust_guide_config: bool = False,
                 guidance_channels: int | None = None) -> None:
        if every_n_steps < 1 or num_samples < 1 or batch_size < 1:
            raise ValueError(f"SampleGrid: every_n_steps, num_samples, batch_size must be >= 1, got "
                             f"{every_n_steps}, {num_samples}, {batch_size}")
        if nrow is not None and nrow < 1:
            raise ValueError(f"SampleGrid: nrow must be >= 1 or None, got {nrow}")
        if clip_x0 is not None and not clip_x0 > 0:
            raise ValueError(f"SampleGrid: clip_x0 must be positive or None, got {clip_x0}")
        super().__init__(every_n_steps, sampler, guide_ckpt, guidance_interval, trust_guide_config, guidance_channels)
        self.num_samples, self.seed, self.guidance = num_samples, seed, guidance
        self.nrow, self.at_train_end, self.batch_size = nrow, at_train_end, batch_size
        self.clip_x0 = clip_x0
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
        """Sample and save one grid per sampler (rank 0 only; other ranks return at once)."""
        step = trainer.global_step
        if trainer.global_rank != 0 or step == self._last_step or self.image_shape is None:
            return []
        self._last_step = step
        indices, labels, nrow = self.layout(pl_module.num_classes)
        folder = self.folder or run_dir(trainer) / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for sampler in self.samplers:
            images = [u8 for _, u8, _, _ in generate(
                pl_module, sampler, indices, self.image_shape, seed=self.seed, guidance=self.guidance,
                class_choices=labels, batch_size=self.batch_size, device=pl_module.device, clip_x0=self.clip_x0,
                guide_module=self.guide, guidance_interval=self.guidance_interval,
                guidance_channels=self.guidance_channels)]
            grid = make_grid(torch.cat(images).cpu(), nrow=nrow, padding=1)  # uint8 (3, H', W')
            path = folder / f"{sampler_label(sampler)}_step{step}.png"
            with atomic_path(path) as tmp:
                save_image(grid.float() / 255.0, tmp)
            for logger in trainer.loggers:
                experiment = getattr(logger, "experiment", None)
                if hasattr(experiment, "add_image"):  # TensorBoard (SummaryWriter)
                    experiment.add_image(f"samples/{sampler_label(sampler)}", grid, global_step=step)
                elif hasattr(logger, "log_image"):  # Weights & Biases (WandbLogger.log_image)
                    logger.log_image(key=f"samples/{sampler_label(sampler)}", images=[grid.permute(1, 2, 0).numpy()],
                                     step=step)
            paths.append(path)
        return paths
