"""Probability-flow ODE samplers: Euler, Heun and adaptive RK45 (Song et al. 2021, eq. 13).

The ODE is integrated in t in its finite form dx/dt = alpha'(t) x0_hat + sigma'(t) eps_hat,
which equals f x - g2/2 score but stays finite where alpha = 0 (rectified flow at t = 1). On
EDM's process (alpha = 1, sigma = t) it is dx/dt = (x - D(x; t)) / t, so `HeunODE` on the
Karras grid with the final denoise is exactly EDM's Algorithm 1 (Karras et al. 2022), and on
other processes it is that algorithm's general form (integration in t).
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffusion_pl.prediction import Denoiser
from diffusion_pl.sampling.base import Point, Sampler, at
from diffusion_pl.sampling.grids import KarrasGrid, TimeGrid, UniformGrid

__all__ = ["EulerODE", "HeunODE", "AdaptiveODE"]


def _velocity(denoiser: Denoiser, x: Tensor, p: Point, class_labels) -> Tensor:
    return p.velocity(denoiser(x, p.t, class_labels))


class EulerODE(Sampler):
    """Euler's method on the probability-flow ODE. NFE = steps + final_denoise."""

    def __init__(self, steps: int = 100, grid: TimeGrid | None = None, final_denoise: bool = True) -> None:
        super().__init__(steps, grid, final_denoise)

    def default_grid(self) -> TimeGrid:
        return KarrasGrid()

    def step(self, denoiser, x, p_t, p_s, noise, class_labels):
        return x + (p_s.t - p_t.t) * _velocity(denoiser, x, p_t, class_labels)


class HeunODE(Sampler):
    """Heun's 2nd-order method on the probability-flow ODE (Karras et al. 2022, Alg. 1). NFE = 2 steps + final_denoise.

    EDM's "18 steps, 35 NFE" is HeunODE(steps=17): 17 Heun steps between its 18 positive noise
    levels and the final denoise, which is EDM's last Euler step to sigma = 0.
    """

    def __init__(self, steps: int = 17, grid: TimeGrid | None = None, final_denoise: bool = True) -> None:
        super().__init__(steps, grid, final_denoise)

    def default_grid(self) -> TimeGrid:
        return KarrasGrid()

    def step(self, denoiser, x, p_t, p_s, noise, class_labels):
        h = p_s.t - p_t.t
        v = _velocity(denoiser, x, p_t, class_labels)
        v_s = _velocity(denoiser, x + h * v, p_s, class_labels)
        return x + h * 0.5 * (v + v_s)


class AdaptiveODE(Sampler):
    """Adaptive Dormand-Prince RK45 on the probability-flow ODE (Song et al. 2021, Sec. 4.3); NFE is adaptive.

    One solve from t_max to t_min with torchdiffeq's dopri5 (imported when first used), or, without
    torchdiffeq, scipy's solve_ivp('RK45') in float64. The solver picks its own steps: `steps` and
    `grid` only place the progress bar's ticks.
    """

    def __init__(self, steps: int = 1, grid: TimeGrid | None = None, final_denoise: bool = True,
                 rtol: float = 1e-5, atol: float = 1e-5) -> None:
        if rtol <= 0 or atol <= 0:
            raise ValueError(f"rtol and atol must be positive, got {rtol}, {atol}")
        super().__init__(steps, grid, final_denoise)
        self.rtol, self.atol = rtol, atol

    def default_grid(self) -> TimeGrid:
        return UniformGrid()

    def solve(self, denoiser, x, points, noise, class_labels, bar):
        ticks = [p.t for p in points[1:]]

        def f(tau: float, y: Tensor) -> Tensor:
            while ticks and tau <= ticks[0]:  # the solver has reached the next grid time
                ticks.pop(0)
                bar.update()
            v = _velocity(denoiser, y.reshape(x.shape).to(x.dtype), at(denoiser.process, tau), class_labels)
            return v.reshape(y.shape).to(y.dtype)

        t, s = points[0].t, points[-1].t
        try:
            from torchdiffeq import odeint
        except ImportError:
            x = _solve_ivp(f, x, t, s, self.rtol, self.atol)
        else:
            span = torch.tensor([t, s], dtype=torch.float64, device=x.device)
            # step_t makes dopri5 land on t_min instead of stepping past it and interpolating back:
            # a process may be undefined beyond its range (VP at t < 0 gives sigma = NaN)
            x = odeint(lambda tau, y: f(float(tau), y), x, span, rtol=self.rtol, atol=self.atol,
                       method="dopri5", options={"step_t": span[1:]})[-1]
        bar.update(len(ticks))
        return x


def _solve_ivp(f, x: Tensor, t: float, s: float, rtol: float, atol: float) -> Tensor:
    """scipy's RK45 on the flattened batch, in float64 (the fallback when torchdiffeq is missing)."""
    from scipy.integrate import solve_ivp

    def fun(tau, y):
        return f(float(tau), torch.from_numpy(y).to(x.device)).cpu().numpy()

    sol = solve_ivp(fun, (t, s), x.reshape(-1).to(torch.float64).cpu().numpy(), method="RK45", rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"solve_ivp failed between t={t} and t={s}: {sol.message}")
    return torch.from_numpy(sol.y[:, -1]).to(device=x.device, dtype=x.dtype).reshape(x.shape)
