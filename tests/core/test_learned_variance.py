"""Learned reverse variance (Nichol & Dhariwal 2021): the output split, the hybrid loss's VLB term, the samplers.

A network with twice the data's channels predicts the mean parameterization (first half) and r, with
v = (r + 1) / 2 interpolating the reverse log-variance between log beta-tilde (v = 0) and log beta (v = 1).
The VLB term is checked against exact answers: with the exact posterior mean E[x0 | x_t] of Gaussian data
(the oracle), its expectation over x0 | x_t is minimised at the true reverse variance
c2 + A^2 Var(x0 | x_t) (Bao et al. 2022, Analytic-DPM), which is beta-tilde for data that x_t determines
and beta for N(0, I) data on a VP process.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from diffusion_pl.guidance import Guidance
from diffusion_pl.losses import DenoisingLoss, EpsMSE
from diffusion_pl.oracle import GaussianMixture
from diffusion_pl.prediction import Denoiser, EpsPrediction, VelocityPrediction, split_variance
from diffusion_pl.processes.variance_preserving import DDPMDiscrete, VPLinear
from diffusion_pl.sampling.posterior import DDIM, DDPM
from diffusion_pl.sampling.ode import AdaptiveODE
from diffusion_pl.sampling.base import Sampler
from diffusion_pl.sampling.api import sample
from diffusion_pl.sampling.base import point_at, posterior_step, step_variances
from diffusion_pl.sampling.noise import GeneratorNoise
from diffusion_pl.vlb import discretized_gaussian_log_likelihood

from diffusion_pl.utils.classes import public_subclasses

MIX = GaussianMixture(torch.tensor([0.3, 0.7]), torch.tensor([[-1.0, 0.5], [1.0, -0.5]]), torch.tensor([0.2, 0.3]))


def with_variance(model, raw):
    """A learned-variance model: the mean model's output, then the raw variance channels raw(x_t, t)."""

    def learned(x_t, t, class_labels=None):
        return torch.cat([model(x_t, t, class_labels), raw(x_t, t)], dim=1)

    return learned


def wavy(x_t, t):
    """Raw variance channels in [-1, 1] that depend on x_t and t."""
    return torch.tanh(3.0 * x_t) * torch.cos(7.0 * t)[:, None].to(x_t.dtype)


# -- the split -----------------------------------------------------------------------------------------------


def test_denoiser_splits_the_mean_and_the_variance_interpolation():
    process, pred = VPLinear(), VelocityPrediction()
    model = MIX.model(process, pred)
    den, den2 = Denoiser(model, process, pred), Denoiser(with_variance(model, wavy), process, pred)
    x, t = torch.randn(5, 2, generator=torch.Generator().manual_seed(0)), torch.full((5,), 0.4)
    plain, learned = den(x, t), den2(x, t)
    assert plain.variance_interp is None
    assert torch.equal(learned.x0, plain.x0) and torch.equal(learned.eps, plain.eps)
    assert torch.allclose(learned.variance_interp, (wavy(x, t) + 1) / 2)  # r = -1 -> v = 0, r = 1 -> v = 1
    bad = lambda x_t, t, y=None: torch.zeros(x_t.shape[0], 3)  # noqa: E731
    with pytest.raises(ValueError, match=r"output has shape \(5, 3\) for x_t of shape \(5, 2\): expected"):
        Denoiser(bad, process, pred)(x, t)
    with pytest.raises(ValueError, match="twice its channels"):
        split_variance(torch.zeros(5, 4, 3), torch.zeros(5, 2, 2))


