"""The step index every metric of a run is logged at: the number of optimizer steps completed.

A value measured after optimizer step k (1-based) is logged at step k: the loss of the k-th step, its gradient
norm and learning rate, the throughput up to it, and an FID or sample grid of the weights it produced all share
index k, which is also the `step=k` of its checkpoint and the `_step<k>` of its grid file. Validation after step k
is logged at k too.

Lightning itself logs `self.log` values at `fit_loop.epoch_loop._batches_that_stepped`, which it increments only
after the batch's metrics are written: the loss of step k would land at k - 1, one below the callbacks that log
with `trainer.global_step` after the step. Lightning's logger connector takes a logged value named "step" as the
index instead (`LoggerConnector.log_metrics`), so DiffusionModule logs `STEP_KEY` beside its losses: in
`training_step`, before the step, `step_in_progress(trainer)` (k); in `validation_step`, `log_step(trainer)`. The
callbacks that call the loggers themselves pass `log_step(trainer)` (after the step: k as well).

It is logged in `training_step` rather than after the step because ModelCheckpoint reads a logged "step" for its
file names (`_monitor_candidates`) in its batch-end hook, which runs before the module's: a value logged there
would still be the previous batch's.
"""

from __future__ import annotations

import lightning as L

__all__ = ["STEP_KEY", "log_step", "step_in_progress"]

STEP_KEY = "step"  # the metric name Lightning's logger connector reads as the step index (and does not log)


def log_step(trainer: L.Trainer) -> int:
    """The step index of a value measured now: the optimizer steps completed (`trainer.global_step`; at the end of
    the batch of step k it is k already, Lightning counts the step inside the optimizer step)."""
    return trainer.global_step


def step_in_progress(trainer: L.Trainer) -> int:
    """`log_step` of the optimizer step a training batch contributes to, read during the batch (`training_step`,
    every micro-batch of gradient accumulation): global_step + 1, which the step makes `trainer.global_step`."""
    return trainer.global_step + 1
