"""Variance-preserving processes (alpha^2 + sigma^2 = 1) and sub-VP (Song et al. 2021, Sec. 3.4)."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from diffusion_pl.processes.base import Process, _autograd_derivative


class _VariancePreserving(Process):
    """alpha = exp(-B(t)/2), sigma^2 = 1 - alpha^2, with B(t) = int_0^t beta(s) ds."""

    def _integral_beta(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def _beta(self, t: Tensor) -> Tensor:
        return _autograd_derivative(self._integral_beta, t)

    def _alpha(self, t: Tensor) -> Tensor:
        return torch.exp(-0.5 * self._integral_beta(t))

    def _sigma(self, t: Tensor) -> Tensor:
        # -expm1(-B) = 1 - alpha^2 without cancellation at small t
        return torch.sqrt(-torch.expm1(-self._integral_beta(t)))

    def _d_alpha(self, t: Tensor) -> Tensor:
        return -0.5 * self._beta(t) * self._alpha(t)

    def _d_sigma(self, t: Tensor) -> Tensor:
        return 0.5 * self._beta(t) * self._alpha(t) ** 2 / self._sigma(t)

    def _log_snr(self, t: Tensor) -> Tensor:
        # log(alpha^2/sigma^2) = -B - log(1 - e^{-B}) = -log(e^B - 1)
        return -torch.log(torch.expm1(self._integral_beta(t)))


class OrnsteinUhlenbeck(_VariancePreserving):
    """Pure Ornstein-Uhlenbeck dx = -x dt + sqrt(2) dW: alpha = e^{-t}, sigma^2 = 1 - e^{-2t}."""

    def __init__(self, t_min: float = 1e-3, t_max: float = 5.0) -> None:
        super().__init__(t_min, t_max)

    def _integral_beta(self, t: Tensor) -> Tensor:
        return 2.0 * t

    def _beta(self, t: Tensor) -> Tensor:
        return torch.full_like(t, 2.0)

    def noise_label(self, t: Tensor) -> Tensor:
        return 1000.0 * t / self.t_max


class VPLinear(_VariancePreserving):
    """VP SDE with linear beta(t) = beta_min + t (beta_max - beta_min) (Song et al. 2021, eq. 11)."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3,
                 t_max: float = 1.0) -> None:
        super().__init__(t_min, t_max)
        if not 0 < beta_min <= beta_max:
            raise ValueError(f"expected 0 < beta_min <= beta_max, got {beta_min}, {beta_max}")
        self.beta_min, self.beta_max = beta_min, beta_max

    def _integral_beta(self, t: Tensor) -> Tensor:
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2

    def _beta(self, t: Tensor) -> Tensor:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def _t_from_log_snr(self, log_snr: Tensor) -> Tensor:
        # B(t) = log(1 + e^{-log_snr}); solve the quadratic 0.5 db t^2 + beta_min t - B = 0
        b = torch.nn.functional.softplus(-log_snr)
        db = self.beta_max - self.beta_min
        return 2.0 * b / (self.beta_min + torch.sqrt(self.beta_min**2 + 2.0 * db * b))


class VPCosine(_VariancePreserving):
    """VP with the cosine schedule alpha^2 = cos^2((t+s)/(1+s) pi/2) / cos^2(s/(1+s) pi/2) (Nichol & Dhariwal 2021, eq. 17).

    t_max < 1 because alpha(1) = 0; the default keeps beta below Nichol & Dhariwal's 0.999 clip
    at the end of a 1000-step grid.
    """

    def __init__(self, s: float = 0.008, t_min: float = 1e-3, t_max: float = 0.9946) -> None:
        super().__init__(t_min, t_max)
        self.s = s

    def _phase(self, t: Tensor) -> Tensor:
        return (t + self.s) / (1.0 + self.s) * (math.pi / 2)

    def _integral_beta(self, t: Tensor) -> Tensor:
        c0 = math.cos(self.s / (1.0 + self.s) * math.pi / 2)
        return -2.0 * (torch.log(torch.cos(self._phase(t))) - math.log(c0))

    def _beta(self, t: Tensor) -> Tensor:
        return torch.tan(self._phase(t)) * math.pi / (1.0 + self.s)

    def _t_from_log_snr(self, log_snr: Tensor) -> Tensor:
        c0 = math.cos(self.s / (1.0 + self.s) * math.pi / 2)
        b = torch.nn.functional.softplus(-log_snr)  # B(t)
        phase = torch.acos((c0 * torch.exp(-0.5 * b)).clamp(-1.0, 1.0))
        return phase * (1.0 + self.s) / (math.pi / 2) - self.s


