"""Network parameterizations and the one wrapper (`Denoiser`) every sampler and the likelihood talk to.

A network F(x_in, noise_label, y) predicts one of eps, x0, v, the score, the flow-matching
velocity, or EDM's preconditioned residual. Every choice is affine in (x_t, F):

    x0_hat  = a_x0(t)  * x_t + b_x0(t)  * F
    eps_hat = a_eps(t) * x_t + b_eps(t) * F

so a parameterization is four coefficients plus its training target, and converting any of
them into (x0_hat, eps_hat, score = -eps_hat / sigma) is one place of code.

The model contract used by samplers, losses and the likelihood is a callable
`model(x_t, t, class_labels) -> F` with x_t the noisy sample, t the process time (B,) in
x_t's dtype, and class_labels (B,) int64 or None. `precondition(net, process, prediction)`
turns a network `net(x_in, noise_label, class_labels)` into such a callable by applying the
parameterization's input scale c_in and noise label c_noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from diffusion_pl.guidance import Guidance
from diffusion_pl.processes.base import AttributeRepr, Process, append_dims, check_positive

__all__ = ["Model", "Prediction", "EpsPrediction", "X0Prediction", "VPrediction", "ScorePrediction",
           "ScaledScorePrediction", "VelocityPrediction", "EDMPreconditioning", "DenoiserOutput", "Denoiser",
           "precondition", "split_variance", "average_velocity_of"]

Model = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]

Coefficients = tuple[Tensor, Tensor, Tensor, Tensor]


class Prediction(AttributeRepr):
    """What the network predicts; subclasses give the affine coefficients and the target."""

    def coefficients(self, t: Tensor, process: Process) -> Coefficients:
        """(a_x0, b_x0, a_eps, b_eps) with x0 = a_x0 x_t + b_x0 F and eps = a_eps x_t + b_eps F."""
        raise NotImplementedError

    def target(self, x0: Tensor, eps: Tensor, t: Tensor, process: Process) -> Tensor:
        """The exact network output for clean data x0 and noise eps at time t."""
        raise NotImplementedError

    def c_in(self, t: Tensor, process: Process) -> Tensor:
        """Input scale: the network sees c_in(t) * x_t."""
        return torch.ones_like(t)

    def c_noise(self, t: Tensor, process: Process) -> Tensor:
        """Noise label the network is conditioned on; by default the process's own."""
        return process.noise_label(t)

    def to_x0_eps(self, out: Tensor, x_t: Tensor, t: Tensor, process: Process) -> tuple[Tensor, Tensor]:
        """Convert network output into (x0_hat, eps_hat)."""
        a_x0, b_x0, a_eps, b_eps = (_per_sample_like(c, x_t) for c in self.coefficients(t, process))
        return a_x0 * x_t + b_x0 * out, a_eps * x_t + b_eps * out


def _scales(t: Tensor, process: Process) -> tuple[Tensor, Tensor]:
    t64 = t.to(torch.float64)
    return process.alpha(t64), process.sigma(t64)


def _per_sample_like(c: Tensor, x: Tensor) -> Tensor:
    """A per-sample coefficient (B,) in x's dtype, shaped (B, 1, ..., 1) to multiply x."""
    return append_dims(c.to(x.dtype), x.ndim)


class EpsPrediction(Prediction):
    """F predicts the noise eps (Ho et al. 2020)."""

    def coefficients(self, t, process):
        alpha, sigma = _scales(t, process)
        return 1.0 / alpha, -sigma / alpha, torch.zeros_like(alpha), torch.ones_like(alpha)

    def target(self, x0, eps, t, process):
        return eps


class X0Prediction(Prediction):
    """F predicts the clean sample x0."""

    def coefficients(self, t, process):
        alpha, sigma = _scales(t, process)
        return torch.zeros_like(alpha), torch.ones_like(alpha), 1.0 / sigma, -alpha / sigma

    def target(self, x0, eps, t, process):
        return x0


class VPrediction(Prediction):
    """F predicts v = alpha eps - sigma x0 (Salimans & Ho 2022, generalised to alpha^2 + sigma^2 != 1)."""

    def coefficients(self, t, process):
        alpha, sigma = _scales(t, process)
        n = alpha**2 + sigma**2
        return alpha / n, -sigma / n, sigma / n, alpha / n

    def target(self, x0, eps, t, process):
        alpha, sigma = _scales(t, process)
        return _per_sample_like(alpha, x0) * eps - _per_sample_like(sigma, x0) * x0


