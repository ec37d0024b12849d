"""Consistency training with ECT's shrinking step (Geng et al. 2024, "Consistency Models Made Easy").

A consistency model maps any point x_t of a probability-flow ODE trajectory to the trajectory's start,
f(x_t, t) = x_{t_min} (Song et al. 2023). Here f is the Denoiser's x0 output: x0_hat = a_x0 x_t + b_x0 F, so
every parameterization whose network weight b_x0 vanishes as sigma -> 0 gives the boundary condition
f(x, t_min) ~ x / alpha(t_min) by construction (`check_boundary`). Discrete-time consistency training pairs
each time t with an earlier r < t, noises the same clean sample with the SAME eps at both, and pulls
f(x_t, t) towards the stop-gradient target f(x_r, r):

    L = E_{t, x0, eps} [ w(t, r) d(f(x_t, t), sg f(x_r, r)) ],    w = 1 / (s_t - s_r)

with s = sigma / alpha the noise level (EDM's sigma). ECT's choices (locuslab/ect@4311059), each an argument:

- t: log-normal noise level, log s ~ N(-1.1, 2.0^2) (training/loss.py:13, 54-55; iCT's proposal, Song &
  Dhariwal 2023, Sec. 3.5), clamped to the process's range here (ECT's own t is unbounded);
- r: s_r = s_t (1 - q^-(stage+1) (1 + k sigmoid(-b s_t))) (loss.py:45-50, `ECTSchedule`), clamped at 0; the
  stage grows by one every `images_per_stage` training images (ct_training_loop.py:241, 383), so r -> t;
- where s_r falls below the process's noise level at t_min, the target is x0 itself (loss.py:70-79: r = 0,
  D_yr = y), the boundary condition held by the loss;
- the target uses the trained network (no EMA teacher) without gradient and with the SAME dropout mask as
  the prediction (loss.py:66-73: the RNG state is restored before the second call);
- d: sqrt(||f_t - f_r||^2 + c^2) - c summed over all dimensions (loss.py:82-89; pseudo-Huber of iCT Sec. 3.3
  with c = 0.00054 sqrt(dim) when `c=None`; ECT's CIFAR-10 run uses c = 0, the L2 norm), or 'l2', the
  squared norm of the original consistency models (Song et al. 2023, Sec. 3);
- w = 1 / (s_t - s_r) (loss.py:92).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from diffusion_pl.losses import LogNormalNoise, LossOutput, TimeProposal, TrainingLoss, draw, drop_labels
from diffusion_pl.prediction import Model, Prediction, split_variance
from diffusion_pl.processes.base import AttributeRepr, Process, append_dims, check_nonnegative

__all__ = ["ECTSchedule", "ConsistencyLoss", "check_boundary", "BOUNDARY_TOLERANCE"]

# f(x, t_min) = (alpha a_x0) x / alpha + b_x0 F: both departures from the identity, for a unit-scale output F,
# must stay below this (EDM preconditioning on EDM(0.002, 80): 3e-5 and 0.002; eps prediction on VPLinear: ~0.01;
# x0 prediction: 1 and 1)
BOUNDARY_TOLERANCE = 0.05


def check_boundary(process: Process, prediction: Prediction) -> None:
    """Refuse, in one line, a parameterization whose x0 output is not the identity at t_min (within
    BOUNDARY_TOLERANCE): f(x, t_min) = alpha a_x0 (x / alpha) + b_x0 F needs alpha a_x0 ~ 1 and b_x0 ~ 0 there.

    Every parameterization whose network weight b_x0 scales with sigma passes on a process with a small
    sigma(t_min): EDMPreconditioning (c_skip = sd^2 / (s^2 + sd^2), c_out = s sd / sqrt(s^2 + sd^2)), eps, v,
    score, scaled score and velocity prediction. X0Prediction (f = F at every t) does not; nor does any
    parameterization on a process that still holds much noise at t_min.
    """
    t = torch.tensor([process.t_min], dtype=torch.float64)
    a_x0, b_x0, _, _ = prediction.coefficients(t, process)
    skip = float(process.alpha(t)[0] * a_x0[0])
    out = float(b_x0[0].abs())
    if not (abs(skip - 1.0) <= BOUNDARY_TOLERANCE and out <= BOUNDARY_TOLERANCE):
        raise ValueError(f"{type(prediction).__name__} on {process!r} gives f(x, t_min) = {skip:.3g} x + {out:.3g} F, "
                         f"not the identity a consistency model needs: expected a parameterization whose network "
                         f"weight vanishes at t_min (EDMPreconditioning, eps, v, velocity; not X0Prediction), each "
                         f"within {BOUNDARY_TOLERANCE}")


def check_finite_noise(process: Process) -> None:
    """ECT's mapping works on the noise level sigma/alpha: refuse a process where it is infinite at t_max."""
    level = float(process.noise_level(torch.tensor([process.t_max], dtype=torch.float64))[0])
    if not math.isfinite(level):
        raise ValueError(f"{process!r} has noise level sigma/alpha = inf at t_max: expected a process with a finite "
                         f"one for consistency training (e.g. t_max={process.t_max} lowered to 0.99)")