def test_guidance_mixes_the_mean_and_keeps_the_conditional_variance():
    process, pred = VPLinear(), EpsPrediction()

    def conditional(x_t, t, y):  # mean channels and raw variance both depend on the label
        scale = (1.0 + y.to(x_t.dtype))[:, None]
        return torch.cat([scale * x_t, 0.1 * scale * x_t], dim=1)

    x, t, y = torch.randn(4, 2), torch.full((4,), 0.5), torch.zeros(4, dtype=torch.long)
    guided = Denoiser(conditional, process, pred, Guidance(weight=3.0, null_label=1))(x, t, y)
    out_c, out_u = conditional(x, t, y), conditional(x, t, torch.ones_like(y))
    mean = out_u[:, :2] + 3.0 * (out_c[:, :2] - out_u[:, :2])
    expected = Denoiser(lambda x_t, t, y=None: torch.cat([mean, out_c[:, 2:]], 1), process, pred)(x, t)
    assert torch.allclose(guided.x0, expected.x0) and torch.equal(guided.variance_interp, expected.variance_interp)


# -- samplers ------------------------------------------------------------------------------------------------


# MeanFlow samples an average-velocity model (keyword r), which has no variance channels (MeanFlowLoss refuses them)
@pytest.mark.parametrize("sampler_cls", [s for s in public_subclasses(Sampler) if s.__name__ != "MeanFlow"],
                         ids=lambda c: c.__name__)
def test_samplers_other_than_learned_ddpm_ignore_the_variance_channels(sampler_cls):
    process, pred = VPLinear(), VelocityPrediction()
    model = MIX.model(process, pred)
    sampler = sampler_cls() if sampler_cls is AdaptiveODE else sampler_cls(steps=6)
    draw = lambda m: sample(m, process, pred, sampler, (64, 2), seeds=list(range(64))).x  # noqa: E731
    assert torch.equal(draw(model), draw(with_variance(model, wavy)))


def test_learned_ddpm_uses_the_variance_and_needs_it():
    process, pred = DDPMDiscrete(50), VelocityPrediction()
    model = MIX.model(process, pred)
    draw = lambda m, variance: sample(m, process, pred, DDPM(steps=50, variance=variance), (256, 2),  # noqa: E731
                                      seeds=list(range(256))).x
    small = draw(model, "fixedsmall")
    large = draw(model, "fixedlarge")
    # r = -1 everywhere is beta-tilde (fixedsmall), r = 1 is beta (fixedlarge)
    assert torch.allclose(draw(with_variance(model, lambda x, t: -torch.ones_like(x)), "learned"), small, atol=1e-3)
    assert torch.allclose(draw(with_variance(model, lambda x, t: torch.ones_like(x)), "learned"), large, atol=1e-3)
    assert not torch.allclose(draw(with_variance(model, wavy), "learned"), small, atol=1e-2)
    with pytest.raises(ValueError, match="variance='learned' needs a model whose output has twice"):
        draw(model, "learned")
    with pytest.raises(ValueError, match="variance must be"):
        DDPM(variance="large")


def test_ddpm_learned_step_equals_diffusers_learned_range():
    """A step t -> t - 1 with the same x0_hat, raw variance and noise as diffusers' learned_range DDPMScheduler."""
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                        beta_schedule="linear", variance_type="learned_range", clip_sample=False)
    scheduler.set_timesteps(1000)
    process, pred = DDPMDiscrete(1000), EpsPrediction()
    g = torch.Generator().manual_seed(0)
    x, eps, raw = (torch.randn(3, 3, 4, 4, generator=g) for _ in range(3))
    raw = torch.tanh(raw)
    for k in (999, 500, 20, 1):
        theirs = scheduler.step(torch.cat([eps, raw], 1), k, x, generator=torch.Generator().manual_seed(k)).prev_sample
        p_t, p_s = point_at(process, (k + 1) / 1000), point_at(process, k / 1000)
        d = Denoiser(lambda x_t, t, y=None: torch.cat([eps, raw], 1), process, pred)(x, torch.full((3,), (k + 1) / 1e3))
        ours = posterior_step(d, x, p_t, p_s, 1.0, GeneratorNoise(torch.Generator().manual_seed(k)), "learned")
        # diffusers keeps alpha_bar in float32: 1 - alpha_bar is off by ~3e-4 relative at k = 1, hence rtol
        assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4), (k, float((ours - theirs).abs().max()))


