"""sCT on the 2-D mixture: a small MLP trained with SCMLoss generates in one step (`pytest -s` prints the numbers
docs/guide/few_step.md quotes)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffusion_pl.prediction import Denoiser, VPrediction, precondition
from diffusion_pl.processes.interpolants import Trigonometric
from diffusion_pl.scm import SCMLoss
from tests.support.meanflow import MIXTURE, sliced_wasserstein

N_SAMPLES = 10000  # samples compared by SW2 (as the MeanFlow training test)

STEPS = 2000


class MLP(nn.Module):
    """net(x_in, noise_label, y): SiLU MLP on [x_in, sin/cos of the noise label 1000 t at low frequencies (0.3 to 10
    per unit t): high-frequency time features make dF/dt, hence the tangent, explode (the paper's Sec. 4.1)."""

    def __init__(self, dim: int = 2, hidden: int = 128, num_freqs: int = 8) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.logspace(-3.5, -2, num_freqs))
        self.net = nn.Sequential(nn.Linear(dim + 2 * num_freqs, hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                 nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x_in, noise_label, class_labels=None):
        phase = noise_label[:, None] * self.freqs
        return self.net(torch.cat([x_in, torch.sin(phase), torch.cos(phase)], 1))


def one_step(model, process, prediction) -> torch.Tensor:
    """The consistency model's one-step sample f(x_T, t_max) = x0_hat at t_max from the prior."""
    x_T = process.prior_sample((N_SAMPLES, 2), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return Denoiser(model, process, prediction)(x_T, torch.tensor(process.t_max)).x0


@pytest.mark.slow
def test_sct_mlp_generates_in_one_step():
    process, prediction = Trigonometric(), VPrediction()
    torch.manual_seed(0)
    net = MLP()
    model = precondition(net, process, prediction)
    loss_fn = SCMLoss(warmup_steps=STEPS // 4)
    reference = MIXTURE.sample(N_SAMPLES, torch.Generator().manual_seed(100))
    before = sliced_wasserstein(one_step(model, process, prediction), reference)
    opt = torch.optim.Adam([*net.parameters(), *loss_fn.parameters()], lr=2e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, STEPS)
    g = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        loss = loss_fn(model, MIXTURE.sample(256, g).float(), process, prediction, generator=g, step=step).loss.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    after = sliced_wasserstein(one_step(model, process, prediction), reference)
    floor = sliced_wasserstein(MIXTURE.sample(N_SAMPLES, torch.Generator().manual_seed(3)), reference)
    print(f"SW2 at 1 step: untrained {before:.4f}, after {STEPS} sCT steps {after:.4f}; exact-vs-exact {floor:.4f}")
    assert after < 0.2 * before and after < 0.15, (before, after)