class ScorePrediction(Prediction):
    """F predicts the score grad log p_t(x_t) = -eps / sigma (Song & Ermon 2019)."""

    def coefficients(self, t, process):
        alpha, sigma = _scales(t, process)
        return 1.0 / alpha, sigma**2 / alpha, torch.zeros_like(alpha), -sigma

    def target(self, x0, eps, t, process):
        _, sigma = _scales(t, process)
        return -eps / _per_sample_like(sigma, eps)


class ScaledScorePrediction(Prediction):
    """F = sigma * score = -eps, conditioned on log(sigma_scale * sigma / alpha): NCSN++'s output (VE, continuous).

    score_sde's NCSNpp with scale_by_sigma returns F(x, log sigma) / sigma as the score
    (yang-song/score_sde_pytorch models/ncsnpp.py:239, :377-379; Song & Ermon 2020, technique 3),
    i.e. F = -eps. Its CIFAR-10 data lie in [0, 1] (configs/default_cifar10_configs.py
    data.centered=False) and the network sees 2 x - 1: with our [-1, 1] data that is the same
    process at twice the sigma (VE(sigma_min=0.02, sigma_max=100)), and sigma_scale=0.5 gives
    score_sde's own label log(sigma / 2), as EDM's VEPrecond does (NVlabs/edm training/networks.py).
    """

    def __init__(self, sigma_scale: float = 0.5) -> None:
        check_positive("sigma_scale", sigma_scale)
        self.sigma_scale = sigma_scale

    def coefficients(self, t, process):
        alpha, sigma = _scales(t, process)
        return 1.0 / alpha, sigma / alpha, torch.zeros_like(alpha), -torch.ones_like(alpha)

    def target(self, x0, eps, t, process):
        return -eps

    def c_noise(self, t, process):
        alpha, sigma = _scales(t, process)
        return torch.log(self.sigma_scale * sigma / alpha).to(t.dtype)  # -inf at sigma = 0, +inf at alpha = 0


class VelocityPrediction(Prediction):
    """F predicts the flow-matching velocity u = alpha' x0 + sigma' eps = dx_t/dt (Lipman et al. 2022)."""

    def coefficients(self, t, process):
        t64 = t.to(torch.float64)
        alpha, sigma = process.alpha(t64), process.sigma(t64)
        d_alpha, d_sigma = process.d_alpha(t64), process.d_sigma(t64)
        # Solve [x_t; u] = [[alpha, sigma], [alpha', sigma']] [x0; eps]
        det = alpha * d_sigma - sigma * d_alpha
        return d_sigma / det, -sigma / det, -d_alpha / det, alpha / det

    def target(self, x0, eps, t, process):
        t64 = t.to(torch.float64)
        return _per_sample_like(process.d_alpha(t64), x0) * x0 + _per_sample_like(process.d_sigma(t64), x0) * eps


