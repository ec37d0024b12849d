"""Sampler contracts against the analytic oracle: every process x every sampler draws the mixture.

Statistics used below (N samples, stated tolerances):
- mixture weights: samples assigned to the nearest component mean (components are > 10 stds
  apart); |fraction - weight| <= 0.05 (Monte Carlo std <= 0.011 at N = 2000).
- per-component mean and std: |mean - mu| <= 0.06 per coordinate, std / s within [0.85, 1.15].
- squared MMD (Gaussian kernels at three bandwidths, estimated with random Fourier features)
  to a fresh exact reference sample of the same size. Its baseline is the same statistic between
  two exact samples (averaged over 4 draws, computed here); a sampler passes at <= 3x baseline,
  i.e. its own bias may add at most twice the Monte Carlo floor that two exact samples show.
Deterministic samplers are also checked against the exact ODE map (adaptive RK45 at rtol 1e-7):
their error must fall with the number of steps at their order.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from diffusion_pl.guidance import Guidance
from diffusion_pl.oracle import GaussianMixture
from diffusion_pl.prediction import Denoiser, EpsPrediction, Prediction, VelocityPrediction, precondition
from diffusion_pl.processes.exploding import EDM
from diffusion_pl.processes.base import Process
from diffusion_pl.processes.interpolants import RectifiedFlow
from diffusion_pl.processes.variance_preserving import VPLinear
from diffusion_pl.sampling.posterior import DDIM, DDPM
from diffusion_pl.sampling.ode import AdaptiveODE, EulerODE, HeunODE
from diffusion_pl.sampling.sde import AnnealedLangevin, EulerMaruyama, PredictorCorrector
from diffusion_pl.sampling.dpm_solver import DPMSolverPP
from diffusion_pl.sampling.unipc import UniPC
from diffusion_pl.sampling.edm import EDMStochastic
from diffusion_pl.sampling.grids import ExplicitGrid, KarrasGrid, LogSNRGrid, QuadraticGrid, TimeGrid, UniformGrid
from diffusion_pl.sampling.base import Sampler
from diffusion_pl.sampling.noise import SeededNoise
from diffusion_pl.sampling.api import sample

from diffusion_pl.utils.classes import public_subclasses


PROCESSES = public_subclasses(Process)
SAMPLERS = public_subclasses(Sampler)
# samplers that integrate a diffusion model's denoiser. Consistency needs a consistency function instead (one
# E[x0 | x_T] is the data mean; its exact one, the integrated PF-ODE, is tested in tests/core/test_consistency.py) and
# MeanFlow an average-velocity model taking the keyword r (its exact one: tests/core/test_meanflow.py)
FEW_STEP = ("Consistency", "MeanFlow")
DENOISER_SAMPLERS = [s for s in SAMPLERS if s.__name__ not in FEW_STEP]
# annealed Langevin takes its many corrector steps: in the full run only (--slow)
DENOISER_SAMPLER_PARAMS = [pytest.param(c, marks=pytest.mark.slow) if c is AnnealedLangevin else c
                           for c in DENOISER_SAMPLERS]
PREDICTIONS = public_subclasses(Prediction)
GRIDS = [g for g in public_subclasses(TimeGrid) if g is not ExplicitGrid]

# Steps per sampler for the distribution tests: each family at a budget where it has converged
# on every process (first-order Euler in t is slow on VE's exponential sigma(t); annealed
# Langevin needs many levels to mix). A sampler not listed here gets 100.
STEPS = {DDPM: 200, DDIM: 100, EulerMaruyama: 150, PredictorCorrector: 100, AnnealedLangevin: 100, EulerODE: 400,
         HeunODE: 25, AdaptiveODE: 1, EDMStochastic: 40, DPMSolverPP: 25, UniPC: 25}
N2, N64 = 2000, 1000
MMD_FACTOR = 3.0

MIX2 = GaussianMixture(torch.tensor([0.2, 0.3, 0.5]), torch.tensor([[-1.5, -0.5], [1.2, -1.0], [0.0, 1.5]]),
                       torch.tensor([0.15, 0.25, 0.2]))
MIX64 = GaussianMixture.random(num_components=3, dim=64, seed=3, spread=0.5, std_range=(0.1, 0.2))


def mmd2(x: torch.Tensor, y: torch.Tensor, bandwidths: tuple[float, ...], features: int = 1024) -> float:
    """Biased squared MMD for a sum of Gaussian kernels, via random Fourier features (Rahimi & Recht 2007)."""
    g = torch.Generator().manual_seed(1234)
    x, y = x.double().flatten(1), y.double().flatten(1)
    total = 0.0
    for b in bandwidths:
        w = torch.randn(x.shape[1], features, generator=g, dtype=torch.float64) / b
        c = 2 * math.pi * torch.rand(features, generator=g, dtype=torch.float64)
        diff = torch.cos(x @ w + c).mean(0) - torch.cos(y @ w + c).mean(0)
        total += 2.0 / features * float((diff**2).sum())
    return total


def bandwidths(mix: GaussianMixture) -> tuple[float, ...]:
    # the within-component and the between-component distance scales of the mixture
    within = math.sqrt(2 * mix.dim) * float(mix.stds.mean())
    between = float(torch.cdist(mix.means, mix.means).max())
    return (0.5 * within, within, between)


_BASELINES: dict[tuple[int, int], tuple[torch.Tensor, float]] = {}


def reference(mix: GaussianMixture, n: int) -> tuple[torch.Tensor, float]:
    """A fresh exact sample and the exact-vs-exact MMD baseline (mean of 4 draws), cached per mixture."""
    key = (mix.dim, n)
    if key not in _BASELINES:
        ref = mix.sample(n, torch.Generator().manual_seed(100)).float()
        base = [mmd2(mix.sample(n, torch.Generator().manual_seed(200 + k)), ref, bandwidths(mix)) for k in range(4)]
        _BASELINES[key] = ref, sum(base) / len(base)
    return _BASELINES[key]


def check_mixture(x: torch.Tensor, mix: GaussianMixture, mean_tol: float, std_tol: float) -> None:
    """Weights by nearest-mean assignment, per-component mean and std."""
    assert torch.isfinite(x).all()
    x = x.double()
    k = torch.cdist(x, mix.means).argmin(1)
    frac = torch.bincount(k, minlength=len(mix.weights)).double() / len(x)
    assert (frac - mix.weights).abs().max() <= 0.05, f"weights {frac.tolist()} vs {mix.weights.tolist()}"
    for j in range(len(mix.weights)):
        xj = x[k == j]
        assert (xj.mean(0) - mix.means[j]).abs().max() <= mean_tol, f"component {j} mean"
        ratio = float(xj.std(0).pow(2).mean().sqrt() / mix.stds[j])
        assert 1 - std_tol <= ratio <= 1 + std_tol, f"component {j} std ratio {ratio:.3f}"


def run(process: Process, sampler: Sampler, mix: GaussianMixture, n: int, seed: int = 0, prediction=None):
    prediction = prediction or VelocityPrediction()  # defined at alpha = 0 (t_max of rectified flow) too
    return sample(mix.model(process, prediction), process, prediction, sampler, (n, mix.dim),
                  generator=torch.Generator().manual_seed(seed))


# -- every process x every sampler draws the mixture ---------------------------------------------------


@pytest.mark.parametrize("sampler_cls", DENOISER_SAMPLER_PARAMS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("process_cls", PROCESSES, ids=lambda c: c.__name__)
def test_sampler_recovers_mixture_2d(process_cls, sampler_cls):
    process, steps = process_cls(), STEPS.get(sampler_cls, 100)
    out = run(process, sampler_cls(steps=steps), MIX2, N2)
    check_mixture(out.x, MIX2, mean_tol=0.06, std_tol=0.15)
    ref, base = reference(MIX2, N2)
    err = mmd2(out.x, ref, bandwidths(MIX2))
    assert err <= MMD_FACTOR * base, f"MMD^2 {err:.2e} > {MMD_FACTOR} x baseline {base:.2e} (nfe {out.nfe})"
    # the error falls with the number of steps (or the coarse run has converged already: adaptive)
    coarse = mmd2(run(process, sampler_cls(steps=max(1, steps // 10)), MIX2, N2).x, ref, bandwidths(MIX2))
    assert coarse > err or coarse <= MMD_FACTOR * base, f"coarse {coarse:.2e} <= fine {err:.2e}"


@pytest.mark.parametrize("sampler_cls", DENOISER_SAMPLER_PARAMS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("process_cls", [VPLinear, RectifiedFlow], ids=lambda c: c.__name__)
def test_sampler_recovers_mixture_64d(process_cls, sampler_cls):
    out = run(process_cls(), sampler_cls(steps=STEPS.get(sampler_cls, 100)), MIX64, N64)
    check_mixture(out.x, MIX64, mean_tol=0.08, std_tol=0.1)
    ref, base = reference(MIX64, N64)
    err = mmd2(out.x, ref, bandwidths(MIX64))
    assert err <= MMD_FACTOR * base, f"MMD^2 {err:.2e} > {MMD_FACTOR} x baseline {base:.2e}"


# -- deterministic samplers converge to the exact ODE map at their order ---------------------------


@pytest.fixture(scope="module")
def ode_reference():
    process, noise = VPLinear(), torch.randn(256, 2, generator=torch.Generator().manual_seed(7))
    pred = VelocityPrediction()
    exact = sample(MIX2.model(process, pred), process, pred, AdaptiveODE(rtol=1e-7, atol=1e-7), (256, 2),
                   noise=noise, dtype=torch.float64).x
    return process, noise, exact


@pytest.mark.parametrize("sampler_cls, order", [(DDIM, 1), (EulerODE, 1), (HeunODE, 2), (DPMSolverPP, 2)],
                         ids=lambda v: getattr(v, "__name__", str(v)))
def test_deterministic_sampler_converges_at_its_order(ode_reference, sampler_cls, order):
    process, noise, exact = ode_reference
    pred = VelocityPrediction()
    errors = []
    for steps in (40, 80, 160):
        x = sample(MIX2.model(process, pred), process, pred, sampler_cls(steps=steps, grid=LogSNRGrid()), (256, 2),
                   noise=noise, dtype=torch.float64).x
        # the median over samples: the few that sit on a boundary between modes may switch mode
        errors.append(float((x - exact).norm(dim=1).median()))
    rates = [math.log2(a / b) for a, b in zip(errors[:-1], errors[1:])]
    assert errors[-1] < 0.01 and min(rates) > order - 0.5, f"errors {errors}, observed orders {rates}"


def test_adaptive_ode_reports_nfe_and_matches_heun():
    process, pred = VPLinear(), VelocityPrediction()
    noise = torch.randn(500, 2, generator=torch.Generator().manual_seed(3))
    model = MIX2.model(process, pred)
    adaptive = sample(model, process, pred, AdaptiveODE(), (500, 2), noise=noise)
    heun = sample(model, process, pred, HeunODE(steps=200), (500, 2), noise=noise)
    assert 20 < adaptive.nfe < 1000 and heun.nfe == 401
    assert float((adaptive.x - heun.x).norm(dim=1).median()) < 1e-3


def test_adaptive_ode_falls_back_to_scipy(monkeypatch):
    import sys

    process, pred = RectifiedFlow(), VelocityPrediction()
    noise = torch.randn(200, 2, generator=torch.Generator().manual_seed(4))
    model = MIX2.model(process, pred)
    with_torchdiffeq = sample(model, process, pred, AdaptiveODE(), (200, 2), noise=noise)
    monkeypatch.setitem(sys.modules, "torchdiffeq", None)  # makes `import torchdiffeq` raise ImportError
    with_scipy = sample(model, process, pred, AdaptiveODE(), (200, 2), noise=noise)
    assert with_scipy.nfe > 0 and (with_scipy.x - with_torchdiffeq.x).abs().max() < 2e-3


# -- every parameterization gives the same samples -------------------------------------------------------


@pytest.mark.parametrize("process_cls", PROCESSES, ids=lambda c: c.__name__)
def test_parameterizations_give_the_same_samples(process_cls):
    process = process_cls()
    noise = torch.randn(300, 2, generator=torch.Generator().manual_seed(5))
    for sampler in (HeunODE(steps=10), DDIM(steps=10), DPMSolverPP(steps=10)):
        times = sampler.times(process)
        ref = sample(MIX2.model(process, VelocityPrediction()), process, VelocityPrediction(), sampler, (300, 2),
                     noise=noise).x
        for prediction_cls in PREDICTIONS:
            prediction = prediction_cls()
            if not all(torch.isfinite(c).all() for c in prediction.coefficients(times, process)):
                continue  # e.g. eps or score prediction where alpha(t_max) = 0: undefined, not a sampler matter
            x = sample(MIX2.model(process, prediction), process, prediction, sampler, (300, 2), noise=noise).x
            assert (x - ref).abs().max() < 1e-3, f"{prediction_cls.__name__} with {type(sampler).__name__}"


# -- EDM's algorithms exactly ------------------------------------------------------------------------------


def _edm_reference(denoise, x, sigmas, S_churn, S_min, S_max, S_noise, z_list):
    """Karras et al. 2022, Alg. 2, written out as in the paper (sigmas end with 0)."""
    n = len(sigmas) - 1
    for i in range(n):
        s_cur, s_next = sigmas[i], sigmas[i + 1]
        gamma = min(S_churn / n, math.sqrt(2) - 1) if S_min <= s_cur <= S_max else 0.0
        s_hat = s_cur * (1 + gamma)
        if gamma > 0:
            x = x + math.sqrt(s_hat**2 - s_cur**2) * S_noise * z_list.pop(0)
        d = (x - denoise(x, s_hat)) / s_hat
        x_next = x + (s_next - s_hat) * d
        if s_next > 0:
            d2 = (x_next - denoise(x_next, s_next)) / s_next
            x_next = x + (s_next - s_hat) * 0.5 * (d + d2)
        x = x_next
    return x


@pytest.mark.parametrize("S_churn", [0.0, 40.0])
def test_edm_stochastic_is_edm_algorithm_2_on_edm_process(S_churn):
    process, pred, steps = EDM(), EpsPrediction(), 12
    model = MIX2.model(process, pred)
    den = Denoiser(model, process, pred)
    sigmas = KarrasGrid().times(process, steps).tolist() + [0.0]
    a, b = 80.0 ** (1 / 7), 0.002 ** (1 / 7)
    sigmas_ref = [(a + i / steps * (b - a)) ** 7 for i in range(steps + 1)]  # EDM's time steps, eq. 5
    assert max(abs(u - v) / v for u, v in zip(sigmas[:-1], sigmas_ref)) < 1e-12
    sampler = EDMStochastic(steps=steps, S_churn=S_churn, S_min=0.05, S_max=50.0, S_noise=1.003)
    noise = torch.randn(300, 2, generator=torch.Generator().manual_seed(6))
    out = sample(model, process, pred, sampler, (300, 2), noise=noise, seeds=list(range(300)))
    # the same churn noise: replay the per-sample generators (x_T came from `noise`, not from them)
    replay = SeededNoise(list(range(300)))
    z_list = [replay.randn((300, 2)) for _ in range(steps + 1)]
    # x_T = prior_std * noise; prior_std = sqrt(1 + 80^2) assumes unit data variance (EDM uses 80)
    x_T = process.prior_std() * noise
    x_ref = _edm_reference(lambda x, s: den(x, s).x0, x_T, sigmas, S_churn, 0.05, 50.0, 1.003, z_list)
    assert torch.allclose(out.x, x_ref, atol=1e-4, rtol=1e-5)
    assert out.nfe == 2 * steps + 1


# -- classifier-free guidance ----------------------------------------------------------------------------


class CountingModel:
    """Class-conditional oracle: label 0 and 1 each own one mixture, label 2 (null) is their union."""

    def __init__(self, process, prediction):
        w, mu, s = MIX2.weights, MIX2.means, MIX2.stds
        mixes = [GaussianMixture(w[:1], mu[:1], s[:1]), GaussianMixture(w[1:], mu[1:], s[1:]), MIX2]
        self.models = [m.model(process, prediction) for m in mixes]
        self.batch_sizes: list[int] = []

    def __call__(self, x_t, t, class_labels):
        self.batch_sizes.append(len(x_t))
        outs = torch.stack([m(x_t, t, None) for m in self.models])  # (3, B, D)
        return outs[class_labels, torch.arange(len(x_t))]


def test_classifier_free_guidance_is_one_batched_call():
    process, pred, n = VPLinear(), EpsPrediction(), 400
    sampler = DDIM(steps=20)
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(8))
    labels = torch.zeros(n, dtype=torch.long)

    def draw(guidance, class_labels, null_label=2):
        model = CountingModel(process, pred)
        out = sample(model, process, pred, sampler, (n, 2), noise=noise, class_labels=class_labels,
                     guidance=Guidance(weight=guidance, null_label=null_label))
        return out, model.batch_sizes

    cond, sizes = draw(1.0, labels)
    assert sizes == [n] * cond.nfe  # w = 1 is conditional sampling: the conditional model alone
    uncond, _ = draw(1.0, torch.full((n,), 2))
    guided, sizes = draw(3.0, labels)
    assert sizes == [2 * n] * guided.nfe and guided.nfe == cond.nfe  # one call of 2n per evaluation
    zero, sizes = draw(0.0, labels)
    assert sizes == [2 * n] * zero.nfe and torch.allclose(zero.x, uncond.x, atol=1e-6)
    # w > 1 pushes samples away from the unconditional model, towards label 0's component
    near = lambda x: float((torch.cdist(x.double(), MIX2.means).argmin(1) == 0).double().mean())  # noqa: E731
    assert near(uncond.x) < 0.5 < near(cond.x) <= near(guided.x)


# -- per-sample seeds ------------------------------------------------------------------------------------


class TinyNet(nn.Module):
    """A small seeded conv net in the network contract net(x_in, noise_label, class_labels)."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():  # seeded weights without touching the caller's global RNG
            torch.manual_seed(0)
            self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x, noise_label, class_labels=None):
        return self.c2(torch.tanh(self.c1(x) + torch.sin(noise_label / 300.0)[:, None, None, None]))


