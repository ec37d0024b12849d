"""Denoising loss, loss weightings and time proposals.

    L = E_{t ~ proposal, x0, eps} [ w_out(t) * mean_dims (F(x_t, t, y) - target)^2 ]

Every weighting is defined on the x0 error, w_x0(t) ||x0_hat - x0||^2, and converted to the
network's output space with the wrapper's coefficient: x0_hat - x0 = b_x0 (F - target), so
w_out = w_x0 * b_x0^2. Because alpha x0_hat + sigma eps_hat = x_t for every parameterization,
the same weight is w_eps * b_eps^2 with w_eps = w_x0 * sigma^2 / alpha^2; the two forms are
computed separately in float64 and the finite one is used, so that e.g. eps-MSE under eps
prediction is exactly 1 even at alpha = 0, where w_x0 = 0 and b_x0 = infinity.

The proposal only decides where t is sampled; it does not reweight (the loss is
E_proposal[w_out * error], so a proposal and a weighting combine multiplicatively in the
effective weight over t, as in EDM's log-normal sigma with lambda(sigma)).

A network with a learned variance (twice the data's channels, `prediction.split_variance`) is trained
on the same MSE through its mean channels, plus, with `vlb_weight` = lambda > 0, the hybrid loss's
variational term (Nichol & Dhariwal 2021, Sec. 3.1, L_hybrid = L_simple + lambda L_vlb, lambda = 0.001).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from diffusion_pl.prediction import Model, Prediction, split_variance
from diffusion_pl.processes.base import AttributeRepr, Process, check_nonnegative, check_positive
from diffusion_pl.vlb import vlb_terms

__all__ = [
    "TimeProposal",
    "UniformTime",
    "LogNormalNoise",
    "LogitNormalTime",
    "ModeTime",
    "ShiftedTime",
    "Weighting",
    "OutputMSE",
    "EpsMSE",
    "LikelihoodWeighting",
    "MinSNR",
    "EDMWeighting",
    "VelocityMSE",
    "TrainingLoss",
    "DenoisingLoss",
    "LossOutput",
    "drop_labels",
    "bucket_losses",
    "draw",
    "log_snr_grid",
]


def draw(fn, shape: tuple[int, ...], generator: torch.Generator | None, device) -> Tensor:
    """Draw on the generator's device (torch requires it), then move to `device` (float64)."""
    gen_device = generator.device if generator is not None else device
    return fn(shape, generator=generator, device=gen_device, dtype=torch.float64).to(device)


# -- time proposals ------------------------------------------------------------------------------
class TimeProposal(AttributeRepr):
    """Distribution of the training time t on [t_min, t_max]."""

    def sample(self, n: int, process: Process, generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> Tensor:
        """n times (n,) float32 in [process.t_min, process.t_max]."""
        raise NotImplementedError


class UniformTime(TimeProposal):
    """t ~ U[t_min, t_max]; uniform over the grid of a discrete process (Ho et al. 2020, Algorithm 1)."""

    def sample(self, n, process, generator=None, device=None):
        grid = process.discrete_times()
        if grid is not None:
            i = torch.randint(len(grid), (n,), generator=generator,
                              device=generator.device if generator is not None else device)
            return grid.to(i.device)[i].to(device=device, dtype=torch.float32)
        u = draw(torch.rand, (n,), generator, device)
        return (process.t_min + (process.t_max - process.t_min) * u).float()


class LogNormalNoise(TimeProposal):
    """log(sigma/alpha) ~ N(p_mean, p_std^2), mapped to t and clamped (Karras et al. 2022, Table 1 'p_train')."""

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2) -> None:
        check_positive("p_std", p_std)
        self.p_mean, self.p_std = p_mean, p_std

    def sample(self, n, process, generator=None, device=None):
        log_noise = self.p_mean + self.p_std * draw(torch.randn, (n,), generator, device)
        # noise level s = sigma/alpha means log-SNR = -2 log s; t_from_log_snr clamps to [t_min, t_max]
        return process.t_from_log_snr(-2.0 * log_noise).float()


class LogitNormalTime(TimeProposal):
    """t = t_min + (t_max - t_min) sigmoid(N(mean, std^2)) (Esser et al. 2024, SD3, Sec. 3.1)."""

    def __init__(self, mean: float = 0.0, std: float = 1.0) -> None:
        check_positive("std", std)
        self.mean, self.std = mean, std

    def sample(self, n, process, generator=None, device=None):
        u = torch.sigmoid(self.mean + self.std * draw(torch.randn, (n,), generator, device))
        return (process.t_min + (process.t_max - process.t_min) * u).float()


