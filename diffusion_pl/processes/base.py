"""The Process interface: forward processes x_t = alpha(t) x_0 + sigma(t) eps, in the
(alpha, sigma) notation of Kingma et al. 2021 (Variational Diffusion Models).

A process is fully given by (alpha(t), sigma(t)) on [t_min, t_max]. Everything a loss or a
sampler needs (drift f, squared diffusion g2, log-SNR and its inverse, the prior) follows
from that pair, so a new process is one small subclass that implements `alpha` and `sigma`
(and, where cheap, their closed-form derivatives and inverse maps).

Time arithmetic runs in float64 and is cast back to the input dtype: the log-SNR of a VE
process spans ~[-8, 9] and the DDPM grid needs exact index arithmetic, both of which lose
digits in float32 (its 24-bit mantissa holds ~7 significant digits).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffusion_pl.utils.recorded import RecordsInit, attributes

__all__ = ["Process", "append_dims", "AttributeRepr", "check_positive", "check_nonnegative"]


def append_dims(v: Tensor, ndim: int) -> Tensor:
    """Reshape a per-sample vector (B,) to (B, 1, ..., 1) with `ndim` dimensions in all."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def check_positive(name: str, value: float) -> None:
    """Raise ValueError('<name> must be positive, got <value>') if value <= 0."""
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")


def check_nonnegative(name: str, value: float) -> None:
    """Raise ValueError('<name> must be >= 0, got <value>') if value < 0."""
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


class AttributeRepr(RecordsInit):
    """`__repr__` as the constructor call `Name(attr=value, ...)` from the instance's attributes.

    For the small configuration objects (samplers, time grids, proposals, weightings) whose
    attributes are exactly their constructor arguments, so the repr reads as the call that built them.
    They record that call (`RecordsInit`), so a module built in Python saves them in its config.
    """

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in attributes(self).items())
        return f"{type(self).__name__}({args})"


