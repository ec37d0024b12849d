"""MeanFlow sampling: x_s = x_t - (t - s) u(x_t, s, t) on each grid interval (Geng et al. 2025, eq. 12, Alg. 2).

The model is an average-velocity network trained with `diffusion_pl.meanflow.MeanFlowLoss`; one step from
t_max to t_min is one-step generation (1-NFE), two steps the paper's 2-NFE (t = 1, 0.5, 0 on rectified flow;
Gsunshine/meanflow meanflow.py:102-113 steps between consecutive times of its schedule the same way).
"""

from __future__ import annotations

from torch import Tensor

from diffusion_pl.prediction import Denoiser
from diffusion_pl.sampling.base import Point, Sampler
from diffusion_pl.sampling.grids import TimeGrid, UniformGrid
from diffusion_pl.sampling.noise import Noise

__all__ = ["MeanFlow"]


class MeanFlow(Sampler):
    """Average-velocity jumps x_s = x_t - (t - s) u(x_t, s, t) along `grid` (UniformGrid by default). NFE = steps.

    Needs a model whose network takes an interval (`takes_interval`, e.g. UNet / DiT with
    interval_embedding=True); another model is refused in one line. The model at r = t is a velocity model, so
    the ODE samplers (EulerODE, HeunODE, ...) sample a MeanFlow model too. final_denoise is off by default:
    the last jump lands at t_min. A model trained with `MeanFlowLoss`'s guidance options (guidance folded into
    the target) has the guidance in its weights: sample it at guidance weight 1, the default.
    """

    def __init__(self, steps: int = 1, grid: TimeGrid | None = None, final_denoise: bool = False) -> None:
        super().__init__(steps, grid, final_denoise)

    def default_grid(self) -> TimeGrid:
        return UniformGrid()

    def step(self, denoiser: Denoiser, x: Tensor, p_t: Point, p_s: Point, noise: Noise,
             class_labels: Tensor | None) -> Tensor:
        u = denoiser.average_velocity(x, p_t.t, p_s.t, class_labels)
        return x - (p_t.t - p_s.t) * u
