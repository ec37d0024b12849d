"""Consistency training (ECT's schedule) and consistency sampling, against ECT's formulas and the exact oracle.

The exact consistency function of the Gaussian mixture's probability-flow ODE (GaussianMixture.consistency_function,
scipy's DOP853) is the reference: it scores lower on the consistency loss than perturbed maps, and its 1-step
samples lie at the exact-vs-exact SW2 floor.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from diffusion_pl.consistency import BOUNDARY_TOLERANCE, ConsistencyLoss, ECTSchedule, check_boundary
from diffusion_pl.oracle import output_for
from diffusion_pl.prediction import EDMPreconditioning, EpsPrediction, VelocityPrediction, X0Prediction
from diffusion_pl.processes.exploding import EDM, VE
from diffusion_pl.processes.interpolants import RectifiedFlow, Trigonometric
from diffusion_pl.processes.variance_preserving import VPLinear
from diffusion_pl.sampling.api import sample
from diffusion_pl.sampling.consistency import Consistency
from diffusion_pl.sampling.ode import HeunODE
from tests.core.test_mixture_training import MIXTURE, SIGMA_DATA, sliced_wasserstein

PROCESS, PREDICTION = EDM(), EDMPreconditioning(sigma_data=SIGMA_DATA)


def ect_r(t: torch.Tensor, stage: int, q=2.0, k=8.0, b=1.0) -> torch.Tensor:
    """locuslab/ect training/loss.py:45-50 (t_to_r_sigmoid), written out."""
    return torch.clamp(t * (1 - (1 / q ** (stage + 1)) * (1 + k * torch.sigmoid(-b * t))), min=0)


def consistency_model(f):
    """The model (x, t, y) -> F whose x0 output is f(x, t) under PREDICTION."""

    def model(x, t, class_labels=None):
        t = torch.as_tensor(t).expand(x.shape[0]).to(torch.float64)
        return output_for(f(x.to(torch.float64), t), x, t, PROCESS, PREDICTION)

    return model


# -- the boundary condition -----------------------------------------------------------------------
@pytest.mark.parametrize("process, prediction", [(EDM(), EDMPreconditioning()), (VPLinear(), EpsPrediction()),
                                                 (RectifiedFlow(t_max=0.99), VelocityPrediction())])
def test_parameterizations_whose_network_weight_vanishes_at_t_min_pass(process, prediction):
    check_boundary(process, prediction)
    t = torch.tensor([process.t_min], dtype=torch.float64)
    a_x0, b_x0, _, _ = prediction.coefficients(t, process)
    assert abs(float(process.alpha(t) * a_x0) - 1) < BOUNDARY_TOLERANCE and float(b_x0.abs()) < BOUNDARY_TOLERANCE


def test_x0_prediction_and_an_infinite_noise_level_are_refused_in_one_line():
    with pytest.raises(ValueError, match="X0Prediction .* not the identity") as err:
        ConsistencyLoss().check(EDM(), X0Prediction())
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="noise level sigma/alpha = inf at t_max"):
        ConsistencyLoss().check(RectifiedFlow(), VelocityPrediction())


def test_edm_preconditioning_is_the_identity_at_sigma_min_to_first_order():
    x = torch.randn(4, 2, dtype=torch.float64)
    f = torch.randn(4, 2, dtype=torch.float64)  # any network output
    t = torch.full((4,), 0.002, dtype=torch.float64)
    x0, _ = EDMPreconditioning(0.5).to_x0_eps(f, x, t, EDM())
    # c_out(0.002) = 0.002 (to 1e-5), c_skip = 1 - 1.6e-5
    assert ((x0 - x).abs() <= 0.002 * f.abs() + 1.7e-5 * x.abs()).all()


# -- ECT's mapping ---------------------------------------------------------------------------------
def test_the_mapping_is_ects_and_the_step_halves_every_stage():
    schedule = ECTSchedule(q=2.0, k=8.0, b=1.0, images_per_stage=1000)
    s_t = torch.exp(torch.linspace(-6, 4.4, 50, dtype=torch.float64))
    for stage in range(4):
        torch.testing.assert_close(schedule.r_noise_level(s_t, stage * 1000 + 999), ect_r(s_t, stage))
    gap = [s_t - schedule.r_noise_level(s_t, 1000 * stage) for stage in (3, 4)]
    big = s_t > 1.0  # away from the clamp at 0
    torch.testing.assert_close(gap[1][big], gap[0][big] / 2)
    assert ECTSchedule(q=256.0, k=0.0).r_noise_level(torch.tensor([80.0]), 0).item() == pytest.approx(80 * (1 - 1 / 256))


def test_pairs_share_eps_and_fall_back_to_x0_below_t_min():
    """x_r is x0 + s_r eps with the t-sample's eps; where s_r < sigma_min the target is x0 and w = 1 / (s_t - s_r)."""
    seen = []

    def model(x, t, class_labels=None):
        seen.append((x.clone(), t.clone()))
        return torch.zeros_like(x)

    loss = ConsistencyLoss(schedule=ECTSchedule(images_per_stage=10**9))
    x0 = torch.randn(3, 2)
    eps = torch.randn(3, 2)
    t = torch.tensor([0.002, 5.0, 20.0])
    out = loss(model, x0, PROCESS, PREDICTION, t=t, eps=eps)
    (x_t, t_in), (x_r, r_in) = seen
    s_r = ect_r(t.double(), 0)
    assert s_r[0] < 0.002 and (r_in[1:].double() - s_r[1:]).abs().max() < 1e-6
    torch.testing.assert_close((x_t - x0) / t[:, None], eps, atol=1e-4, rtol=1e-4)  # float32 x_t at sigma 0.002
    torch.testing.assert_close((x_r[1:] - x0[1:]) / r_in[1:, None], eps[1:])
    f_t, _ = PREDICTION.to_x0_eps(torch.zeros_like(x_t), x_t, t_in, PROCESS)
    f_r, _ = PREDICTION.to_x0_eps(torch.zeros_like(x_r), x_r, r_in, PROCESS)
    target = torch.cat([x0[:1], f_r[1:]])
    expected = (f_t - target).pow(2).sum(1).sqrt() / (t.double() - s_r).float()
    torch.testing.assert_close(out.loss.float(), expected)