class Process(RecordsInit):
    """A forward process with Gaussian marginals N(alpha(t) x_0, sigma(t)^2 I).

    Subclasses implement `_alpha(t)` and `_sigma(t)` on float64 tensors; closed-form
    derivatives (`_d_alpha`, `_d_sigma`) and inverses (`_t_from_log_snr`) are optional, with
    autograd and bisection as generic defaults.
    """

    t_min: float
    t_max: float

    def __init__(self, t_min: float, t_max: float) -> None:
        if not t_min < t_max:
            raise ValueError(f"t_min must be smaller than t_max, got t_min={t_min}, t_max={t_max}")
        self.t_min = float(t_min)
        self.t_max = float(t_max)

    # -- what a subclass provides (float64 in, float64 out) -----------------------------------
    def _alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def _sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def _d_alpha(self, t: Tensor) -> Tensor:
        return _autograd_derivative(self._alpha, t)

    def _d_sigma(self, t: Tensor) -> Tensor:
        return _autograd_derivative(self._sigma, t)

    def _t_from_log_snr(self, log_snr: Tensor) -> Tensor:
        # log-SNR is strictly decreasing in t for every process here, so bisection is exact
        # to float64 precision after 64 halvings of [t_min, t_max].
        lo = torch.full_like(log_snr, self.t_min)
        hi = torch.full_like(log_snr, self.t_max)
        for _ in range(64):
            mid = 0.5 * (lo + hi)
            above = self._log_snr(mid) > log_snr  # still too little noise: move right
            lo = torch.where(above, mid, lo)
            hi = torch.where(above, hi, mid)
        return 0.5 * (lo + hi)

    def _log_snr(self, t: Tensor) -> Tensor:
        return 2.0 * (torch.log(self._alpha(t)) - torch.log(self._sigma(t)))

    # -- public interface: any float dtype in, same dtype out ---------------------------------
    def alpha(self, t: Tensor) -> Tensor:
        """Signal scale alpha(t)."""
        return _f64(self._alpha, t)

    def sigma(self, t: Tensor) -> Tensor:
        """Noise scale sigma(t)."""
        return _f64(self._sigma, t)

    def d_alpha(self, t: Tensor) -> Tensor:
        """Time derivative alpha'(t)."""
        return _f64(self._d_alpha, t)

    def d_sigma(self, t: Tensor) -> Tensor:
        """Time derivative sigma'(t)."""
        return _f64(self._d_sigma, t)

    def f(self, t: Tensor) -> Tensor:
        """Drift coefficient f(t) = alpha'/alpha of dx = f x dt + g dW (Song et al. 2021, eq. 5)."""
        return _f64(lambda s: self._d_alpha(s) / self._alpha(s), t)

    def g2(self, t: Tensor) -> Tensor:
        """Squared diffusion g(t)^2 = (sigma^2)' - 2 f sigma^2.

        The variance of dx = f x dt + g dW obeys (sigma^2)' = 2 f sigma^2 + g^2.
        """

        def g2(s: Tensor) -> Tensor:
            sigma = self._sigma(s)
            f = self._d_alpha(s) / self._alpha(s)
            return 2.0 * sigma * self._d_sigma(s) - 2.0 * f * sigma**2

        return _f64(g2, t)

    def log_snr(self, t: Tensor) -> Tensor:
        """log(alpha^2 / sigma^2), strictly decreasing in t."""
        return _f64(self._log_snr, t)

    def t_from_log_snr(self, log_snr: Tensor) -> Tensor:
        """Inverse of `log_snr`, clamped to [t_min, t_max]."""
        t = _f64(self._t_from_log_snr, log_snr)
        return t.clamp(self.t_min, self.t_max)

    def t_from_noise_level(self, noise_level: Tensor) -> Tensor:
        """Time at which sigma/alpha equals `noise_level` (EDM's sigma for alpha != 1)."""
        return self.t_from_log_snr(-2.0 * torch.log(noise_level.to(torch.float64))).to(noise_level.dtype)

    def noise_level(self, t: Tensor) -> Tensor:
        """sigma/alpha: the noise standard deviation of x_t / alpha (EDM's sigma)."""
        return _f64(lambda s: self._sigma(s) / self._alpha(s), t)

    def noise_label(self, t: Tensor) -> Tensor:
        """The per-sample scalar a network is conditioned on by default: 1000 t."""
        return 1000.0 * t

    def discrete_times(self) -> Tensor | None:
        """The finite set of times a discrete-time process is defined on, else None."""
        return None

    def prior_std(self) -> float:
        """Std of the prior N(0, s^2 I) at t_max, assuming unit-variance data: alpha^2 + sigma^2."""
        t = torch.tensor([self.t_max], dtype=torch.float64)
        return float(torch.sqrt(self._alpha(t) ** 2 + self._sigma(t) ** 2))

    def prior_sample(self, shape: tuple[int, ...], generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> Tensor:
        """Draw x_T from the prior."""
        return self.prior_std() * torch.randn(shape, generator=generator, device=device)

    def prior_log_prob(self, x: Tensor) -> Tensor:
        """Log-density of the prior, summed over all but the first dimension: (B,)."""
        s = self.prior_std()
        d = x[0].numel()
        return -0.5 * (x.flatten(1) ** 2).sum(1) / s**2 - d * (math.log(s) + 0.5 * math.log(2 * math.pi))

    def marginal(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x_t = alpha(t) x_0 + sigma(t) eps, t of shape (B,)."""
        a = append_dims(self.alpha(t).to(x0.dtype), x0.ndim)
        s = append_dims(self.sigma(t).to(x0.dtype), x0.ndim)
        return a * x0 + s * eps

    def __repr__(self) -> str:
        return f"{type(self).__name__}(t_min={self.t_min}, t_max={self.t_max})"


def _f64(fn, t: Tensor) -> Tensor:
    t = torch.as_tensor(t)
    dtype = t.dtype if t.is_floating_point() else torch.get_default_dtype()
    return fn(t.to(torch.float64)).to(dtype)


def _autograd_derivative(fn, t: Tensor) -> Tensor:
    with torch.enable_grad():
        s = t.detach().clone().requires_grad_(True)
        y = fn(s)
        if not y.requires_grad:  # constant in t (e.g. alpha = 1)
            return torch.zeros_like(t)
        (d,) = torch.autograd.grad(y.sum(), s, allow_unused=True, materialize_grads=True)
    return d.detach()
