"""Contracts of the forward processes, the parameterization wrapper and the analytic oracle.

Every test is parametrized over all `Process` and `Prediction` subclasses (found recursively,
names starting with "_" skipped), so a new class is covered without touching this file.
"""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_pl.oracle import GaussianMixture, output_for
from diffusion_pl.prediction import Denoiser, Prediction, average_velocity_of
from diffusion_pl.processes.variance_preserving import DDPMDiscrete
from diffusion_pl.processes.base import Process

from diffusion_pl.utils.classes import public_subclasses


PROCESSES = [cls() for cls in public_subclasses(Process)]
PREDICTIONS = [cls() for cls in public_subclasses(Prediction)]
F64 = torch.float64


def interior_times(process: Process, n: int = 25) -> torch.Tensor:
    """n times strictly inside (t_min, t_max), at irrational fractions so they avoid DDPM's grid."""
    u = torch.linspace(0.02, 0.98, n, dtype=F64) + 1e-3 / math.pi
    return process.t_min + (process.t_max - process.t_min) * u


def finite_at(process: Process, prediction: Prediction, t: torch.Tensor) -> torch.Tensor:
    """Mask of the times where all four wrapper coefficients are finite."""
    return torch.stack([torch.isfinite(c) for c in prediction.coefficients(t, process)]).all(0)


def test_every_class_is_collected():
    assert len(PROCESSES) >= 9 and len(PREDICTIONS) >= 6


# -- processes -----------------------------------------------------------------------------------
@pytest.mark.parametrize("process", PROCESSES, ids=repr)
def test_marginals_match_euler_maruyama(process):
    """Simulate dx = f x dt + g dW from the exact x_{t_min}; mean and variance must match the closed form
    alpha m0 and alpha^2 s0^2 + sigma^2.

    Tolerances: the deterministic Euler moment recursion (the simulation's own mean and variance)
    must be within 2% of the closed form (O(dt) bias with 1000 steps uniform in log-SNR); the particle
    moments must be within 5 standard errors
    (n*d = 20000 draws) of the recursion.
    """
    n, d, m0, s0, steps = 10000, 2, 0.7, 0.3, 1000
    g = torch.Generator().manual_seed(0)
    t_end = process.t_max
    end = torch.tensor([t_end], dtype=F64)
    if not (torch.isfinite(process.f(end)) & torch.isfinite(process.g2(end))).all():
        t_end = process.t_min + 0.95 * (process.t_max - process.t_min)  # f, g2 blow up where alpha = 0
    # a grid uniform in log-SNR keeps |f dt| <= |d log-SNR| / 2 small even where beta is large (VPCosine near t_max)
    ends = process.log_snr(torch.tensor([process.t_min, t_end], dtype=F64))
    ts = process.t_from_log_snr(torch.linspace(ends[0].item(), ends[1].item(), steps + 1, dtype=F64))
    f, g2, dt = process.f(ts), process.g2(ts), ts.diff()
    assert (g2[:-1] >= 0).all()

    x0 = m0 + s0 * torch.randn(n, d, generator=g, dtype=F64)
    x = process.marginal(x0, ts[:1].expand(n), torch.randn(n, d, generator=g, dtype=F64))
    a0, sg0 = process.alpha(ts[:1]).item(), process.sigma(ts[:1]).item()
    mean, var = a0 * m0, a0**2 * s0**2 + sg0**2  # Euler recursion of the moments
    for i in range(steps):
        x = x + f[i] * x * dt[i] + torch.sqrt(g2[i] * dt[i]) * torch.randn(n, d, generator=g, dtype=F64)
        mean, var = (1 + f[i] * dt[i]) * mean, (1 + f[i] * dt[i]) ** 2 * var + g2[i] * dt[i]

    alpha, sigma = process.alpha(ts[-1:]).item(), process.sigma(ts[-1:]).item()
    exact_mean, exact_var = alpha * m0, alpha**2 * s0**2 + sigma**2
    assert abs(mean - exact_mean) < 0.02 * math.sqrt(exact_var)
    assert abs(var / exact_var - 1) < 0.02
    assert abs(x.mean().item() - mean) < 5 * math.sqrt(var / (n * d))
    assert abs(x.var().item() / var - 1) < 5 * math.sqrt(2 / (n * d))


