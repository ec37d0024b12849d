"""sCM's continuous-time consistency training (diffusion_pl/scm.py) on the Gaussian-mixture oracle.

The exact consistency function (the oracle's PF-ODE integrated to t_min) makes the sCT tangent g = cos df/dtheta
zero in conditional expectation given x_t (dx/dtheta enters linearly and E[dx/dtheta | x_t] is the PF-ODE
velocity, along which f is constant), so the expected gradient vanishes for it and not for a function that is
not consistent (the denoiser E[x0 | x_t]).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffusion_pl.oracle import GaussianMixture
from diffusion_pl.prediction import VelocityPrediction, VPrediction
from diffusion_pl.processes.interpolants import RectifiedFlow, Trigonometric
from diffusion_pl.processes.variance_preserving import DDPMDiscrete, VPCosine
from diffusion_pl.scm import SCMLoss

MIXTURE = GaussianMixture(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([[-1.0, -0.6], [1.0, -0.6], [0.0, 1.0]]),
                          torch.tensor([0.3, 0.2, 0.35]))


class Perturbed(nn.Module):
    """model(x_t, t) = base(x_t, t) + phi(x_t, t) a_i with a per-sample parameter a_i = 0 (B, 3, 2): a.grad[i] is
    sample i's term of the sCT gradient, projected on six features (x_1, x_2, 1 per output, times sin(theta))."""

    def __init__(self, base, n: int) -> None:
        super().__init__()
        self.base = base
        self.a = nn.Parameter(torch.zeros(n, 3, 2, dtype=torch.float64))

    def forward(self, x_t, t, class_labels=None):
        phi = torch.cat([x_t, torch.ones_like(x_t[:, :1])], 1) * torch.sin(t)[:, None]  # (B, 3)
        return self.base(x_t, t, class_labels) + torch.einsum("bk,bkd->bd", phi, self.a)


def gradient_z_scores(base, process, prediction, n: int = 16384) -> torch.Tensor:
    """|mean| / standard error of the per-sample gradient terms, per feature (6,)."""
    model, g = Perturbed(base, n), torch.Generator().manual_seed(0)
    loss = SCMLoss(norm_c=None, warmup_steps=0, adaptive=False)  # the plain objective: its expectation is linear in g
    loss(model, MIXTURE.sample(n, g), process, prediction, generator=g).loss.sum().backward()
    terms = model.a.grad.flatten(1)  # (n, 6)
    return terms.mean(0).abs() / (terms.std(0) / n**0.5)


@pytest.mark.parametrize("process, prediction", [
    (Trigonometric(), VPrediction()),
    pytest.param(VPCosine(), VelocityPrediction(), marks=pytest.mark.slow)], ids=["trigflow_v", "vp_cosine_velocity"])
def test_exact_consistency_function_has_zero_expected_gradient(process, prediction):
    exact = gradient_z_scores(MIXTURE.consistency_model(process, prediction, steps=4), process, prediction)
    denoiser = gradient_z_scores(MIXTURE.model(process, prediction), process, prediction)
    assert exact.max() < 4.0, exact  # zero within Monte-Carlo error (measured: at most 1.3 standard errors)
    assert denoiser.max() > 20.0, denoiser  # a function that is not consistent gets pushed (measured: 77)


def test_loss_is_the_same_for_every_prediction_of_the_same_function():
    # F is read as alpha eps_hat - sigma x0_hat: the v and velocity networks of one function give one loss
    process, g = Trigonometric(), torch.Generator().manual_seed(0)
    x0, t = MIXTURE.sample(64, g), torch.rand(64, generator=g, dtype=torch.float64) * 0.9 + 0.05
    eps = torch.randn(64, 2, generator=g, dtype=torch.float64)
    losses = [SCMLoss(warmup_steps=0)(MIXTURE.model(process, p), x0, process, p, t=t, eps=eps).loss
              for p in (VPrediction(), VelocityPrediction())]
    torch.testing.assert_close(losses[0], losses[1])


def test_refuses_processes_that_are_not_trigflow():
    x0 = MIXTURE.sample(4).float()
    for process, words in [(RectifiedFlow(), "alpha^2 + sigma^2 = 1"), (DDPMDiscrete(), "continuous-time")]:
        with pytest.raises(ValueError, match=words.replace("^", r"\^").replace("+", r"\+")):
            SCMLoss()(MIXTURE.model(process, VPrediction()), x0, process, VPrediction())
    with pytest.raises(ValueError, match="warmup_steps"):
        SCMLoss(warmup_steps=-1)


@pytest.mark.slow
def test_adaptive_weight_learns_the_log_of_the_loss():
    # e^w L - w is smallest at w = -log L: with the network fixed, w learns the size of the unweighted loss
    process, prediction = Trigonometric(), VPrediction()
    loss = SCMLoss(warmup_steps=0)
    opt = torch.optim.Adam(loss.parameters(), lr=5e-2)
    model = MIXTURE.model(process, prediction)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        out = loss(model, MIXTURE.sample(512, g).float(), process, prediction, generator=g)
        opt.zero_grad()
        out.loss.mean().backward()
        opt.step()
    plain = SCMLoss(warmup_steps=0, adaptive=False)
    x0, t = MIXTURE.sample(4096, g).float(), torch.full((4096,), 0.5)
    mse = plain(model, x0, process, prediction, t=t, generator=g).loss.mean()
    w = loss.weight(torch.full((1,), 0.25 * torch.pi, dtype=torch.float64)).detach()
    assert abs(float(w) + float(torch.log(mse))) < 0.3, (float(w), float(mse))
