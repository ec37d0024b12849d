"""TrainingMonitor: the run's health scalars at every logged step (learning rate, throughput, memory, EMA decay).

`diffusion-pl fit` adds one to every run (diffusion_pl/cli/fit.py); list it in `trainer.callbacks` to configure it.
At every optimizer step k that the Trainer logs (k a multiple of `log_every_n_steps`) it logs, at step index k
(diffusion_pl/training/log_step.py):

    train/lr                 the learning rate step k used (several param groups: train/lr_group0, _group1, ...)
    train/images_per_sec     training images per second over all ranks, since the previous logged step
    train/sec_per_kimg       seconds per 1000 training images (EDM's sec/kimg), the same interval
    train/kimg               training images seen so far, in thousands (the module's counter, resumed runs included)
    train/ema_decay          the EMA decay of step k's update (diffusion_pl/training/ema.py: fixed, warm-up or
                             half-life schedule)
    train/peak_memory_gib    peak accelerator memory allocated on this rank since the previous logged step, GiB
                             (CUDA only: absent on CPU; torch.cuda.max_memory_allocated, then reset, as
                             NVlabs/edm2 training/training_loop.py:166-172 does per status line)

Throughput is computed by Lightning's `Throughput` (lightning.fabric.utilities.throughput) over the interval since
the previous logged step (`window`: how many logged steps the rate spans, counting back from the current one).
Lightning's `ThroughputMonitor` callback is not used: it logs at the step index before the step (one below the
losses here), warns unless the module defines `flops_per_batch`, and names its rate `device/samples_per_sec` on
one device. Images per optimizer step are the global batch: the batch of every micro-batch x the world size. The
clock stops during validation and while the project's sampling callbacks (SampleGrid, FIDCallback: any callback
with a `busy_seconds` total) evaluate, as EDM2's sec/kimg leaves out its maintenance time (NVlabs/edm2
training/training_loop.py:163-164); data loading and
checkpoint saving count. The learning rate, EMA decay and memory are read on each rank; the loggers write rank 0's.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.throughput import Throughput
from lightning.pytorch.utilities.data import extract_batch_size

from diffusion_pl.training.callbacks.optimizer_step import OptimizerStepCallback
from diffusion_pl.training.log_step import log_step
from diffusion_pl.utils.errors import UserValueError

__all__ = ["TrainingMonitor"]


class TrainingMonitor(OptimizerStepCallback):
    """Log learning rate, images/s, sec/kimg, kimg, EMA decay and peak CUDA memory at every logged step.

    Args:
        window: the rate spans this many logged steps back (2: since the previous logged step; at least 2).
    """

    def __init__(self, window: int = 2) -> None:
        super().__init__()
        if isinstance(window, bool) or not isinstance(window, int) or window < 2:
            raise UserValueError(f"TrainingMonitor: window is {window}: expected an integer >= 2 (logged steps)")
        self.window = window
        self._throughput: Throughput | None = None
        self._t0 = 0.0
        self._paused = 0.0  # seconds of validation so far (the sampling callbacks count their own)
        self._validation_start: float | None = None
        self._images = 0  # this rank's training images since train start
        self._steps = 0  # optimizer steps since train start
        self._learning_rates: dict[str, float] = {}  # of the step in progress

    # -- the clock ------------------------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._throughput = Throughput(world_size=trainer.world_size, window_size=self.window)
        self._t0, self._paused, self._images, self._steps = time.perf_counter(), 0.0, 0, 0
        self._throughput.update(time=0.0, batches=0, samples=0)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._validation_start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._validation_start is not None:
            self._paused += time.perf_counter() - self._validation_start
            self._validation_start = None

    def _clock(self, trainer: L.Trainer) -> float:
        """Training seconds since train start: wall time less validation and the sampling callbacks' work."""
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)  # else the clock reads before the step finished
        busy = sum(float(getattr(cb, "busy_seconds", 0.0)) for cb in trainer.callbacks)
        return time.perf_counter() - self._t0 - self._paused - busy

    # -- per step -------------------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._images += extract_batch_size(batch)  # before the base calls on_optimizer_step_end
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_optimizer_step_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._steps += 1
        every = trainer.log_every_n_steps
        if not trainer.loggers or not every or log_step(trainer) % every:
            return  # the steps Lightning writes its logged values at (LoggerConnector.should_update_logs)
        values = {**self._learning_rates, **self.throughput(trainer)}
        averaging = getattr(pl_module, "averaging", None)  # DiffusionModule's EMA (diffusion_pl/training/ema.py)
        if getattr(averaging, "images_seen", None) is not None:
            values["train/kimg"] = averaging.images_seen / 1000.0
        if getattr(averaging, "last_beta", None) is not None:
            values["train/ema_decay"] = float(averaging.last_beta)
        device = trainer.strategy.root_device
        if device.type == "cuda":
            values["train/peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.reset_peak_memory_stats(device)
        for name, value in values.items():
            pl_module.log(name, value, on_step=True, on_epoch=False)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        # read here: Lightning steps the step-interval schedulers before the batch-end hooks
        self._learning_rates = self.learning_rates(trainer)

    @staticmethod
    def learning_rates(trainer: L.Trainer) -> dict[str, float]:
        """{'train/lr': lr} for one param group, else {'train/lr_group<i>': lr, ...} over every optimizer's groups
        (read before the optimizer step: the rates it uses)."""
        groups = [group for optimizer in trainer.optimizers for group in optimizer.param_groups]
        if len(groups) == 1:
            return {"train/lr": float(groups[0]["lr"])}
        return {f"train/lr_group{i}": float(group["lr"]) for i, group in enumerate(groups)}

    def throughput(self, trainer: L.Trainer) -> dict[str, float]:
        """images/s over all ranks and sec/kimg since the window's first logged step (empty before it fills)."""
        if self._throughput is None:
            return {}
        self._throughput.update(time=self._clock(trainer), batches=self._steps, samples=self._images)
        rates = self._throughput.compute()
        # Throughput reports the all-rank rate only when world_size > 1; on one device it is the device's rate
        per_sec = rates.get("samples_per_sec", rates.get("device/samples_per_sec"))
        if not per_sec:
            return {}
        return {"train/images_per_sec": float(per_sec), "train/sec_per_kimg": 1000.0 / float(per_sec)}
