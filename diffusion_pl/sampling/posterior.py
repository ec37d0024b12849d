"""Posterior (ancestral) samplers: DDPM and DDIM(eta) for every process.

One step draws x_s from q(x_s | x_t, x0 = x0_hat), the Gaussian posterior of the forward
process with DDIM's eta scaling its variance (`base.posterior_step`). eta = 1 is DDPM's
ancestral sampler with the posterior variance beta-tilde (Ho et al. 2020, eq. 6-7), eta = 0
the deterministic DDIM (Song et al. 2021a). As the step size goes to zero the step is the
reverse SDE with stochasticity gamma = eta, discretized exactly in its linear part.
"""

from __future__ import annotations

from torch import Tensor

from diffusion_pl.prediction import Denoiser
from diffusion_pl.processes import check_nonnegative
from diffusion_pl.sampling.base import Point, Sampler, posterior_step
from diffusion_pl.sampling.grids import TimeGrid
from diffusion_pl.sampling.noise import Noise

__all__ = ["DDIM", "DDPM"]


class DDIM(Sampler):
    """DDIM with stochasticity eta (Song et al. 2021a, eq. 12); eta = 0 is deterministic.

    The final denoise x <- x0_hat at t_min is DDIM's last step to alpha = 1 (diffusers'
    set_alpha_to_one=True). NFE = steps + final_denoise.
    """

    def __init__(self, steps: int = 50, grid: TimeGrid | None = None, final_denoise: bool = True,
                 eta: float = 0.0) -> None:
        check_nonnegative("eta", eta)
        super().__init__(steps, grid, final_denoise)
        self.eta = eta

    def step(self, denoiser: Denoiser, x: Tensor, p_t: Point, p_s: Point, noise: Noise, class_labels) -> Tensor:
        return posterior_step(denoiser(x, p_t.t, class_labels), x, p_t, p_s, self.eta, noise)


class DDPM(DDIM):
    """DDPM ancestral sampling (Ho et al. 2020, Alg. 2): DDIM with eta = 1.

    DDPM's own schedule: on DDPMDiscrete with N training steps, grid=UniformGrid() and
    steps = N - 1 visit t = 1, (N-1)/N, ..., 1/N, and the final denoise is DDPM's last step
    (t = 1/N to x0), so diffusers' 1000-step DDPMScheduler is DDPM(steps=999, grid=UniformGrid()).
    NFE = steps + final_denoise.
    """

    def __init__(self, steps: int = 1000, grid: TimeGrid | None = None, final_denoise: bool = True) -> None:
        super().__init__(steps, grid, final_denoise, eta=1.0)
