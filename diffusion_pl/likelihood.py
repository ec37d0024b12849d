"""Exact likelihood through the probability-flow ODE (Song et al. 2021, Appendix D.2).

Along the probability-flow ODE dx/dt = v(x, t) every marginal p_t is transported, and the
instantaneous change of variables (Chen et al. 2018, Thm. 1) gives d log p_t(x(t))/dt = -div v, so

    log p_{t_min}(x) = log p_{t_max}(x(t_max)) + int_{t_min}^{t_max} div v(x(t), t) dt.

In (alpha, sigma) form the ODE velocity f x - g2/2 * score is v = alpha' x0_hat + sigma' eps_hat
(substitute x = alpha x0_hat + sigma eps_hat), which never divides by alpha, so it is finite at
alpha = 0 (rectified flow at t = 1) for parameterizations whose coefficients are.
The divergence is exact (one backward pass per dimension) or the Hutchinson-Skilling estimate
E_z[z^T (dv/dx) z] (Hutchinson 1989; Skilling 1989; Grathwohl et al. 2019) with probes held
fixed along one solve, so the integrand stays a smooth function of t for the adaptive solver.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import Tensor

from diffusion_pl.prediction import Denoiser, Model, Prediction
from diffusion_pl.processes.base import Process
from diffusion_pl.sampling.ode import solve_ode

__all__ = ["NLLResult", "BPDResult", "jacobian_trace", "ode_nll", "bits_per_dim",
           "dequantize_uint8"]


@dataclass
class NLLResult:
    """-log p_{t_min}(x) in nats (B,), the number of network evaluations, and the latent x(t_max)."""

    nll: Tensor
    nfe: int
    x_T: Tensor


@dataclass
class BPDResult:
    """Bits per dimension (B,) of 8-bit data, the underlying continuous NLL (nats, B) and the NFE."""

    bpd: Tensor
    nll: Tensor
    nfe: int


def jacobian_trace(fn: Callable[[Tensor], Tensor], x: Tensor, probes: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(fn(x), tr d fn / dx) per sample: exact if probes is None, else the Hutchinson mean over probes (P, *x.shape).

    fn must act on each sample independently (no batch coupling), as a network in eval mode does.
    """
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        v = fn(x)
        if probes is None:
            flat = v.flatten(1)  # (B, D)
            trace = torch.zeros(x.shape[0], dtype=v.dtype, device=v.device)
            for i in range(flat.shape[1]):
                (grad,) = torch.autograd.grad(flat[:, i].sum(), x, retain_graph=True)
                trace = trace + grad.flatten(1)[:, i]
        else:
            trace = torch.zeros(x.shape[0], dtype=v.dtype, device=v.device)
            for z in probes:
                (vjp,) = torch.autograd.grad((v * z).sum(), x, retain_graph=True)  # z^T dv/dx
                trace = trace + (vjp * z).flatten(1).sum(1)
            trace = trace / len(probes)
    return v.detach(), trace.detach()


def _probes(kind: str, num_probes: int, x: Tensor, generator: torch.Generator | None) -> Tensor | None:
    if kind == "exact":
        return None
    if num_probes < 1:
        raise ValueError(f"num_probes must be >= 1, got {num_probes}")
    shape = (num_probes, *x.shape)
    device = generator.device if generator is not None else x.device
    if kind == "rademacher":
        z = torch.randint(0, 2, shape, generator=generator, device=device).to(x.dtype) * 2 - 1
    elif kind == "gaussian":
        z = torch.randn(shape, generator=generator, device=device, dtype=x.dtype)
    else:
        raise ValueError(f"divergence must be 'exact', 'rademacher' or 'gaussian', got {kind!r}")
    return z.to(x.device)


def ode_nll(model: Model, process: Process, prediction: Prediction, x: Tensor, *,
            divergence: Literal["exact", "rademacher", "gaussian"] = "rademacher", num_probes: int = 1,
            rtol: float = 1e-5, atol: float = 1e-5, t_min: float | None = None, t_max: float | None = None,
            class_labels: Tensor | None = None, generator: torch.Generator | None = None,
            prior_log_prob: Callable[[Tensor], Tensor] | None = None,
            solver: Literal["torchdiffeq", "scipy"] = "torchdiffeq",
            time_variable: Literal["auto", "t", "log_snr"] = "auto", progress: bool = False) -> NLLResult:
    """-log p_{t_min}(x) by integrating (x, int div v dt) from t_min to t_max (Song et al. 2021, Appendix D.2).

    The ODE runs in x's dtype with dopri5 (torchdiffeq; scipy's RK45 if asked or torchdiffeq is
    missing). `prior_log_prob(x_T)` defaults to the process prior N(0, prior_std^2 I); the exact
    p_{t_max} differs from it by KL(p_{t_max} | prior) on average. `time_variable="auto"` integrates
    in log-SNR when it is finite at both ends, else in t (see `_time_change`).
    """
    t0 = process.t_min if t_min is None else float(t_min)
    t1 = process.t_max if t_max is None else float(t_max)
    prior_log_prob = process.prior_log_prob if prior_log_prob is None else prior_log_prob
    denoiser = Denoiser(model, process, prediction)
    probes = _probes(divergence, num_probes, x, generator)
    s0, s1, to_t, dt_ds = _time_change(process, t0, t1, time_variable)
    bar = _progress(progress)

    def rhs(s: Tensor | float, x_t: Tensor) -> tuple[Tensor, Tensor]:
        # the solver's first-step probe may look past the end, where e.g. VPCosine's alpha is undefined
        s = torch.as_tensor(s, dtype=torch.float64).clamp(min(s0, s1), max(s0, s1)).reshape(1)
        t = to_t(s)
        t_b = t.to(dtype=x.dtype, device=x.device).expand(x.shape[0])
        if bar is not None:
            bar.set_postfix(t=float(t), refresh=False)
            bar.update()
        v, div = jacobian_trace(lambda y: denoiser.velocity(y, t_b, class_labels), x_t, probes)
        scale = dt_ds(t).to(dtype=x.dtype, device=x.device)  # (1,): dx/ds = v dt/ds
        return v * scale, div * scale

    with torch.no_grad():
        state = (x, torch.zeros(x.shape[0], dtype=x.dtype, device=x.device))  # (x, int div v dt)
        x_T, delta = solve_ode(lambda s, y: rhs(s, y[0]), state, s0, s1, rtol, atol, time_dtype=x.dtype,
                               use_torchdiffeq=solver == "torchdiffeq")
        log_p = prior_log_prob(x_T).to(delta.dtype) + delta
    if bar is not None:
        bar.close()
    return NLLResult(nll=-log_p, nfe=denoiser.nfe, x_T=x_T)


