"""The sampler base class and the per-time scalars every step needs.

A sampler turns x at t_max into x at t_min along a `TimeGrid`, talking only to a `Denoiser`
(x_t, t -> x0_hat, eps_hat) and to the process's alpha, sigma and their derivatives, so one
implementation serves every process and every parameterization. The scalars of a step are
Python floats computed in float64 from the float64 grid; they multiply float32 samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffusion_pl.prediction import Denoiser, DenoiserOutput
from diffusion_pl.processes.base import AttributeRepr, Process
from diffusion_pl.sampling.grids import LogSNRGrid, TimeGrid
from diffusion_pl.sampling.noise import Noise

__all__ = ["Sampler", "Point", "point_at", "points_at", "posterior_step", "step_variances", "Variance"]


@dataclass(frozen=True)
class Point:
    """alpha, sigma, their time derivatives and g^2 at one time t, as float64 Python floats."""

    t: float
    alpha: float
    sigma: float
    d_alpha: float
    d_sigma: float
    g2: float

    @property
    def noise_level(self) -> float:
        """sigma/alpha, EDM's sigma; infinite where alpha = 0."""
        return self.sigma / self.alpha if self.alpha > 0 else math.inf

    @property
    def lam(self) -> float:
        """Half log-SNR lambda = log(alpha/sigma) (Lu et al. 2022); -inf where alpha = 0."""
        return math.log(self.alpha / self.sigma) if self.alpha > 0 else -math.inf


def points_at(process: Process, times: list[float]) -> list[Point]:
    """The process's scalars at each of a list of times (one vectorized call per function)."""
    tt = torch.tensor(times, dtype=torch.float64)
    fns = (process.alpha, process.sigma, process.d_alpha, process.d_sigma, process.g2)
    columns = [tt.tolist()] + [fn(tt).tolist() for fn in fns]
    return [Point(*row) for row in zip(*columns)]


def point_at(process: Process, t: float) -> Point:
    """The process's scalars at one time t."""
    return points_at(process, [t])[0]


Variance = Literal["fixedsmall", "fixedlarge", "learned"]


def step_variances(p_t: Point, p_s: Point) -> tuple[float, float]:
    """(b2, c2) of the step t -> s: b2 = sigma_t^2 - a^2 sigma_s^2 with a = alpha_t / alpha_s, the step's
    beta in x-space, and c2 = b2 sigma_s^2 / sigma_t^2, the posterior variance beta-tilde (Ho et al. 2020, eq. 7).

    On a VP process b2 = 1 - alpha_bar_t / alpha_bar_s, the beta of a respaced step (Nichol & Dhariwal 2021,
    App. B). Finite where alpha_t = 0 (then a = 0, b2 = sigma_t^2).
    """
    return step_variance_terms(p_t.alpha, p_t.sigma, p_s.alpha, p_s.sigma)


def step_variance_terms(alpha_t, sigma_t, alpha_s, sigma_s):
    """`step_variances` of (alpha, sigma) at t and s given as floats or as tensors (elementwise, the VLB's case)."""
    a = alpha_t / alpha_s
    b2 = sigma_t**2 - a**2 * sigma_s**2
    b2 = b2.clamp_min(0.0) if isinstance(b2, Tensor) else max(b2, 0.0)  # >= 0 up to rounding
    return b2, b2 * sigma_s**2 / sigma_t**2