class ModeTime(TimeProposal):
    """t = t_min + (t_max - t_min) f(u), f(u) = 1 - u - scale (cos^2(pi u / 2) - 1 + u), u ~ U[0, 1]: SD3's "mode
    sampling with heavy tails" (Esser et al. 2024, Sec. 3.1, eq. 20; diffusers training_utils.py
    `compute_density_for_timestep_sampling`, weighting_scheme "mode"). scale = 0 is uniform; scale in
    [-1, 2/(pi - 2)] keeps f monotone (the paper's bound); 1.29 is the value diffusers' SD3 scripts default to."""

    def __init__(self, scale: float = 1.29) -> None:
        if not -1.0 <= scale <= 2.0 / (math.pi - 2.0):
            raise ValueError(f"scale must lie in [-1, 2/(pi - 2)] = [-1, {2.0 / (math.pi - 2.0):.4f}] for a monotone "
                             f"map (Esser et al. 2024, eq. 20), got {scale}")
        self.scale = scale

    def sample(self, n, process, generator=None, device=None):
        u = draw(torch.rand, (n,), generator, device)
        f = 1.0 - u - self.scale * (torch.cos(0.5 * math.pi * u) ** 2 - 1.0 + u)
        # SD3 draws t with t = 1 pure noise, like this package; f maps [0, 1] onto itself
        return (process.t_min + (process.t_max - process.t_min) * f.clamp(0.0, 1.0)).float()


class ShiftedTime(TimeProposal):
    """Another proposal's times moved towards noise: the noise level sigma/alpha times `shift` (log-SNR minus
    2 log shift), mapped back to t and clamped to the process's range.

    On the rectified flow (sigma/alpha = t / (1 - t)) this is SD3's resolution-dependent shift
    t' = shift t / (1 + (shift - 1) t) (Esser et al. 2024, Sec. 5.3.2, eq. 23, with shift = sqrt(m/n) for m pixels
    against n of the resolution the proposal was tuned at; diffusers FlowMatchEulerDiscreteScheduler `shift`); on
    any other process the same move in log-SNR. SD3 trains at 1024^2 with shift 3 over logit-normal times.
    """

    def __init__(self, proposal: TimeProposal | None = None, shift: float = 3.0) -> None:
        check_positive("shift", shift)
        self.proposal = proposal if proposal is not None else LogitNormalTime()
        self.shift = shift

    def sample(self, n, process, generator=None, device=None):
        t = self.proposal.sample(n, process, generator, device).to(torch.float64)
        return process.t_from_log_snr(process.log_snr(t) - 2.0 * math.log(self.shift)).float()


# -- weightings ----------------------------------------------------------------------------------
def _scales(t: Tensor, process: Process) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    t = t.to(torch.float64)
    return process.alpha(t), process.sigma(t), process.d_alpha(t), process.d_sigma(t)


class Weighting(AttributeRepr):
    """A loss weight w_out(t) on the output MSE, defined through the x0-error weight w_x0(t).

    Subclasses give `x0_weight` and `eps_weight` = x0_weight * sigma^2 / alpha^2, each written
    so it stays finite where it is finite in exact arithmetic (float64 in, float64 out).
    """

    def x0_weight(self, t: Tensor, process: Process) -> Tensor:
        """w_x0(t) on ||x0_hat - x0||^2."""
        raise NotImplementedError

    def eps_weight(self, t: Tensor, process: Process) -> Tensor:
        """w_eps(t) = w_x0 sigma^2 / alpha^2 on ||eps_hat - eps||^2."""
        raise NotImplementedError

    def __call__(self, t: Tensor, process: Process, prediction: Prediction) -> Tensor:
        """w_out(t) (B,) = w_x0 b_x0^2 = w_eps b_eps^2, in t's dtype."""
        t64 = t.to(torch.float64)
        _, b_x0, _, b_eps = prediction.coefficients(t64, process)
        via_x0 = self.x0_weight(t64, process) * b_x0.to(torch.float64) ** 2
        via_eps = self.eps_weight(t64, process) * b_eps.to(torch.float64) ** 2
        # inf * 0 (e.g. b_x0 = sigma/alpha at alpha = 0) is NaN in one form and finite in the other
        return torch.where(torch.isfinite(via_x0), via_x0, via_eps).to(t.dtype)


