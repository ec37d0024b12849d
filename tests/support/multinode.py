"""Instrumentation for tests/training/test_multinode.py, loaded by `diffusion-pl fit` through `class_path`
(`tests.support.multinode.BatchProbe`).

The fits under test run in subprocesses (torchrun node processes, a SLURM stand-in job), so
what each rank trained on and ended with is written to files the test reads afterwards:

- `<out>/steps-rank<R>-pid<P>.jsonl`: one JSON line per optimizer step, written at batch end:
  the global step before and after it and a hash of every image of the batch it trained on.
- `<out>/final-rank<R>-pid<P>.pt`: the module's whole state_dict (net, ema, ...) at train end.

`pause_at_step: K` holds the run after step K (between two optimizer steps) until the file
`<out>/release` exists (at most 120 s), so a test can signal it at a known step boundary.
`signal_in_step: K` sends SIGUSR1 to the process itself right after `optimizer.step()` of step
K returns (before Lightning counts the step and before the EMA update): a SLURM signal landing
at that instant, made deterministic.

The hashes are of what the training consumed, not of the datamodule's internals, and are
invariant to a horizontal flip (the stream flips at random), so "ranks saw disjoint data" means
no image, in either orientation, reached both ranks.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from pathlib import Path

import lightning as L
import torch

__all__ = ["BatchProbe", "image_hashes"]


def image_hashes(images: torch.Tensor) -> list[str]:
    """One flip-invariant hash per image of a (B, C, H, W) batch: the smaller digest of both orientations."""
    out = []
    for image in images.detach().cpu().contiguous():
        digests = (hashlib.sha1(im.contiguous().numpy().tobytes()).hexdigest() for im in (image, image.flip(-1)))
        out.append(min(digests))
    return out


class BatchProbe(L.Callback):
    """Record each rank's batches and final state under `out`; pause or signal a run where a test needs it."""

    def __init__(self, out: str, pause_at_step: int | None = None, signal_in_step: int | None = None) -> None:
        self.out = Path(out)
        self.pause_at_step = pause_at_step
        self.signal_in_step = signal_in_step
        self._step_before: int | None = None
        self._hashes: list[str] = []

    def _name(self, trainer: L.Trainer, kind: str, suffix: str) -> Path:
        return self.out / f"{kind}-rank{trainer.global_rank}-pid{os.getpid()}.{suffix}"

    def on_train_start(self, trainer, pl_module) -> None:
        if self.signal_in_step is None:
            return

        def after_step(optimizer, args, kwargs) -> None:
            if trainer.global_step == self.signal_in_step - 1:  # not counted yet: still the step before
                os.kill(os.getpid(), signal.SIGUSR1)  # Python runs the handler before this returns

        for optimizer in trainer.optimizers:
            optimizer.register_step_post_hook(after_step)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_before = trainer.global_step
        self._hashes = image_hashes(batch[0])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        record = {"rank": trainer.global_rank, "world_size": trainer.world_size, "before": self._step_before,
                  "after": trainer.global_step, "hashes": self._hashes}
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self._name(trainer, "steps", "jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if trainer.global_step == self.pause_at_step:
            # a signal landing now runs its handler here, between two optimizer steps
            release, deadline = self.out / "release", time.monotonic() + 120
            while not release.exists() and time.monotonic() < deadline:
                time.sleep(0.01)

    def on_train_end(self, trainer, pl_module) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        torch.save({"state_dict": state, "global_step": trainer.global_step}, self._name(trainer, "final", "pt"))
