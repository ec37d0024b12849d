"""Forward processes x_t = alpha(t) x_0 + sigma(t) eps, one object each, in the
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

__all__ = [
    "Process",
    "OrnsteinUhlenbeck",
    "VPLinear",
    "VPCosine",
    "DDPMDiscrete",
    "SubVP",
    "VE",
    "EDM",
    "RectifiedFlow",
    "Trigonometric",
    "append_dims",
    "AttributeRepr",
    "check_positive",
    "check_nonnegative",
]


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


class AttributeRepr:
    """`__repr__` as the constructor call `Name(attr=value, ...)` from the instance's attributes.

    For the small configuration objects (samplers, time grids, proposals, weightings) whose
    attributes are exactly their constructor arguments, so the repr reads as the call that built them.
    """

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class Process:
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
    """Discrete DDPM (Ho et al. 2020): N linear betas, step i in 1..N placed at t_i = i / N.

    alpha_bar(t_i) = prod_{j<=i} (1 - beta_j) exactly at the grid; between grid points
    log alpha_bar is linear in t, so every continuous-time sampler runs on this process and
    a uniform grid with N steps from t_max = 1 to t_min = 1/N visits exactly DDPM's steps.
    The network sees the integer step index i - 1 in 0..N-1 as its noise label, as in DDPM.
    """

    def __init__(self, num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> None:
        if num_steps < 2:
            raise ValueError(f"num_steps must be >= 2, got {num_steps}")
        super().__init__(1.0 / num_steps, 1.0)
        self.num_steps = num_steps
        betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
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