def posterior_step(d: DenoiserOutput, x: Tensor, p_t: Point, p_s: Point, eta: float, noise: Noise,
                   variance: Variance = "fixedsmall") -> Tensor:
    """x_s ~ q(x_s | x_t, x0_hat) with DDIM's eta (Song et al. 2021a, eq. 12), or DDPM's reverse variances.

    With (b2, c2) from `step_variances`: x_s = alpha_s x0_hat + sqrt(sigma_s^2 - eta^2 c2) eps_hat + std z,
    where the mean at eta = 1 is the posterior mean of q(x_s | x_t, x0_hat) (Ho et al. 2020, eq. 7) and
    - 'fixedsmall': std = eta sqrt(c2), beta-tilde (DDIM's sigma; eta = 1 is DDPM's 'fixedsmall');
    - 'fixedlarge': std = sqrt(b2), beta (Ho et al. 2020, Sec. 3.2, their CIFAR-10 choice), eta = 1;
    - 'learned': log std^2 = v log b2 + (1 - v) log c2 with v = d.variance_interp (Nichol & Dhariwal 2021,
      eq. 15; guided-diffusion gaussian_diffusion.py:269-276 LEARNED_RANGE), eta = 1.
    A step that ends at sigma_s = 0 draws no noise (Ho et al. 2020, Alg. 2: z = 0 at the last step);
    otherwise noise is drawn exactly when std > 0, so the noise streams match diffusers' schedulers.
    """
    if variance != "fixedsmall" and eta != 1.0:
        raise ValueError(f"variance={variance!r} is DDPM's ancestral step: expected eta = 1, got {eta}")
    b2, c2 = step_variances(p_t, p_s)
    # eta > 1 asks for more variance than sigma_s^2 holds; the eps_hat direction then vanishes
    direction = math.sqrt(max(p_s.sigma**2 - eta**2 * c2, 0.0))
    x_s = p_s.alpha * d.x0 + direction * d.eps
    if variance == "fixedsmall":
        if eta * c2 > 0:
            x_s = x_s + eta * math.sqrt(c2) * noise.randn_like(x)
    elif variance == "fixedlarge":
        if b2 > 0 and p_s.sigma > 0:
            x_s = x_s + math.sqrt(b2) * noise.randn_like(x)
    elif variance == "learned":
        if d.variance_interp is None:
            raise ValueError("variance='learned' needs a model whose output has twice x's channels (mean and "
                             "variance interpolation), got one with x's channels")
        if c2 > 0:  # then b2 >= c2 > 0 too
            v = d.variance_interp  # (B, C, ...)
            std = torch.exp(0.5 * (v * math.log(b2) + (1.0 - v) * math.log(c2)))
            x_s = x_s + std * noise.randn_like(x)
    else:
        raise ValueError(f"variance must be 'fixedsmall', 'fixedlarge' or 'learned', got {variance!r}")
    return x_s


class Sampler(AttributeRepr):
    """Base: `steps` steps along `grid` from t_max to t_min, then optionally x <- x0_hat at t_min (Tweedie).

    Subclasses implement `step` (one grid interval t -> s) or override `solve` (multistep and
    adaptive samplers). `grid=None` picks the sampler's default grid (`default_grid`).
    """

    # whether its steps need a denoiser E[x0 | x_t] (every diffusion sampler); False for a sampler that reads a
    # consistency model's x0 output only at its own times (`Consistency`), see `TrainingLoss.denoiser`
    needs_denoiser: bool = True

    def __init__(self, steps: int, grid: TimeGrid | None = None, final_denoise: bool = True) -> None:
        if isinstance(steps, bool) or int(steps) != steps or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        self.steps = int(steps)
        self.grid = grid if grid is not None else self.default_grid()
        self.final_denoise = final_denoise

    def default_grid(self) -> TimeGrid:
        """The grid used when none is given: uniform in log-SNR, which suits every process (uniform t
        wastes steps on EDM's t in [0.002, 80]); a sampler built for another grid overrides this."""
        return LogSNRGrid()

    def times(self, process: Process) -> Tensor:
        """The float64 grid (steps + 1,) this sampler visits on `process`."""
        return self.grid.times(process, self.steps)

    def run(self, denoiser: Denoiser, x: Tensor, noise: Noise, class_labels: Tensor | None = None,
            progress: bool = False) -> Tensor:
        """Carry x from t_max (a prior sample) to t_min, and to x0_hat if final_denoise."""
        points = points_at(denoiser.process, self.times(denoiser.process).tolist())
        with tqdm(total=len(points) - 1, disable=not progress, desc=type(self).__name__) as bar:
            x = self.solve(denoiser, x, points, noise, class_labels, bar)
        if self.final_denoise:
            x = self.denoise(denoiser, x, points[-1], noise, class_labels)
        return x

    def solve(self, denoiser: Denoiser, x: Tensor, points: list[Point], noise: Noise,
              class_labels: Tensor | None, bar: tqdm) -> Tensor:
        """All grid steps, one `step` per interval."""
        for p_t, p_s in zip(points[:-1], points[1:]):
            x = self.step(denoiser, x, p_t, p_s, noise, class_labels)
            bar.update()
        return x

    def step(self, denoiser: Denoiser, x: Tensor, p_t: Point, p_s: Point, noise: Noise,
             class_labels: Tensor | None) -> Tensor:
        """x at time p_s.t < p_t.t from x at time p_t.t."""
        raise NotImplementedError

    def denoise(self, denoiser: Denoiser, x: Tensor, p: Point, noise: Noise, class_labels: Tensor | None) -> Tensor:
        """The final x <- E[x0 | x_t] (Tweedie's formula, Efron 2011) at t = t_min."""
        return denoiser(x, p.t, class_labels).x0