@pytest.mark.parametrize("process", PROCESSES, ids=repr)
def test_drift_and_diffusion_match_autograd(process):
    t = interior_times(process).requires_grad_(True)
    alpha, sigma = process.alpha(t), process.sigma(t)
    grad = lambda y: torch.autograd.grad(y.sum(), t, allow_unused=True, materialize_grads=True)[0] \
        if y.requires_grad else torch.zeros_like(t)  # alpha = 1 (VE, EDM) has no graph
    d_alpha, d_sigma2 = grad(alpha), grad(sigma**2)
    t, alpha, sigma = t.detach(), alpha.detach(), sigma.detach()
    f = d_alpha / alpha
    torch.testing.assert_close(process.d_alpha(t), d_alpha, rtol=1e-7, atol=1e-12)
    torch.testing.assert_close(2 * sigma * process.d_sigma(t), d_sigma2, rtol=1e-7, atol=1e-12)
    torch.testing.assert_close(process.f(t), f, rtol=1e-7, atol=1e-12)
    torch.testing.assert_close(process.g2(t), d_sigma2 - 2 * f * sigma**2, rtol=1e-7, atol=1e-12)
    assert (process.g2(t) > 0).all()


@pytest.mark.parametrize("process", PROCESSES, ids=repr)
def test_log_snr_decreasing_and_inverses(process):
    t = torch.linspace(process.t_min, process.t_max, 2001, dtype=F64)
    log_snr = process.log_snr(t)
    finite = torch.isfinite(log_snr)
    assert finite[:-1].all()  # only alpha(t_max) = 0 may give -inf
    assert (log_snr[finite].diff() < 0).all()
    span = process.t_max - process.t_min
    torch.testing.assert_close(process.t_from_log_snr(log_snr), t, rtol=0, atol=1e-9 * span)
    noise_level = process.noise_level(t)
    torch.testing.assert_close(process.t_from_noise_level(noise_level), t, rtol=0, atol=1e-9 * span)
    torch.testing.assert_close(process.log_snr(process.t_from_log_snr(log_snr[finite])), log_snr[finite],
                               rtol=1e-9, atol=1e-9)
    # out-of-range log-SNR is clamped to the time interval
    extreme = process.t_from_log_snr(torch.tensor([1e3, -1e3], dtype=F64))
    assert extreme.tolist() == pytest.approx([process.t_min, process.t_max], abs=1e-9 * span)


def test_ddpm_discrete_matches_ddpm_products():
    process = DDPMDiscrete()
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=F64)
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    t = process.discrete_times()
    assert len(t) == 1000 and t[0] == process.t_min and t[-1] == process.t_max
    torch.testing.assert_close(process.alpha(t) ** 2, alphas_cumprod, rtol=1e-12, atol=0)
    torch.testing.assert_close(process.sigma(t) ** 2, 1 - alphas_cumprod, rtol=1e-12, atol=0)
    labels = process.noise_label(t)
    assert torch.equal(labels, torch.arange(1000, dtype=F64))  # integer step indices, exactly
    assert torch.equal((torch.arange(1000, dtype=F64) + 1.0) / 1000, t)  # step index i at t = (i + 1) / N
    # float32 times (what the loss proposals return) give labels within 1e-4 of the integers
    assert (process.noise_label(t.float()) - torch.arange(1000)).abs().max() < 1e-4


def test_ddpm_discrete_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                        beta_schedule="linear")
    process = DDPMDiscrete()
    ours = process.alpha(process.discrete_times()) ** 2
    torch.testing.assert_close(ours.float(), scheduler.alphas_cumprod, rtol=1e-5, atol=1e-7)