def test_the_target_shares_the_predictions_dropout_mask_and_has_no_gradient():
    masks = []
    drop = nn.Dropout(0.5).train()
    weight = nn.Parameter(torch.ones(1))

    def model(x, t, class_labels=None):
        out = weight * drop(torch.ones_like(x))
        masks.append(out)
        return out

    torch.manual_seed(0)
    out = ConsistencyLoss(schedule=ECTSchedule(images_per_stage=1))(model, torch.randn(64, 2), PROCESS, PREDICTION,
                                                                      t=torch.full((64,), 5.0), images_seen=3)
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], torch.ones_like(masks[0]) * 2)
    assert masks[0].requires_grad and not masks[1].requires_grad
    out.loss.sum().backward()
    assert weight.grad is not None


def test_pseudo_huber_constant_defaults_to_icts():
    def model(x, t, class_labels=None):
        return torch.zeros_like(x)

    x0, eps, t = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4), torch.full((5,), 2.0)
    c = 0.00054 * math.sqrt(48)
    huber = ConsistencyLoss(c=None)(model, x0, PROCESS, PREDICTION, t=t, eps=eps).loss
    l2 = ConsistencyLoss(distance="l2")(model, x0, PROCESS, PREDICTION, t=t, eps=eps).loss
    s_t = torch.tensor(2.0, dtype=torch.float64)
    w = float(1 / (s_t - ect_r(s_t, 0)))
    torch.testing.assert_close(huber, (torch.sqrt(l2 / w + c**2) - c) * w)


# -- the oracle --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_exact_consistency_function_minimises_the_loss():
    """With f exact (the PF-ODE integrated to t_min) the loss is lower than with f scaled or shifted by 2%."""
    g = torch.Generator().manual_seed(0)
    n = 256
    x0 = MIXTURE.sample(n, g)
    eps = torch.randn(n, 2, generator=g, dtype=torch.float64)
    t = torch.exp(-1.1 + 2.0 * torch.randn(n, generator=g, dtype=torch.float64)).clamp(0.002, 80.0)
    cache = {}

    def exact(x, tt):
        key = (x.numpy().tobytes(), tt.numpy().tobytes())
        if key not in cache:
            cache[key] = MIXTURE.consistency_function(x, tt, PROCESS, rtol=1e-9, atol=1e-9)
        return cache[key]

    loss = ConsistencyLoss(schedule=ECTSchedule(images_per_stage=1))
    values = {}
    for name, f in [("exact", exact), ("scaled", lambda x, tt: 1.02 * exact(x, tt)),
                    ("shrunk", lambda x, tt: 0.98 * exact(x, tt)), ("shifted", lambda x, tt: exact(x, tt) + 0.02)]:
        values[name] = loss(consistency_model(f), x0, PROCESS, PREDICTION, t=t, eps=eps, images_seen=4).loss.mean()
    assert all(values["exact"] < values[name] for name in ("scaled", "shrunk", "shifted")), values


@pytest.mark.parametrize("process", [RectifiedFlow(), Trigonometric(), VE(), EDM()],
                         ids=["rectified-flow", "trigflow", "ve", "edm"])