class EDMPreconditioning(Prediction):
    """EDM preconditioning (Karras et al. 2022, Table 1), generalised to alpha != 1.

    With the noise level s = sigma/alpha and x~ = x_t/alpha (an EDM-style sample):
    x0_hat = c_skip(s) x~ + c_out(s) F(c_in(s) x~, c_noise(s)).
    """

    def __init__(self, sigma_data: float = 0.5) -> None:
        check_positive("sigma_data", sigma_data)
        self.sigma_data = sigma_data

    def _edm(self, t: Tensor, process: Process) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(alpha, sigma, r, c_skip, c_out) with r = alpha sqrt(s^2 + sigma_data^2) = sqrt(sigma^2 + sigma_data^2 alpha^2).

        Written in (alpha, sigma) instead of s = sigma/alpha so that alpha = 0 (rectified flow at
        t = 1, where s = inf) gives the finite limits c_skip = 0, c_out = sigma_data.
        """
        alpha, sigma = _scales(t, process)
        sd = self.sigma_data
        r = torch.sqrt(sigma**2 + sd**2 * alpha**2)
        c_skip = (sd * alpha / r) ** 2  # sd^2 / (s^2 + sd^2)
        c_out = sigma * sd / r  # s sd / sqrt(s^2 + sd^2)
        return alpha, sigma, r, c_skip, c_out

    def coefficients(self, t, process):
        alpha, sigma, r, c_skip, c_out = self._edm(t, process)
        sd = self.sigma_data
        # c_skip / alpha and eps = (x_t - alpha x0_hat) / sigma, simplified so nothing divides by alpha or sigma
        return sd**2 * alpha / r**2, c_out, sigma / r**2, -sd * alpha / r

    def target(self, x0, eps, t, process):
        # (x0 - c_skip x_t / alpha) / c_out, simplified to stay finite at alpha = 0
        alpha, sigma, r, _, _ = self._edm(t, process)
        sd = self.sigma_data
        sigma, alpha, r = (_per_sample_like(c, x0) for c in (sigma, alpha, r))
        return (sigma * x0 - sd**2 * alpha * eps) / (sd * r)

    def c_in(self, t, process):
        _, _, r, _, _ = self._edm(t, process)
        return (1.0 / r).to(t.dtype)  # 1 / (alpha sqrt(s^2 + sd^2))

    def c_noise(self, t, process):
        alpha, sigma = _scales(t, process)
        return (0.25 * torch.log(sigma / alpha)).to(t.dtype)  # +inf at alpha = 0: no finite label exists there


class _Preconditioned(nn.Module):
    """A network wrapped into the model contract: (x_t, t, y) -> net(c_in x_t, c_noise, y).

    `augment_labels` (B, augment_dim), given only in training with `DiffusionModule(augment=...)`,
    reaches the network as a keyword; without it networks that take no such argument still work.
    `r` (B,), the start of an interval [r, t] (MeanFlow's average velocity, diffusion_pl/meanflow.py),
    reaches a network that declares `takes_interval` as the keyword `interval = c_noise(t) - c_noise(r)`
    (0 at r = t); a network without an interval input is refused in one line.
    """

    def __init__(self, net: nn.Module, process: Process, prediction: Prediction) -> None:
        super().__init__()
        self.net = net
        self.process = process
        self.prediction = prediction

    def forward(self, x_t: Tensor, t: Tensor, class_labels: Tensor | None = None,
                augment_labels: Tensor | None = None, r: Tensor | None = None) -> Tensor:
        c_in = _per_sample_like(self.prediction.c_in(t, self.process), x_t)
        c_noise = self.prediction.c_noise(t, self.process).to(x_t.dtype)
        extra = {} if augment_labels is None else {"augment_labels": augment_labels}
        if r is not None:
            if not getattr(self.net, "takes_interval", False):
                raise ValueError(f"{type(self.net).__name__} takes no interval input, so it cannot give an average "
                                 "velocity u(x, r, t): expected a network built with interval_embedding=True and "
                                 "trained with MeanFlowLoss")
            extra["interval"] = c_noise - self.prediction.c_noise(r, self.process).to(x_t.dtype)
        return self.net(c_in * x_t, c_noise, class_labels, **extra)


def precondition(net: nn.Module, process: Process, prediction: Prediction) -> nn.Module:
    """Turn a network `net(x_in, noise_label, class_labels)` into a model `(x_t, t, class_labels)`."""
    return _Preconditioned(net, process, prediction)


def split_variance(out: Tensor, x_t: Tensor) -> tuple[Tensor, Tensor | None]:
    """(F, v): a network output split into its mean part F (x_t's shape) and, if it has one, its variance part.

    The output's channels (dim 1) tell: x_t's count is a mean only (v = None); twice x_t's count is a
    learned variance (Nichol & Dhariwal 2021; ADM, DiT with learn_sigma), F being the first half and
    v = (r + 1) / 2 from the second half r, so that r = -1 is beta-tilde and r = 1 is beta
    (guided-diffusion gaussian_diffusion.py:273-275, "model_var_values is [-1, 1] for [min_var, max_var]";
    diffusers' DDPMScheduler learned_range). The network's own out_channels thus chooses; no flag can
    disagree with it. Every other shape is refused.
    """
    if out.shape == x_t.shape:
        return out, None
    if out.ndim == x_t.ndim >= 2 and out.shape[1] == 2 * x_t.shape[1] and \
            out.shape[:1] + out.shape[2:] == x_t.shape[:1] + x_t.shape[2:]:
        mean, r = out.chunk(2, dim=1)  # (B, C, ...) each
        return mean, (r + 1.0) / 2.0
    raise ValueError(f"the model's output has shape {tuple(out.shape)} for x_t of shape {tuple(x_t.shape)}: expected "
                     "x_t's shape, or twice its channels (dim 1) for a learned variance")


@dataclass
class DenoiserOutput:
    """The wrapper's answer at (x_t, t): x0_hat and eps_hat (the score is -eps / sigma).

    variance_interp: for a network with a learned variance (see `split_variance`), v shaped like x_t:
    the reverse step's log-variance is v log beta + (1 - v) log beta-tilde; None otherwise.
    Only DDPM(variance='learned') and the hybrid loss read it; every other consumer uses x0 and eps.
    """

    x0: Tensor
    eps: Tensor
    variance_interp: Tensor | None = None

    def velocity(self, d_alpha: Tensor | float, d_sigma: Tensor | float) -> Tensor:
        """Probability-flow ODE velocity dx/dt = alpha' x0_hat + sigma' eps_hat at the same time.

        Substituting x_t = alpha x0_hat + sigma eps_hat into f x - g2/2 score gives this form, which
        never divides by alpha, so it is finite where alpha = 0 (rectified flow at t = 1).
        d_alpha, d_sigma: alpha'(t) and sigma'(t) as Python floats or per-sample (B, 1, ..., 1) tensors.
        """
        return d_alpha * self.x0 + d_sigma * self.eps


class Denoiser:
    """Model + process + parameterization -> (x0_hat, eps_hat), with guidance.

    Classifier-free guidance (Ho & Salimans 2022), `guide=None`: F = F_u + w (F_c - F_u), computed
    from one batched call with the null label (`null_label`, the index of the network's "no class"
    embedding). Autoguidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of
    Itself", eq. 1), `guide` a second model in the same contract: F = F_guide + w (F_main - F_guide),
    two calls, the guide getting the same class labels. Because x0_hat and eps_hat are affine in F
    with the same x_t term, mixing raw outputs equals mixing D (x0_hat) or eps_hat with the same weight,
    provided both models share this process and prediction (the caller's duty; the CLI checks it).
    A learned variance (`split_variance`) is not mixed: it stays the main model's. w = 1: no guidance.
    Every option comes in one `Guidance` (diffusion_pl/guidance.py): the weight w, the guide model, the
    interval (sigma_lo, sigma_hi) in noise levels sigma/alpha (EDM's sigma; Kynkäänniemi et al. 2024,
    "Applying Guidance in a Limited Interval", eq. 5) outside which F is the plain conditional output (no
    extra call when the whole batch is outside), the channels K of the mean that are mixed (the rest stay
    the main model's; DiT's K = 3 of 4 latent channels), `clip_x0` (clamp x0_hat to [-clip_x0, clip_x0]
    and recompute eps_hat, DDPM's clipping) and the null label.
    `nfe` counts network evaluations (a guided evaluation counts once).
    """

    def __init__(self, model: Model, process: Process, prediction: Prediction,
                 guidance: Guidance = Guidance()) -> None:
        if not isinstance(guidance, Guidance):
            raise TypeError(f"guidance must be a diffusion_pl.guidance.Guidance, got {type(guidance).__name__}")
        if guidance.guide_path is not None:
            raise ValueError(f"guidance guide {guidance.guide_path} is a checkpoint path: expected the loaded model "
                             "(diffusion_pl.evaluation.loading.load_guide loads it)")
        if guidance.active and guidance.null_label is None and guidance.guide is None:
            raise ValueError("guidance weight != 1 needs null_label, the index of the network's unconditional label, "
                             "or a guide model (autoguidance)")
        self.model, self.process, self.prediction, self.guidance = model, process, prediction, guidance
        self.nfe = 0

    def _guided_mask(self, t: Tensor) -> Tensor | None:
        """(B,) bool: which samples are guided at t; None means all of them."""
        if self.guidance.interval is None:
            return None
        lo, hi = self.guidance.interval
        level = self.process.noise_level(t.to(torch.float64))  # (B,) sigma/alpha
        return (level >= lo) & (level <= hi)

    def output(self, x_t: Tensor, t: Tensor, class_labels: Tensor | None, r: Tensor | None = None) -> Tensor:
        """Raw (guided) network output F at (x_t, t); with r, at the interval [r, t] (an average-velocity model)."""
        self.nfe += 1
        guidance = self.guidance
        at_r = {} if r is None else {"r": r}
        if not guidance.active or (class_labels is None and guidance.guide is None):
            return self.model(x_t, t, class_labels, **at_r)
        mask = self._guided_mask(t)
        if mask is not None and not bool(mask.any()):
            return self.model(x_t, t, class_labels, **at_r)  # whole batch outside the interval: no extra call
        if guidance.guide is None:
            null = torch.full_like(class_labels, guidance.null_label)
            both = {} if r is None else {"r": torch.cat([r, r])}
            out = self.model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([class_labels, null]), **both)
            out_main, out_guide = out.chunk(2)  # (B, C', ...) each: F_c, F_u
        else:
            out_main, out_guide = self.model(x_t, t, class_labels, **at_r), guidance.guide(x_t, t, class_labels, **at_r)
        guided = _mix(out_main, out_guide, guidance.weight, x_t, guidance.check_channels(x_t.shape[1]))
        if mask is not None:
            guided = torch.where(append_dims(mask, guided.ndim), guided, out_main)
        return guided

    def __call__(self, x_t: Tensor, t: Tensor, class_labels: Tensor | None = None) -> DenoiserOutput:
        t = _per_sample_time(t, x_t)
        mean, variance_interp = split_variance(self.output(x_t, t, class_labels), x_t)
        x0, eps = self.prediction.to_x0_eps(mean, x_t, t, self.process)
        clip = self.guidance.clip_x0
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
            alpha, sigma = _scales(t, self.process)
            eps = (x_t - _per_sample_like(alpha, x_t) * x0) / _per_sample_like(sigma, x_t)
        return DenoiserOutput(x0=x0, eps=eps, variance_interp=variance_interp)

    def velocity(self, x_t: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """Probability-flow ODE velocity dx/dt at (x_t, t) (see `DenoiserOutput.velocity`)."""
        t = _per_sample_time(t, x_t)
        t64 = t.to(torch.float64)
        return self(x_t, t, class_labels).velocity(_per_sample_like(self.process.d_alpha(t64), x_t),
                                                   _per_sample_like(self.process.d_sigma(t64), x_t))

    def average_velocity(self, x_t: Tensor, t: Tensor, r: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """MeanFlow's u(x_t, r, t) = (x_t - x_r) / (t - r) along the probability-flow ODE (Geng et al. 2025, eq. 3).

        The model's output at [r, t] read through the prediction's velocity (`DenoiserOutput.velocity`): at
        r = t it is the instantaneous velocity; a model trained with `MeanFlowLoss` extends it to r < t.
        """
        t, r = _per_sample_time(t, x_t), _per_sample_time(r, x_t)
        mean, _ = split_variance(self.output(x_t, t, class_labels, r=r), x_t)
        return average_velocity_of(mean, x_t, t, self.process, self.prediction)

    def score(self, x_t: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """grad log p_t(x_t) = -eps_hat / sigma(t)."""
        t = _per_sample_time(t, x_t)
        sigma = _per_sample_like(self.process.sigma(t.to(torch.float64)), x_t)
        return -self(x_t, t, class_labels).eps / sigma


def average_velocity_of(out: Tensor, x_t: Tensor, t: Tensor, process: Process, prediction: Prediction) -> Tensor:
    """alpha'(t) x0_hat + sigma'(t) eps_hat of a network output `out` at time t (B,): the velocity it stands for.

    Written with differentiable tensor operations only, so forward-mode AD (MeanFlow's JVP) runs through it.
    """
    x0, eps = prediction.to_x0_eps(out, x_t, t, process)
    t64 = t.to(torch.float64)
    return _per_sample_like(process.d_alpha(t64), x_t) * x0 + _per_sample_like(process.d_sigma(t64), x_t) * eps


def _mix(out_main: Tensor, out_guide: Tensor, w: float, x_t: Tensor, k: int) -> Tensor:
    """F_guide + w (F_main - F_guide) on the first k mean channels; the other mean channels and any
    learned-variance channels stay the main model's."""
    mean_main, _ = split_variance(out_main, x_t)  # also refuses a malformed output
    mean_guide, _ = split_variance(out_guide, x_t)
    guided = mean_guide[:, :k] + w * (mean_main[:, :k] - mean_guide[:, :k])  # (B, k, ...)
    if out_main.shape[1] != k:  # (DiT models.py:262-266: eps channels [:3] guided, the rest conditional)
        guided = torch.cat([guided, out_main[:, k:]], dim=1)
    return guided


def _per_sample_time(t: Tensor | float, x: Tensor) -> Tensor:
    """Broadcast a scalar or (B,) time to a (B,) tensor in x's dtype and device (a Python float goes
    straight to x's dtype, not through torch's float32 default, so float64 sampling sees the exact grid time)."""
    t = t if isinstance(t, Tensor) else torch.tensor(t, dtype=x.dtype)
    t = t.to(device=x.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    return t.to(x.dtype)
