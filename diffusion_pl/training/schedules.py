"""Learning-rate schedules: the optimizer's lr times a multiplier that is a pure function of the optimizer step.

    Constant(warmup_steps)                       linear warm-up, then the optimizer's lr
    Cosine(warmup_steps, total_steps, min_ratio) linear warm-up, then half a cosine down to min_ratio x lr
    InverseSqrt(ref_steps | ref_kimg, rampup_*)  EDM2's inverse square root decay with its linear ramp-up

`step` counts the optimizer steps taken before the one the multiplier is for (0 for the first), as
torch.optim.lr_scheduler.LambdaLR counts them: DiffusionModule steps a LambdaLR with `schedule(step)` after every
optimizer step, and Lightning saves and restores its step count with each checkpoint, so a resumed run continues
with exactly the multipliers of an uninterrupted one. Every warm-up is lr x min(step / warmup, 1): the first step
has lr 0, as in DDPM (utils.get_warmed_up_lr), score_sde (losses.optimization_manager) and EDM (NVlabs/edm
training/training_loop.py:136).

A schedule may leave out what a run knows: `Cosine` without `total_steps` takes the trainer's length
(`estimated_stepping_batches`: max_steps, or max_epochs x batches), and `InverseSqrt` counted in images without
`batch_size` takes the global batch from the data module (batch_size x devices x nodes x accumulate_grad_batches).
`DiffusionModule.configure_optimizers` fills them with `bind(trainer)`.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from diffusion_pl.utils.errors import UserValueError
from diffusion_pl.utils.recorded import RecordsInit, attributes

__all__ = ["Constant", "Cosine", "InverseSqrt", "Schedule", "global_batch"]


class Schedule(RecordsInit):
    """A learning-rate multiplier as a function of the optimizer step (`schedule(step)`; module docstring)."""

    def __call__(self, step: int) -> float:
        raise NotImplementedError

    def bind(self, trainer: Any) -> "Schedule":
        """This schedule with what it left to the run filled from `trainer` (a copy; self when nothing is left)."""
        return self

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in attributes(self).items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and attributes(self) == attributes(other)


class Constant(Schedule):
    """The optimizer's lr after a linear warm-up: min(step / warmup_steps, 1) (DDPM's warm-up, 5000 steps).

    Args:
        warmup_steps: optimizer steps of the warm-up; 0: the optimizer's lr from the first step.
    """

    def __init__(self, warmup_steps: int = 0) -> None:
        self.warmup_steps = _steps("Constant", "warmup_steps", warmup_steps)

    def __call__(self, step: int) -> float:
        return _warmup(step, self.warmup_steps)


class Cosine(Schedule):
    """Linear warm-up, then half a cosine from 1 down to `min_ratio` at `total_steps`, then `min_ratio`.

    After the warm-up, with p = (step - warmup_steps) / (total_steps - warmup_steps) clipped to [0, 1]:
    min_ratio + (1 - min_ratio) (1 + cos(pi p)) / 2 (SGDR's annealing, Loshchilov & Hutter 2017, eq. 5,
    one cycle without restarts, floor min_ratio x lr).

    Args:
        warmup_steps: optimizer steps of the linear warm-up.
        total_steps: the step at which the decay reaches the floor; None: the trainer's length (max_steps).
        min_ratio: the floor, as a fraction of the optimizer's lr, in [0, 1].
    """

    def __init__(self, warmup_steps: int = 0, total_steps: int | None = None, min_ratio: float = 0.0) -> None:
        self.warmup_steps = _steps("Cosine", "warmup_steps", warmup_steps)
        self.total_steps = None if total_steps is None else _steps("Cosine", "total_steps", total_steps)
        if isinstance(min_ratio, bool) or not isinstance(min_ratio, (int, float)) or not 0.0 <= min_ratio <= 1.0:
            raise UserValueError(f"Cosine min_ratio is {min_ratio!r}: expected a number in [0, 1]")
        self.min_ratio = float(min_ratio)
        if self.total_steps is not None:
            self._check_total()

    def _check_total(self) -> None:
        if self.total_steps <= self.warmup_steps:
            raise UserValueError(f"Cosine total_steps is {self.total_steps} and warmup_steps {self.warmup_steps}: "
                                 "expected total_steps > warmup_steps (the decay runs between them)")

    def __call__(self, step: int) -> float:
        if self.total_steps is None:
            raise UserValueError("Cosine has no total_steps: expected Cosine(total_steps=...) or a bind(trainer) "
                                 "with max_steps")
        if step < self.warmup_steps:
            return _warmup(step, self.warmup_steps)
        progress = min((step - self.warmup_steps) / (self.total_steps - self.warmup_steps), 1.0)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def bind(self, trainer: Any) -> "Cosine":
        if self.total_steps is not None:
            return self
        total = trainer.estimated_stepping_batches  # max_steps when set, else max_epochs x batches (or inf)
        if not math.isfinite(total) or total < 1:
            raise UserValueError(f"lr_schedule Cosine has no total_steps and the trainer's length is unknown "
                                 f"(max_steps {trainer.max_steps}, estimated steps {total}): expected "
                                 "Cosine(total_steps=...) or --trainer.max_steps")
        bound = copy.copy(self)
        bound.total_steps = int(total)
        bound._check_total()
        return bound


class InverseSqrt(Schedule):
    """EDM2's schedule: 1 / sqrt(max(t / t_ref, 1)) x min(t / t_rampup, 1), t the training time so far.

    Karras et al. 2024 (EDM2, "Analyzing and Improving the Training Dynamics of Diffusion Models"), learning rate
    decay alpha(t) = alpha_ref / sqrt(max(t / t_ref, 1)) with the optimizer's lr as alpha_ref; NVlabs/edm2
    training/training_loop.py:47-53 (`learning_rate_schedule`) counts t in images before the step (`cur_nimg`),
    t_ref in batches (`ref_batches`, the `--decay` option, 70000 at ImageNet-512, 35000 at 64) and the ramp-up in
    millions of images (`rampup_Mimg`, default 10); train_edm2.py:26-37 lists the presets.

    Give t_ref either in optimizer steps (`ref_steps`, EDM2's `--decay` batches) or in thousands of images
    (`ref_kimg`), and the ramp-up likewise (`rampup_steps` or `rampup_kimg`; 0 / None: none). With a constant
    global batch B, t = step x B images, so a count in images is step x B / (kimg x 1000); `batch_size` is B,
    None: the global batch of the run (`bind`).

    Args:
        ref_steps: t_ref in optimizer steps; or
        ref_kimg: t_ref in thousands of training images.
        rampup_steps: linear ramp-up length in optimizer steps (0: no ramp-up); or
        rampup_kimg: ramp-up length in thousands of training images (EDM2: 10000).
        batch_size: the global batch (images per optimizer step) that converts kimg to steps; None: the run's.
    """

    def __init__(self, ref_steps: float | None = None, ref_kimg: float | None = None, rampup_steps: float = 0,
                 rampup_kimg: float | None = None, batch_size: int | None = None) -> None:
        if (ref_steps is None) == (ref_kimg is None):
            raise UserValueError(f"InverseSqrt got ref_steps={ref_steps} and ref_kimg={ref_kimg}: expected exactly "
                                 "one of them (t_ref in optimizer steps or in thousands of images)")
        if ref_steps is not None:
            _positive("InverseSqrt", "ref_steps", ref_steps)
        if ref_kimg is not None:
            _positive("InverseSqrt", "ref_kimg", ref_kimg)
        if rampup_kimg is not None and rampup_steps:
            raise UserValueError(f"InverseSqrt got rampup_steps={rampup_steps} and rampup_kimg={rampup_kimg}: "
                                 "expected at most one of them")
        _non_negative("InverseSqrt", "rampup_steps", rampup_steps)
        if rampup_kimg is not None:
            _non_negative("InverseSqrt", "rampup_kimg", rampup_kimg)
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size < 1):
            raise UserValueError(f"InverseSqrt batch_size is {batch_size!r}: expected an integer >= 1 (the global "
                                 "batch) or None")
        self.ref_steps, self.ref_kimg = ref_steps, ref_kimg
        self.rampup_steps, self.rampup_kimg = rampup_steps, rampup_kimg
        self.batch_size = batch_size

    @property
    def counts_images(self) -> bool:
        return self.ref_kimg is not None or bool(self.rampup_kimg)

    def _in_steps(self, steps: float | None, kimg: float | None) -> float:
        if kimg is None:
            return float(steps or 0)
        if self.batch_size is None:
            raise UserValueError("InverseSqrt counts kimg and has no batch_size: expected "
                                 "InverseSqrt(batch_size=...) (the global batch) or a bind(trainer)")
        return kimg * 1000.0 / self.batch_size

    def __call__(self, step: int) -> float:
        ref, rampup = self._in_steps(self.ref_steps, self.ref_kimg), self._in_steps(self.rampup_steps,
                                                                                     self.rampup_kimg)
        factor = 1.0 / math.sqrt(max(step / ref, 1.0))
        if rampup > 0:
            factor *= min(step / rampup, 1.0)
        return factor

    def bind(self, trainer: Any) -> "InverseSqrt":
        if not self.counts_images:
            return self
        batch = global_batch(trainer)
        if self.batch_size is None:
            if batch is None:
                raise UserValueError("lr_schedule InverseSqrt counts kimg and the data module has no batch_size: "
                                     "expected InverseSqrt(batch_size=...) (the global batch, images per step)")
            bound = copy.copy(self)
            bound.batch_size = batch
            return bound
        if batch is not None and batch != self.batch_size:
            raise UserValueError(f"lr_schedule InverseSqrt batch_size is {self.batch_size} but the run's global "
                                 f"batch is {batch} ({_batch_terms(trainer)}): expected them equal, or batch_size "
                                 "None to take the run's")
        return self


def global_batch(trainer: Any) -> int | None:
    """Images per optimizer step over all ranks: the data module's batch_size x world size x accumulated batches;
    None when the data module declares no batch_size."""
    batch = getattr(getattr(trainer, "datamodule", None), "batch_size", None)
    if batch is None:
        return None
    return int(batch) * trainer.world_size * max(1, trainer.accumulate_grad_batches)


def _batch_terms(trainer: Any) -> str:
    return (f"batch_size {trainer.datamodule.batch_size} x {trainer.world_size} devices x "
            f"{max(1, trainer.accumulate_grad_batches)} accumulated")


def _warmup(step: int, warmup_steps: int) -> float:
    return 1.0 if warmup_steps == 0 else min(1.0, step / warmup_steps)


def _steps(owner: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UserValueError(f"{owner} {name} is {value!r}: expected an integer >= 0 (optimizer steps)")
    return value


def _positive(owner: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise UserValueError(f"{owner} {name} is {value!r}: expected a positive number")


def _non_negative(owner: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise UserValueError(f"{owner} {name} is {value!r}: expected a number >= 0")
