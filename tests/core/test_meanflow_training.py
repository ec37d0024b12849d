"""MeanFlow on the 2-D mixture: a small MLP trained with MeanFlowLoss generates in one and two steps.

The same MLP (its interval input unused) trained as a flow-matching model (DenoisingLoss, velocity) for the same
steps and sampled with the best ODE sampler at the same NFE is the comparison (docs/guide/few_step.md has
the numbers and the command: `pytest -s tests/core/test_meanflow_training.py`).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from diffusion_pl.losses import DenoisingLoss, LogitNormalTime, OutputMSE
from diffusion_pl.meanflow import MeanFlowLoss, MeanFlowTimes
from diffusion_pl.oracle import GaussianMixture
from diffusion_pl.prediction import VelocityPrediction, precondition
from diffusion_pl.processes.interpolants import RectifiedFlow
from diffusion_pl.sampling.api import sample
from diffusion_pl.sampling.dpm_solver import DPMSolverPP
from diffusion_pl.sampling.meanflow import MeanFlow
from diffusion_pl.sampling.ode import EulerODE, HeunODE

MIXTURE = GaussianMixture(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([[-1.0, -0.6], [1.0, -0.6], [0.0, 1.0]]),
                          torch.tensor([0.3, 0.2, 0.35]))
N_SAMPLES = 20000
STEPS = 2000


class IntervalMLP(nn.Module):
    """net(x_in, noise_label, y, interval=None): SiLU MLP on [x_in, sin/cos of both labels]; interval None = 0."""

    takes_interval = True

    def __init__(self, dim: int = 2, hidden: int = 128, num_freqs: int = 8) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.logspace(-3, 0.5, num_freqs))
        self.net = nn.Sequential(nn.Linear(dim + 4 * num_freqs, hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                 nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x_in, noise_label, class_labels=None, interval=None):
        interval = torch.zeros_like(noise_label) if interval is None else interval
        phase = torch.cat([noise_label[:, None] * self.freqs, interval[:, None] * self.freqs], 1)  # (B, 2F)
        return self.net(torch.cat([x_in, torch.sin(phase), torch.cos(phase)], 1))


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, num_directions: int = 128) -> float:
    """SW_2 between equal-size samples: RMS over random directions of the sorted-projection distance."""
    d = torch.randn(num_directions, a.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    d = d / d.norm(dim=1, keepdim=True)
    pa, pb = (a.double() @ d.T).sort(0).values, (b.double() @ d.T).sort(0).values
    return math.sqrt(((pa - pb) ** 2).mean().item())


def train(loss_fn, process, prediction, steps: int = STEPS):
    torch.manual_seed(0)
    net = IntervalMLP()
    model = precondition(net, process, prediction)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        loss = loss_fn(model, MIXTURE.sample(256, g).float(), process, prediction, generator=g).loss.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    return model.eval()


def distance(model, process, prediction, sampler) -> float:
    x = sample(model, process, prediction, sampler, (N_SAMPLES, 2), generator=torch.Generator().manual_seed(2)).x
    return sliced_wasserstein(x, MIXTURE.sample(N_SAMPLES, torch.Generator().manual_seed(100)))


# the best ODE sampler at each NFE (final_denoise off: at t_min = 0.001 of rectified flow it changes nothing)
ODE_SAMPLERS = {1: [EulerODE(1, final_denoise=False)],
                2: [EulerODE(2, final_denoise=False), HeunODE(1, final_denoise=False),
                    DPMSolverPP(2, final_denoise=False)]}


@pytest.mark.slow
def test_meanflow_mlp_generates_in_one_and_two_steps():
    process, prediction = RectifiedFlow(), VelocityPrediction()
    meanflow = train(MeanFlowLoss(MeanFlowTimes(ratio=0.5), norm_p=1.0), process, prediction)
    flow = train(DenoisingLoss(LogitNormalTime(), OutputMSE()), process, prediction)
    floor = sliced_wasserstein(MIXTURE.sample(N_SAMPLES, torch.Generator().manual_seed(3)),
                               MIXTURE.sample(N_SAMPLES, torch.Generator().manual_seed(100)))
    mf = {n: distance(meanflow, process, prediction, MeanFlow(n)) for n in (1, 2)}
    fm = {n: min(distance(flow, process, prediction, s) for s in ODE_SAMPLERS[n]) for n in (1, 2)}
    fm_many = distance(flow, process, prediction, HeunODE(20, final_denoise=False))
    mf_ode = distance(meanflow, process, prediction, HeunODE(20, final_denoise=False))
    print(f"SW2: exact-vs-exact {floor:.4f}; MeanFlow 1-step {mf[1]:.4f}, 2-step {mf[2]:.4f}, as a velocity model "
          f"Heun-20 {mf_ode:.4f}; flow matching best ODE 1-NFE {fm[1]:.4f}, 2-NFE {fm[2]:.4f}, Heun-20 {fm_many:.4f}")
    assert mf[1] < 0.1 and mf[2] < 0.1, mf
    assert mf[1] < 0.5 * fm[1] and mf[2] < 0.5 * fm[2], (mf, fm)
