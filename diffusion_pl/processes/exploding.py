"""Variance-exploding processes (alpha = 1): VE (Song et al. 2021) and EDM's sigma(t) = t (Karras et al. 2022)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffusion_pl.processes.base import Process


class VE(Process):
    """Variance exploding SDE: alpha = 1, sigma = sigma_min (sigma_max/sigma_min)^t (Song et al. 2021, eq. 9)."""

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, t_min: float = 0.0,
                 t_max: float = 1.0) -> None:
        super().__init__(t_min, t_max)
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"expected 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self._log_ratio = math.log(sigma_max / sigma_min)

    def _alpha(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def _sigma(self, t: Tensor) -> Tensor:
        return self.sigma_min * torch.exp(t * self._log_ratio)

    def _d_alpha(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t)

    def _d_sigma(self, t: Tensor) -> Tensor:
        return self._sigma(t) * self._log_ratio

    def _t_from_log_snr(self, log_snr: Tensor) -> Tensor:
        return (-0.5 * log_snr - math.log(self.sigma_min)) / self._log_ratio


class EDM(Process):
    """EDM's process (Karras et al. 2022): alpha = 1, sigma(t) = t, t in [sigma_min, sigma_max]."""

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0) -> None:
        super().__init__(sigma_min, sigma_max)

    def _alpha(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def _sigma(self, t: Tensor) -> Tensor:
        return t

    def _d_alpha(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t)

    def _d_sigma(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def _t_from_log_snr(self, log_snr: Tensor) -> Tensor:
        return torch.exp(-0.5 * log_snr)

    def noise_label(self, t: Tensor) -> Tensor:
        """EDM's c_noise = log(sigma) / 4 (Karras et al. 2022, Table 1)."""
        return 0.25 * torch.log(t)
