"""Interpolants between data and noise: rectified flow (Liu et al. 2022) and the trigonometric path."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffusion_pl.processes.base import Process


class RectifiedFlow(Process):
    """Linear interpolant alpha = 1 - t, sigma = t (Liu et al. 2022; Lipman et al. 2022).

    t_max = 1 makes alpha vanish: use a parameterization that does not divide by alpha there
    (velocity, x0 or v), or set t_max slightly below 1.
    """

    def __init__(self, t_min: float = 1e-3, t_max: float = 1.0) -> None:
        super().__init__(t_min, t_max)

    def _alpha(self, t: Tensor) -> Tensor:
        return 1.0 - t

    def _sigma(self, t: Tensor) -> Tensor:
        return t

    def _d_alpha(self, t: Tensor) -> Tensor:
        return -torch.ones_like(t)

    def _d_sigma(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def _t_from_log_snr(self, log_snr: Tensor) -> Tensor:
        return torch.sigmoid(-0.5 * log_snr)


class Trigonometric(Process):
    """Trigonometric interpolant alpha = cos(pi t / 2), sigma = sin(pi t / 2) (Albergo & Vanden-Eijnden 2023)."""

    def __init__(self, t_min: float = 1e-3, t_max: float = 1.0) -> None:
        super().__init__(t_min, t_max)

    def _alpha(self, t: Tensor) -> Tensor:
        # cos(pi t / 2) written as sin(pi (1 - t) / 2): exactly 0 at t = 1 (cos gives 6e-17), so
        # f, g2 and the noise level are exactly infinite there, as they are for RectifiedFlow
        return torch.sin(0.5 * math.pi * (1.0 - t))

    def _sigma(self, t: Tensor) -> Tensor:
        return torch.sin(0.5 * math.pi * t)

    def _d_alpha(self, t: Tensor) -> Tensor:
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)

    def _d_sigma(self, t: Tensor) -> Tensor:
        return 0.5 * math.pi * torch.sin(0.5 * math.pi * (1.0 - t))

    def _t_from_log_snr(self, log_snr: Tensor) -> Tensor:
        return torch.atan(torch.exp(-0.5 * log_snr)) * (2.0 / math.pi)
