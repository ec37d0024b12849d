"""Stochastic samplers: Euler-Maruyama on the reverse SDE, predictor-corrector, annealed Langevin.

The reverse SDE with stochasticity gamma (Song et al. 2021, eq. 6 for gamma = 1)

    dx = [f x - (1 + gamma^2)/2 g2 score] dt + gamma g dW
       = [v + gamma^2/2 g2 eps_hat / sigma] dt + gamma g dW,   v = alpha' x0_hat + sigma' eps_hat,

is written with the finite ODE velocity v. Where alpha(t) = 0 (RectifiedFlow, Trigonometric
at t = 1) f and g2 are infinite and no explicit step exists: there `EulerMaruyama` takes the
posterior step with eta = min(gamma, 1) (`base.posterior_step`), the discretization of the same
SDE that is exact in its linear part (eta -> gamma as the step size -> 0). The predictor of
`PredictorCorrector` is the posterior step with eta = 1 (ancestral sampling, Song et al.'s
"reverse diffusion" predictor), finite everywhere.
"""

from __future__ import annotations

import math
from typing import Literal

from torch import Tensor

from diffusion_pl.prediction import Denoiser
from diffusion_pl.processes.base import append_dims, check_nonnegative
from diffusion_pl.sampling.base import Point, Sampler, posterior_step
from diffusion_pl.sampling.grids import TimeGrid
from diffusion_pl.sampling.noise import Noise

__all__ = ["EulerMaruyama", "PredictorCorrector", "AnnealedLangevin"]


class EulerMaruyama(Sampler):
    """Euler-Maruyama on the reverse SDE with stochasticity gamma (Song et al. 2021, eq. 6; gamma = 0 is Euler on the ODE).

    NFE = steps + final_denoise (score_sde's `denoise=True`).
    """

    def __init__(self, steps: int = 1000, grid: TimeGrid | None = None, final_denoise: bool = True,
                 gamma: float = 1.0) -> None:
        check_nonnegative("gamma", gamma)
        super().__init__(steps, grid, final_denoise)
        self.gamma = gamma

    def step(self, denoiser, x, p_t, p_s, noise, class_labels):
        d = denoiser(x, p_t.t, class_labels)
        if not math.isfinite(p_t.g2):  # alpha(t) = 0: see the module docstring
            return posterior_step(d, x, p_t, p_s, min(self.gamma, 1.0), noise)
        h = p_t.t - p_s.t
        x_s = x - h * d.velocity(p_t.d_alpha, p_t.d_sigma) - (0.5 * self.gamma**2 * p_t.g2 * h / p_t.sigma) * d.eps
        if self.gamma > 0:
            x_s = x_s + self.gamma * math.sqrt(p_t.g2 * h) * noise.randn_like(x)
        return x_s


def langevin_step(denoiser: Denoiser, x: Tensor, p: Point, snr: float, scale: float, norms: str, noise: Noise,
                  class_labels) -> Tensor:
    """x += h score + sqrt(2h) z with h = 2 scale (snr |z| / |score|)^2 (Song et al. 2021, Alg. 4/5)."""
    score = denoiser.score(x, p.t, class_labels)
    z = noise.randn_like(x)
    if norms == "sample":
        # each sample's own norms (score_sde averages them over the batch, which would tie samples together)
        ratio = z.flatten(1).norm(dim=1) / score.flatten(1).norm(dim=1).clamp_min(1e-30)
        h = append_dims(2.0 * scale * (snr * ratio) ** 2, x.ndim)
        return x + h * score + (2.0 * h).sqrt() * z
    # expected norms: |z|^2 -> D and |score|^2 -> E|eps|^2 / sigma^2 = D / sigma^2
    h = 2.0 * scale * (snr * p.sigma) ** 2
    return x + h * score + math.sqrt(2.0 * h) * z