class ECTSchedule(AttributeRepr):
    """ECT's mapping from t's noise level s_t to r's: s_r = max(0, s_t (1 - q^-(stage+1) (1 + k sigmoid(-b s_t)))).

    stage = images_seen // images_per_stage: the step t - r halves (q = 2) every stage. Defaults are ECT's
    CIFAR-10 run: q = 2, k = 8, b = 1 (ct_train.py:71-73, the 'sigmoid' mapping; k = 0 is the 'const' one,
    loss.py:39-43), a stage every 250 ticks of 12.8k images = 3.2M images (run_ecm.sh:6; the 1-hour run
    run_ecm_1hour.sh:7 uses q = 256 with no doubling).
    """

    def __init__(self, q: float = 2.0, k: float = 8.0, b: float = 1.0, images_per_stage: int = 3_200_000) -> None:
        if not q > 1.0:
            raise ValueError(f"q must be > 1 (the factor the step shrinks by per stage), got {q}")
        check_nonnegative("k", k)
        check_nonnegative("b", b)
        if isinstance(images_per_stage, bool) or int(images_per_stage) != images_per_stage or images_per_stage < 1:
            raise ValueError(f"images_per_stage must be a positive integer, got {images_per_stage!r}")
        self.q, self.k, self.b, self.images_per_stage = q, k, b, int(images_per_stage)

    def stage(self, images_seen: int) -> int:
        """The stage after `images_seen` training images."""
        return int(images_seen) // self.images_per_stage

    def r_noise_level(self, s_t: Tensor, images_seen: int) -> Tensor:
        """s_r (float64, like s_t) for noise levels s_t after `images_seen` training images."""
        s_t = s_t.to(torch.float64)
        decay = self.q ** -(self.stage(images_seen) + 1)
        return (s_t * (1.0 - decay * (1.0 + self.k * torch.sigmoid(-self.b * s_t)))).clamp_min(0.0)


Distance = Literal["pseudo_huber", "l2"]


