"""One-step and multistep consistency sampling (Song et al. 2023, Algorithm 1), for any process.

A consistency model's x0 output maps a noisy sample straight to data. Sampling evaluates it at t_max on the
prior sample; with more steps it re-noises that estimate to the next time t_i with fresh noise,
x = alpha(t_i) x0_hat + sigma(t_i) z, and evaluates it again. The last evaluation's x0_hat is the sample.
ECT samples this way with the times [80] (1 step) or [80, 0.821] (2 steps) on EDM's process
(locuslab/ect training/ct_training_loop.py:79-97 `generator_fn`, ct_train.py:99 `--mid_t`).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from diffusion_pl.prediction import Denoiser
from diffusion_pl.processes.base import Process
from diffusion_pl.sampling.base import Sampler, points_at
from diffusion_pl.sampling.grids import KarrasGrid, TimeGrid
from diffusion_pl.sampling.noise import Noise

__all__ = ["Consistency"]


class Consistency(Sampler):
    """Multistep consistency sampling: `steps` evaluations of the x0 output, re-noising in between.

    The evaluation times are t_max followed by either the times whose noise levels sigma/alpha are
    `noise_levels` (steps - 1 of them, decreasing; ECT's 2-step CIFAR-10 sampler: [0.821]) or, without them,
    the first `steps` times of `grid` (default `KarrasGrid()`, whose last time t_min is not evaluated:
    re-noising to t_min would add almost no noise). NFE = steps. It needs no denoiser: a consistency model
    (ConsistencyLoss, SCMLoss) samples with it, and so does a diffusion model (one step is then one denoise).
    """

    needs_denoiser = False

    def __init__(self, steps: int = 1, grid: TimeGrid | None = None,
                 noise_levels: Sequence[float] | None = None) -> None:
        super().__init__(steps, grid, final_denoise=True)
        if noise_levels is not None:
            levels = [float(s) for s in noise_levels]
            if len(levels) != self.steps - 1:
                raise ValueError(f"noise_levels holds {len(levels)} levels for steps={self.steps}: expected "
                                 f"steps - 1 = {self.steps - 1} (the levels after t_max)")
            if any(not s > 0 for s in levels) or any(a <= b for a, b in zip(levels[:-1], levels[1:])):
                raise ValueError(f"noise_levels must be positive and strictly decreasing, got {levels}")
            noise_levels = levels
        self.noise_levels = noise_levels

    def default_grid(self) -> TimeGrid:
        return KarrasGrid()

    def times(self, process: Process) -> Tensor:
        """The `steps` float64 times the x0 output is evaluated at, t_max first."""
        if self.noise_levels is None:
            return self.grid.times(process, self.steps)[:-1]
        levels = torch.tensor(self.noise_levels, dtype=torch.float64)
        t = process.t_from_noise_level(levels)
        t_min, t_max = process.t_min, process.t_max
        lo, hi = (float(process.noise_level(torch.tensor([x], dtype=torch.float64))[0]) for x in (t_min, t_max))
        if float(levels.max()) >= hi or float(levels.min()) <= lo:
            raise ValueError(f"noise_levels {self.noise_levels} must lie inside the process's ({lo:g}, {hi:g}) "
                             f"(sigma/alpha at t_min and t_max)")
        return torch.cat([torch.tensor([t_max], dtype=torch.float64), t])

    def run(self, denoiser: Denoiser, x: Tensor, noise: Noise, class_labels: Tensor | None = None,
            progress: bool = False) -> Tensor:
        points = points_at(denoiser.process, self.times(denoiser.process).tolist())
        for i, p in enumerate(points):
            x0 = denoiser(x, p.t, class_labels).x0
            if i + 1 < len(points):
                nxt = points[i + 1]
                x = nxt.alpha * x0 + nxt.sigma * noise.randn_like(x)
        return x0
