"""Time grids t_0 = t_max > t_1 > ... > t_steps = t_min for the samplers.

A grid is uniform in some coordinate of time: t itself, u = sqrt((t - t_min) / (t_max - t_min)),
the noise level sigma/alpha to the power 1/rho (Karras et al. 2022, eq. 5), or the log-SNR.
`TimestepGrid` instead picks integer training timesteps as DDPM, DDIM and diffusers do; its
'leading' and 'trailing' spacings (like `ExplicitGrid`) need not start at t_max or end at t_min,
and `UniformGrid(t_end=...)` may end before t_min (score_sde's sampling eps).
Grids are float64: the DDPM grid needs exact step indices and a Karras grid spans 0.002..80.

The noise level and the log-SNR are infinite at t_max when alpha(t_max) = 0 (RectifiedFlow,
Trigonometric), and a VP process reaches noise levels (~150) where x_t holds no information
about the data. `KarrasGrid` and `LogSNRGrid` therefore ramp from at most `max_noise_level`
(EDM's sigma_max = 80) and, when the process goes beyond it, spend their first step going from
t_max down to that level: every grid starts exactly at t_max, where the prior is drawn.
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import numpy as np
import torch
from torch import Tensor

from diffusion_pl.processes.base import AttributeRepr, Process, check_positive

__all__ = ["TimeGrid", "UniformGrid", "QuadraticGrid", "KarrasGrid", "LogSNRGrid", "ExplicitGrid", "TimestepGrid"]


class TimeGrid(AttributeRepr):
    """A rule that places `steps + 1` decreasing times from process.t_max to process.t_min."""

    def times(self, process: Process, steps: int) -> Tensor:
        """Float64 tensor (steps + 1,), times[0] = t_max, times[-1] = t_min, strictly decreasing.

        Grids that reproduce another code's timesteps (`ExplicitGrid`, `TimestepGrid` with 'leading'
        or 'trailing' spacing, `UniformGrid` with `t_end`) only lie within [t_min, t_max]: the prior sample is then taken as x at
        times[0], and the final denoise happens at times[-1], as in those codes.
        """
        raise NotImplementedError


def _check_steps(steps: int) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")


def _pin_ends(t: Tensor, process: Process) -> Tensor:
    # inverse maps (bisection, closed forms) return the end points only to rounding; pin them
    t[0], t[-1] = process.t_max, process.t_min
    return t


class UniformGrid(TimeGrid):
    """Uniform in t (DDPM, DDIM's 'uniform' skip, Song et al. 2021 SDE samplers).

    `t_end` ends the grid at that time instead of the process's t_min: score_sde trains its VP and
    sub-VP models on t >= 1e-5 but samples down to eps = 1e-3 (yang-song/score_sde_pytorch
    run_lib.py:92-95, sampling.py `linspace(sde.T, eps, sde.N)`).
    """

    def __init__(self, t_end: float | None = None) -> None:
        if t_end is not None and not t_end > 0:
            raise ValueError(f"t_end must be a positive time or None, got {t_end}")
        self.t_end = t_end

    def times(self, process: Process, steps: int) -> Tensor:
        _check_steps(steps)
        end = process.t_min if self.t_end is None else self.t_end
        if not process.t_min <= end < process.t_max:
            raise ValueError(f"UniformGrid t_end={end} must lie in [t_min, t_max) = [{process.t_min}, {process.t_max})")
        t = torch.linspace(process.t_max, end, steps + 1, dtype=torch.float64)
        t[0], t[-1] = process.t_max, end
        return t


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
            n = len(self._t)
            raise ValueError(f"ExplicitGrid holds {n} times but the sampler asks for {steps + 1}: expected a sampler "
                             f"that visits {n} times (steps={n - 1} for most samplers, steps={n} for DDIM and DDPM "
                             "with final_denoise)")
        if self._t[0] > process.t_max or self._t[-1] < process.t_min:
            raise ValueError(f"ExplicitGrid times must lie in [t_min, t_max] = [{process.t_min}, {process.t_max}], "
                             f"got [{float(self._t[-1])}, {float(self._t[0])}]")
        return self._t.clone()

    def __repr__(self) -> str:
        return f"ExplicitGrid(times=<{len(self._t)} times from {float(self._t[0]):g} to {float(self._t[-1]):g}>)"


Spacing = Literal["linspace", "leading", "trailing"]


class TimestepGrid(TimeGrid):
    """The integer training timesteps k in {0, ..., N-1} that DDPM, DDIM and diffusers visit, as process times.

    `times(process, steps)` gives the n = steps + 1 timesteps of diffusers' `set_timesteps(n)` with
    `timestep_spacing` = spacing (diffusers schedulers/scheduling_ddim.py `set_timesteps`; the names of
    Lin et al. 2024, Table 2):

    - 'linspace': k = round(linspace(0, N - 1, n)): starts at t_max and ends at t_min (the default);
    - 'leading': k = i floor(N / n) + steps_offset, i = n-1, ..., 0 (DDIM's 'uniform' skip, Song et al.
      2021a, and diffusers' default): ends at t_min (steps_offset = 0) but starts below t_max;
    - 'trailing': k = round(N - i N / n) - 1, i = 0, ..., n-1: starts at t_max, ends above t_min.

    With n = N all three are every timestep N-1, ..., 0 (DDPM, Ho et al. 2020, Alg. 2).
    Timestep k is the time `process.discrete_times()[k]`; on DDPMDiscrete that is t = (k + 1) / N, whose
    noise label t N - 1 is k again. A continuous process has no timesteps of its own: with
    `num_train_steps` = N it is cut into N uniform times t_k = t_min + k (t_max - t_min) / (N - 1);
    without, this grid is `continuous` (default LogSNRGrid()), so a sampler whose default grid this is
    keeps a grid that suits continuous processes.
    """

    def __init__(self, spacing: Spacing = "linspace", num_train_steps: int | None = None, steps_offset: int = 0,
                 continuous: TimeGrid | None = None) -> None:
        if spacing not in ("linspace", "leading", "trailing"):
            raise ValueError(f"spacing must be 'linspace', 'leading' or 'trailing', got {spacing!r}")
        if num_train_steps is not None and (isinstance(num_train_steps, bool) or num_train_steps < 2):
            raise ValueError(f"num_train_steps must be an integer >= 2 or None, got {num_train_steps!r}")
        if steps_offset < 0:
            raise ValueError(f"steps_offset must be >= 0, got {steps_offset}")
        self.spacing, self.num_train_steps, self.steps_offset = spacing, num_train_steps, steps_offset
        self.continuous = continuous

    def timesteps(self, num_train_steps: int, n: int) -> np.ndarray:
        """The n decreasing integer timesteps (int64) out of num_train_steps, as diffusers' set_timesteps(n)."""
        big_n = num_train_steps
        if not 1 <= n <= big_n:
            raise ValueError(f"TimestepGrid: {n} timesteps asked for, but there are {big_n} training timesteps: "
                             f"expected at most {big_n} grid times (DDPM and DDIM: steps <= {big_n})")
        i = np.arange(n)
        if self.spacing == "linspace":
            k = np.linspace(0, big_n - 1, n).round()[::-1]
        elif self.spacing == "leading":
            k = (i * (big_n // n))[::-1] + self.steps_offset
        else:  # trailing: np.arange(N, 0, -N / n) holds the same floats, but may hold one more of them
            k = np.round(big_n - i * (big_n / n)) - 1
        k = np.ascontiguousarray(k).astype(np.int64)
        if k.max() > big_n - 1 or k.min() < 0 or (n > 1 and not (np.diff(k) < 0).all()):
            raise ValueError(f"TimestepGrid: spacing={self.spacing!r}, steps_offset={self.steps_offset} gives the "
                             f"timesteps {k.tolist()[:3]}... for n={n}: expected distinct ones in 0..{big_n - 1}")
        return k

    def times(self, process: Process, steps: int) -> Tensor:
        _check_steps(steps)
        discrete = process.discrete_times()
        if discrete is None and self.num_train_steps is None:
            return (self.continuous if self.continuous is not None else LogSNRGrid()).times(process, steps)
        if discrete is not None and self.num_train_steps not in (None, len(discrete)):
            raise ValueError(f"TimestepGrid num_train_steps={self.num_train_steps} but the process has "
                             f"{len(discrete)} discrete times: expected {len(discrete)} or None")
        big_n = len(discrete) if discrete is not None else self.num_train_steps
        k = torch.from_numpy(self.timesteps(big_n, steps + 1))  # (steps + 1,) int64
        if discrete is not None:
            return discrete.to(torch.float64)[k]
        t = process.t_min + k.to(torch.float64) * ((process.t_max - process.t_min) / (big_n - 1))
        t[k == big_n - 1], t[k == 0] = process.t_max, process.t_min  # exact ends
        return t
