"""sCM: continuous-time consistency training on TrigFlow (Lu & Song 2024, arXiv 2410.11081).

TrigFlow writes x_t = cos(theta) x0 + sin(theta) z (theta in [0, pi/2]; the paper scales z by sigma_d, which
is this process on the data divided by sigma_d) and parameterizes the consistency function as

    f(x_t, theta) = cos(theta) x_t - sin(theta) F(x_t, theta),

F being the network (the paper's eq. 7, sigma_d = 1). For the exact F, F = dx/dtheta is the velocity in theta
and f is constant along the probability-flow ODE. Continuous-time consistency training follows the gradient of
E[w f_theta^T df_theta-/dtheta] (Song et al. 2023), which with w = 1 / tan(theta) equals the gradient of the
regression

    || F_theta - sg(F_theta + g) ||^2,   g = cos(theta) df/dtheta
      = -cos^2(theta) (F - dx/dtheta) - r cos(theta) sin(theta) (x_t + dF/dtheta),

(the paper's Sec. 4 and Algorithm 1), with dx/dtheta = -sin(theta) x0 + cos(theta) z the conditional
velocity (consistency *training*: no teacher) and dF/dtheta one Jacobian-vector product of the network along
(dx/dtheta, 1). The stabilisers of the paper's Sec. 5 are options: the tangent warm-up r = min(1, step /
warmup_steps), the tangent normalisation g / (||g|| + c) and the adaptive weighting
e^{w_phi(t)} ||.||^2 / D - w_phi(t) with a learned w_phi.

Generic over processes as far as the math allows: every variance-preserving process (alpha^2 + sigma^2 = 1,
checked on a grid) is TrigFlow with theta(t) = atan2(sigma, alpha), a change of time; `Trigonometric` has
theta = pi t / 2 exactly. Others (rectified flow, VE) are refused in one line. F is read from any prediction as
alpha eps_hat - sigma x0_hat, which makes f the prediction's x0_hat; `VPrediction` (v = alpha eps - sigma x0)
is F itself, the paper's parameterization.

Sources: the paper (Sec. 4-5, Algorithm 1); the default proposal and sigma_d are FastGen's; NVIDIA
FastGen, NVlabs/FastGen fastgen/methods/consistency_model/sCM.py:178-179 (JVP tangents scaled by cos sin),
:203 (theta from the noise level), :260 (warm-up), :265-268 (g), :272-275 (normalisation by the RMS norm),
:285 (adaptive weight), and fastgen/configs/methods/config_scm.py:35-57 (defaults).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from diffusion_pl.losses import LogNormalNoise, LossOutput, TrainingLoss, draw, drop_labels
from diffusion_pl.meanflow import jvp
from diffusion_pl.prediction import Model, Prediction, split_variance
from diffusion_pl.processes.base import Process, append_dims, check_nonnegative, check_positive

__all__ = ["SCMLoss", "AdaptiveWeight", "check_trigflow"]


def check_trigflow(process: Process) -> None:
    """Refuse, in one line, a process that is not TrigFlow up to a change of time (alpha^2 + sigma^2 = 1)."""
    if process.discrete_times() is not None:
        raise ValueError(f"sCM needs a continuous-time process (it differentiates in t): {type(process).__name__} is "
                         "discrete; expected Trigonometric (TrigFlow) or another variance-preserving process")
    grid = torch.linspace(process.t_min, process.t_max, 65, dtype=torch.float64)
    alpha, sigma = process.alpha(grid), process.sigma(grid)
    drift = float((alpha**2 + sigma**2 - 1.0).abs().max())
    if drift > 1e-6:
        raise ValueError(f"sCM needs TrigFlow's alpha = cos, sigma = sin (alpha^2 + sigma^2 = 1): "
                         f"{type(process).__name__} has |alpha^2 + sigma^2 - 1| up to {drift:.3g}; expected "
                         "Trigonometric or another variance-preserving process (VPLinear, VPCosine)")
    speed = alpha * process.d_sigma(grid) - sigma * process.d_alpha(grid)  # dtheta/dt
    if not bool(torch.isfinite(speed).all()) or not bool((speed > 0).all()):
        raise ValueError(f"sCM needs a finite, positive dtheta/dt on [t_min, t_max] = [{process.t_min}, "
                         f"{process.t_max}]: {type(process).__name__} has none there; lower t_max")


class AdaptiveWeight(nn.Module):
    """w_phi(theta): the learned log-weight of sCM's adaptive weighting (the paper's Sec. 5, 'adaptive weighting').

    A linear map of fixed random Fourier features of c = log(tan theta) / 4 (EDM's noise label, clamped to
    [-5, 5]), zero at initialisation (weight 1). The features are those of EDM2's MPFourier (Karras et al.
    2024); written here because torch has no Fourier-feature layer.
    """

    def __init__(self, num_features: int = 64, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", 2.0 * math.pi * torch.randn(num_features, generator=g))
        self.register_buffer("phases", 2.0 * math.pi * torch.rand(num_features, generator=g))
        self.linear = nn.Linear(num_features, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, theta: Tensor) -> Tensor:
        """(B,) log-weights for angles theta (B,)."""
        c = (0.25 * torch.log(torch.tan(theta.to(torch.float64)))).clamp(-5.0, 5.0).to(self.freqs.dtype)
        features = math.sqrt(2.0) * torch.cos(c[:, None] * self.freqs + self.phases)  # (B, num_features)
        return self.linear(features).squeeze(1)


class SCMLoss(TrainingLoss, nn.Module):
    """sCT, continuous-time consistency training (Lu & Song 2024, Algorithm 1; see the module docstring).

    p_mean, p_std, sigma_d: the time proposal tan(theta) = exp(N(p_mean, p_std^2)) / sigma_d (defaults
        -1.0, 1.4 and 0.5: FastGen config_scm.py:35-39), mapped to the process's t.
    norm_c: tangent normalisation g / (rms(g) + norm_c), rms the root mean square over the sample (the paper's
        ||g|| + c with c = 0.1; FastGen's default g_norm_spatial_invariance, which keeps c's meaning at every
        resolution); None: no normalisation.
    warmup_steps: the tangent warm-up, r = min(1, step / warmup_steps) on the second term of g (the paper: 10k
        iterations); 0: r = 1 from the start. The training module passes `step`; without it r = 1.
    adaptive: learn w_phi(theta) (`AdaptiveWeight`) and minimise e^{w} mean(||.||^2) - w (its parameters train
        with the network); False: the plain mean squared error.
    p_uncond: label dropout (classifier-free guidance training, as DenoisingLoss).

    Called as `DenoisingLoss` is: `loss(model, x0, process, prediction, class_labels, null_label, generator,
    t=None, eps=None, step=None)`. The JVP is torch.func.jvp of the model whose primal output carries the
    gradient (as `MeanFlowLoss`; attention on the math backend); the loss's value at theta- = theta is
    e^w mean(g^2) - w, so it tracks the tangent's size, not the sample quality.
    """

    takes_step = True
    denoiser = False  # x0_hat is f, the trajectory's end: sampled by `Consistency`, refused by diffusion samplers
    # an nn.Module (its adaptive weight trains) and a TrainingLoss: calls and reprs are the module's
    __call__ = nn.Module.__call__
    __repr__ = nn.Module.__repr__

    def __init__(self, p_mean: float = -1.0, p_std: float = 1.4, sigma_d: float = 0.5, norm_c: float | None = 0.1,
                 warmup_steps: int = 10000, adaptive: bool = True, p_uncond: float = 0.0) -> None:
        super().__init__()
        check_positive("p_std", p_std)
        check_positive("sigma_d", sigma_d)
        if norm_c is not None:
            check_nonnegative("norm_c", norm_c)
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0 (0: no tangent warm-up), got {warmup_steps}")
        if not 0.0 <= p_uncond <= 1.0:
            raise ValueError(f"p_uncond must be in [0, 1], got {p_uncond}")
        self.p_mean, self.p_std, self.sigma_d, self.norm_c = p_mean, p_std, sigma_d, norm_c
        self.warmup_steps, self.p_uncond = warmup_steps, p_uncond
        # tan(theta) = sigma/alpha for a variance-preserving process: EDM's noise level, log-normal
        self.proposal = LogNormalNoise(p_mean - math.log(sigma_d), p_std)
        self.weight = AdaptiveWeight() if adaptive else None

    def extra_repr(self) -> str:
        return (f"p_mean={self.p_mean}, p_std={self.p_std}, sigma_d={self.sigma_d}, norm_c={self.norm_c}, "
                f"warmup_steps={self.warmup_steps}, p_uncond={self.p_uncond}")

    def forward(self, model: Model, x0: Tensor, process: Process, prediction: Prediction,
                class_labels: Tensor | None = None, null_label: int | None = None,
                generator: torch.Generator | None = None, t: Tensor | None = None, eps: Tensor | None = None,
                step: int | None = None, images_seen: int = 0) -> LossOutput:
        """Per-sample loss (B,) for clean data x0 (B, ...); pass t (and eps) for a deterministic loss."""
        check_trigflow(process)
        if t is None:
            t = self.proposal.sample(x0.shape[0], process, generator=generator, device=x0.device)
        t = t.to(device=x0.device, dtype=x0.dtype)
        if eps is None:
            eps = draw(torch.randn, tuple(x0.shape), generator, x0.device).to(x0.dtype)
        labels = drop_labels(class_labels, null_label, self.p_uncond, generator)
        r = 1.0 if step is None or self.warmup_steps == 0 else min(1.0, step / self.warmup_steps)
        x_t = process.marginal(x0, t, eps)  # (B, ...)
        t64 = t.to(torch.float64)
        cos, sin = process.alpha(t64), process.sigma(t64)  # (B,)
        speed = cos * process.d_sigma(t64) - sin * process.d_alpha(t64)  # dtheta/dt (B,)
        theta = torch.atan2(sin, cos)

        def per_sample(c: Tensor) -> Tensor:
            return append_dims(c.to(x0.dtype), x0.ndim)

        v = per_sample(process.d_alpha(t64)) * x0 + per_sample(process.d_sigma(t64)) * eps  # dx_t/dt
        dx_dtheta = v / per_sample(speed)  # = -sin x0 + cos eps

        def velocity_fn(z: Tensor, tt: Tensor) -> Tensor:
            mean, variance = split_variance(model(z, tt, labels), z)
            if variance is not None:
                raise ValueError("SCMLoss trains a consistency function: expected a network with the data's "
                                 f"{z.shape[1]} output channels, not a learned variance")
            x0_hat, eps_hat = prediction.to_x0_eps(mean, z, tt, process)
            tt64 = tt.to(torch.float64)
            return per_sample(process.alpha(tt64)) * eps_hat - per_sample(process.sigma(tt64)) * x0_hat  # F

        # tangents scaled by cos sin (FastGen sCM.py:178-179): the JVP gives cos sin dF/dtheta directly
        scale = cos * sin / speed  # (B,) d theta -> d t, times cos sin
        F, cs_dF = jvp(velocity_fn, (x_t, t), (per_sample(scale) * v, scale.to(t.dtype)))
        F_minus, cs_dF = F.detach(), cs_dF.detach()
        g = -per_sample(cos**2) * (F_minus - dx_dtheta) - r * (per_sample(cos * sin) * x_t + cs_dF)
        if self.norm_c is not None:
            rms = g.pow(2).flatten(1).mean(1).sqrt()  # (B,)
            g = g / per_sample(rms + self.norm_c)
        mse = (F - F_minus - g).pow(2).flatten(1).mean(1)  # (B,) ||.||^2 / D
        if self.weight is None:
            return LossOutput(loss=mse, t=t)
        w = self.weight(theta).to(mse.dtype)  # (B,)
        return LossOutput(loss=torch.exp(w) * mse - w, t=t)
