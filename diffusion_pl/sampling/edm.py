"""EDM's stochastic sampler (Karras et al. 2022, Alg. 2) on any process.

EDM works on the noise level s = sigma/alpha and x~ = x_t/alpha, where x~ = x0 + s eps. Each
step raises the noise level from s_i to s_hat = s_i (1 + gamma_i) by adding fresh noise
("churn"), then takes a Heun step in s from s_hat to s_{i+1}. Written in x_t (so that nothing
divides by alpha = 0), with eps_hat = (x~ - D) / s the EDM direction d:

    churn:  x_hat = (alpha_hat / alpha_i) x_i + alpha_hat sqrt(s_hat^2 - s_i^2) S_noise z
    Euler:  x' = alpha' x0_hat + sigma' eps_hat                      (= x~ + (s' - s_hat) d)
    Heun:   x' += alpha' (s' - s_hat) (eps_hat' - eps_hat) / 2

Times are mapped to and from noise levels with process.noise_level / t_from_noise_level. For
alpha = 1 this is Alg. 2 line by line; on EDM's process (sigma(t) = t) with the Karras grid and
the final denoise (churn, then x <- D(x_hat; s_hat): Alg. 2's last step to sigma = 0) it is
EDM's sampler exactly. Two guards: the churn never raises the noise level above the
process's own at t_max (the process is not defined beyond; EDM's S_max = 50 < 80 never gets
there), and a step that starts at an infinite noise level (alpha(t_max) = 0) is an Euler step,
the trapezoid rule having an infinite interval there.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffusion_pl.prediction import Denoiser
from diffusion_pl.sampling.base import Point, Sampler, point_at
from diffusion_pl.sampling.grids import KarrasGrid, TimeGrid
from diffusion_pl.sampling.noise import Noise

__all__ = ["EDMStochastic"]


class EDMStochastic(Sampler):
    """EDM's stochastic Heun sampler with S_churn, S_min, S_max, S_noise (Karras et al. 2022, Alg. 2).

    Defaults are EDM's ImageNet-64 settings (Table 5); S_churn = 0 gives Alg. 1 (Heun in the
    noise level). EDM's N is steps + final_denoise. NFE = 2 steps + final_denoise (one less if
    alpha(t_max) = 0).
    """

    def __init__(self, steps: int = 32, grid: TimeGrid | None = None, final_denoise: bool = True,
                 S_churn: float = 40.0, S_min: float = 0.05, S_max: float = 50.0, S_noise: float = 1.003) -> None:
        if S_churn < 0 or S_noise < 0 or S_min > S_max:
            raise ValueError(f"expected S_churn >= 0, S_noise >= 0, S_min <= S_max, got {S_churn}, {S_noise}, {S_min}, {S_max}")
        super().__init__(steps, grid, final_denoise)
        self.S_churn, self.S_min, self.S_max, self.S_noise = S_churn, S_min, S_max, S_noise

    def default_grid(self) -> TimeGrid:
        return KarrasGrid()

    def _churn(self, denoiser: Denoiser, x: Tensor, p: Point, noise: Noise) -> tuple[Tensor, Point]:
        """Raise the noise level from s_i to s_hat = (1 + gamma_i) s_i by adding noise (Alg. 2, lines 4-6)."""
        process = denoiser.process
        s_i = p.noise_level
        n = self.steps + int(self.final_denoise)  # EDM's N counts the step to sigma = 0
        gamma = min(self.S_churn / n, math.sqrt(2.0) - 1.0) if self.S_min <= s_i <= self.S_max else 0.0
        s_hat = min(s_i * (1.0 + gamma), point_at(process, process.t_max).noise_level)
        if not s_hat > s_i:
            return x, p
        t_hat = float(process.t_from_noise_level(torch.tensor([s_hat], dtype=torch.float64))[0])
        p_hat = point_at(process, t_hat)
        s_hat = p_hat.noise_level  # the level actually reached after the round trip through t
        z = noise.randn_like(x)
        return (p_hat.alpha / p.alpha) * x + (p_hat.alpha * math.sqrt(max(s_hat**2 - s_i**2, 0.0)) * self.S_noise) * z, p_hat

    def step(self, denoiser, x, p_t, p_s, noise, class_labels):
        x_hat, p_hat = self._churn(denoiser, x, p_t, noise)
        d = denoiser(x_hat, p_hat.t, class_labels)
        x_s = p_s.alpha * d.x0 + p_s.sigma * d.eps  # Euler in s (Alg. 2, lines 7-8)
        if math.isfinite(p_hat.noise_level):  # Heun correction (Alg. 2, lines 9-11)
            d_s = denoiser(x_s, p_s.t, class_labels)
            x_s = x_s + (0.5 * p_s.alpha * (p_s.noise_level - p_hat.noise_level)) * (d_s.eps - d.eps)
        return x_s

    def denoise(self, denoiser, x, p, noise, class_labels):
        x_hat, p_hat = self._churn(denoiser, x, p, noise)
        return denoiser(x_hat, p_hat.t, class_labels).x0