class DDPMDiscrete(_VariancePreserving):
    """Discrete DDPM (Ho et al. 2020): N betas, step i in 1..N placed at t_i = i / N.

    alpha_bar(t_i) = prod_{j<=i} (1 - beta_j) exactly at the grid; between grid points
    log alpha_bar is linear in t, so every continuous-time sampler runs on this process and
    a uniform grid with N steps from t_max = 1 to t_min = 1/N visits exactly DDPM's steps.
    The network sees the integer step index i - 1 in 0..N-1 as its noise label, as in DDPM.

    beta_schedule names diffusers' schedules (schedulers/scheduling_ddpm.py, `__init__`): "linear"
    (DDPM: beta_start..beta_end evenly), "scaled_linear" (latent diffusion: sqrt(beta) evenly),
    "squaredcos_cap_v2" (Nichol & Dhariwal 2021's cosine, eq. 17, beta capped at 0.999; beta_start
    and beta_end unused). The betas are computed in float64 (diffusers: float32).
    """

    def __init__(self, num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                 beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear") -> None:
        if num_steps < 2:
            raise ValueError(f"num_steps must be >= 2, got {num_steps}")
        super().__init__(1.0 / num_steps, 1.0)
        self.num_steps = num_steps
        self.beta_start, self.beta_end, self.beta_schedule = beta_start, beta_end, beta_schedule
        if beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
        elif beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float64) ** 2
        elif beta_schedule == "squaredcos_cap_v2":
            steps = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
            alpha_bar = torch.cos(VPCosine()._phase(steps)) ** 2  # diffusers' betas_for_alpha_bar, s = 0.008
            betas = (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
        else:
            raise ValueError(f"beta_schedule must be 'linear', 'scaled_linear' or 'squaredcos_cap_v2', "
                             f"got {beta_schedule!r}")
        # cumulative B at t = 0, 1/N, ..., 1: B_i = -sum_{j<=i} log(1 - beta_j)
        self._b_grid = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(-torch.log1p(-betas), 0)])

    def _integral_beta(self, t: Tensor) -> Tensor:
        pos = (t * self.num_steps).clamp(0.0, float(self.num_steps))
        i = pos.floor().clamp(max=self.num_steps - 1).long()
        w = pos - i
        b = self._b_grid.to(t.device)
        return b[i] * (1 - w) + b[i + 1] * w

    def _beta(self, t: Tensor) -> Tensor:
        # piecewise-constant derivative of the interpolated B(t), taken on the right segment
        pos = (t * self.num_steps).clamp(0.0, float(self.num_steps))
        i = pos.floor().clamp(max=self.num_steps - 1).long()
        b = self._b_grid.to(t.device)
        return (b[i + 1] - b[i]) * self.num_steps

    def _t_from_log_snr(self, log_snr: Tensor) -> Tensor:
        target = torch.nn.functional.softplus(-log_snr)  # B(t), increasing in t
        b = self._b_grid.to(log_snr.device)
        i = torch.searchsorted(b, target.contiguous()).clamp(1, self.num_steps)
        w = (target - b[i - 1]) / (b[i] - b[i - 1])
        return ((i - 1) + w) / self.num_steps

    def noise_label(self, t: Tensor) -> Tensor:
        return t * self.num_steps - 1.0

    def discrete_times(self) -> Tensor:
        return torch.arange(1, self.num_steps + 1, dtype=torch.float64) / self.num_steps


class SubVP(Process):
    """Sub-VP SDE (Song et al. 2021, eq. 12): alpha as VP-linear, sigma = 1 - alpha^2."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3,
                 t_max: float = 1.0) -> None:
        super().__init__(t_min, t_max)
        self._vp = VPLinear(beta_min, beta_max, t_min, t_max)
        self.beta_min, self.beta_max = beta_min, beta_max

    def _alpha(self, t: Tensor) -> Tensor:
        return self._vp._alpha(t)

    def _sigma(self, t: Tensor) -> Tensor:
        return -torch.expm1(-self._vp._integral_beta(t))

    def _d_alpha(self, t: Tensor) -> Tensor:
        return self._vp._d_alpha(t)

    def _d_sigma(self, t: Tensor) -> Tensor:
        return self._vp._beta(t) * torch.exp(-self._vp._integral_beta(t))

    def _t_from_log_snr(self, log_snr: Tensor) -> Tensor:
        # r = e^{log_snr/2} = alpha / (1 - alpha^2) solves r a^2 + a - r = 0: a = 2r / (1 + sqrt(1 + 4 r^2))
        # written with 1/r and a clamped log-SNR so that +-inf map to the ends instead of nan
        inv_r = torch.exp(-0.5 * log_snr.clamp(-80.0, 80.0))
        alpha = 2.0 / (inv_r + torch.sqrt(inv_r**2 + 4.0))
        b = -2.0 * torch.log(alpha)  # B(t), then VP-linear's quadratic
        db = self.beta_max - self.beta_min
        return 2.0 * b / (self.beta_min + torch.sqrt(self.beta_min**2 + 2.0 * db * b))