@pytest.mark.filterwarnings("ignore:TF32 acceleration")  # torch.backends.mkldnn.flags() warns on CPU-only builds
@pytest.mark.parametrize("sampler_cls", SAMPLERS, ids=lambda c: c.__name__)
def test_seeds_give_the_same_sample_whatever_the_batch(sampler_cls):
    """Sample i depends on seeds[i] only: same seed, same sample, in any batch (bitwise on CPU)."""
    sampler = sampler_cls(steps=4)
    # AdaptiveODE's error control takes a norm over the whole batch, so its step sizes (not its
    # noise) depend on the batch: equal to the solver tolerance, not bitwise
    exact = not isinstance(sampler, AdaptiveODE)
    process = VPLinear()
    cases = [
        (MIX2.model(process, VelocityPrediction()), VelocityPrediction(), (2,)),
        (precondition(TinyNet().eval(), process, EpsPrediction()), EpsPrediction(), (3, 8, 8)),
    ]
    if sampler_cls.__name__ == "MeanFlow":  # an average-velocity model (keyword r): the oracle's exact one
        cases = [(MIX2.mean_flow_model(process, VelocityPrediction(), steps=8), VelocityPrediction(), (2,))]
    # oneDNN picks another convolution algorithm for a batch of one: the *network* would not be
    # batch-size invariant, which is not what is tested here
    with torch.backends.mkldnn.flags(enabled=False):
        for model, pred, shape in cases:
            big = sample(model, process, pred, sampler, (6, *shape), seeds=[10, 11, 12, 13, 14, 15]).x
            small = sample(model, process, pred, sampler, (3, *shape), seeds=[15, 13, 99]).x
            one = sample(model, process, pred, sampler, (1, *shape), seeds=[13]).x
            for a, b in [(big[5], small[0]), (big[3], small[1]), (big[3], one[0])]:
                assert torch.equal(a, b) if exact else torch.allclose(a, b, atol=1e-3)
            assert not torch.equal(big[3], big[4])


