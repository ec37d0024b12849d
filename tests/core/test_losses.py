"""Contracts of the denoising loss, the weightings and the time proposals, checked against the analytic oracle.

Parametrized over every `Process`, `Prediction`, `Weighting` and `TimeProposal` subclass.
"""

from __future__ import annotations

import math

import pytest
import numpy as np
import torch
from scipy import optimize, stats

from diffusion_pl.losses import (DenoisingLoss, EDMWeighting, EpsMSE, LikelihoodWeighting, LogitNormalTime,
                                 LogNormalNoise, MinSNR, ModeTime, ShiftedTime, OutputMSE, TimeProposal, UniformTime, VelocityMSE, Weighting,
                                 bucket_losses, log_snr_grid)
from diffusion_pl.oracle import GaussianMixture
from diffusion_pl.prediction import EDMPreconditioning, EpsPrediction, Prediction, VelocityPrediction, X0Prediction
from diffusion_pl.processes.base import Process

from diffusion_pl.utils.classes import public_subclasses


PROCESSES = [cls() for cls in public_subclasses(Process)]
PREDICTIONS = [cls() for cls in public_subclasses(Prediction)]
WEIGHTINGS = [cls() for cls in public_subclasses(Weighting)]
PROPOSALS = [cls() for cls in public_subclasses(TimeProposal)]
X0_DEFINED = [w for w in WEIGHTINGS if type(w).__call__ is Weighting.__call__]  # all but OutputMSE
MIXTURE = GaussianMixture.random(3, 2, seed=0)
F64 = torch.float64


def interior_times(process: Process, n: int = 25) -> torch.Tensor:
    u = torch.linspace(0.02, 0.98, n, dtype=F64) + 1e-3 / math.pi
    return process.t_min + (process.t_max - process.t_min) * u


def draw(process: Process, n: int, seed: int):
    """x0 from the mixture, t ~ UniformTime (float64), eps: one fixed draw for paired comparisons."""
    g = torch.Generator().manual_seed(seed)
    x0 = MIXTURE.sample(n, g)
    t = UniformTime().sample(n, process, generator=g).to(F64)
    return x0, t, torch.randn(x0.shape, generator=g, dtype=F64)


