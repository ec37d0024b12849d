"""DPM-Solver++ (2M, 3M, SDE) and UniPC: parity with diffusers' schedulers on the oracle, and their weights.

The Gaussian-mixture oracle on DDPMDiscrete (diffusers' default betas) is the network for both sides;
diffusers' integer timestep k is the process time (k + 1) / 1000 (tests/core/test_sampling_parity.py).
diffusers computes its coefficients in float32, so parity is to 2e-5 on samples of unit scale.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy.integrate import quad

from diffusion_pl.cli.sampler_spec import resolve_sampler
from diffusion_pl.oracle import GaussianMixture
from diffusion_pl.prediction import EpsPrediction, X0Prediction
from diffusion_pl.processes.variance_preserving import DDPMDiscrete
from diffusion_pl.sampling.api import sample
from diffusion_pl.sampling.base import Point, points_at
from diffusion_pl.sampling.dpm_solver import DPMSolverPP, DPMSolverPPSDE, dpm_update
from diffusion_pl.sampling.grids import ExplicitGrid, LogSNRGrid
from diffusion_pl.sampling.unipc import UniPC

diffusers = pytest.importorskip("diffusers")
# diffusers 0.42 calls np.array(tensor, copy=False) in DPMSolverMultistepScheduler: NumPy 2 warns, not our code
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

BETAS = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
N, DIM = 256, 16
MIX = GaussianMixture.random(3, DIM, seed=3, spread=0.5, std_range=(0.1, 0.2))
PROCESS, PRED = DDPMDiscrete(1000, 1e-4, 0.02), EpsPrediction()
MODEL = MIX.model(PROCESS, PRED)


def _eps(x, k):
    return MODEL(x, torch.full((len(x),), (int(k) + 1) / 1000.0), None)


def _diffusers(scheduler, steps: int, seed: int, stochastic: bool = False) -> torch.Tensor:
    scheduler.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, DIM, generator=g)
    for k in scheduler.timesteps:
        extra = {"generator": g} if stochastic else {}
        x = scheduler.step(_eps(x, k), k, x, **extra).prev_sample
    return x


def _ours(sampler, seed: int):
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(N, DIM, generator=g)
    return sample(MODEL, PROCESS, PRED, sampler, (N, DIM), noise=x_T, generator=g)


def _grid(scheduler, sigma_min: bool = False) -> ExplicitGrid:
    """diffusers' timesteps as times; with final_sigmas_type="sigma_min" also its last sigma, timestep 0's."""
    times = ((scheduler.timesteps.to(torch.float64) + 1) / 1000).tolist()
    return ExplicitGrid(times + ([0.001] if sigma_min else []))


def _check(ours, theirs, nfe: int, tol: float = 2e-5) -> None:
    assert ours.nfe == nfe
    assert torch.isfinite(theirs).all()
    assert float((ours.x - theirs).abs().max()) <= tol


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("steps", [5, 10, 20])
def test_dpm_solver_pp_matches_diffusers(order, steps):
    sched = diffusers.DPMSolverMultistepScheduler(**BETAS, algorithm_type="dpmsolver++", solver_order=order)
    theirs = _diffusers(sched, steps, seed=0)
    _check(_ours(DPMSolverPP(steps=steps - 1, grid=_grid(sched), order=order), seed=0), theirs, steps)


@pytest.mark.parametrize("order", [2, 3])
def test_dpm_solver_pp_without_final_denoise_is_diffusers_sigma_min(order):
    # the run's last evaluation is then a grid interval, which lower_order_final makes first order
    sched = diffusers.DPMSolverMultistepScheduler(**BETAS, algorithm_type="dpmsolver++", solver_order=order,
                                                  final_sigmas_type="sigma_min")
    theirs = _diffusers(sched, 8, seed=0)
    sampler = DPMSolverPP(steps=8, grid=_grid(sched, sigma_min=True), order=order, final_denoise=False)
    _check(_ours(sampler, seed=0), theirs, 8)


@pytest.mark.parametrize("steps", [5, 10])
def test_sde_dpm_solver_pp_2m_matches_diffusers_with_the_same_noise(steps):
    sched = diffusers.DPMSolverMultistepScheduler(**BETAS, algorithm_type="sde-dpmsolver++", solver_order=2)
    theirs = _diffusers(sched, steps, seed=1, stochastic=True)
    ours = _ours(DPMSolverPPSDE(steps=steps - 1, grid=_grid(sched), order=2), seed=1)
    _check(ours, theirs, steps)
    # the noise matters: another stream gives other samples
    assert float((_ours(DPMSolverPPSDE(steps=steps - 1, grid=_grid(sched)), seed=2).x - theirs).abs().max()) > 0.1


@pytest.mark.parametrize("variant", ["bh2", "bh1"])
@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("steps", [5, 10, 20])
def test_unipc_matches_diffusers(variant, order, steps):
    if variant == "bh1":
        # diffusers' bh1 step to sigma = 0 is NaN (B(h) = -h = -inf times 0): compare on its sigma_min schedule
        sched = diffusers.UniPCMultistepScheduler(**BETAS, solver_order=order, solver_type="bh1",
                                                  final_sigmas_type="sigma_min")
        sampler = UniPC(steps=steps, grid=None, order=order, variant="bh1", final_denoise=False)
        theirs = _diffusers(sched, steps, seed=0)
        sampler.grid = _grid(sched, sigma_min=True)
    else:
        sched = diffusers.UniPCMultistepScheduler(**BETAS, solver_order=order, solver_type="bh2")
        theirs = _diffusers(sched, steps, seed=0)
        sampler = UniPC(steps=steps - 1, grid=_grid(sched), order=order)
    _check(_ours(sampler, seed=0), theirs, steps)


def test_unipc_disable_corrector_matches_diffusers():
    sched = diffusers.UniPCMultistepScheduler(**BETAS, solver_order=3, disable_corrector=[0, 3])
    theirs = _diffusers(sched, 10, seed=0)
    _check(_ours(UniPC(steps=9, grid=_grid(sched), order=3, disable_corrector=[0, 3]), seed=0), theirs, 10)
    with_corrector = _ours(UniPC(steps=9, grid=_grid(sched), order=3), seed=0).x
    assert float((with_corrector - theirs).abs().max()) > 1e-4  # the corrector changes the samples


# -- the weights of the 3M step ----------------------------------------------------------------------------


def _point(lam: float) -> Point:
    """A VP point (alpha^2 + sigma^2 = 1) at half log-SNR lam; the derivatives do not enter these steps."""
    alpha = 1.0 / math.sqrt(1.0 + math.exp(-2.0 * lam))
    return Point(t=0.0, alpha=alpha, sigma=alpha * math.exp(-lam), d_alpha=0.0, d_sigma=0.0, g2=0.0)


def _exact_step(f, x_t: float, lam_t: float, lam_s: float, gamma: float) -> float:
    """x_s of the ODE (gamma = 0) or of the SDE's mean (gamma = 1) for x0_hat = f(lambda), by quadrature."""
    p_t, p_s = _point(lam_t), _point(lam_s)
    h = lam_s - lam_t
    integral = quad(lambda lam: (1 + gamma) * math.exp(-(1 + gamma) * (lam_s - lam)) * f(lam), lam_t, lam_s)[0]
    return (p_s.sigma / p_t.sigma) * math.exp(-gamma * h) * x_t + p_s.alpha * integral


