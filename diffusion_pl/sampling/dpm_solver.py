"""DPM-Solver++(2M): multistep 2nd-order solver of the probability-flow ODE in lambda (Lu et al. 2022b, Alg. 2).

With lambda = log(alpha/sigma) and the data prediction x0_hat, the ODE solution from t to s is
x_s = (sigma_s/sigma_t) x_t + sigma_s int e^lambda x0_hat dlambda. Taking x0_hat linear in
lambda through the current and the previous evaluation gives, with h = lambda_s - lambda_t
and r = h_prev / h,

    D   = (1 + 1/(2r)) x0_hat_t - 1/(2r) x0_hat_prev      (first step: D = x0_hat_t)
    x_s = (sigma_s / sigma_t) x_t + alpha_s (1 - e^-h) D.

e^-h = alpha_t sigma_s / (sigma_t alpha_s) is computed as that ratio, so a step from
alpha_t = 0 (lambda = -inf) is finite (it is DDIM's step); the step after it has r = inf and is
first order. The final denoise is diffusers' last step to sigma = 0 (final_sigmas_type="zero").
"""

from __future__ import annotations

import math

from diffusion_pl.sampling.base import Sampler
from diffusion_pl.sampling.grids import TimeGrid

__all__ = ["DPMSolverPP"]


class DPMSolverPP(Sampler):
    """DPM-Solver++(2M), data prediction, multistep in lambda (Lu et al. 2022b, Alg. 2). NFE = steps + final_denoise."""

    def __init__(self, steps: int = 20, grid: TimeGrid | None = None, final_denoise: bool = True) -> None:
        super().__init__(steps, grid, final_denoise)

    def solve(self, denoiser, x, points, noise, class_labels, bar):
        x0_prev, h_prev = None, math.inf
        for p_t, p_s in zip(points[:-1], points[1:]):
            x0 = denoiser(x, p_t.t, class_labels).x0
            h = p_s.lam - p_t.lam
            D = x0
            if x0_prev is not None and math.isfinite(h_prev):
                k = 0.5 * h / h_prev  # 1 / (2 r)
                D = (1.0 + k) * x0 - k * x0_prev
            exp_neg_h = p_t.alpha * p_s.sigma / (p_t.sigma * p_s.alpha)
            x = (p_s.sigma / p_t.sigma) * x + (p_s.alpha * (1.0 - exp_neg_h)) * D
            x0_prev, h_prev = x0, h
            bar.update()
        return x