# -- prediction wrapper --------------------------------------------------------------------------
@pytest.mark.parametrize("prediction", PREDICTIONS, ids=repr)
@pytest.mark.parametrize("process", PROCESSES, ids=repr)
def test_target_round_trip(process, prediction):
    """to_x0_eps(target(x0, eps)) == (x0, eps) wherever the coefficients are finite (all interior times)."""
    span = process.t_max - process.t_min
    u = torch.tensor([0.0, 1e-3, 0.1, 0.5, 0.9, 1 - 1e-3, 1.0], dtype=F64)
    t = process.t_min + span * u
    ok = finite_at(process, prediction, t)
    assert ok[1:-1].all(), "the wrapper must be finite inside (t_min, t_max)"
    t = t[ok]
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(len(t), 3, generator=g, dtype=F64)
    eps = torch.randn(len(t), 3, generator=g, dtype=F64)
    x_t = process.marginal(x0, t, eps)
    x0_hat, eps_hat = prediction.to_x0_eps(prediction.target(x0, eps, t, process), x_t, t, process)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(eps_hat, eps, rtol=1e-9, atol=1e-9)


# -- oracle --------------------------------------------------------------------------------------
MIXTURE = GaussianMixture.random(3, 2, seed=0)


@pytest.mark.parametrize("prediction", PREDICTIONS, ids=repr)
@pytest.mark.parametrize("process", PROCESSES, ids=repr)
def test_output_for_inverts_to_x0_eps_along_x0_and_the_velocity(process, prediction):
    """output_for(value, ...) is the output whose x0_hat (weights (1, 0)) or velocity alpha' x0_hat + sigma' eps_hat
    (average_velocity_of) is `value`: the inverse the oracle's exact consistency and average-velocity models use."""
    t = interior_times(process, 7)
    t = t[finite_at(process, prediction, t)]
    g = torch.Generator().manual_seed(2)
    x_t, value = torch.randn(len(t), 3, generator=g, dtype=F64), torch.randn(len(t), 3, generator=g, dtype=F64)
    out = output_for(value, x_t, t, process, prediction)
    torch.testing.assert_close(prediction.to_x0_eps(out, x_t, t, process)[0], value, rtol=1e-9, atol=1e-9)
    if process.discrete_times() is None:  # alpha', sigma' exist
        out = output_for(value, x_t, t, process, prediction, process.d_alpha(t), process.d_sigma(t))
        torch.testing.assert_close(average_velocity_of(out, x_t, t, process, prediction), value, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("process", PROCESSES, ids=repr)
def test_oracle_score_is_gradient_of_log_prob(process):
    g = torch.Generator().manual_seed(2)
    t = interior_times(process, 8)
    x_t = process.marginal(MIXTURE.sample(8, g), t, torch.randn(8, 2, generator=g, dtype=F64))
    x = x_t.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(MIXTURE.log_prob(x, t, process).sum(), x)
    torch.testing.assert_close(MIXTURE.score(x_t, t, process), grad, rtol=1e-8, atol=1e-10)
    x0, eps = MIXTURE.posterior_means(x_t, t, process)
    alpha, sigma = process.alpha(t)[:, None], process.sigma(t)[:, None]
    torch.testing.assert_close(alpha * x0 + sigma * eps, x_t, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(x0, (x_t + sigma**2 * grad) / alpha, rtol=1e-7, atol=1e-9)  # Tweedie


@pytest.mark.parametrize("prediction", PREDICTIONS, ids=repr)
@pytest.mark.parametrize("process", PROCESSES, ids=repr)
def test_oracle_model_through_denoiser_gives_oracle_score(process, prediction):
    g = torch.Generator().manual_seed(3)
    t = interior_times(process, 8)
    x_t = process.marginal(MIXTURE.sample(8, g), t, torch.randn(8, 2, generator=g, dtype=F64))
    denoiser = Denoiser(MIXTURE.model(process, prediction), process, prediction)
    score = MIXTURE.score(x_t, t, process)
    torch.testing.assert_close(denoiser.score(x_t, t), score, rtol=1e-7, atol=1e-7 * score.abs().max().item())
    x0, _ = MIXTURE.posterior_means(x_t, t, process)
    torch.testing.assert_close(denoiser(x_t, t).x0, x0, rtol=1e-7, atol=1e-7)
    assert denoiser.nfe == 2