def test_step_variances_are_ddpm_beta_and_beta_tilde():
    process = DDPMDiscrete(1000)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    for i in (1, 10, 500, 999):  # 0-based timestep i -> i - 1
        b2, c2 = step_variances(point_at(process, (i + 1) / 1000), point_at(process, i / 1000))
        assert b2 == pytest.approx(float(betas[i]), rel=1e-9)
        assert c2 == pytest.approx(float(betas[i] * (1 - abar[i - 1]) / (1 - abar[i])), rel=1e-9)


# -- the VLB term --------------------------------------------------------------------------------------------


def _vlb_of_v(process, data: GaussianMixture, t: float, n: int = 20000, **loss_kwargs):
    """v -> (E[vlb term], d/dv of it) for a constant v, the mean being the exact eps-prediction of `data`
    (fixed x0, eps and t)."""
    pred = EpsPrediction()
    g = torch.Generator().manual_seed(1)
    x0 = data.sample(n, g).float()
    eps = torch.randn(x0.shape, generator=g)
    tt = torch.full((n,), t)
    loss = DenoisingLoss(vlb_weight=1.0, **loss_kwargs)
    oracle = data.model(process, pred)

    def value_and_slope(v: float) -> tuple[float, float]:
        v = torch.tensor(v, requires_grad=True)
        model = with_variance(oracle, lambda x_t, t: (2 * v - 1).expand_as(x_t))
        vlb = loss(model, x0, process, pred, t=tt, eps=eps).vlb.mean()
        vlb.backward()
        return float(vlb.detach()), float(v.grad)

    return value_and_slope


def _true_reverse_v(process, std: float, t: float, s: float) -> float:
    """v with exp(v log b2 + (1 - v) log c2) = c2 + A^2 Var(x0 | x_t), for x0 ~ N(mu, std^2 I)."""
    p_t, p_s = point_at(process, t), point_at(process, s)
    b2, c2 = step_variances(p_t, p_s)
    coef_x0 = p_s.alpha * b2 / p_t.sigma**2
    var_x0 = std**2 * p_t.sigma**2 / (p_t.alpha**2 * std**2 + p_t.sigma**2)  # Gaussian conditioning
    return (math.log(c2 + coef_x0**2 * var_x0) - math.log(c2)) / (math.log(b2) - math.log(c2))


@pytest.mark.parametrize("std, expected", [(1e-4, 0.0), (1.0, 1.0), (0.5, None)], ids=["point", "unit", "half"])
@pytest.mark.parametrize("case", ["ddpm_discrete", "vp_linear"])
def test_vlb_term_is_minimised_at_the_true_reverse_variance(std, expected, case):
    if case == "ddpm_discrete":
        process, t, h, kwargs = DDPMDiscrete(10, beta_start=0.05, beta_end=0.3), 0.4, 0.1, {}
    else:  # a continuous process, cut into 20 steps by vlb_num_steps
        process, t, kwargs = VPLinear(), 0.5, {"vlb_num_steps": 20}
        h = (process.t_max - process.t_min) / 19
    data = GaussianMixture(torch.ones(1), torch.tensor([[0.3, -0.2, 0.1]]), torch.tensor([std]))
    v_true = _true_reverse_v(process, std, t, t - h)
    if expected is not None:  # x_t determines x0: beta-tilde; N(0, I)-like data on VP: beta
        assert v_true == pytest.approx(expected, abs=1e-3 if std < 1 else 0.05)
    value_and_slope = _vlb_of_v(process, data, t, **kwargs)
    lo, hi = v_true - 0.5, v_true + 0.5
    assert value_and_slope(lo)[1] < 0 < value_and_slope(hi)[1]  # convex in v: an interior minimum in between
    for _ in range(12):  # bisection on the slope
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if value_and_slope(mid)[1] < 0 else (lo, mid)
    v_best = 0.5 * (lo + hi)
    print(f"{case}, data std {std}: argmin v = {v_best:.4f}, true reverse variance at v = {v_true:.4f}")
    assert abs(v_best - v_true) <= 0.02
    best = value_and_slope(v_best)[0]
    assert best < value_and_slope(v_best - 0.1)[0] and best < value_and_slope(v_best + 0.1)[0]


