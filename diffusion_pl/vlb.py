"""The per-step terms of the discrete variational bound, for learning the reverse variance.

Ho et al. 2020, eq. 5: -log p(x0) <= L_prior + sum_{t>1} KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) - log p(x0 | x_1).
For a step t -> s of any process (alpha, sigma), with a = alpha_t / alpha_s,

    b2 = sigma_t^2 - a^2 sigma_s^2  (the step's beta),     c2 = b2 sigma_s^2 / sigma_t^2  (beta-tilde),
    q(x_s | x_t, x0) = N(A x0 + B x_t, c2 I),  A = alpha_s b2 / sigma_t^2,  B = a sigma_s^2 / sigma_t^2,

and the model's reverse step is p(x_s | x_t) = N(A x0_hat + B x_t, exp(v log b2 + (1 - v) log c2) I)
(Nichol & Dhariwal 2021, eq. 15). `vlb_terms` returns KL(q || p) for a step of a discretisation of
[t_min, t_max] into N times, and at the first time the decoder NLL -log p(x0 | x_{t_min}) of 8-bit data, in
bits per dimension as guided-diffusion's `_vb_terms_bpd` (gaussian_diffusion.py:709-742).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffusion_pl.processes.base import Process, append_dims
from diffusion_pl.sampling.base import step_variance_terms

__all__ = ["normal_kl", "discretized_gaussian_log_likelihood", "vlb_terms"]

_MIN_VARIANCE = 1e-20  # keeps log b2, log c2 finite (diffusers clamps beta-tilde at 1e-20 as well)


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _log_diff_ndtr(upper: Tensor, lower: Tensor) -> Tensor:
    """log(Phi(upper) - Phi(lower)) for upper > lower, accurate in both tails (the right tail by symmetry)."""
    right = lower > 0  # both in the right tail: Phi(u) - Phi(l) = Phi(-l) - Phi(-u)
    hi = torch.where(right, -lower, upper)
    lo = torch.where(right, -upper, lower)
    log_hi = torch.special.log_ndtr(hi)
    return log_hi + torch.log((-torch.expm1(torch.special.log_ndtr(lo) - log_hi)).clamp_min(1e-12))


def discretized_gaussian_log_likelihood(x0: Tensor, mean: Tensor, log_scale: Tensor, levels: int = 256) -> Tensor:
    """log P(x0) per element (nats) of data quantized to `levels` values in [-1, 1] under N(mean, e^(2 log_scale)).

    The Gaussian mass of x0's bin [x0 - 1/(levels - 1), x0 + 1/(levels - 1)]; the end bins take the tails
    (Ho et al. 2020, Sec. 3.3, eq. 13; guided-diffusion losses.py:50-77, which uses a tanh approximation of
    the normal CDF where this uses the exact one).
    """
    half_bin = 1.0 / (levels - 1)
    inv_std = torch.exp(-log_scale)
    upper = (x0 - mean + half_bin) * inv_std
    lower = (x0 - mean - half_bin) * inv_std
    return torch.where(x0 < -0.999, torch.special.log_ndtr(upper),
                       torch.where(x0 > 0.999, torch.special.log_ndtr(-lower), _log_diff_ndtr(upper, lower)))


def _step(process: Process, t: Tensor, s: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(b2, c2, A, B) of the steps t -> s (float64, (B,) each); see the module docstring."""
    alpha_t, sigma_t, alpha_s, sigma_s = process.alpha(t), process.sigma(t), process.alpha(s), process.sigma(s)
    b2, c2 = step_variance_terms(alpha_t, sigma_t, alpha_s, sigma_s)  # the samplers' own (b2, c2)
    return b2, c2, alpha_s * b2 / sigma_t**2, (alpha_t / alpha_s) * sigma_s**2 / sigma_t**2


def vlb_terms(x0: Tensor, x_t: Tensor, t: Tensor, x0_hat: Tensor, variance_interp: Tensor, process: Process,
              num_steps: int) -> Tensor:
    """The variational-bound term of each sample (B,), in bits per dimension.

    The N = num_steps times t_min, t_min + h, ..., t_max (h = (t_max - t_min) / (N - 1)) discretise the
    process; on DDPMDiscrete(N) they are its own times i / N. A sample at t >= t_min + h/2 gives
    KL(q(x_s | x_t, x0) || p(x_s | x_t)) with s = max(t - h, t_min); one at t < t_min + h/2 (the first time)
    gives the decoder NLL -log p(x0 | x_t) with mean x0_hat and log-variance v log sigma_t^2 + (1 - v) log c2',
    c2' the beta-tilde of the step t + h -> t (guided-diffusion's clipped log-variance at timestep 0,
    gaussian_diffusion.py:159-161). x0 must then be 8-bit data scaled to [-1, 1].
    x0_hat is used as given: pass it detached for the hybrid loss's stop-gradient on the mean.
    """
    h = (process.t_max - process.t_min) / (num_steps - 1)
    t64 = t.detach().to(torch.float64)
    decoder = t64 < process.t_min + 0.5 * h  # (B,)
    s = (t64 - h).clamp_min(process.t_min)
    b2, c2, coef_x0, coef_xt = _step(process, t64, s)
    # the decoder's range: beta = sigma_t^2 (the step to x0, alpha = 1, sigma = 0) down to the next step's beta-tilde
    _, c2_next, _, _ = _step(process, (t64 + h).clamp_max(process.t_max), t64)
    log_max = torch.where(decoder, 2.0 * torch.log(process.sigma(t64)), torch.log(b2.clamp_min(_MIN_VARIANCE)))
    log_min = torch.where(decoder, torch.log(c2_next.clamp_min(_MIN_VARIANCE)), torch.log(c2.clamp_min(_MIN_VARIANCE)))
    dtype = torch.promote_types(variance_interp.dtype, torch.float32)
    log_max, log_min, log_c2, coef_x0, coef_xt = (append_dims(c.to(dtype), x_t.ndim) for c in
                                                  (log_max, log_min, torch.log(c2.clamp_min(_MIN_VARIANCE)),
                                                   coef_x0, coef_xt))
    v = variance_interp.to(dtype)
    x0, x_t, x0_hat = x0.to(dtype), x_t.to(dtype), x0_hat.to(dtype)
    log_var = v * log_max + (1.0 - v) * log_min  # (B, C, ...)
    mean_q = coef_x0 * x0 + coef_xt * x_t
    mean_p = coef_x0 * x0_hat + coef_xt * x_t
    kl = normal_kl(mean_q, log_c2.expand_as(log_var), mean_p, log_var).flatten(1).mean(1)  # (B,)
    nll = -discretized_gaussian_log_likelihood(x0, x0_hat, 0.5 * log_var).flatten(1).mean(1)  # (B,)
    return torch.where(decoder.to(kl.device), nll, kl) / math.log(2.0)