# -- proposals -----------------------------------------------------------------------------------
@pytest.mark.parametrize("proposal", PROPOSALS, ids=repr)
@pytest.mark.parametrize("process", PROCESSES, ids=repr)
def test_proposal_in_range_and_reproducible(process, proposal):
    t = proposal.sample(4096, process, generator=torch.Generator().manual_seed(0))
    assert t.shape == (4096,) and t.dtype == torch.float32
    lo, hi = torch.tensor([process.t_min, process.t_max]).float()
    assert (t >= lo).all() and (t <= hi).all()
    assert torch.equal(t, proposal.sample(4096, process, generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("process", PROCESSES, ids=repr)
def test_uniform_time(process):
    n = 20000
    t = UniformTime().sample(n, process, generator=torch.Generator().manual_seed(1)).to(F64)
    grid = process.discrete_times()
    if grid is None:  # Kolmogorov-Smirnov against U[t_min, t_max]
        u = (t - process.t_min) / (process.t_max - process.t_min)
        assert stats.kstest(u.numpy(), "uniform").pvalue > 1e-3
    else:  # only grid times, each equally likely (chi-square)
        index = torch.searchsorted(grid.float(), t.float())
        assert torch.equal(grid.float()[index], t.float())
        counts = torch.bincount(index, minlength=len(grid)).numpy()
        assert stats.chisquare(counts).pvalue > 1e-3


@pytest.mark.parametrize("process", PROCESSES, ids=repr)
def test_lognormal_noise(process):
    """The CDF of log(sigma/alpha) matches N(p_mean, p_std^2) inside the process's noise range (5 standard errors)."""
    proposal, n = LogNormalNoise(p_mean=-1.2, p_std=1.2), 20000
    t = proposal.sample(n, process, generator=torch.Generator().manual_seed(2)).to(F64)
    log_noise = torch.log(process.noise_level(t))
    lo, hi = torch.log(process.noise_level(torch.tensor([process.t_min, process.t_max], dtype=F64))).tolist()
    checked = 0
    for q in (-2.4, -1.2, 0.0):
        if lo + 1e-3 < q < hi - 1e-3:
            p = stats.norm.cdf(q, loc=-1.2, scale=1.2)
            assert abs((log_noise <= q).double().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n)
            checked += 1
    assert checked >= 2


def test_lognormal_noise_on_edm_moments():
    """On EDM (t = sigma) log t ~ N(-1.2, 1.2^2): mean within 5 standard errors, std within 3%."""
    from diffusion_pl.processes.exploding import EDM

    log_t = torch.log(LogNormalNoise().sample(20000, EDM(), generator=torch.Generator().manual_seed(3)).to(F64))
    assert abs(log_t.mean().item() + 1.2) < 5 * 1.2 / math.sqrt(20000)
    assert abs(log_t.std().item() / 1.2 - 1) < 0.03


@pytest.mark.parametrize("process", PROCESSES, ids=repr)
def test_logit_normal_time(process):
    proposal, n = LogitNormalTime(mean=0.3, std=0.8), 20000
    t = proposal.sample(n, process, generator=torch.Generator().manual_seed(4)).to(F64)
    u = ((t - process.t_min) / (process.t_max - process.t_min)).clamp(1e-7, 1 - 1e-7)  # float32 rounding
    z = torch.log(u) - torch.log1p(-u)
    assert abs(z.mean().item() - 0.3) < 5 * 0.8 / math.sqrt(n)
    assert abs(z.std().item() / 0.8 - 1) < 0.03


def test_mode_time_follows_sd3s_density():
    """t = f(u) with f decreasing from 1 to 0, so P(t <= x) = 1 - f^-1(x) (Esser et al. 2024, eq. 20); KS test."""
    from diffusion_pl.processes.interpolants import RectifiedFlow

    scale = 1.29
    f = lambda u: 1 - u - scale * (math.cos(math.pi * u / 2) ** 2 - 1 + u)  # noqa: E731
    cdf = np.vectorize(lambda x: 1.0 - optimize.brentq(lambda u: f(u) - x, 0.0, 1.0) if 0 < x < 1 else float(x >= 1))
    t = ModeTime(scale).sample(20000, RectifiedFlow(), generator=torch.Generator().manual_seed(5)).to(F64)
    assert stats.kstest(t.numpy(), cdf).pvalue > 1e-3
    assert stats.kstest(t.numpy(), "uniform").pvalue < 1e-6  # the heavy middle is not uniform
    with pytest.raises(ValueError, match=r"scale must lie in \[-1, 2/\(pi - 2\)\]"):
        ModeTime(scale=2.0)


def test_shifted_time_is_sd3s_shift_on_the_rectified_flow():
    """t' = shift t / (1 + (shift - 1) t) on the same draws (Esser et al. 2024, eq. 23)."""
    from diffusion_pl.processes.interpolants import RectifiedFlow

    process, shift = RectifiedFlow(), 3.0
    t = LogitNormalTime().sample(4000, process, generator=torch.Generator().manual_seed(6)).to(F64)
    shifted = ShiftedTime(LogitNormalTime(), shift).sample(4000, process,
                                                           generator=torch.Generator().manual_seed(6)).to(F64)
    torch.testing.assert_close(shifted, (shift * t / (1 + (shift - 1) * t)).clamp(process.t_min, process.t_max),
                               rtol=1e-5, atol=1e-6)
    assert shifted.mean() > t.mean() + 0.1  # towards noise
    with pytest.raises(ValueError, match="shift must be positive"):
        ShiftedTime(shift=0.0)


@pytest.mark.parametrize("process", PROCESSES, ids=repr)
def test_shifted_time_moves_log_snr_by_two_log_shift(process):
    """On every process: the shifted draw's log-SNR is the base draw's minus 2 log(shift) wherever neither is
    clamped to the process's range."""
    base = UniformTime().sample(2000, process, generator=torch.Generator().manual_seed(7)).to(F64)
    shifted = ShiftedTime(UniformTime(), 2.0).sample(2000, process, generator=torch.Generator().manual_seed(7)).to(F64)
    target = process.log_snr(base) - 2 * math.log(2.0)
    lo, hi = process.log_snr(torch.tensor([process.t_max, process.t_min], dtype=F64)).tolist()
    inside = (target > lo + 0.05) & (target < hi - 0.05) & torch.isfinite(target)
    assert inside.sum() > 500
    torch.testing.assert_close(process.log_snr(shifted)[inside], target[inside], rtol=1e-4, atol=1e-3)


# -- weightings ----------------------------------------------------------------------------------
@pytest.mark.parametrize("process", PROCESSES, ids=repr)
def test_weight_identities(process):
    """The named special cases of the x0-space definition, at interior times and at both ends."""
    t = torch.cat([torch.tensor([process.t_min, process.t_max], dtype=F64), interior_times(process)])
    one = torch.ones_like(t)
    torch.testing.assert_close(EpsMSE()(t, process, EpsPrediction()), one, rtol=1e-12, atol=0)
    torch.testing.assert_close(EDMWeighting(0.7)(t, process, EDMPreconditioning(0.7)), one, rtol=1e-12, atol=0)
    torch.testing.assert_close(VelocityMSE()(t, process, VelocityPrediction()), one, rtol=1e-12, atol=0)
    torch.testing.assert_close(OutputMSE()(t, process, X0Prediction()), one)
    t = interior_times(process)
    snr = (process.alpha(t) / process.sigma(t)) ** 2
    g2_over_s2 = process.g2(t) / process.sigma(t) ** 2
    torch.testing.assert_close(LikelihoodWeighting()(t, process, EpsPrediction()), g2_over_s2, rtol=1e-9, atol=0)
    torch.testing.assert_close(MinSNR(5.0)(t, process, EpsPrediction()), snr.clamp(max=5.0) / snr, rtol=1e-9, atol=0)
    torch.testing.assert_close(MinSNR(5.0)(t, process, X0Prediction()), snr.clamp(max=5.0), rtol=1e-9, atol=0)
    torch.testing.assert_close(EpsMSE()(t, process, X0Prediction()), snr, rtol=1e-9, atol=0)


@pytest.mark.parametrize("weighting", X0_DEFINED, ids=repr)
@pytest.mark.parametrize("process", PROCESSES, ids=repr)
def test_x0_and_eps_forms_agree(process, weighting):
    """w_eps = w_x0 sigma^2 / alpha^2: the two closed forms are the same weight."""
    t = interior_times(process)
    ratio = (process.sigma(t) / process.alpha(t)) ** 2
    torch.testing.assert_close(weighting.eps_weight(t, process), weighting.x0_weight(t, process) * ratio,
                               rtol=1e-9, atol=0)


def weight_limit_is_finite(weighting, process, prediction, end: float, inward: float) -> bool:
    """Is lim w_out(t) at `end` finite? Evaluate 1e-9 and 1e-11 of the interval inside and ask for convergence."""
    span = process.t_max - process.t_min
    near = [weighting(torch.tensor([end + inward * h * span], dtype=F64), process, prediction).item()
            for h in (1e-9, 1e-11)]
    return all(math.isfinite(v) for v in near) and abs(near[1] - near[0]) <= 1e-4 * abs(near[0]) + 1e-6


@pytest.mark.parametrize("prediction", PREDICTIONS, ids=repr)
@pytest.mark.parametrize("process", PROCESSES, ids=repr)
def test_no_nan_at_the_ends(process, prediction):
    """Where lim w_out is finite at t_min or t_max, the weight, target and oracle loss there are finite too.

    Combinations with an infinite limit (e.g. EDMWeighting under EpsPrediction at alpha = 0, where
    x0 = (x_t - sigma eps)/alpha is unrecoverable) are genuinely infinite and are not asserted on.
    """
    x0, _, eps = draw(process, 64, seed=5)
    model = MIXTURE.model(process, prediction)
    finite_combinations = 0
    for end, inward in ((process.t_min, 1.0), (process.t_max, -1.0)):
        t = torch.full((64,), end, dtype=F64)
        for weighting in WEIGHTINGS:
            if not weight_limit_is_finite(weighting, process, prediction, end, inward):
                continue
            finite_combinations += 1
            w = weighting(t, process, prediction)
            assert torch.isfinite(w).all(), f"{weighting} is NaN/inf at t={end}"
            assert torch.isfinite(prediction.target(x0, eps, t, process)).all()
            loss = DenoisingLoss(weighting=weighting)(model, x0, process, prediction, t=t, eps=eps).loss
            assert torch.isfinite(loss).all(), f"{weighting} loss is NaN/inf at t={end}"
    assert finite_combinations >= len(WEIGHTINGS)  # at least t_min is regular for every process


# -- the loss is minimised by the exact denoiser ---------------------------------------------------
def posterior_x0_variance(x_t: torch.Tensor, t: torch.Tensor, process: Process) -> torch.Tensor:
    """Per-dimension Var[x0 | x_t] (B,) of the mixture, written out independently of the oracle.

    x0 | x_t, k ~ N(m_k, tau_k^2 I), tau_k^2 = s_k^2 sigma^2 / v_k, v_k = alpha^2 s_k^2 + sigma^2.
    """
    alpha, sigma = process.alpha(t)[:, None], process.sigma(t)[:, None]
    s2, mu, d = MIXTURE.stds[None] ** 2, MIXTURE.means, x_t.shape[1]
    v = alpha**2 * s2 + sigma**2  # (B, K)
    diff = x_t[:, None, :] - alpha[:, :, None] * mu[None]  # (B, K, D)
    log_r = torch.log(MIXTURE.weights)[None] - 0.5 * (diff**2).sum(-1) / v - 0.5 * d * torch.log(v)
    r = torch.softmax(log_r, 1)  # (B, K)
    m = mu[None] + (alpha * s2 / v)[:, :, None] * diff  # (B, K, D)
    m_bar = (r[:, :, None] * m).sum(1, keepdim=True)
    return (r * (s2 * sigma**2 / v + ((m - m_bar) ** 2).sum(-1) / d)).sum(1)


@pytest.mark.parametrize("prediction", PREDICTIONS, ids=repr)
@pytest.mark.parametrize("process", PROCESSES, ids=repr)
def test_oracle_minimises_loss_and_attains_irreducible_value(process, prediction):
    """Tweedie: F* = E[target | x_t] minimises E w ||F - target||^2 and its loss is the irreducible w c^2 Var[x0 | x_t].

    For F = F* + p(x_t, t) the loss grows by w ||p||^2 (deterministic) plus the cross term
    2 w (F* - target) . p, whose mean vanishes exactly when F* is the conditional mean of the
    target (orthogonality). c is the target's coefficient on x0 at fixed x_t
    (eps = (x_t - alpha x0) / sigma), taken from `prediction.target` itself. Paired comparisons
    on the same (x0, t, eps); means within 5 standard errors.
    """
    n = 4096
    x0, t, eps = draw(process, n, seed=6)
    oracle = MIXTURE.model(process, prediction)
    b_x0 = prediction.coefficients(t, process)[1][:, None]
    perturbations = {  # moves x0_hat by 0.3 (constant) or by 0.3 tanh(x_t) (state dependent)
        "constant": lambda x_t: 0.3 / b_x0 * torch.ones_like(x_t),
        "tanh": lambda x_t: 0.3 / b_x0 * torch.tanh(x_t),
    }
    alpha, sigma = process.alpha(t), process.sigma(t)
    x_t = process.marginal(x0, t, eps)
    c = prediction.target(torch.ones(n, 1, dtype=F64), -(alpha / sigma)[:, None], t, process)[:, 0]
    var_x0 = posterior_x0_variance(x_t, t, process)
    for weighting in WEIGHTINGS:
        loss_fn = DenoisingLoss(weighting=weighting)
        w = weighting(t, process, prediction)
        loss = loss_fn(oracle, x0, process, prediction, t=t, eps=eps).loss
        for name, p in perturbations.items():
            worse = loss_fn(lambda x, t_, y: oracle(x, t_, y) + p(x), x0, process, prediction, t=t, eps=eps).loss
            gain = worse - loss
            cross = gain - w * p(x_t).pow(2).mean(1)
            assert gain.mean() > 0, f"{weighting}, {name}: the perturbed network is not worse"
            assert abs(cross.mean()) < 5 * cross.std() / math.sqrt(n), f"{weighting}, {name}: not orthogonal"
        irreducible = w * c**2 * var_x0
        err = loss - irreducible
        assert abs(err.mean()) < 5 * err.std() / math.sqrt(n) + 1e-9 * irreducible.mean(), f"{weighting}"


# -- the loss object -----------------------------------------------------------------------------
def test_label_dropout_rate_and_errors():
    process, prediction = PROCESSES[0], EpsPrediction()
    seen = []

    def model(x_t, t, y):
        seen.append(y.clone())
        return torch.zeros_like(x_t)

    n, p = 20000, 0.3
    x0 = torch.zeros(n, 2)
    labels = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(7))
    DenoisingLoss(p_uncond=p)(model, x0, process, prediction, labels, null_label=10,
                              generator=torch.Generator().manual_seed(8))
    dropped = seen[-1] == 10
    assert abs(dropped.double().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n)
    assert torch.equal(seen[-1][~dropped], labels[~dropped])
    DenoisingLoss(p_uncond=0.0)(model, x0, process, prediction, labels)
    assert torch.equal(seen[-1], labels)
    with pytest.raises(ValueError, match="null_label"):
        DenoisingLoss(p_uncond=0.1)(model, x0, process, prediction, labels)
    with pytest.raises(ValueError, match="p_uncond"):
        DenoisingLoss(p_uncond=1.5)


def test_loss_shapes_overrides_and_images():
    process, prediction = PROCESSES[-1], EpsPrediction()
    model = MIXTURE.model(process, prediction)  # flattens (B, 1, 1, 2) images
    x0 = MIXTURE.sample(16, torch.Generator().manual_seed(9)).float().reshape(16, 1, 1, 2)
    loss_fn = DenoisingLoss(LogNormalNoise(), MinSNR())
    a = loss_fn(model, x0, process, prediction, generator=torch.Generator().manual_seed(10))
    b = loss_fn(model, x0, process, prediction, generator=torch.Generator().manual_seed(10))
    assert a.loss.shape == (16,) and a.t.shape == (16,) and a.loss.dtype == torch.float32
    assert torch.equal(a.loss, b.loss)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(11))
    c = loss_fn(model, x0, process, prediction, t=a.t, eps=eps)
    d = loss_fn(model, x0, process, prediction, t=a.t, eps=eps, generator=torch.Generator().manual_seed(12))
    assert torch.equal(c.loss, d.loss) and torch.equal(c.t, a.t)