class OutputMSE(Weighting):
    """w_out = 1: plain MSE on the network output (eps: Ho et al. 2020 'simple'; velocity: Lipman et al. 2022).

    Under EDMPreconditioning this is EDM's lambda(sigma) = 1 / c_out^2 (Karras et al. 2022, Sec. 5).
    """

    def x0_weight(self, t, process):
        raise TypeError("OutputMSE's x0 weight depends on the parameterization: call it with a prediction")

    eps_weight = x0_weight

    def __call__(self, t, process, prediction):
        return torch.ones_like(t)


class EpsMSE(Weighting):
    """w_eps = 1: 'simple' eps-MSE (Ho et al. 2020, eq. 14), whatever the network predicts."""

    def x0_weight(self, t, process):
        alpha, sigma, _, _ = _scales(t, process)
        return (alpha / sigma) ** 2

    def eps_weight(self, t, process):
        return torch.ones_like(t, dtype=torch.float64)


class LikelihoodWeighting(Weighting):
    """w_eps = g2 / sigma^2 = -d log-SNR / dt: the KL bound (Song, Durkan et al. 2021, 'likelihood weighting', Thm. 1).

    With the score error (eps_hat - eps)/sigma this is g(t)^2 ||s_theta - grad log p||^2, so
    (t_max - t_min) * D / 2 * E_uniform[loss] bounds -log p_0 up to data-independent terms.
    """

    def x0_weight(self, t, process):
        # -d SNR/dt = 2 alpha (alpha sigma' - alpha' sigma) / sigma^3: finite at alpha = 0, unlike g2 alpha^2 / sigma^4
        alpha, sigma, d_alpha, d_sigma = _scales(t, process)
        return 2.0 * alpha * (alpha * d_sigma - d_alpha * sigma) / sigma**3

    def eps_weight(self, t, process):
        alpha, sigma, d_alpha, d_sigma = _scales(t, process)
        return 2.0 * (alpha * d_sigma - d_alpha * sigma) / (alpha * sigma)


class MinSNR(Weighting):
    """w_x0 = min(SNR, gamma) (Hang et al. 2023, 'Min-SNR weighting')."""

    def __init__(self, gamma: float = 5.0) -> None:
        check_positive("gamma", gamma)
        self.gamma = gamma

    def x0_weight(self, t, process):
        alpha, sigma, _, _ = _scales(t, process)
        return torch.clamp((alpha / sigma) ** 2, max=self.gamma)

    def eps_weight(self, t, process):
        alpha, sigma, _, _ = _scales(t, process)
        return torch.clamp(self.gamma * (sigma / alpha) ** 2, max=1.0)  # min(1, gamma / SNR); inf -> 1


class EDMWeighting(Weighting):
    """w_x0 = (s^2 + sigma_data^2) / (s sigma_data)^2 with s = sigma / alpha (Karras et al. 2022, Table 1)."""

    def __init__(self, sigma_data: float = 0.5) -> None:
        check_positive("sigma_data", sigma_data)
        self.sigma_data = sigma_data

    def x0_weight(self, t, process):
        alpha, sigma, _, _ = _scales(t, process)
        return 1.0 / self.sigma_data**2 + (alpha / sigma) ** 2

    def eps_weight(self, t, process):
        alpha, sigma, _, _ = _scales(t, process)
        return (sigma / (alpha * self.sigma_data)) ** 2 + 1.0


class VelocityMSE(Weighting):
    """MSE on the velocity u = alpha' x0 + sigma' eps (Lipman et al. 2022, flow matching), whatever F predicts.

    At fixed x_t, with det = alpha sigma' - alpha' sigma:
    u_hat - u = -(det / sigma) (x0_hat - x0) = (det / alpha) (eps_hat - eps).
    """

    def x0_weight(self, t, process):
        alpha, sigma, d_alpha, d_sigma = _scales(t, process)
        return ((alpha * d_sigma - d_alpha * sigma) / sigma) ** 2

    def eps_weight(self, t, process):
        alpha, sigma, d_alpha, d_sigma = _scales(t, process)
        return ((alpha * d_sigma - d_alpha * sigma) / alpha) ** 2


# -- the loss ------------------------------------------------------------------------------------
@dataclass
class LossOutput:
    """Per-sample weighted loss (B,) (mean over non-batch dims) and the times (B,) it was drawn at.

    vlb: with vlb_weight > 0, each sample's variational-bound term (B,) in bits per dimension (before
    the factor vlb_weight * N that `loss` includes); None otherwise.
    """

    loss: Tensor
    t: Tensor
    vlb: Tensor | None = None