def _time_change(process: Process, t0: float, t1: float, time_variable: str):
    """(s0, s1, t(s), dt/ds(t)) for integrating in s = t or s = log-SNR.

    In log-SNR the path (alpha, sigma) of every process here is smooth, including DDPM's, whose
    piecewise-linear log alpha(t) has 1000 kinks in t that stall an adaptive solver; log-SNR also
    spreads EDM's decades of sigma evenly. It is infinite where alpha = 0 (rectified flow at t = 1),
    so "auto" falls back to t there (and for ends outside the process's own [t_min, t_max]).
    """
    if time_variable not in ("auto", "t", "log_snr"):
        raise ValueError(f"time_variable must be 'auto', 't' or 'log_snr', got {time_variable!r}")
    ends = process.log_snr(torch.tensor([t0, t1], dtype=torch.float64))
    inside = process.t_min <= min(t0, t1) and max(t0, t1) <= process.t_max  # t_from_log_snr clamps to the range
    if time_variable == "log_snr" and not (inside and torch.isfinite(ends).all()):
        raise ValueError(f"time_variable='log_snr' needs a finite log-SNR on [{t0}, {t1}] inside the process's "
                         f"[{process.t_min}, {process.t_max}]; use 't'")
    if time_variable == "t" or not (inside and torch.isfinite(ends).all()):
        return t0, t1, (lambda s: s), (lambda t: torch.ones_like(t))

    def dt_ds(t: Tensor) -> Tensor:  # 1 / (d log-SNR / dt), d log-SNR/dt = 2 (alpha'/alpha - sigma'/sigma)
        return 0.5 / (process.d_alpha(t) / process.alpha(t) - process.d_sigma(t) / process.sigma(t))

    return float(ends[0]), float(ends[1]), process.t_from_log_snr, dt_ds


def _progress(enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(desc="ode_nll (NFE)", unit="eval")


def dequantize_uint8(images_uint8: Tensor, uniform: bool = True, generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float32) -> Tensor:
    """8-bit k to x = 2 (k + u) / 256 - 1 in [-1, 1], u ~ U[0, 1) (Theis et al. 2016; Song et al. 2021).

    With uniform=False, u = 1/2 (bin centres).
    """
    k = images_uint8.to(torch.float64)
    if uniform:
        device = generator.device if generator is not None else k.device
        u = torch.rand(k.shape, generator=generator, device=device, dtype=torch.float64).to(k.device)
    else:
        u = torch.full_like(k, 0.5)  # bin centres: the midpoint rule for P(k) = int_bin p
    return (2.0 * (k + u) / 256.0 - 1.0).to(dtype)


def bits_per_dim(model: Model, process: Process, prediction: Prediction, images_uint8: Tensor, *,
                 dequantize: bool = True, generator: torch.Generator | None = None,
                 divergence: Literal["exact", "rademacher", "gaussian"] = "rademacher", num_probes: int = 1,
                 rtol: float = 1e-5, atol: float = 1e-5, t_min: float | None = None, t_max: float | None = None,
                 class_labels: Tensor | None = None, prior_log_prob: Callable[[Tensor], Tensor] | None = None,
                 solver: Literal["torchdiffeq", "scipy"] = "torchdiffeq", dtype: torch.dtype = torch.float32,
                 progress: bool = False) -> BPDResult:
    """Bits/dim of 8-bit data with uniform dequantization (Song et al. 2021, Table 2 convention).

    The model's density is on x = 2 y / 256 - 1 with y = k + u in [0, 256)^D. In the units of y,
    p_y(y) = p_x(x) |dx/dy|^D = p_x(x) / 128^D, so -log2 p_y = -log2 p_x + 7 D and
    bpd = nll_x / (D ln 2) + 7 (score_sde_pytorch's offset 7 - inverse_scaler(-1) for centred data).
    By Jensen, E_u[bpd] bounds the discrete -log2 P(k) / D from above (Theis et al. 2016).
    """
    x = dequantize_uint8(images_uint8, uniform=dequantize, generator=generator, dtype=dtype)
    result = ode_nll(model, process, prediction, x, divergence=divergence, num_probes=num_probes, rtol=rtol,
                     atol=atol, t_min=t_min, t_max=t_max, class_labels=class_labels, generator=generator,
                     prior_log_prob=prior_log_prob, solver=solver, progress=progress)
    d = x[0].numel()
    bpd = result.nll / (d * math.log(2.0)) + 7.0
    return BPDResult(bpd=bpd, nll=result.nll, nfe=result.nfe)