def test_bucket_losses_are_log_snr_ranges_for_every_process():
    loss = torch.tensor([1.0, 3.0, 5.0, 7.0, 9.0, 11.0])
    log_snr = torch.tensor([-5.5, -4.5, -1.0, 2.0, 4.5, 5.5], dtype=F64)
    for process in PROCESSES:
        t = process.t_from_log_snr(log_snr)
        assert torch.allclose(process.log_snr(t), log_snr, atol=1e-6), process  # inside every range tested
        out = bucket_losses(loss, t, process)
        assert list(out) == ["logsnr_lt_-4", "logsnr_-4_to_0", "logsnr_0_to_4", "logsnr_gt_4"], process
        assert [v.item() for v in out.values()] == [2.0, 5.0, 7.0, 10.0], process
    assert list(bucket_losses(loss[:2], t[:2], process)) == ["logsnr_lt_-4"]  # empty buckets left out


def test_validation_grid_is_even_in_log_snr_and_finite_for_every_process():
    for process in PROCESSES:
        t = log_snr_grid(process, 8)
        log_snr = process.log_snr(t)
        assert t.shape == (8,) and bool(torch.isfinite(log_snr).all()), process  # rectified flow: alpha(1) = 0
        assert bool((t[1:] > t[:-1]).all()), process  # 8 distinct noise levels, not all at t_max
        steps = log_snr[:-1] - log_snr[1:]
        assert torch.allclose(steps, steps.mean().expand(7), rtol=1e-6) and -10 <= log_snr.min(), process
        assert log_snr.max() <= 10, process