class PredictorCorrector(Sampler):
    """Predictor-corrector sampling (Song et al. 2021, Alg. 2, 4, 5): an ancestral predictor step, then Langevin.

    Corrector step size h = 2 a (snr |z| / |score|)^2 with a = (alpha_t / alpha_s)^2 over the
    predictor's step t -> s, the generic form of Alg. 5's alpha_i = 1 - beta_i (a = 1 when alpha
    is constant, Alg. 4; a = 0, no correction, after a step from alpha_t = 0).
    `norms` = "expected" takes |z|^2 = D and |score|^2 = D / sigma^2 (the score of the Gaussian
    corruption alone), so h = 2 a snr^2 sigma^2: the same for every sample, stable in any
    dimension, and what the adaptive rule gives for images, whose score norm is close to
    sqrt(D)/sigma. `norms` = "sample" uses each sample's own |z| and |score| (Alg. 4/5 per
    sample): adaptive, but heavy-tailed in low dimension, where a sample near a mode has a
    vanishing score and so a huge step (2-D mixtures diverge with it; 64-D ones do not).
    `predictor_variance` is the predictor's reverse variance (`base.posterior_step`): "fixedsmall"
    (beta-tilde, ancestral sampling) or "fixedlarge" (the step's beta), which on VE is exactly
    score_sde's ReverseDiffusionPredictor, x + (sigma_t^2 - sigma_s^2) score + sqrt(sigma_t^2 -
    sigma_s^2) z (yang-song/score_sde_pytorch sampling.py ReverseDiffusionPredictor, sde_lib.py
    VESDE.discretize). score_sde runs the corrector before each predictor step; here it follows
    it, which is the same sequence but for one corrector step at t_max, on the prior sample.
    NFE = steps (1 + corrector_steps) + final_denoise.
    """

    def __init__(self, steps: int = 1000, grid: TimeGrid | None = None, final_denoise: bool = True,
                 snr: float = 0.16, corrector_steps: int = 1, norms: Literal["expected", "sample"] = "expected",
                 predictor_variance: Literal["fixedsmall", "fixedlarge"] = "fixedsmall") -> None:
        if snr < 0 or corrector_steps < 0:
            raise ValueError(f"snr and corrector_steps must be >= 0, got {snr}, {corrector_steps}")
        if norms not in ("expected", "sample"):
            raise ValueError(f"norms must be 'expected' or 'sample', got {norms!r}")
        if predictor_variance not in ("fixedsmall", "fixedlarge"):
            raise ValueError(f"predictor_variance must be 'fixedsmall' or 'fixedlarge', got {predictor_variance!r}")
        super().__init__(steps, grid, final_denoise)
        self.snr, self.corrector_steps, self.norms = snr, corrector_steps, norms
        self.predictor_variance = predictor_variance

    def step(self, denoiser, x, p_t, p_s, noise, class_labels):
        x = posterior_step(denoiser(x, p_t.t, class_labels), x, p_t, p_s, 1.0, noise, self.predictor_variance)
        scale = (p_t.alpha / p_s.alpha) ** 2
        for _ in range(self.corrector_steps):
            x = langevin_step(denoiser, x, p_s, self.snr, scale, self.norms, noise, class_labels)
        return x


class AnnealedLangevin(Sampler):
    """Annealed Langevin dynamics (Song & Ermon 2019, Alg. 1): steps_per_level Langevin steps at each grid level.

    Langevin runs on x_t at the levels t_1, ..., t_steps = t_min (x at t_max is the prior sample)
    with step size h = step_size * sigma(t)^2: NCSN's alpha_i = eps sigma_i^2 / sigma_L^2 with
    step_size = eps / sigma_L^2 (2e-5 / 0.01^2 = 0.2 in Song & Ermon 2019). sigma(t) is the right
    scale on any process: Langevin on x_t/alpha with EDM's noise level s^2 and the same relative
    step size is the same update. Between levels x is multiplied by alpha_s/alpha_t, which keeps
    x/alpha (NCSN's variable) and changes nothing for alpha = 1 (NCSN exactly). The default grid
    is uniform in log-SNR, NCSN's geometric noise levels. NFE = steps * steps_per_level +
    final_denoise (NCSNv2's final denoising step, Song & Ermon 2020).
    """

    def __init__(self, steps: int = 100, grid: TimeGrid | None = None, final_denoise: bool = True,
                 steps_per_level: int = 10, step_size: float = 0.2) -> None:
        if steps_per_level < 1 or step_size <= 0:
            raise ValueError(f"steps_per_level must be >= 1 and step_size > 0, got {steps_per_level}, {step_size}")
        super().__init__(steps, grid, final_denoise)
        self.steps_per_level, self.step_size = steps_per_level, step_size

    def step(self, denoiser, x, p_t, p_s, noise, class_labels):
        if p_t.alpha > 0:
            # carry x/alpha (NCSN's variable) to the new level, so that samples follow the means alpha mu
            # when alpha changes; at alpha_t = 0 (t_max) x is a prior sample, already right for t_1
            x = (p_s.alpha / p_t.alpha) * x
        h = self.step_size * p_s.sigma**2
        for _ in range(self.steps_per_level):
            score = denoiser.score(x, p_s.t, class_labels)
            x = x + h * score + math.sqrt(2.0 * h) * noise.randn_like(x)
        return x