def test_without_seeds_the_generator_decides():
    process, pred = VPLinear(), VelocityPrediction()
    model, sampler = MIX2.model(process, pred), EulerMaruyama(steps=5)
    a = sample(model, process, pred, sampler, (4, 2), generator=torch.Generator().manual_seed(1)).x
    b = sample(model, process, pred, sampler, (4, 2), generator=torch.Generator().manual_seed(1)).x
    c = sample(model, process, pred, sampler, (4, 2), generator=torch.Generator().manual_seed(2)).x
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bad_arguments_are_one_sentence_errors():
    process, pred = VPLinear(), VelocityPrediction()
    model = MIX2.model(process, pred)
    with pytest.raises(ValueError, match="one integer per sample"):
        sample(model, process, pred, DDIM(steps=2), (3, 2), seeds=[1, 2])
    with pytest.raises(ValueError, match="either seeds"):
        sample(model, process, pred, DDIM(steps=2), (2, 2), seeds=[1, 2], generator=torch.Generator())
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        DDIM(steps=0)
    with pytest.raises(ValueError, match="holds 3 times but the sampler asks for 4"):
        sample(model, process, pred, DDIM(steps=4, grid=ExplicitGrid([0.9, 0.5, 0.1])), (2, 2))


# -- progress bar -------------------------------------------------------------------------------------------