class TrainingLoss(AttributeRepr):
    """What `DiffusionModule` trains with: a per-sample loss for a batch of clean data (`DenoisingLoss`,
    `diffusion_pl.consistency.ConsistencyLoss`).

    `images_seen`, the training images of every optimizer step so far (the module's `EMA.images_seen`), is
    passed to every call, so that a loss whose terms change over training (ECT's shrinking step) is a pure
    function of the run's progress and resumes exactly; a loss that does not change ignores it.
    """

    # Whether the trained network, read through the prediction, is a denoiser (x0_hat ~ E[x0 | x_t] at every t),
    # which every sampler may use. A consistency loss sets False: its x0_hat is the end of the ODE trajectory,
    # which only samplers with `needs_denoiser = False` read; `generate` refuses the others in one line.
    denoiser: bool = True

    def check(self, process: Process, prediction: Prediction) -> None:
        """Refuse, in one line, a process or parameterization this loss cannot train; the default takes any."""

    def __call__(self, model: Model, x0: Tensor, process: Process, prediction: Prediction,
                 class_labels: Tensor | None = None, null_label: int | None = None,
                 generator: torch.Generator | None = None, t: Tensor | None = None,
                 eps: Tensor | None = None, images_seen: int = 0) -> LossOutput:
        """Per-sample loss for clean data x0 (B, ...); pass t and eps for a deterministic (validation) loss."""
        raise NotImplementedError


class DenoisingLoss(TrainingLoss):
    """E_t w_out(t) ||F(x_t, t, y) - target||^2 (see the module docstring), with label dropout (Ho & Salimans 2022).

    vlb_weight: lambda of the hybrid loss (Nichol & Dhariwal 2021, Sec. 3.1: 0.001) for a network with a
        learned variance. Each sample then adds lambda N L_t, L_t its variational term in bits per
        dimension with the mean detached (`vlb.vlb_terms`; stop-gradient on the mean), so that the
        sampled term estimates lambda sum_t L_t. With N = 1000 that is guided-diffusion's RESCALED_MSE
        hybrid, vb * num_timesteps / 1000 (gaussian_diffusion.py:786-799), and L_simple is this loss's
        MSE with EpsPrediction and OutputMSE. 0 (the default) trains the mean alone.
    vlb_num_steps: N, the number of steps of the discretisation the bound is taken over; None means the
        process's own (`discrete_times()`: DDPMDiscrete(N) has N), required on a continuous process.
    """

    def __init__(self, proposal: TimeProposal = UniformTime(), weighting: Weighting = OutputMSE(),
                 p_uncond: float = 0.0, vlb_weight: float = 0.0, vlb_num_steps: int | None = None) -> None:
        if not 0.0 <= p_uncond <= 1.0:
            raise ValueError(f"p_uncond must be in [0, 1], got {p_uncond}")
        check_nonnegative("vlb_weight", vlb_weight)
        if vlb_num_steps is not None and (isinstance(vlb_num_steps, bool) or vlb_num_steps < 2):
            raise ValueError(f"vlb_num_steps must be an integer >= 2 or None, got {vlb_num_steps!r}")
        self.proposal, self.weighting, self.p_uncond = proposal, weighting, p_uncond
        self.vlb_weight, self.vlb_num_steps = vlb_weight, vlb_num_steps

    def __call__(self, model: Model, x0: Tensor, process: Process, prediction: Prediction,
                 class_labels: Tensor | None = None, null_label: int | None = None,
                 generator: torch.Generator | None = None, t: Tensor | None = None,
                 eps: Tensor | None = None, images_seen: int = 0) -> LossOutput:
        """Per-sample loss for clean data x0 (B, ...); pass t and eps for a deterministic (validation) loss.
        images_seen: unused (the denoising loss is the same at every step of training)."""
        b = x0.shape[0]
        if t is None:
            t = self.proposal.sample(b, process, generator=generator, device=x0.device)
        t = t.to(device=x0.device, dtype=x0.dtype)  # the model contract: t in x_t's dtype
        if eps is None:
            eps = draw(torch.randn, tuple(x0.shape), generator, x0.device).to(x0.dtype)
        class_labels = drop_labels(class_labels, null_label, self.p_uncond, generator)
        x_t = process.marginal(x0, t, eps)  # (B, ...)
        out, variance_interp = split_variance(model(x_t, t, class_labels), x_t)  # (B, ...), (B, ...) or None
        target = prediction.target(x0, eps, t, process).to(out.dtype)
        weight = self.weighting(t, process, prediction).to(out.dtype)  # (B,)
        loss = weight * (out - target).pow(2).flatten(1).mean(1)  # (B,)
        if self.vlb_weight == 0.0:
            return LossOutput(loss=loss, t=t)
        if variance_interp is None:
            raise ValueError(f"vlb_weight={self.vlb_weight} trains a learned variance: expected a network with twice "
                             f"the data's {x0.shape[1]} channels (out_channels={2 * x0.shape[1]})")
        num_steps = self._vlb_num_steps(process)
        x0_hat, _ = prediction.to_x0_eps(out.detach(), x_t, t, process)  # the stop-gradient on the mean
        vlb = vlb_terms(x0, x_t, t, x0_hat, variance_interp, process, num_steps)  # (B,) bits per dimension
        return LossOutput(loss=loss + (self.vlb_weight * num_steps) * vlb.to(loss.dtype), t=t, vlb=vlb)

    def _vlb_num_steps(self, process: Process) -> int:
        discrete = process.discrete_times()
        if discrete is not None and self.vlb_num_steps not in (None, len(discrete)):
            raise ValueError(f"vlb_num_steps={self.vlb_num_steps} but the process has {len(discrete)} discrete times: "
                             f"expected {len(discrete)} or None")
        if discrete is not None:
            return len(discrete)
        if self.vlb_num_steps is None:
            raise ValueError(f"vlb_weight={self.vlb_weight} on the continuous-time {type(process).__name__} needs "
                             "vlb_num_steps: expected the number of steps N of its discretisation (e.g. 1000)")
        return self.vlb_num_steps

