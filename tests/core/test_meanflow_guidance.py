"""MeanFlow with classifier-free guidance folded into the target (Geng et al. 2025, Sec. 4.2), against the exact
average velocities of a class-conditional Gaussian mixture (`diffusion_pl.oracle.GuidedMixture`).

The target is affine in the conditional velocity v_c, so its mean given (x_t, label) is the target at the posterior
means of (x0, eps): where that target equals the model's u, u is the regression's fixed point (the minimiser of
E ||u - sg(target)||^2 given x_t). These tests check, at those posterior means, that the exact average velocity of
the *guided* field w' v(x | c) + (1 - w') v(x), w' = w / (1 - kappa), is that fixed point and the unguided one is
not; that the guidance is applied only inside guidance_t_interval and never to samples with the null label; that
the network's own velocities enter without gradient; plus the one-line refusals and the checkpoint's record.
"""

from __future__ import annotations

import pytest
import torch

from diffusion_pl.meanflow import MeanFlowLoss
from diffusion_pl.networks.unet import UNet
from diffusion_pl.oracle import GaussianMixture, GuidedMixture
from diffusion_pl.prediction import VelocityPrediction, X0Prediction
from diffusion_pl.processes.interpolants import RectifiedFlow
from diffusion_pl.processes.variance_preserving import VPCosine

MIXTURE = GaussianMixture(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([[-1.0, -0.6], [1.0, -0.6], [0.0, 1.0]]),
                          torch.tensor([0.3, 0.2, 0.35]))
NULL = 3  # GuidedMixture: labels 0..2 are the components, 3 the whole mixture
PAIRS = {"rectified-flow/velocity": (RectifiedFlow(), VelocityPrediction()), "vp-cosine/x0": (VPCosine(), X0Prediction())}


def _points(process, n: int = 48, seed: int = 0, t_range=None):
    """(x_t, t, r, labels): labels 0..NULL (a quarter null), t uniform on t_range, r uniform on [t_lo, t]."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = t_range or (process.t_min, process.t_max)
    t = lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)
    r = lo + (t - lo) * torch.rand(n, generator=g, dtype=torch.float64)
    labels = torch.arange(n) % 4
    x_t = process.marginal(MIXTURE.sample(n, g), t, torch.randn(n, 2, generator=g, dtype=torch.float64))
    return x_t, t, r, labels


def _residual(model, process, prediction, points, **guidance) -> torch.Tensor:
    """||u - target|| (n,) of MeanFlowLoss at the label's posterior means (so that v_c is the exact v(x_t | label))."""
    x_t, t, r, labels = points
    x0, eps = GuidedMixture(MIXTURE).posterior_means(x_t, t, labels, process)
    loss_fn = MeanFlowLoss(norm_p=0.0, p_uncond=0.1, **guidance)
    loss_fn.p_uncond = 0.0  # the labels already hold null labels where wanted: no random drop on top
    return loss_fn(model, x0, process, prediction, labels, NULL, t=t, r=r, eps=eps).loss.sqrt()


STEPS = 12  # RK4 steps of the exact average velocity: residual at the fixed point ~2e-4 (6e-4 on VP-cosine)
TOL, GAP = 2e-3, 0.05  # the fixed point's residual, and the least median residual of a wrong u (measured 0.5-1.0)


def _check_guided_fixed_point(name: str, weight: float, kappa: float, n: int) -> None:
    process, prediction = PAIRS[name]
    points = _points(process, n=n)
    conditional = points[3] != NULL
    kw = dict(guidance_weight=weight, guidance_kappa=kappa)
    effective = weight / (1.0 - kappa)
    guided = GuidedMixture(MIXTURE, effective).mean_flow_model(process, prediction, steps=STEPS)
    right = _residual(guided, process, prediction, points, **kw)
    # the unguided u, and the guided field at w itself (kappa's w / (1 - kappa) left out), are not the fixed point
    wrong = {w: _residual(GuidedMixture(MIXTURE, w).mean_flow_model(process, prediction, steps=STEPS), process,
                          prediction, points, **kw) for w in {1.0, weight} - {effective}}
    print(f"{name} w={weight} kappa={kappa}: guided max {right.max():.2e}; "
          + ", ".join(f"field at w={w}: median {r[conditional].median():.3f}" for w, r in wrong.items()))
    assert right.max() < TOL, right.max()
    assert all(r[conditional].median() > GAP for r in wrong.values()), wrong
    # the null label's target is the plain one: the mixture's own u solves it whatever the guidance
    assert all(r[~conditional].max() < TOL for r in wrong.values())


def test_guided_target_is_solved_by_the_guided_average_velocity():
    """kappa = 0.5, w = 1 (the official default, configs/default.py:62-63): effective weight 2."""
    _check_guided_fixed_point("rectified-flow/velocity", 1.0, 0.5, n=24)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PAIRS))
@pytest.mark.parametrize("weight, kappa", [(2.0, 0.0), (1.5, 0.25)])
def test_guided_target_is_solved_by_the_guided_average_velocity_more_cases(name, weight, kappa):
    _check_guided_fixed_point(name, weight, kappa, n=48)