def test_discretized_decoder_is_a_distribution_over_the_256_levels():
    levels = torch.linspace(-1, 1, 256, dtype=torch.float64)[:, None]  # every 8-bit value
    for mean, log_scale in [(0.0, -6.0), (0.3, -2.0), (-0.99, -4.0), (1.5, 0.5), (0.002, -9.0)]:
        logp = discretized_gaussian_log_likelihood(levels, torch.full_like(levels, mean),
                                                   torch.full_like(levels, log_scale))
        assert float(logp.exp().sum()) == pytest.approx(1.0, abs=1e-6), (mean, log_scale)
    # a wide Gaussian: bin mass = density x bin width
    x = torch.tensor([[0.1]], dtype=torch.float64)
    logp = discretized_gaussian_log_likelihood(x, torch.zeros_like(x), torch.full_like(x, math.log(0.5)))
    density = -0.5 * (0.1 / 0.5) ** 2 - math.log(0.5 * math.sqrt(2 * math.pi))
    assert float(logp) == pytest.approx(density + math.log(2 / 255), abs=1e-4)


def test_decoder_term_at_the_first_step():
    """At t = t_min the term is the decoder NLL (bits/dim) of 8-bit x0 with mean x0_hat."""
    process, pred = DDPMDiscrete(10, beta_start=0.05, beta_end=0.3), EpsPrediction()
    x0 = torch.tensor([[-1.0, 0.0, 127 / 127.5 - 1, 1.0]])
    eps = torch.tensor([[0.3, -0.2, 0.5, 0.1]])
    t = torch.full((1,), process.t_min)
    model = with_variance(lambda x_t, t, y=None: torch.zeros_like(x_t), lambda x_t, t: torch.zeros_like(x_t))
    out = DenoisingLoss(vlb_weight=1.0)(model, x0, process, pred, t=t, eps=eps)
    x_t = process.marginal(x0, t, eps)
    x0_hat = x_t / process.alpha(t.double()).float()  # eps_hat = 0
    sigma2 = float(process.sigma(t.double())) ** 2  # beta_1 of the step to x0
    _, c2_next = step_variances(point_at(process, 0.2), point_at(process, 0.1))
    log_scale = torch.full_like(x0, 0.25 * (math.log(sigma2) + math.log(c2_next)))  # v = 1/2
    expected = -discretized_gaussian_log_likelihood(x0, x0_hat, log_scale).mean() / math.log(2)
    assert float(out.vlb) == pytest.approx(float(expected), rel=1e-5)
    assert float(out.loss) == pytest.approx(float(eps.pow(2).mean()) + 10 * float(expected), rel=1e-5)


def test_hybrid_loss_sends_no_vlb_gradient_to_the_mean():
    process, pred = DDPMDiscrete(100), EpsPrediction()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 6, 3, padding=1))
    outputs = []

    def model(x_t, t, y=None):
        out = net(x_t)
        out.retain_grad()
        outputs.append(out)
        return out

    g = torch.Generator().manual_seed(0)
    x0, eps = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1, torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0.01, 0.02, 0.5, 1.0])  # the decoder term, and three KL terms
    grads = {}
    for weight in (0.0, 0.001):
        out = DenoisingLoss(vlb_weight=weight)(model, x0, process, pred, t=t, eps=eps)
        out.loss.sum().backward()
        grads[weight] = outputs[-1].grad
        assert torch.isfinite(out.loss).all() and (weight == 0.0) == (out.vlb is None)
    assert torch.equal(grads[0.001][:, :3], grads[0.0][:, :3])  # the mean channels: the MSE's gradient alone
    assert grads[0.0][:, 3:].abs().max() == 0 and grads[0.001][:, 3:].abs().min() > 0  # variance: the VLB's


