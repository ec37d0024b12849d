"""MeanFlow: a network of the average velocity, for one- and few-step generation (Geng et al. 2025).

For x_t = alpha(t) x0 + sigma(t) eps, the probability-flow ODE dx/dt = v(x, t) carries x_t to x_r (r < t);
its average velocity over [r, t] is

    u(x_t, r, t) = 1 / (t - r) * int_r^t v(x_tau, tau) dtau = (x_t - x_r) / (t - r),

so one network evaluation jumps x_r = x_t - (t - r) u(x_t, r, t) (`diffusion_pl.sampling.meanflow.MeanFlow`).
Differentiating (t - r) u = int_r^t v in t gives the MeanFlow identity (Geng et al. 2025, eq. 6)

    u(x_t, r, t) = v(x_t, t) - (t - r) d/dt u(x_t, r, t),   d/dt u = v . grad_x u + d_t u,

which `MeanFlowLoss` turns into a regression: the network's u_theta against the stop-gradient target
sg(v_c - (t - r) (v_c . grad_x u_theta + d_t u_theta)), the total derivative being one Jacobian-vector
product of u_theta with the tangent (v_c, 1, 0) in (x_t, t, r) (eq. 8-10). v_c = alpha'(t) x0 + sigma'(t) eps
is the conditional velocity, which replaces v as in flow matching. Nothing here is specific to one
process: u is read from the network output through the prediction (`prediction.average_velocity_of`), and
the process's alpha, sigma and their derivatives give x_t and v_c.

Supported: every continuous-time process whose alpha' and sigma' are finite on [t_min, t_max] (all the
included continuous ones), with a prediction whose velocity is finite there (VelocityPrediction is the
paper's; eps prediction is not finite where alpha = 0). A discrete-time process (DDPMDiscrete) has no
derivative in t and is refused.

Sources: the paper (arXiv 2505.13447): (t, r) sampling (Sec. 4.3, Table 1a, 1d), adaptive weighting
(Sec. 4.3, Table 1e); the official JAX code Gsunshine/meanflow meanflow.py:147-157 (t, r),
:226-243 (JVP, target, weight) and the PyTorch port Gsunshine/py-meanflow meanflow/models/meanflow.py:36-68,
meanflow/models/time_sampler.py:22-59.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from diffusion_pl.losses import LossOutput, TrainingLoss, draw, drop_labels
from diffusion_pl.prediction import Model, Prediction, average_velocity_of, split_variance
from diffusion_pl.processes.base import AttributeRepr, Process, append_dims, check_nonnegative, check_positive

__all__ = ["MeanFlowTimes", "MeanFlowLoss"]


class MeanFlowTimes(AttributeRepr):
    """The pair (t, r), r <= t, of MeanFlow's training (Geng et al. 2025, Sec. 4.3).

    Two times are drawn logit-normal, t_min + (t_max - t_min) sigmoid(N(mean, std^2)) (the paper's best:
    lognorm(-0.4, 1.0), Table 1d); r from (r_mean, r_std), the same as t's when None. With sort=True t and r
    are their maximum and minimum, then r = t for a fraction 1 - ratio of the samples (the paper's order,
    py-meanflow's 'v0', time_sampler.py:22-39); with sort=False r = t for 1 - ratio first and then
    r = min(r, t) ('v1', time_sampler.py:42-59, py-meanflow's default with r_mean=-4).
    ratio: the fraction with r != t (Table 1a: 25% best on ImageNet, the default; py-meanflow's CIFAR-10
    scripts use 75%). ratio = 0 is flow matching (u = v only).
    """

    def __init__(self, mean: float = -0.4, std: float = 1.0, r_mean: float | None = None,
                 r_std: float | None = None, ratio: float = 0.25, sort: bool = True) -> None:
        check_positive("std", std)
        if r_std is not None:
            check_positive("r_std", r_std)
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"ratio must be in [0, 1] (the fraction of samples with r != t), got {ratio}")
        self.mean, self.std, self.r_mean, self.r_std, self.ratio, self.sort = mean, std, r_mean, r_std, ratio, sort

    def sample(self, n: int, process: Process, generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
        """(t, r), each (n,) float32 in [t_min, t_max], r <= t."""
        def logit_normal(mean: float, std: float) -> Tensor:
            u = torch.sigmoid(mean + std * draw(torch.randn, (n,), generator, device))
            return process.t_min + (process.t_max - process.t_min) * u

        t = logit_normal(self.mean, self.std)
        r = logit_normal(self.mean if self.r_mean is None else self.r_mean, self.std if self.r_std is None else self.r_std)
        equal = draw(torch.rand, (n,), generator, device) >= self.ratio  # (n,) r = t for these
        if self.sort:
            t, r = torch.maximum(t, r), torch.minimum(t, r)
            r = torch.where(equal, t, r)
        else:
            r = torch.minimum(torch.where(equal, t, r), t)
        return t.float(), r.float()


class MeanFlowLoss(TrainingLoss):
    """MeanFlow's loss sg(w) ||u_theta(x_t, r, t) - sg(u_tgt)||^2 (Geng et al. 2025, eq. 9-10; see the module docstring).

    times: the (t, r) proposal (`MeanFlowTimes`).
    norm_p, norm_c: adaptive weight w = 1 / (||Delta||^2 + c)^p on the squared error summed over the sample's
        dimensions (Sec. 4.3, 'Adaptive loss weighting'; Table 1e: p = 1 best on ImageNet, the default; c = 1e-3
        as the paper; the official JAX code uses c = 0.01, meanflow.py:84, py-meanflow c = 1e-3 with p = 0.75 on
        CIFAR-10, train_arg_parser.py:64-65). p = 0: the plain squared error.
    p_uncond: label dropout (classifier-free guidance training, as DenoisingLoss).
    guidance_weight, guidance_kappa, guidance_t_interval: classifier-free guidance folded into the target
        (Sec. 4.2 "Mean Flows with Guidance" and the appendix's mixing scale kappa; Gsunshine/meanflow
        meanflow.py:171-189, 219-231). For a sample with a class label the velocity v_c (the JVP's tangent and the
        target's first term) becomes v~ = w v_c + (1 - w - kappa) u_theta(x_t, t, t | null) + kappa
        u_theta(x_t, t, t | c), both network terms without gradient; a sample whose label was dropped keeps v_c.
        The network then learns the average velocity of the guided field w' v(x|c) + (1 - w') v(x) with the
        effective weight w' = w / (1 - kappa) (Gsunshine/meanflow README.md:181-188), so sampling it is unguided
        (weight 1). The network's dropout, if any, is active in those calls (the official code makes them with
        train=False, meanflow.py:219; its DiT has no dropout layers).
        guidance_t_interval (t_start, t_end): guide only where the sample's t is in it, as the
        official t_start, t_end (meanflow.py:176, 183-184); None: every t. Defaults: no guidance. Guidance
        needs p_uncond > 0 (the null label's velocity is learned from the dropped labels; the official
        class_dropout_prob is 0.1, configs/default.py:58), class labels and the network's null label.

    Called as `DenoisingLoss` is: `loss(model, x0, process, prediction, class_labels, null_label, generator,
    t=None, eps=None)`. `model` takes the keyword `r` (a `precondition`ed network with `takes_interval`).
    With t given (the module's validation) and r not, r = t: the flow-matching loss of the instantaneous
    velocity at those times. The JVP is torch.func.jvp of the model; its primal output is the prediction that
    carries the gradient, so one forward-mode pass serves both (as the official code does); under DDP the
    whole loss runs inside the wrapped module's forward (Lightning's training_step), which keeps the
    gradient all-reduce (tests/training/test_meanflow_ddp.py).
    """

    def __init__(self, times: MeanFlowTimes = MeanFlowTimes(), norm_p: float = 1.0, norm_c: float = 1e-3,
                 p_uncond: float = 0.0, guidance_weight: float = 1.0, guidance_kappa: float = 0.0,
                 guidance_t_interval: tuple[float, float] | None = None) -> None:
        if not isinstance(times, MeanFlowTimes):
            raise TypeError(f"times must be a MeanFlowTimes, got {type(times).__name__}")
        check_nonnegative("norm_p", norm_p)
        check_positive("norm_c", norm_c)
        if not 0.0 <= p_uncond <= 1.0:
            raise ValueError(f"p_uncond must be in [0, 1], got {p_uncond}")
        self.times, self.norm_p, self.norm_c, self.p_uncond = times, norm_p, norm_c, p_uncond
        self.guidance_weight, self.guidance_kappa = float(guidance_weight), float(guidance_kappa)
        self.guidance_t_interval = check_guidance(self.guidance_weight, self.guidance_kappa, guidance_t_interval,
                                                  p_uncond)

    @property
    def guided(self) -> bool:
        """Whether the target is guided (guidance_weight != 1 or guidance_kappa != 0)."""
        return self.guidance_weight != 1.0 or self.guidance_kappa != 0.0

    def __call__(self, model: Model, x0: Tensor, process: Process, prediction: Prediction,
                 class_labels: Tensor | None = None, null_label: int | None = None,
                 generator: torch.Generator | None = None, t: Tensor | None = None,
                 eps: Tensor | None = None, r: Tensor | None = None, images_seen: int = 0) -> LossOutput:
        """Per-sample weighted loss (B,) for clean data x0 (B, ...); pass t (and r, eps) for a deterministic loss.
        `images_seen` (the run's progress, `TrainingLoss`) does not change MeanFlow's loss."""
        check_process(process)
        b = x0.shape[0]
        if t is None:
            t, r = self.times.sample(b, process, generator=generator, device=x0.device)
        t = t.to(device=x0.device, dtype=x0.dtype)
        r = t if r is None else r.to(device=x0.device, dtype=x0.dtype)
        if bool((r > t).any()):
            raise ValueError("MeanFlowLoss needs r <= t for every sample (the interval [r, t] runs backwards in time)")
        if eps is None:
            eps = draw(torch.randn, tuple(x0.shape), generator, x0.device).to(x0.dtype)
        labels = drop_labels(class_labels, null_label, self.p_uncond, generator)
        x_t = process.marginal(x0, t, eps)  # (B, ...)
        t64 = t.to(torch.float64)
        v = (append_dims(process.d_alpha(t64), x0.ndim) * x0 + append_dims(process.d_sigma(t64), x0.ndim) * eps)
        v = v.to(x0.dtype)  # the conditional velocity dx_t/dt (B, ...)

        def u_fn(z: Tensor, tt: Tensor, rr: Tensor, y: Tensor | None = labels) -> Tensor:
            mean, variance = split_variance(model(z, tt, y, r=rr), z)
            if variance is not None:
                raise ValueError("MeanFlowLoss trains an average velocity: expected a network with the data's "
                                 f"{z.shape[1]} output channels, not a learned variance")
            return average_velocity_of(mean, z, tt, process, prediction)

        if self.guided:
            v = self._guided_velocity(u_fn, v, x_t, t, labels, null_label)
        # d/dt u(x_t, r, t) along dx_t/dt = v, dr/dt = 0 (eq. 8): one forward-mode pass gives u and du/dt. In
        # float32 even under a mixed-precision run (bf16-mixed), as py-meanflow (meanflow/models/meanflow.py:54):
        # du/dt enters the target multiplied by t - r, and bfloat16's 8-bit mantissa would round it away.
        with torch.autocast(x0.device.type, enabled=False):
            u, du_dt = jvp(u_fn, (x_t, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))
            target = (v - append_dims(t - r, x0.ndim) * du_dt).detach()  # sg(u_tgt), eq. 10
            sq = (u - target).pow(2).flatten(1).sum(1)  # (B,) ||Delta||^2
        weight = 1.0 / (sq.detach() + self.norm_c) ** self.norm_p if self.norm_p else torch.ones_like(sq)
        return LossOutput(loss=weight * sq, t=t)

    def _guided_velocity(self, u_fn, v: Tensor, x_t: Tensor, t: Tensor, labels: Tensor | None,
                         null_label: int | None) -> Tensor:
        """v~ = w v + (1 - w - kappa) u(x_t, t, t | null) + kappa u(x_t, t, t | c) where the sample has a class label
        and t is in the interval, else v (the official guidance_fn and cond_drop, meanflow.py:171-200)."""
        if labels is None or null_label is None:
            raise ValueError(f"MeanFlowLoss with guidance_weight={self.guidance_weight:g}, guidance_kappa="
                             f"{self.guidance_kappa:g} needs class labels and the network's null label, got "
                             f"{'no class labels' if labels is None else 'no null label'}: expected a class-"
                             "conditional network with a null row (num_classes set)")
        conditional = labels != null_label  # (B,) the dropped labels keep the plain target
        if self.guidance_t_interval is not None:
            lo, hi = self.guidance_t_interval
            conditional = conditional & (t >= lo) & (t <= hi)
        if not bool(conditional.any()):
            return v
        shape = (-1,) + (1,) * (v.ndim - 1)
        w = torch.where(conditional, self.guidance_weight, 1.0).to(v.dtype).reshape(shape)
        kappa = torch.where(conditional, self.guidance_kappa, 0.0).to(v.dtype).reshape(shape)
        with torch.no_grad():  # the network's own velocities enter the stop-gradient target only
            # two calls, not one of twice the batch: the model may carry per-sample inputs of batch size B
            # (the augmentation labels DiffusionModule binds to it)
            v_null = u_fn(x_t, t, t, torch.full_like(labels, null_label))
            v_cond = u_fn(x_t, t, t, labels) if self.guidance_kappa else torch.zeros_like(v)
        return w * v + (1.0 - w - kappa) * v_null + kappa * v_cond


def jvp(fn, primals: tuple[Tensor, ...], tangents: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
    """torch.func.jvp with scaled_dot_product_attention on its math backend, the only one with forward-mode AD
    (the fused CPU / flash kernels raise NotImplementedError under a JVP; the math one costs more memory)."""
    with warnings.catch_warnings(), sdpa_kernel([SDPBackend.MATH]):
        # torch's first forward-AD call loads decompositions with torch.jit.script, which warns (torch's own code)
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
        return torch.func.jvp(fn, primals, tangents)


def check_guidance(weight: float, kappa: float, interval, p_uncond: float) -> tuple[float, float] | None:
    """Refuse, in one line, guidance options MeanFlowLoss cannot use; the interval as a (t_start, t_end) tuple."""
    if not math.isfinite(weight) or weight < 0:
        raise ValueError(f"guidance_weight must be a finite number >= 0 (1 = no guidance), got {weight}")
    if not 0.0 <= kappa < 1.0:
        raise ValueError(f"guidance_kappa must be in [0, 1) (the effective weight is guidance_weight / (1 - kappa)), "
                         f"got {kappa}")
    if interval is not None:
        try:
            lo, hi = (float(x) for x in interval)
        except (TypeError, ValueError):
            raise ValueError(f"guidance_t_interval must be two times (t_start, t_end) or None, got {interval!r}") \
                from None
        if not lo <= hi:
            raise ValueError(f"guidance_t_interval must have t_start <= t_end, got ({lo:g}, {hi:g})")
        interval = (lo, hi)
    if (weight != 1.0 or kappa != 0.0) and p_uncond == 0.0:
        raise ValueError(f"guidance_weight={weight:g}, guidance_kappa={kappa:g} needs p_uncond > 0: the null label's "
                         "velocity is learned from the dropped labels (the official code drops 10%)")
    return interval


def check_process(process: Process) -> None:
    """Refuse, in one line, a process MeanFlow cannot train on: discrete time, or alpha' / sigma' not finite."""
    if process.discrete_times() is not None:
        raise ValueError(f"MeanFlow needs a continuous-time process (it differentiates in t): "
                         f"{type(process).__name__} is discrete; expected e.g. RectifiedFlow, VPLinear or VPCosine")
    ends = torch.linspace(process.t_min, process.t_max, 65, dtype=torch.float64)
    derivatives = torch.stack([process.d_alpha(ends), process.d_sigma(ends)])
    if not bool(torch.isfinite(derivatives).all()):
        raise ValueError(f"MeanFlow needs finite alpha'(t) and sigma'(t) on [t_min, t_max] = [{process.t_min}, "
                         f"{process.t_max}]: {type(process).__name__} has an infinite one there")
