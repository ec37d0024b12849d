"""Few-step objectives (MeanFlow, sCM) and their diffusion baselines trained on the 2-D Gaussian mixture with small
MLPs, and their sample distances.

Shared by tests/core/test_meanflow_training.py, tests/core/test_scm_training.py and bench/bench_few_step.py (which
tabulates more samplers and NFE).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from diffusion_pl.losses import DenoisingLoss, LogitNormalTime, OutputMSE
from diffusion_pl.meanflow import MeanFlowLoss, MeanFlowTimes
from diffusion_pl.oracle import GaussianMixture
from diffusion_pl.prediction import VelocityPrediction, precondition
from diffusion_pl.processes.interpolants import RectifiedFlow
from diffusion_pl.sampling.api import sample
from diffusion_pl.sampling.dpm_solver import DPMSolverPP
from diffusion_pl.sampling.ode import EulerODE, HeunODE
from diffusion_pl.sampling.unipc import UniPC

MIXTURE = GaussianMixture(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([[-1.0, -0.6], [1.0, -0.6], [0.0, 1.0]]),
                          torch.tensor([0.3, 0.2, 0.35]))
PROCESS, PREDICTION = RectifiedFlow(), VelocityPrediction()


class IntervalMLP(nn.Module):
    """net(x_in, noise_label, y, interval=None): SiLU MLP on [x_in, sin/cos of both labels]; interval None = 0.

    The labels are 1000 t; the frequencies, 1 to 32 per unit t, keep u smooth in t: MeanFlow's target carries
    (t - r) d_t u, and with frequencies up to 3000 per unit t its training diverged."""

    takes_interval = True

    def __init__(self, dim: int = 2, hidden: int = 128, num_freqs: int = 8) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.logspace(-3, -1.5, num_freqs))
        self.net = nn.Sequential(nn.Linear(dim + 4 * num_freqs, hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                 nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x_in, noise_label, class_labels=None, interval=None):
        interval = torch.zeros_like(noise_label) if interval is None else interval
        phase = torch.cat([noise_label[:, None] * self.freqs, interval[:, None] * self.freqs], 1)  # (B, 2F)
        return self.net(torch.cat([x_in, torch.sin(phase), torch.cos(phase)], 1))


class TimeMLP(nn.Module):
    """net(x_in, noise_label, y): SiLU MLP on [x_in, sin/cos of the noise label 1000 t at low frequencies (0.3 to 10
    per unit t)], for sCM: high-frequency time features make dF/dt, hence its tangent, explode (the paper's
    Sec. 4.1)."""

    def __init__(self, dim: int = 2, hidden: int = 128, num_freqs: int = 8) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.logspace(-3.5, -2, num_freqs))
        self.net = nn.Sequential(nn.Linear(dim + 2 * num_freqs, hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                 nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x_in, noise_label, class_labels=None):
        phase = noise_label[:, None] * self.freqs
        return self.net(torch.cat([x_in, torch.sin(phase), torch.cos(phase)], 1))


def meanflow_loss() -> MeanFlowLoss:
    """Half the samples with r != t (py-meanflow's CIFAR-10 scripts use 75%, the paper's ImageNet 25%) and the plain
    squared error: on this mixture the adaptive weight (p = 1, 0.75, 0.5) left 2-step SW2 at 0.14-0.31 after 2000
    steps against 0.09 with p = 0 (its weights 1 / ||Delta||^2 bias the regression away from the conditional mean)."""
    return MeanFlowLoss(MeanFlowTimes(ratio=0.5), norm_p=0.0)


def flow_matching_loss() -> DenoisingLoss:
    """Flow matching with the same logit-normal times (velocity prediction, plain MSE)."""
    return DenoisingLoss(LogitNormalTime(), OutputMSE())


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, num_directions: int = 128) -> float:
    """SW_2 between equal-size samples: RMS over random directions of the sorted-projection distance."""
    d = torch.randn(num_directions, a.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    d = d / d.norm(dim=1, keepdim=True)
    pa, pb = (a.double() @ d.T).sort(0).values, (b.double() @ d.T).sort(0).values
    return math.sqrt(((pa - pb) ** 2).mean().item())


def train(loss_fn, steps: int, batch_size: int = 256, lr: float = 2e-3, seed: int = 0, net=IntervalMLP,
          process=PROCESS, prediction=PREDICTION):
    """`net()` trained with `loss_fn` for `steps` Adam steps (cosine-annealed lr) on fresh mixture draws; the loss's
    own parameters (sCM's adaptive weight) train with it, and a loss that takes the step (sCM's warm-up) gets it."""
    torch.manual_seed(seed)
    net = net()
    model = precondition(net, process, prediction)
    params = [*net.parameters(), *(loss_fn.parameters() if isinstance(loss_fn, nn.Module) else [])]
    opt = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed + 1)
    for step in range(steps):
        extra = {"step": step} if getattr(loss_fn, "takes_step", False) else {}
        loss = loss_fn(model, MIXTURE.sample(batch_size, g).float(), process, prediction, generator=g,
                       images_seen=step * batch_size, **extra).loss.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    return model.eval()


def distance(model, sampler, n: int, process=PROCESS, prediction=PREDICTION) -> float:
    """SW2 between `n` samples of `model` drawn with `sampler` and `n` fresh mixture samples."""
    x = sample(model, process, prediction, sampler, (n, 2), generator=torch.Generator().manual_seed(2)).x
    return sliced_wasserstein(x, MIXTURE.sample(n, torch.Generator().manual_seed(100)))


def floor(n: int) -> float:
    """SW2 between two independent exact `n`-sample sets: the best any model can score at this n."""
    return sliced_wasserstein(MIXTURE.sample(n, torch.Generator().manual_seed(3)),
                              MIXTURE.sample(n, torch.Generator().manual_seed(100)))


def ode_samplers(nfe: int) -> list:
    """The multistep ODE samplers that take exactly `nfe` evaluations, final_denoise off (at rectified flow's
    t_min = 0.001 it changes nothing): Euler, Heun (2 per step, even nfe only), DPM-Solver++(2M), UniPC-bh2."""
    samplers = [EulerODE(nfe, final_denoise=False), DPMSolverPP(nfe, final_denoise=False),
                UniPC(nfe, final_denoise=False)]
    return samplers + ([HeunODE(nfe // 2, final_denoise=False)] if nfe % 2 == 0 else [])