def drop_labels(class_labels: Tensor | None, null_label: int | None, p_uncond: float,
                generator: torch.Generator | None = None) -> Tensor | None:
    """Replace each label by null_label with probability p_uncond (classifier-free guidance training)."""
    if class_labels is None or p_uncond == 0.0:
        return class_labels
    if null_label is None:
        raise ValueError("p_uncond > 0 with class labels needs null_label, the index of the 'no class' label")
    drop = draw(torch.rand, tuple(class_labels.shape), generator, class_labels.device) < p_uncond
    return torch.where(drop, torch.full_like(class_labels, null_label), class_labels)


LOG_SNR_EDGES = (-4.0, 0.0, 4.0)  # sigma/alpha > 7.4 | 1..7.4 | 0.14..1 | < 0.14


def log_snr_grid(process: Process, num: int, limit: float = 10.0) -> Tensor:
    """`num` times (float64, increasing) whose log-SNRs are evenly spaced (bin centres) over the process's
    range clipped to [-limit, limit]; the clip keeps the grid finite where alpha or sigma reaches 0
    (rectified flow at t = 1: log-SNR = -inf)."""
    ends = process.log_snr(torch.tensor([process.t_min, process.t_max], dtype=torch.float64)).clamp(-limit, limit)
    u = (torch.arange(num, dtype=torch.float64) + 0.5) / num
    return process.t_from_log_snr(ends[0] + u * (ends[1] - ends[0]))


def bucket_losses(loss: Tensor, t: Tensor, process: Process,
                  edges: tuple[float, ...] = LOG_SNR_EDGES) -> dict[str, Tensor]:
    """Mean loss per log-SNR bucket, from the noisiest: 'logsnr_lt_-4', 'logsnr_-4_to_0', ..., 'logsnr_gt_4'.

    Buckets in log-SNR rather than in t, so they mean the same noise levels for every process (EDM's
    t = sigma in [0.002, 80] put nearly every training sample in the first quarter of [t_min, t_max]).
    Empty buckets are left out.
    """
    log_snr = process.log_snr(t.detach().to(torch.float64))
    index = torch.bucketize(log_snr, torch.tensor(edges, dtype=torch.float64, device=log_snr.device))
    names = ([f"logsnr_lt_{edges[0]:g}"] + [f"logsnr_{a:g}_to_{b:g}" for a, b in zip(edges[:-1], edges[1:])]
             + [f"logsnr_gt_{edges[-1]:g}"])
    out = {}
    for i, name in enumerate(names):
        mask = index == i
        if mask.any():
            out[name] = loss.detach()[mask].mean()
    return out