class ConsistencyLoss(TrainingLoss):
    """Discrete-time consistency training with ECT's schedule (see the module docstring).

    Args:
        proposal: the distribution of t; None: ECT's and iCT's log-normal noise level, `LogNormalNoise(-1.1, 2.0)`.
        schedule: r from t and the images seen; None: `ECTSchedule()`, ECT's CIFAR-10 settings.
        distance: 'pseudo_huber' (sqrt(||.||^2 + c^2) - c, summed over dimensions) or 'l2' (||.||^2).
        c: the pseudo-Huber constant; None means iCT's 0.00054 sqrt(dim) (Song & Dhariwal 2023, Sec. 3.3);
            ECT's CIFAR-10 run: 0 (the L2 norm, ct_train.py:75).
        p_uncond: label dropout for classifier-free guidance (as `DenoisingLoss`).
    """

    denoiser = False  # x0_hat is f, the trajectory's end: sampled by `Consistency`, refused by diffusion samplers

    def __init__(self, proposal: TimeProposal | None = None, schedule: ECTSchedule | None = None,
                 distance: Distance = "pseudo_huber", c: float | None = 0.0, p_uncond: float = 0.0) -> None:
        if distance not in ("pseudo_huber", "l2"):
            raise ValueError(f"distance must be 'pseudo_huber' or 'l2', got {distance!r}")
        if c is not None:
            check_nonnegative("c", c)
        if not 0.0 <= p_uncond <= 1.0:
            raise ValueError(f"p_uncond must be in [0, 1], got {p_uncond}")
        self.proposal = proposal if proposal is not None else LogNormalNoise(-1.1, 2.0)
        self.schedule = schedule if schedule is not None else ECTSchedule()
        self.distance, self.c, self.p_uncond = distance, c, p_uncond

    def check(self, process: Process, prediction: Prediction) -> None:
        check_boundary(process, prediction)
        check_finite_noise(process)

    def pair(self, t: Tensor, process: Process, images_seen: int) -> tuple[Tensor, Tensor, Tensor]:
        """(t_r, weight, at_boundary) for times t (B,): r's time, 1 / (s_t - s_r), and where s_r < s(t_min)."""
        s_t = process.noise_level(t.to(torch.float64))
        s_r = self.schedule.r_noise_level(s_t, images_seen)
        s_min = float(process.noise_level(torch.tensor([process.t_min], dtype=torch.float64))[0])
        boundary = s_r < s_min
        t_r = process.t_from_noise_level(s_r.clamp_min(s_min))
        t_r = torch.minimum(t_r, t.to(torch.float64))  # rounding of the round trip through the noise level
        return t_r, 1.0 / (s_t - s_r), boundary

    def __call__(self, model: Model, x0: Tensor, process: Process, prediction: Prediction,
                 class_labels: Tensor | None = None, null_label: int | None = None,
                 generator: torch.Generator | None = None, t: Tensor | None = None,
                 eps: Tensor | None = None, images_seen: int = 0) -> LossOutput:
        """Per-sample loss for clean data x0 (B, ...); pass t and eps for a deterministic (validation) loss."""
        self.check(process, prediction)
        b = x0.shape[0]
        if t is None:
            t = self.proposal.sample(b, process, generator=generator, device=x0.device)
        t = t.to(device=x0.device, dtype=x0.dtype)
        if eps is None:
            eps = draw(torch.randn, tuple(x0.shape), generator, x0.device).to(x0.dtype)
        class_labels = drop_labels(class_labels, null_label, self.p_uncond, generator)
        t_r, weight, boundary = self.pair(t, process, images_seen)
        t_r = t_r.to(t.dtype)
        x_t, x_r = process.marginal(x0, t, eps), process.marginal(x0, t_r, eps)  # the same eps
        devices = [x0.device] if x0.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # the target's dropout mask is the prediction's
            f_t = self._f(model, x_t, t, class_labels, process, prediction)
        with torch.no_grad():
            f_r = self._f(model, x_r, t_r, class_labels, process, prediction)
        f_r = torch.where(append_dims(boundary.to(x0.device), x0.ndim), x0, torch.nan_to_num(f_r)).to(f_t.dtype)
        sq = (f_t - f_r).pow(2).flatten(1).sum(1)  # (B,)
        if self.distance == "l2":
            d = sq
        else:
            c = self.c if self.c is not None else 0.00054 * math.sqrt(x0[0].numel())
            d = torch.sqrt(sq + c**2) - c
        return LossOutput(loss=weight.to(device=d.device, dtype=d.dtype) * d, t=t)

    @staticmethod
    def _f(model: Model, x: Tensor, t: Tensor, class_labels: Tensor | None, process: Process,
           prediction: Prediction) -> Tensor:
        """The consistency function f(x, t) = the parameterization's x0 output."""
        out, _ = split_variance(model(x, t, class_labels), x)
        return prediction.to_x0_eps(out, x, t, process)[0]