def test_the_exact_flow_is_the_converged_ode_solution(process):
    """GaussianMixture.flow_to_t_min from x_T (alpha(t_max) = 0 on rectified flow and TrigFlow, t_min = 0 on VE)
    against Heun's method on the exact velocity from the same x_T: Heun's error falls about 4x when its steps double
    (second order) towards it, and is below 4e-4 at 400 steps. (DDPMDiscrete, whose alpha(t) has kinks that Heun in
    t does not resolve, is checked against DPM-Solver++ in lambda in tests/cli/test_bench_scripts.py.)"""
    z = torch.randn(200, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = MIXTURE.flow_to_t_min(process.prior_std() * z, process.t_max, process, rtol=1e-10, atol=1e-10)
    model, prediction = MIXTURE.model(process, VelocityPrediction()), VelocityPrediction()
    errors = []
    for steps in (200, 400):
        heun = sample(model, process, prediction, HeunODE(steps, final_denoise=False), (200, 2), noise=z,
                      dtype=torch.float64).x
        errors.append(float((heun - exact).norm(dim=1).max()))
    assert errors[1] < 4e-4 and errors[0] / errors[1] > 3.5, errors


@pytest.mark.slow
def test_one_step_sampling_with_the_exact_map_is_at_the_floor():
    n = 4000
    exact = consistency_model(lambda x, tt: MIXTURE.consistency_function(x, tt, PROCESS, rtol=1e-8, atol=1e-8))
    out = sample(exact, PROCESS, PREDICTION, Consistency(1), (n, 2), dtype=torch.float64,
                 generator=torch.Generator().manual_seed(2))
    reference = MIXTURE.sample(n, torch.Generator().manual_seed(100))
    floor = sliced_wasserstein(MIXTURE.sample(n, torch.Generator().manual_seed(7)), reference)
    one_step = sliced_wasserstein(out.x, reference)
    denoised = sliced_wasserstein(sample(MIXTURE.model(PROCESS, PREDICTION), PROCESS, PREDICTION, Consistency(1),
                                         (n, 2), generator=torch.Generator().manual_seed(2)).x, reference)
    assert out.nfe == 1 and one_step < 1.5 * floor, (one_step, floor)
    assert denoised > 5 * floor  # E[x0 | x_T] (the diffusion denoiser) collapses to the mean: not a sampler


# -- the sampler -------------------------------------------------------------------------------------
def test_multistep_sampling_renoises_with_fresh_noise_at_the_given_levels():
    calls = []

    def model(x, t, class_labels=None):
        calls.append((x.clone(), t.clone()))
        return torch.zeros_like(x)

    sampler = Consistency(steps=2, noise_levels=[0.821])
    torch.testing.assert_close(sampler.times(PROCESS), torch.tensor([80.0, 0.821], dtype=torch.float64))
    out = sample(model, PROCESS, PREDICTION, sampler, (5, 2), seeds=list(range(5)))
    (x1, t1), (x2, t2) = calls
    assert out.nfe == 2 and float(t1[0]) == 80.0 and float(t2[0]) == pytest.approx(0.821)
    f1, _ = PREDICTION.to_x0_eps(torch.zeros_like(x1), x1, t1, PROCESS)
    z = (x2 - f1) / 0.821  # fresh noise, not the prior's
    assert abs(float(z.std()) - 1) < 0.8 and not torch.allclose(z, x1 / PROCESS.prior_std(), atol=1e-3)
    f2, _ = PREDICTION.to_x0_eps(torch.zeros_like(x2), x2, t2, PROCESS)
    torch.testing.assert_close(out.x, f2)
    assert len(Consistency(steps=3).times(PROCESS)) == 3 and Consistency(3).times(PROCESS)[0] == 80.0


@pytest.mark.parametrize("kwargs, match", [({"steps": 2, "noise_levels": [1.0, 0.5]}, "expected steps - 1 = 1"),
                                           ({"steps": 3, "noise_levels": [0.5, 1.0]}, "strictly decreasing")])
def test_bad_noise_levels_are_one_line_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Consistency(**kwargs)
    with pytest.raises(ValueError, match="must lie inside"):
        Consistency(steps=2, noise_levels=[100.0]).times(PROCESS)


def test_the_sampler_is_a_cli_spec():
    from diffusion_pl.cli.sampler_spec import resolve_sampler

    sampler, spec = resolve_sampler("consistency", steps=1)
    assert isinstance(sampler, Consistency) and spec["class_path"] == "diffusion_pl.sampling.consistency.Consistency"
    sampler, spec = resolve_sampler('{"class_path": "consistency", "init_args": {"steps": 2, "noise_levels": [0.821]}}')
    assert sampler.noise_levels == [0.821] and spec["init_args"]["noise_levels"] == [0.821]