def test_progress_bar_is_off_by_default_and_on_when_asked(capsys):
    process, pred = VPLinear(), VelocityPrediction()
    model = MIX2.model(process, pred)
    sample(model, process, pred, DDIM(steps=5), (4, 2))
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    sample(model, process, pred, DDIM(steps=5), (4, 2), progress=True)
    assert "DDIM" in capsys.readouterr().err


# -- time grids ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid_cls", GRIDS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("process_cls", PROCESSES, ids=lambda c: c.__name__)
def test_grids_run_from_t_max_to_t_min(process_cls, grid_cls):
    process = process_cls()
    for steps in (1, 2, 7, 50):
        t = grid_cls().times(process, steps)
        assert t.dtype == torch.float64 and t.shape == (steps + 1,)
        assert t[0] == process.t_max and t[-1] == process.t_min and bool((t[1:] < t[:-1]).all())


def test_grids_are_uniform_in_their_coordinate():
    process = VPLinear()
    lam = process.log_snr(LogSNRGrid(max_noise_level=math.inf).times(process, 10))
    assert torch.allclose(lam.diff(), lam.diff()[:1].expand(10), rtol=1e-9)
    u = ((QuadraticGrid().times(process, 10) - process.t_min) / (process.t_max - process.t_min)).sqrt()
    assert torch.allclose(u.diff(), torch.full((10,), -0.1, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(UniformGrid().times(process, 4), torch.linspace(1.0, 1e-3, 5, dtype=torch.float64))
    # above max_noise_level (alpha(t_max) = 0 here) the grid spends one step from t_max to it
    t = KarrasGrid().times(RectifiedFlow(), 10)
    assert t[0] == 1.0 and abs(float(RectifiedFlow().noise_level(t[1:2])) - 80.0) < 1e-9


# -- the KL bound of the reverse SDE ---------------------------------------------------------------------


def _kl_bound_terms(process, p, q, t_switch):
    """Right side by quadrature: KL(p_T | prior) + 1/2 int g2 E_p |score_p - s|^2 dt, s = q's score for t >= t_switch."""
    x = torch.linspace(-8, 8, 2001, dtype=torch.float64)[:, None]
    dx = float(x[1] - x[0])
    t_max = torch.tensor(process.t_max, dtype=torch.float64)
    p_T = p.log_prob(x, t_max, process).exp()
    std = process.prior_std()
    log_prior = -0.5 * x[:, 0] ** 2 / std**2 - math.log(std * math.sqrt(2 * math.pi))
    kl_prior = float((p_T * (p_T.clamp_min(1e-300).log() - log_prior)).sum() * dx)
    ts = torch.logspace(math.log10(max(process.t_min, t_switch)), math.log10(process.t_max), 200, dtype=torch.float64)
    integrand = [float(process.g2(t)) * float((p.log_prob(x, t, process).exp()
                                               * (p.score(x, t, process) - q.score(x, t, process))[:, 0] ** 2).sum() * dx)
                 for t in ts]
    return kl_prior, kl_prior + 0.5 * float(torch.trapezoid(torch.tensor(integrand, dtype=torch.float64), ts))


def _binned_kl(process, p, x_samples):
    """KL(p_{t_min} | q) over 80 bins on [-4, 4]: binning can only lower a KL (data processing)."""
    edges = torch.linspace(-4, 4, 81, dtype=torch.float64)
    t_min = torch.tensor(process.t_min, dtype=torch.float64)
    alpha, sigma = process.alpha(t_min), process.sigma(t_min)
    components = torch.distributions.Normal(alpha * p.means[:, 0], (alpha**2 * p.stds**2 + sigma**2).sqrt())
    p_bins = (components.cdf(edges[:, None]) * p.weights).sum(1).diff().clamp_min(1e-12)
    q_bins = torch.histc(x_samples.double()[:, 0], bins=80, min=-4, max=4) / len(x_samples)
    return float((p_bins * (p_bins.log() - q_bins.clamp_min(1e-12).log())).sum())


@pytest.mark.slow
def test_kl_bound_for_the_reverse_sde_with_an_imperfect_score():
    """KL(p | q_sde) <= KL(p_T | prior) + 1/2 int g2 E|score - s|^2 dt (Song et al. 2021b, Thm. 1; notes, seeds/001).

    1-D VP process, data p, and s the exact score of another mixture q: (a) at every t, (b) only
    for t >= 0.1 (a network wrong at high noise only; the exact score below contracts the
    error). Left side: a histogram estimate from 20k Euler-Maruyama samples (150 steps) at t_min;
    its floor, measured with the exact score, is 0.0023 (histogram bias 79/(2n) plus discretization).
    Measured when written: (a) 0.688 <= 0.719 (the bound is nearly tight), (b) 0.114 <= 0.257.
    """
    process, pred, n = VPLinear(), EpsPrediction(), 20_000
    p = GaussianMixture(torch.tensor([0.3, 0.7]), torch.tensor([[-1.0], [1.0]]), torch.tensor([0.3, 0.4]))
    q = GaussianMixture(torch.tensor([0.6, 0.4]), torch.tensor([[-0.5], [1.5]]), torch.tensor([0.5, 0.3]))
    model_p, model_q = p.model(process, pred), q.model(process, pred)
    sampler = EulerMaruyama(steps=150, final_denoise=False)

    def left(t_switch, seed):
        def model(x_t, t, class_labels=None):
            return torch.where((t >= t_switch)[:, None], model_q(x_t, t, class_labels), model_p(x_t, t, class_labels))

        x = sample(model, process, pred, sampler, (n, 1), generator=torch.Generator().manual_seed(seed)).x
        return _binned_kl(process, p, x)

    floor = left(math.inf, 0)
    for t_switch, margin in [(0.0, 1.02), (0.1, 0.75)]:
        kl_prior, bound = _kl_bound_terms(process, p, q, t_switch)
        kl = left(t_switch, 1)
        print(f"s wrong for t >= {t_switch}: KL(p | q_sde) ~ {kl:.4f} <= bound {bound:.4f} "
              f"(KL(p_T | prior) = {kl_prior:.1e}); exact-score floor {floor:.4f}")
        assert kl > 10 * floor and kl <= margin * bound + floor


# -- score_sde's samplers exactly --------------------------------------------------------------------------


def test_fixedlarge_predictor_is_score_sde_reverse_diffusion_on_ve():
    """PredictorCorrector(predictor_variance='fixedlarge') is score_sde's ReverseDiffusionPredictor on VE:
    x <- x + (sigma_t^2 - sigma_s^2) score + sqrt(sigma_t^2 - sigma_s^2) z, checked step by step (a whole run
    amplifies float64 rounding through the 1 / sigma^2-steep score at small sigma)."""
    from diffusion_pl.processes.exploding import VE
    from diffusion_pl.sampling.noise import GeneratorNoise
    from diffusion_pl.sampling.base import points_at

    process, pred = VE(sigma_min=0.02, sigma_max=100.0), EpsPrediction()
    den = Denoiser(MIX2.model(process, pred), process, pred)
    large = PredictorCorrector(steps=30, grid=UniformGrid(), corrector_steps=0, predictor_variance="fixedlarge")
    small = PredictorCorrector(steps=30, grid=UniformGrid(), corrector_steps=0)
    points = points_at(process, large.times(process).tolist())
    x = process.prior_std() * torch.randn(200, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for k, (p_t, p_s) in enumerate(zip(points[:-1], points[1:])):
        var = p_t.sigma**2 - p_s.sigma**2
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
        ref = x + var * den.score(x, p_t.t) + math.sqrt(var) * z
        ours = large.step(den, x, p_t, p_s, GeneratorNoise(torch.Generator().manual_seed(k)), None)
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * p_s.sigma)  # the oracle posterior: ~1e-5 rounding
        # the default (ancestral, beta-tilde) predictor is another sampler
        other = small.step(den, x, p_t, p_s, GeneratorNoise(torch.Generator().manual_seed(k)), None)
        assert (other - ref).abs().max() > 0.05 * p_s.sigma
        x = ref
    with pytest.raises(ValueError, match="predictor_variance"):
        PredictorCorrector(predictor_variance="learned")


def test_uniform_grid_t_end_is_score_sde_sampling_eps():
    process = VPLinear(t_min=1e-5)
    t = UniformGrid(t_end=1e-3).times(process, 999)
    ref = torch.linspace(1.0, 1e-3, 1000, dtype=torch.float64)  # score_sde: linspace(sde.T, eps, sde.N)
    assert t[0] == 1.0 and t[-1] == 1e-3 and torch.allclose(t, ref, rtol=0, atol=1e-15)
    assert UniformGrid().times(process, 4)[-1] == 1e-5
    with pytest.raises(ValueError, match="t_end"):
        UniformGrid(t_end=2.0).times(process, 4)
    with pytest.raises(ValueError, match="t_end"):
        UniformGrid(t_end=-1.0)
