"""Parity with diffusers' schedulers: the same eps-network, the same noise, the same samples (docs/design.md).

DDPMDiscrete (1000 linear betas 1e-4..0.02) is diffusers' default DDPM schedule; its noise label
t N - 1 is diffusers' integer timestep, so a timestep k is the process time (k + 1) / 1000.
diffusers is a test-only dependency.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffusion_pl.guidance import Guidance
from diffusion_pl.prediction import EpsPrediction
from diffusion_pl.processes.variance_preserving import DDPMDiscrete
from diffusion_pl.sampling.posterior import DDIM, DDPM
from diffusion_pl.sampling.dpm_solver import DPMSolverPP
from diffusion_pl.sampling.grids import ExplicitGrid, TimestepGrid, UniformGrid
from diffusion_pl.sampling.api import sample

diffusers = pytest.importorskip("diffusers")
# diffusers 0.42 calls np.array(tensor, copy=False) in DPMSolverMultistepScheduler: NumPy 2 warns, not our code
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SHAPE = (4, 3, 8, 8)
BETAS = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")


class EpsNet(nn.Module):
    """A fixed smooth eps(x, timestep): the exact eps of N(0, 0.5^2 I) data plus a small seeded conv net.

    The Gaussian part keeps samples at unit scale (a random net alone would make x0_hat explode);
    the conv part makes the function non-trivial. alpha_bar is interpolated between integer
    timesteps, so eps is defined (and smooth) at our float32 noise labels too.
    """

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():  # seeded weights without touching the caller's global RNG
            torch.manual_seed(0)
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
        betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
        self.register_buffer("alpha_bar", torch.cumprod(1 - betas, 0))

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        k = timestep.to(torch.float64).reshape(-1).expand(len(x)).clamp(0, 999)
        lo = k.floor().long().clamp(max=998)
        abar = self.alpha_bar[lo] + (k - lo) * (self.alpha_bar[lo + 1] - self.alpha_bar[lo])
        a, s = abar.sqrt().float()[:, None, None, None], (1 - abar).sqrt().float()[:, None, None, None]
        gaussian = s * x / (0.25 * a**2 + s**2)
        return gaussian + 0.1 * torch.tanh(self.conv(x)) * torch.sin(k / 300.0).float()[:, None, None, None]


@pytest.fixture(scope="module")
def setup():
    net = EpsNet().eval()
    process = DDPMDiscrete(1000, 1e-4, 0.02)

    def model(x_t, t, class_labels=None):
        return net(x_t, process.noise_label(t))

    return net, process, model


def _diffusers_loop(scheduler, net, x, generator, **step_kwargs):
    with torch.no_grad():
        for k in scheduler.timesteps:
            x = scheduler.step(net(x, k), k, x, generator=generator, **step_kwargs).prev_sample
    return x


def _stochastic_pair(setup, scheduler, sampler, seed, clip_x0=None, **step_kwargs):
    """(ours, diffusers') from the same x_T and the same generator stream for the step noise."""
    net, process, model = setup
    g = torch.Generator().manual_seed(seed)
    theirs = _diffusers_loop(scheduler, net, torch.randn(SHAPE, generator=g), g, **step_kwargs)
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(SHAPE, generator=g)
    ours = sample(model, process, EpsPrediction(), sampler, SHAPE, noise=x_T, generator=g,
                  guidance=Guidance(clip_x0=clip_x0))
    return ours, theirs


def _times(scheduler) -> list[float]:
    return ((scheduler.timesteps.to(torch.float64) + 1) / 1000).tolist()


def _assert_parity(ours, theirs, nfe: int, label: str) -> None:
    """Our sampler used `nfe` network evaluations and lands within 1e-4 of diffusers' sample."""
    assert ours.nfe == nfe
    diff = float((ours.x - theirs).abs().max())
    print(f"{label}: max |ours - diffusers| = {diff:.2e}, sample std {float(theirs.std()):.2f}")
    assert diff <= 1e-4


@pytest.mark.parametrize("clip", [False, True])
def test_ddpm_ancestral_matches_diffusers(setup, clip):
    scheduler = diffusers.DDPMScheduler(**BETAS, clip_sample=clip, clip_sample_range=1.0, variance_type="fixed_small")
    scheduler.set_timesteps(1000)
    # all 1000 steps: t = 1, 0.999, ..., 0.001 (999 posterior steps), then diffusers' last step to x0
    ours, theirs = _stochastic_pair(setup, scheduler, DDPM(steps=1000, grid=UniformGrid()), seed=0,
                                    clip_x0=1.0 if clip else None)
    _assert_parity(ours, theirs, 1000, f"DDPM 1000 steps, clip={clip}")


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_matches_diffusers(setup, eta):
    scheduler = diffusers.DDIMScheduler(**BETAS, clip_sample=False, set_alpha_to_one=True, steps_offset=0,
                                        timestep_spacing="leading")
    scheduler.set_timesteps(50)  # timesteps 980, 960, ..., 0
    # set_alpha_to_one: the last step goes from timestep 0 to alpha = 1, i.e. our final denoise
    sampler = DDIM(steps=50, grid=ExplicitGrid(_times(scheduler)), eta=eta)
    ours, theirs = _stochastic_pair(setup, scheduler, sampler, seed=1, eta=eta)
    _assert_parity(ours, theirs, 50, f"DDIM 50 steps, eta={eta}")


@pytest.mark.parametrize("steps", [10, 20])
def test_dpm_solver_pp_2m_matches_diffusers(setup, steps):
    net, process, model = setup
    scheduler = diffusers.DPMSolverMultistepScheduler(**BETAS, algorithm_type="dpmsolver++", solver_order=2,
                                                      solver_type="midpoint", lower_order_final=True,
                                                      final_sigmas_type="zero", timestep_spacing="linspace")
    scheduler.set_timesteps(steps)  # timesteps 999, ..., then a last step to sigma = 0
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    theirs = _diffusers_loop(scheduler, net, x_T * scheduler.init_noise_sigma, None)
    # diffusers' last step to sigma = 0 is first order from x0_hat: our final denoise
    sampler = DPMSolverPP(steps=steps - 1, grid=ExplicitGrid(_times(scheduler)))
    ours = sample(model, process, EpsPrediction(), sampler, SHAPE, noise=x_T)
    _assert_parity(ours, theirs, steps, f"DPM-Solver++(2M) {steps} steps")


# -- DDPM's reverse variances, learned variance, and diffusers' timestep spacings ------------------------------


class LearnedVarianceNet(EpsNet):
    """EpsNet plus 3 raw variance channels r in [-1, 1] (out_channels = 2 C, as ADM / DiT with learn_sigma)."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(1)
            self.var_conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        k = timestep.to(torch.float32).reshape(-1).expand(len(x))
        raw = torch.tanh(self.var_conv(x)) * torch.cos(k / 200.0)[:, None, None, None]
        return torch.cat([super().forward(x, timestep), raw], dim=1)


@pytest.fixture(scope="module")
def learned_setup():
    net = LearnedVarianceNet().eval()
    process = DDPMDiscrete(1000, 1e-4, 0.02)
    return net, process, lambda x_t, t, class_labels=None: net(x_t, process.noise_label(t))


DDPM_CASES = [  # (our variance, diffusers' variance_type, steps, spacing)
    ("fixedsmall", "fixed_small", 1000, "leading"),
    ("fixedlarge", "fixed_large", 1000, "leading"),  # Ho et al.'s CIFAR-10 protocol (with clipping)
    ("learned", "learned_range", 1000, "leading"),
    ("fixedlarge", "fixed_large", 100, "leading"),  # respaced: the step's own beta 1 - abar_t / abar_s
    ("learned", "learned_range", 100, "leading"),
    ("fixedsmall", "fixed_small", 100, "linspace"),
]


@pytest.mark.parametrize("variance, variance_type, steps, spacing", DDPM_CASES,
                         ids=[f"{v}-{n}-{s}" for v, _, n, s in DDPM_CASES])
def test_ddpm_variances_match_diffusers(setup, learned_setup, variance, variance_type, steps, spacing):
    scheduler = diffusers.DDPMScheduler(**BETAS, clip_sample=True, clip_sample_range=1.0, variance_type=variance_type,
                                        timestep_spacing=spacing)
    scheduler.set_timesteps(steps)
    # steps = 1000: DDPM's default grid, every timestep 999..0 (one network evaluation each, the last to x0)
    sampler = DDPM(variance=variance) if steps == 1000 else DDPM(steps=steps, grid=TimestepGrid(spacing),
                                                                 variance=variance)
    pair = learned_setup if variance == "learned" else setup
    assert sampler.times(pair[1]).tolist() == _times(scheduler)
    ours, theirs = _stochastic_pair(pair, scheduler, sampler, seed=3, clip_x0=1.0)
    _assert_parity(ours, theirs, steps, f"DDPM {variance} {steps} steps ({spacing})")


@pytest.mark.parametrize("spacing, offset, eta", [("leading", 0, 0.0), ("leading", 1, 0.5), ("trailing", 0, 0.0),
                                                  ("trailing", 0, 0.5)])
def test_ddim_timestep_spacings_match_diffusers(setup, spacing, offset, eta):
    scheduler = diffusers.DDIMScheduler(**BETAS, clip_sample=False, set_alpha_to_one=True, steps_offset=offset,
                                        timestep_spacing=spacing)
    scheduler.set_timesteps(50)  # leading: 980 (+1), ..., 0 (+1); trailing: 999, 979, ..., 19
    sampler = DDIM(steps=50, grid=TimestepGrid(spacing, steps_offset=offset), eta=eta)
    assert sampler.times(setup[1]).tolist() == _times(scheduler)
    ours, theirs = _stochastic_pair(setup, scheduler, sampler, seed=4, eta=eta)
    _assert_parity(ours, theirs, 50, f"DDIM 50 steps, {spacing} (offset {offset}), eta={eta}")


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_timestep_grid_is_diffusers_set_timesteps(spacing):
    for n in (1, 2, 3, 7, 16, 30, 50, 333, 999, 1000):  # 16: N / n = 62.5, so rounding meets exact halves
        scheduler = diffusers.DDPMScheduler(**BETAS, timestep_spacing=spacing)
        scheduler.set_timesteps(n)
        assert TimestepGrid(spacing).timesteps(1000, n).tolist() == scheduler.timesteps.tolist(), n
