"""Probability-flow ODE samplers: Euler, Heun and adaptive RK45 (Song et al. 2021, eq. 13).

The ODE is integrated in t in its finite form dx/dt = alpha'(t) x0_hat + sigma'(t) eps_hat,
which equals f x - g2/2 score but stays finite where alpha = 0 (rectified flow at t = 1). On
EDM's process (alpha = 1, sigma = t) it is dx/dt = (x - D(x; t)) / t, so `HeunODE` on the
Karras grid with the final denoise is exactly EDM's Algorithm 1 (Karras et al. 2022), and on
other processes it is that algorithm's general form (integration in t).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import Tensor

from diffusion_pl.prediction import Denoiser
from diffusion_pl.sampling.base import Point, Sampler, point_at
from diffusion_pl.sampling.grids import KarrasGrid, TimeGrid, UniformGrid

__all__ = ["EulerODE", "HeunODE", "AdaptiveODE", "solve_ode"]

State = Tensor | tuple[Tensor, ...]


def solve_ode(fun: Callable[[Tensor | float, State], State], y0: State, t0: float, t1: float, rtol: float,
              atol: float, *, time_dtype: torch.dtype = torch.float64, use_torchdiffeq: bool = True) -> State:
    """y(t1) for dy/dt = fun(t, y), y(t0) = y0, by adaptive Dormand-Prince RK45 (Dormand & Prince 1980).

    y0 is a tensor or a tuple of tensors; fun returns, and the result is, the same structure.
    With torchdiffeq installed (and use_torchdiffeq) its dopri5 integrates the tensors themselves
    and fun gets t as a 0-dim tensor of `time_dtype`; otherwise scipy's solve_ivp('RK45') integrates
    one flat float64 vector and fun gets t as a Python float and the state in y0's dtypes and shapes.
    """
    single = isinstance(y0, Tensor)
    state = (y0,) if single else tuple(y0)
    odeint = None
    if use_torchdiffeq:
        try:
            from torchdiffeq import odeint
        except ImportError:
            pass
    if odeint is not None:
        span = torch.tensor([t0, t1], dtype=time_dtype, device=state[0].device)
        # step_t makes dopri5 end a step exactly at t1 instead of stepping past it and interpolating
        # back: a process may be undefined beyond its range (VP at t < 0 gives sigma = NaN)
        solution = odeint(fun, y0 if single else state, span, rtol=rtol, atol=atol, method="dopri5",
                          options={"step_t": span[1:]})
        return solution[-1] if single else tuple(y[-1] for y in solution)
    ends = np.cumsum([0] + [y.numel() for y in state])

    def unflatten(flat: np.ndarray) -> tuple[Tensor, ...]:
        return tuple(torch.from_numpy(flat[a:b]).to(device=y.device, dtype=y.dtype).reshape(y.shape)
                     for y, a, b in zip(state, ends[:-1], ends[1:]))

    def flat_fun(t: float, flat: np.ndarray) -> np.ndarray:
        pieces = unflatten(flat)
        dy = fun(float(t), pieces[0] if single else pieces)
        return np.concatenate([d.double().cpu().numpy().ravel() for d in ((dy,) if single else dy)])

    from scipy.integrate import solve_ivp

    flat0 = np.concatenate([y.double().cpu().numpy().ravel() for y in state])
    sol = solve_ivp(flat_fun, (t0, t1), flat0, method="RK45", rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"scipy solve_ivp failed between {t0} and {t1}: {sol.message}")
    result = unflatten(sol.y[:, -1])
    return result[0] if single else result


def _velocity(denoiser: Denoiser, x: Tensor, p: Point, class_labels) -> Tensor:
    return denoiser(x, p.t, class_labels).velocity(p.d_alpha, p.d_sigma)


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

    One solve from t_max to t_min with `solve_ode`: torchdiffeq's dopri5 (imported when first used),
    or, without torchdiffeq, scipy's solve_ivp('RK45') in float64. The solver picks its own steps:
    `steps` and `grid` only place the progress bar's ticks.
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

        def f(tau: Tensor | float, y: Tensor) -> Tensor:
            tau = float(tau)
            while ticks and tau <= ticks[0]:  # the solver has reached the next grid time
                ticks.pop(0)
                bar.update()
            return _velocity(denoiser, y, point_at(denoiser.process, tau), class_labels)

        x = solve_ode(f, x, points[0].t, points[-1].t, self.rtol, self.atol)
        bar.update(len(ticks))
        return x