def test_guidance_applies_only_inside_the_t_interval():
    """Official t_start, t_end (Gsunshine/meanflow meanflow.py:176): the target is guided for t in [0.5, 1] and
    unguided below, so the fixed point is the guided u at t >= 0.5 and the unguided one below (points whose [r, t]
    does not cross 0.5); guidance everywhere leaves that model off its fixed point below 0.5."""
    process, prediction = RectifiedFlow(), VelocityPrediction()
    guided = GuidedMixture(MIXTURE, 2.0).mean_flow_model(process, prediction, steps=STEPS)
    unguided = GuidedMixture(MIXTURE, 1.0).mean_flow_model(process, prediction, steps=STEPS)

    def piecewise(x_t, t, class_labels=None, r=None):
        late = (t >= 0.5)[:, None]
        return torch.where(late, guided(x_t, t, class_labels, r=r), unguided(x_t, t, class_labels, r=r))

    low, high = _points(process, n=16, seed=1, t_range=(0.0, 0.45)), _points(process, n=16, seed=2, t_range=(0.5, 1.0))
    points = tuple(torch.cat([a, b]) for a, b in zip(low, high))
    inside = _residual(piecewise, process, prediction, points, guidance_weight=2.0, guidance_t_interval=(0.5, 1.0))
    everywhere = _residual(piecewise, process, prediction, points, guidance_weight=2.0)
    low_conditional = (points[1] < 0.5) & (points[3] != NULL)
    assert inside.max() < TOL, inside.max()
    assert everywhere[low_conditional].median() > GAP and everywhere[~low_conditional].max() < TOL


class _Recorder:
    def __init__(self, model):
        self.model, self.calls = model, []

    def __call__(self, x_t, t, class_labels=None, r=None):
        self.calls.append((class_labels.clone(), torch.is_grad_enabled()))
        return self.model(x_t, t, class_labels, r=r)


@pytest.mark.parametrize("kappa", [0.0, 0.5])
def test_the_networks_own_velocities_enter_without_gradient(kappa):
    process, prediction = RectifiedFlow(), VelocityPrediction()
    model = _Recorder(GuidedMixture(MIXTURE, 2.0).mean_flow_model(process, prediction, steps=2))
    labels = torch.tensor([0, 1, 2, 0])
    MeanFlowLoss(guidance_weight=2.0, guidance_kappa=kappa, p_uncond=1e-9)(
        model, torch.zeros(4, 2, dtype=torch.float64), process, prediction, labels, NULL,
        generator=torch.Generator().manual_seed(0))
    *guide, (train_labels, train_grad) = model.calls
    expected = [torch.full_like(labels, NULL)] + ([labels] if kappa else [])
    assert len(guide) == len(expected) and all(torch.equal(a, b) and not grad for (a, grad), b in zip(guide, expected))
    assert torch.equal(train_labels, labels) and train_grad


@pytest.mark.parametrize("kappa", [0.0, 0.5])
def test_guided_loss_trains_a_class_conditional_unet_with_augmentation_labels(kappa):
    """Through a real network: labels dropped to the null row, the guidance calls and the JVP all take the
    augmentation labels DiffusionModule binds to the model (batch B each); the gradient is finite and nonzero."""
    import functools

    from diffusion_pl.prediction import precondition

    torch.manual_seed(0)
    net = UNet(img_resolution=8, in_channels=1, num_classes=2, model_channels=8, channel_mult=(1,), num_res_blocks=1,
               attn_resolutions=(8,), dropout=0.0, augment_dim=3, interval_embedding=True)
    with torch.no_grad():  # the output layer starts at zero: give the guidance terms something to say
        net.conv_out.weight.normal_(0.0, 0.05)
    process, prediction = RectifiedFlow(), VelocityPrediction()
    model = functools.partial(precondition(net, process, prediction), augment_labels=torch.randn(6, 3))
    loss_fn = MeanFlowLoss(p_uncond=0.3, guidance_weight=1.5, guidance_kappa=kappa)
    out = loss_fn(model, torch.randn(6, 1, 8, 8), process, prediction, torch.tensor([0, 1, 0, 1, 0, 1]), net.null_label,
                  generator=torch.Generator().manual_seed(0))
    out.loss.mean().backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_refusals():
    for kwargs, match in [({"guidance_weight": -1.0, "p_uncond": 0.1}, "guidance_weight must be a finite number"),
                          ({"guidance_weight": float("nan"), "p_uncond": 0.1}, "guidance_weight must be a finite"),
                          ({"guidance_kappa": 1.0, "p_uncond": 0.1}, r"guidance_kappa must be in \[0, 1\)"),
                          ({"guidance_t_interval": (0.8, 0.2)}, "t_start <= t_end"),
                          ({"guidance_t_interval": "late"}, "must be two times"),
                          ({"guidance_weight": 2.0}, "needs p_uncond > 0")]:
        with pytest.raises(ValueError, match=match):
            MeanFlowLoss(**kwargs)
    process, prediction = RectifiedFlow(), VelocityPrediction()
    model = GuidedMixture(MIXTURE, 2.0).mean_flow_model(process, prediction, steps=2)
    loss_fn, x0 = MeanFlowLoss(guidance_weight=2.0, p_uncond=0.1), torch.zeros(4, 2)
    with pytest.raises(ValueError, match="needs class labels and the network's null label, got no class labels"):
        loss_fn(model, x0, process, prediction)
    with pytest.raises(ValueError, match="needs null_label"):
        loss_fn(model, x0, process, prediction, torch.zeros(4, dtype=torch.long), None)


def test_a_checkpoint_records_the_guidance_in_its_loss():
    """The saved config holds the loss and its guidance: such a model samples unguided (weight 1)."""
    from diffusion_pl.training.module import DiffusionModule

    net = UNet(img_resolution=8, in_channels=1, num_classes=2, model_channels=8, channel_mult=(1,), num_res_blocks=1,
               attn_resolutions=(), interval_embedding=True)
    loss = MeanFlowLoss(p_uncond=0.1, guidance_weight=1.0, guidance_kappa=0.5, guidance_t_interval=(0.0, 0.75))
    module = DiffusionModule(net, RectifiedFlow(), VelocityPrediction(), loss=loss)
    args = module.hparams["loss"]["init_args"]
    assert (args["guidance_weight"], args["guidance_kappa"], args["guidance_t_interval"]) == (1.0, 0.5, [0.0, 0.75])