def test_hybrid_loss_refuses_what_it_cannot_train():
    process, pred = VPLinear(), EpsPrediction()
    x0 = torch.zeros(2, 3)
    plain = lambda x_t, t, y=None: torch.zeros_like(x_t)  # noqa: E731
    with pytest.raises(ValueError, match="twice the data's 3 channels"):
        DenoisingLoss(vlb_weight=1e-3)(plain, x0, process, pred)
    learned = with_variance(plain, lambda x_t, t: torch.zeros_like(x_t))
    with pytest.raises(ValueError, match="needs vlb_num_steps"):
        DenoisingLoss(vlb_weight=1e-3)(learned, x0, process, pred)
    with pytest.raises(ValueError, match="vlb_num_steps=500 but the process has 1000 discrete times"):
        DenoisingLoss(vlb_weight=1e-3, vlb_num_steps=500)(learned, x0, DDPMDiscrete(), pred)
    with pytest.raises(ValueError, match="vlb_weight must be >= 0"):
        DenoisingLoss(vlb_weight=-1.0)
    # vlb_weight = 0 trains the mean channels of a learned-variance network (MSE only)
    out = DenoisingLoss(weighting=EpsMSE())(learned, x0, process, pred)
    assert out.vlb is None and torch.isfinite(out.loss).all()


def test_training_with_the_hybrid_loss_runs(tmp_path):
    import lightning as L

    from diffusion_pl.data.datamodule import ShardDataModule
    from diffusion_pl.training.module import DiffusionModule
    from diffusion_pl.networks.unet import UNet

    torch.manual_seed(0)
    net = UNet(img_resolution=8, in_channels=3, out_channels=6, model_channels=8, channel_mult=(1, 2),
               num_res_blocks=1, attn_resolutions=(), dropout=0.0)
    module = DiffusionModule(net, DDPMDiscrete(100), EpsPrediction(), DenoisingLoss(vlb_weight=0.001), ema_decay=0.5)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                        limit_val_batches=0)
    trainer.fit(module, ShardDataModule(shards="builtin:shapes?size=8&count=24", batch_size=8, num_workers=0))
    assert trainer.global_step == 3 and torch.isfinite(trainer.callback_metrics["train/loss"])
    # the trained network samples with its learned variance
    out = sample(module.model(), module.process, module.prediction, DDPM(steps=10, variance="learned"),
                 (2, 3, 8, 8), seeds=[0, 1])
    assert out.nfe == 10 and torch.isfinite(out.x).all()


# -- callbacks -----------------------------------------------------------------------------------------------


def test_callbacks_pass_clip_x0_to_generation(tmp_path, monkeypatch, stand_in_features, frozen_fit):
    from diffusion_pl.evaluation import fid_callback as fid_module
    from diffusion_pl.evaluation import sample_grid as grid_module
    from diffusion_pl.evaluation.fid_callback import FIDCallback
    from diffusion_pl.evaluation.sample_grid import SampleGrid

    monkeypatch.setenv("DIFFUSION_PL_CACHE", str(tmp_path / "cache"))
    seen = []
    for module in (fid_module, grid_module):
        def recording(*args, _original=module.generate, **kwargs):
            seen.append(kwargs["guidance"].clip_x0)
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, "generate", recording)
    fid = FIDCallback(every_n_steps=1, num_samples=4, sampler=DDIM(steps=1), feature_extractor=stand_in_features(),
                      batch_size=4, guidance=Guidance(clip_x0=1.0))
    grid = SampleGrid(every_n_steps=1, num_samples=2, sampler=DDIM(steps=1), at_train_end=False,
                      guidance=Guidance(clip_x0=0.5))
    frozen_fit(tmp_path, [fid, grid], max_steps=1)
    assert sorted(seen) == [0.5, 1.0]
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match=f"clip_x0 {bad} is invalid: expected a positive number") as err:
            Guidance(clip_x0=bad)
        assert "\n" not in str(err.value)
    for cls in (SampleGrid, FIDCallback):  # a bare bound instead of a Guidance: refused in one line
        with pytest.raises(ValueError, match=f"{cls.__name__}: guidance 0.5 is a float: expected a "
                                             r"diffusion_pl.guidance.Guidance") as err:
            cls(guidance=0.5)
        assert "\n" not in str(err.value)