@pytest.mark.parametrize("exact_quadratic", [False, True])
@pytest.mark.parametrize("gamma", [0.0, 1.0])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_dpm_update_weights(order, gamma, exact_quadratic):
    lams = [-1.3, -0.6, -0.1, 0.7]  # three evaluations, then the step to 0.7 (uneven spacing)
    p_t, p_s = _point(lams[2]), _point(lams[3])

    def step(f):
        history = [(lam, torch.tensor([f(lam)], dtype=torch.float64)) for lam in lams[:3]]
        x_t = torch.tensor([0.4], dtype=torch.float64)
        return float(dpm_update(x_t, p_t, p_s, history, order, gamma, exact_quadratic))

    def linear(lam):
        return 0.3 - 0.8 * lam

    def quadratic(lam):
        return linear(lam) + 0.5 * (lam - lams[2]) ** 2  # centred at lambda_t: D1 sees only the linear part

    def constant(lam):
        return 0.3

    # every order is exact for a constant x0_hat; the midpoint 2M step is not exact for a linear one (its
    # D1 weight (1 - e^-H) / 2 is the exact one to first order in h only), the 3M step is; the published 3M
    # step takes the quadratic part at half the weight that makes it exact for a quadratic x0_hat, the
    # exact_quadratic one at that weight
    exact = {f: _exact_step(f, 0.4, lams[2], lams[3], gamma) for f in (constant, linear, quadratic)}
    assert step(constant) == pytest.approx(exact[constant], abs=1e-12)
    if order == 2:
        assert abs(step(linear) - exact[linear]) > 1e-3
    if order == 3:
        assert step(linear) == pytest.approx(exact[linear], abs=1e-12)
        share = 1.0 if exact_quadratic else 0.5
        assert step(quadratic) - step(linear) == pytest.approx(share * (exact[quadratic] - exact[linear]), rel=1e-9)


