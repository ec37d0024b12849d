"""Time grids t_0 = t_max > t_1 > ... > t_steps = t_min for the samplers.

A grid is uniform in some coordinate of time: t itself, u = sqrt((t - t_min) / (t_max - t_min)),
the noise level sigma/alpha to the power 1/rho (Karras et al. 2022, eq. 5), or the log-SNR.
Grids are float64: the DDPM grid needs exact step indices and a Karras grid spans 0.002..80.

The noise level and the log-SNR are infinite at t_max when alpha(t_max) = 0 (RectifiedFlow,
Trigonometric), and a VP process reaches noise levels (~150) where x_t holds no information
about the data. `KarrasGrid` and `LogSNRGrid` therefore ramp from at most `max_noise_level`
(EDM's sigma_max = 80) and, when the process goes beyond it, spend their first step going from
t_max down to that level: every grid starts exactly at t_max, where the prior is drawn.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from diffusion_pl.processes import AttributeRepr, Process, check_positive

__all__ = ["TimeGrid", "UniformGrid", "QuadraticGrid", "KarrasGrid", "LogSNRGrid", "ExplicitGrid"]


class TimeGrid(AttributeRepr):
    """A rule that places `steps + 1` decreasing times from process.t_max to process.t_min."""

    def times(self, process: Process, steps: int) -> Tensor:
        """Float64 tensor (steps + 1,), times[0] = t_max, times[-1] = t_min, strictly decreasing."""
        raise NotImplementedError


def _check_steps(steps: int) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")


def _pin_ends(t: Tensor, process: Process) -> Tensor:
    # inverse maps (bisection, closed forms) return the end points only to rounding; pin them
    t[0], t[-1] = process.t_max, process.t_min
    return t


class UniformGrid(TimeGrid):
    """Uniform in t (DDPM, DDIM's 'uniform' skip, Song et al. 2021 SDE samplers)."""

    def times(self, process: Process, steps: int) -> Tensor:
        _check_steps(steps)
        return _pin_ends(torch.linspace(process.t_max, process.t_min, steps + 1, dtype=torch.float64), process)


class QuadraticGrid(TimeGrid):
    """t = t_min + (t_max - t_min) u^2 with u uniform in [0, 1] (DDIM's 'quadratic' skip, Song et al. 2021a)."""

    def times(self, process: Process, steps: int) -> Tensor:
        _check_steps(steps)
        u = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
        return _pin_ends(process.t_min + (process.t_max - process.t_min) * u**2, process)


def _capped_ramp(process: Process, steps: int, q_max: float, q_min: float, q_cap: float,
                 ramp: Callable[[float, float, int], Tensor], t_of_q: Callable[[Tensor], Tensor]) -> Tensor:
    """Times uniform in a noise coordinate q (increasing in t), the ramp starting at min(q_max, q_cap)."""
    if q_max <= q_cap:
        return _pin_ends(t_of_q(ramp(q_max, q_min, steps + 1)), process)
    # the process goes beyond the cap (or to infinity): one step from t_max to the cap, then the ramp
    if steps == 1:
        return torch.tensor([process.t_max, process.t_min], dtype=torch.float64)
    t = torch.cat([torch.tensor([process.t_max], dtype=torch.float64), t_of_q(ramp(q_cap, q_min, steps))])
    return _pin_ends(t, process)


def _float_value(fn: Callable[[Tensor], Tensor], t: float) -> float:
    """fn (a process function of time, e.g. noise_level) at the one time t, as a Python float."""
    return float(fn(torch.tensor([t], dtype=torch.float64))[0])


class KarrasGrid(TimeGrid):
    """Uniform in noise_level^(1/rho), noise_level = sigma/alpha (Karras et al. 2022, eq. 5), mapped back to t.

    The ramp starts at min(noise_level(t_max), max_noise_level); see the module docstring.
    On EDM's process (sigma(t) = t, sigma_max = 80) this is exactly EDM's time-step grid.
    """

    def __init__(self, rho: float = 7.0, max_noise_level: float = 80.0) -> None:
        if rho <= 0 or max_noise_level <= 0:
            raise ValueError(f"rho and max_noise_level must be positive, got {rho}, {max_noise_level}")
        self.rho = rho
        self.max_noise_level = max_noise_level

    def _ramp(self, s_max: float, s_min: float, n: int) -> Tensor:
        i = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
        a, b = s_max ** (1 / self.rho), s_min ** (1 / self.rho)
        return (a + i * (b - a)) ** self.rho

    def times(self, process: Process, steps: int) -> Tensor:
        _check_steps(steps)
        s_max = _float_value(process.noise_level, process.t_max)
        s_min = _float_value(process.noise_level, process.t_min)
        return _capped_ramp(process, steps, s_max, s_min, self.max_noise_level, self._ramp,
                            process.t_from_noise_level)


class LogSNRGrid(TimeGrid):
    """Uniform in log-SNR (DPM-Solver's 'logSNR' skip, Lu et al. 2022), starting at most at max_noise_level."""

    def __init__(self, max_noise_level: float = 80.0) -> None:
        check_positive("max_noise_level", max_noise_level)
        self.max_noise_level = max_noise_level

    def times(self, process: Process, steps: int) -> Tensor:
        _check_steps(steps)
        # q = -log_snr increases with t; its cap is the log-SNR of max_noise_level
        q_max, q_min = -_float_value(process.log_snr, process.t_max), -_float_value(process.log_snr, process.t_min)
        q_cap = 2.0 * math.log(self.max_noise_level)

        def ramp(a: float, b: float, n: int) -> Tensor:
            return torch.linspace(a, b, n, dtype=torch.float64)

        return _capped_ramp(process, steps, q_max, q_min, q_cap, ramp, lambda q: process.t_from_log_snr(-q))


class ExplicitGrid(TimeGrid):
    """A given list of times (e.g. diffusers' timesteps mapped to t for parity tests); steps must be len - 1."""

    def __init__(self, times: list[float]) -> None:
        t = torch.tensor(times, dtype=torch.float64)
        if t.ndim != 1 or len(t) < 2 or not bool((t[1:] < t[:-1]).all()):
            raise ValueError(f"ExplicitGrid needs at least two strictly decreasing times, got {times}")
        self._t = t

    def times(self, process: Process, steps: int) -> Tensor:
        if steps != len(self._t) - 1:
            raise ValueError(f"ExplicitGrid holds {len(self._t)} times, so steps must be {len(self._t) - 1}, got {steps}")
        if self._t[0] > process.t_max or self._t[-1] < process.t_min:
            raise ValueError(f"ExplicitGrid times must lie in [t_min, t_max] = [{process.t_min}, {process.t_max}], "
                             f"got [{float(self._t[-1])}, {float(self._t[0])}]")
        return self._t.clone()

    def __repr__(self) -> str:
        return f"ExplicitGrid(times=<{len(self._t)} times from {float(self._t[0]):g} to {float(self._t[-1]):g}>)"
