"""Tiny training setup shared by the training tests and their subprocess workers (tests/workers/train.py)."""

from __future__ import annotations

import torch

from diffusion_pl.data.datamodule import ShardDataModule
from diffusion_pl.losses import DenoisingLoss
from diffusion_pl.training.module import DiffusionModule
from diffusion_pl.networks.unet import UNet
from diffusion_pl.prediction import EpsPrediction
from diffusion_pl.processes.variance_preserving import VPLinear

IMAGE_SIZE = 16


class RecordingLoss(DenoisingLoss):
    """DenoisingLoss that keeps the times it drew (to compare noise across ranks and runs)."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[torch.Tensor] = []

    def __call__(self, *args, **kwargs):
        out = super().__call__(*args, **kwargs)
        self.times.append(out.t.detach().clone())
        return out


def make_net(num_classes: int | None = None) -> UNet:
    return UNet(img_resolution=IMAGE_SIZE, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                attn_resolutions=(8,), dropout=0.1, num_classes=num_classes)


def make_module(**kwargs) -> DiffusionModule:
    kwargs.setdefault("ema_decay", 0.9)
    return DiffusionModule(make_net(), VPLinear(), EpsPrediction(), RecordingLoss(), **kwargs)


def make_datamodule(num_workers: int = 0, batch_size: int = 8) -> ShardDataModule:
    return ShardDataModule(shards=f"builtin:shapes?size={IMAGE_SIZE}", batch_size=batch_size,
                           num_workers=num_workers, seed=0)


class StepMarker(__import__("lightning").Callback):
    """Append the global step to a file after every optimizer step (lets a parent process watch a run)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with open(self.path, "a") as f:
            f.write(f"{trainer.global_step}\n")


class DieOnRank(__import__("lightning").Callback):
    """Kill this process with os._exit (no cleanup, as a SIGKILL or an OOM kill) at the start of training step
    `step` on global rank `rank`: a distributed peer that dies mid-training."""

    def __init__(self, rank: int = 1, step: int = 1) -> None:
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            __import__("os")._exit(9)