def _quadratic_x0(x, t, class_labels):
    """An x0-prediction network whose x0_hat is 0.3 - 0.8 lambda + 0.05 lambda^2 at every x."""
    lam = torch.tensor([p.lam for p in points_at(PROCESS, t.tolist())], dtype=x.dtype)[:, None]
    return (0.3 - 0.8 * lam + 0.05 * lam**2).expand_as(x)


@pytest.mark.parametrize("exact_quadratic", [False, True])
def test_exact_quadratic_3m_run_solves_the_ode_of_a_quadratic_x0_hat_exactly(exact_quadratic):
    # the warm-up steps (orders 1 and 2) are not exact for a quadratic x0_hat; from the third grid time on
    # every step is 3M (lower_order_final off), so the run from there on must be the exact ODE flow
    times = LogSNRGrid().times(PROCESS, 8).tolist()
    x_T = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def run(ts):
        sampler = DPMSolverPP(steps=len(ts) - 1, grid=ExplicitGrid(ts), order=3, final_denoise=False,
                              lower_order_final=False, exact_quadratic=exact_quadratic)
        return sample(_quadratic_x0, PROCESS, X0Prediction(), sampler, (4, 3), noise=x_T, dtype=torch.float64).x

    p_2, p_end = points_at(PROCESS, [times[2], times[-1]])
    flow = quad(lambda lam: math.exp(lam) * (0.3 - 0.8 * lam + 0.05 * lam**2), p_2.lam, p_end.lam,
                epsabs=0.0, epsrel=1e-13)[0]
    exact = (p_end.sigma / p_2.sigma) * run(times[:3]) + p_end.sigma * flow
    error = float((run(times) - exact).abs().max())
    if exact_quadratic:
        assert error < 1e-12
    else:
        assert error > 1e-3


# -- seeds, arguments and the --sampler spec ----------------------------------------------------------------


def test_sde_solver_sample_depends_on_its_seed_only():
    sampler = DPMSolverPPSDE(steps=6, order=3)
    batch = sample(MODEL, PROCESS, PRED, sampler, (3, DIM), seeds=[5, 6, 7]).x
    alone = sample(MODEL, PROCESS, PRED, sampler, (1, DIM), seeds=[6]).x
    assert torch.equal(batch[1:2], alone)
    assert not torch.equal(batch[0], batch[1])


@pytest.mark.parametrize("make, message", [
    (lambda: DPMSolverPP(order=4), "order must be 1, 2 or 3, got 4"),
    (lambda: DPMSolverPPSDE(order=True), "order must be 1, 2 or 3"),
    (lambda: UniPC(order=0), "order must be 1, 2 or 3, got 0"),
    (lambda: UniPC(variant="bh3"), "variant must be 'bh1' or 'bh2', got 'bh3'"),
])
def test_bad_arguments_are_refused_in_one_line(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("text, cls, order", [
    ("dpmsolverpp", DPMSolverPP, 2),
    ('{"class_path": "dpmsolverpp", "init_args": {"order": 3}}', DPMSolverPP, 3),
    ("dpmsolverppsde", DPMSolverPPSDE, 2),
    ("unipc", UniPC, 2),
    ('{"class_path": "diffusion_pl.UniPC", "init_args": {"order": 3, "variant": "bh1"}}', UniPC, 3),
])
def test_sampler_spec_builds_the_multistep_solvers(text, cls, order):
    sampler, spec = resolve_sampler(text, steps=9)
    assert type(sampler) is cls and sampler.order == order and sampler.steps == 9
    assert spec["class_path"] == f"{cls.__module__}.{cls.__name__}" and spec["init_args"]["order"] == order
