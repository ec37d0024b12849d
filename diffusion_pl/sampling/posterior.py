"""Posterior (ancestral) samplers: DDPM and DDIM(eta) for every process.

One step draws x_s from q(x_s | x_t, x0 = x0_hat), the Gaussian posterior of the forward
process with DDIM's eta scaling its variance (`base.posterior_step`). eta = 1 is DDPM's
ancestral sampler with the posterior variance beta-tilde (Ho et al. 2020, eq. 6-7), eta = 0
the deterministic DDIM (Song et al. 2021a). As the step size goes to zero the step is the
reverse SDE with stochasticity gamma = eta, discretized exactly in its linear part. `DDPM` also
offers the reverse variance beta ('fixedlarge') and the learned interpolation of Nichol & Dhariwal
(2021) ('learned').

`steps` counts network evaluations, as diffusers' num_inference_steps does: with final_denoise
(the default) the grid holds `steps` times t_max >= t_1 > ... > t_steps >= t_min, one posterior
step leads from each to the next, and the last evaluation, at t_steps, is the step to x0
(x <- x0_hat, DDPM's last step and DDIM's step to alpha = 1). Without final_denoise the grid has
steps + 1 times and sampling stops at x_{t_min}. So DDPM(steps=1000) on DDPMDiscrete is 1000 network
evaluations at the timesteps 999, ..., 0, as diffusers' DDPMScheduler.
"""

from __future__ import annotations

from torch import Tensor

from diffusion_pl.prediction import Denoiser
from diffusion_pl.processes.base import Process, check_nonnegative
from diffusion_pl.sampling.base import Point, Sampler, Variance, posterior_step
from diffusion_pl.sampling.grids import TimeGrid, TimestepGrid
from diffusion_pl.sampling.noise import Noise

__all__ = ["DDIM", "DDPM"]


class DDIM(Sampler):
    """DDIM with stochasticity eta (Song et al. 2021a, eq. 12); eta = 0 is deterministic.

    NFE = steps (see the module docstring): the final denoise x <- x0_hat at the grid's last time is
    DDIM's last step to alpha = 1 (diffusers' set_alpha_to_one=True). The default grid is
    `TimestepGrid()`: evenly spaced training timesteps on a discrete process (DDPMDiscrete), uniform in
    log-SNR on a continuous one. eta sets the noise; a learned variance is not used (as guided-diffusion's
    ddim_sample, gaussian_diffusion.py:537-585, whose sigma is eta times the beta-tilde of the step).
    """

    def __init__(self, steps: int = 50, grid: TimeGrid | None = None, final_denoise: bool = True,
                 eta: float = 0.0) -> None:
        check_nonnegative("eta", eta)
        super().__init__(steps, grid, final_denoise)
        self.eta = eta

    def default_grid(self) -> TimeGrid:
        """Training timesteps where the process has them (DDPM's and DDIM's grids), else uniform in log-SNR."""
        return TimestepGrid()

    def times(self, process: Process) -> Tensor:
        """The float64 grid: `steps` times with final_denoise (the last evaluation steps to x0), else steps + 1."""
        intervals = self.steps - 1 if self.final_denoise else self.steps
        if intervals == 0:  # a single evaluation: x0_hat at the grid's first time
            return self.grid.times(process, 1)[:1]
        return self.grid.times(process, intervals)

    def step(self, denoiser: Denoiser, x: Tensor, p_t: Point, p_s: Point, noise: Noise, class_labels) -> Tensor:
        return posterior_step(denoiser(x, p_t.t, class_labels), x, p_t, p_s, self.eta, noise)


class DDPM(DDIM):
    """DDPM ancestral sampling (Ho et al. 2020, Alg. 2): the posterior mean plus noise of variance `variance`.

    variance (per step t -> s, with b2 and c2 of `base.step_variances`):
    - 'fixedsmall': beta-tilde c2 (DDIM with eta = 1; diffusers' 'fixed_small');
    - 'fixedlarge': beta b2 (Ho et al.'s CIFAR-10 choice, FID 3.17; diffusers' 'fixed_large');
    - 'learned': exp(v log b2 + (1 - v) log c2) with v from the network's extra C output channels
      (Nichol & Dhariwal 2021, eq. 15; diffusers' 'learned_range').
    On a respaced grid b2 is the step's own beta, 1 - alpha_bar_t / alpha_bar_s on VP processes (as
    guided-diffusion's respace.py and diffusers). The last step, to x0, adds no noise for any variance.
    DDPM() on DDPMDiscrete(1000) visits every timestep 999, ..., 0: 1000 network evaluations.
    """

    def __init__(self, steps: int = 1000, grid: TimeGrid | None = None, final_denoise: bool = True,
                 variance: Variance = "fixedsmall") -> None:
        if variance not in ("fixedsmall", "fixedlarge", "learned"):
            raise ValueError(f"variance must be 'fixedsmall', 'fixedlarge' or 'learned', got {variance!r}")
        super().__init__(steps, grid, final_denoise, eta=1.0)
        self.variance = variance

    def step(self, denoiser: Denoiser, x: Tensor, p_t: Point, p_s: Point, noise: Noise, class_labels) -> Tensor:
        return posterior_step(denoiser(x, p_t.t, class_labels), x, p_t, p_s, 1.0, noise, self.variance)
