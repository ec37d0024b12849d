"""Tiny evaluation setup shared by the metric / callback / command tests and their subprocess worker
(tests/workers/eval_ddp.py); the commands and recipes name the stand-in extractor by STAND_IN."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffusion_pl.training.module import DiffusionModule
from diffusion_pl.networks.unet import UNet
from diffusion_pl.prediction import EpsPrediction
from diffusion_pl.processes.variance_preserving import VPLinear

IMAGE_SIZE = 8
DATA = f"builtin:shapes?size={IMAGE_SIZE}&count=48"
STAND_IN = "tests.support.evaluation.StandInFeatures"  # its class path, for --feature_extractor and YAML


class StandInFeatures(nn.Module):
    """A stand-in for InceptionV3: uint8 (B, 3, H, W) -> (features (B, D), logits (B, D)) by a fixed projection."""

    def __init__(self, dim: int = 12, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("proj", torch.randn(3 * 4 * 4, dim, generator=g) / 4)
        self.images_seen = 0  # counts every image passed through (real or generated)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert x.dtype == torch.uint8 and x.shape[1] == 3
        self.images_seen += x.shape[0]
        pooled = F.adaptive_avg_pool2d(x.float() / 127.5 - 1.0, 4).flatten(1)  # (B, 48)
        logits = pooled @ self.proj  # (B, D)
        return torch.tanh(logits), logits


def frozen_optimizer(params) -> torch.optim.Optimizer:
    """lr = 0: weights (and so the EMA) stay at their initial values, equal across world sizes."""
    return torch.optim.SGD(params, lr=0.0)


def make_net(num_classes: int | None = None) -> UNet:
    return UNet(img_resolution=IMAGE_SIZE, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                attn_resolutions=(), dropout=0.0, num_classes=num_classes)


def make_module(num_classes: int | None = None, frozen: bool = False) -> DiffusionModule:
    torch.manual_seed(0)
    kwargs = {"optimizer": frozen_optimizer} if frozen else {}
    return DiffusionModule(make_net(num_classes), VPLinear(), EpsPrediction(), ema_decay=0.5, **kwargs)


def recording(callback_class: type) -> type:
    """A subclass of FIDCallback or SampleGrid that keeps what each evaluation returned, for the tests to read:
    `.last` (the latest FID values) and `.written` (every grid path, in order)."""

    class Recording(callback_class):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.last: dict[str, float] = {}
            self.written: list = []

        def evaluate(self, trainer, pl_module):
            self.last = super().evaluate(trainer, pl_module)
            return self.last

        def write(self, trainer, pl_module):
            paths = super().write(trainer, pl_module)
            self.written.extend(paths)
            return paths

    Recording.__name__ = f"Recording{callback_class.__name__}"
    return Recording


def make_callbacks(extractor: nn.Module | None = None):
    """The FID + grid callbacks of the callback tests (the same in-process and under DDP)."""
    from diffusion_pl.evaluation.fid_callback import FIDCallback
    from diffusion_pl.evaluation.sample_grid import SampleGrid
    from diffusion_pl.sampling.posterior import DDIM
    from diffusion_pl.sampling.ode import HeunODE

    FIDCallback, SampleGrid = recording(FIDCallback), recording(SampleGrid)
    fid = FIDCallback(every_n_steps=2, num_samples=12, sampler=[DDIM(steps=2), HeunODE(steps=1)],
                      feature_extractor=extractor if extractor is not None else StandInFeatures(), batch_size=5)
    return fid, SampleGrid(every_n_steps=2, num_samples=10, sampler=DDIM(steps=2))


def fit(root, callbacks, devices: int = 1, logger=False, num_classes: int | None = 5, max_steps: int = 2):
    """A short CPU fit of a frozen tiny conditional model on the built-in shapes."""
    import lightning as L

    from diffusion_pl.data.datamodule import ShardDataModule

    module = make_module(num_classes=num_classes, frozen=True)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                        max_steps=max_steps, logger=logger, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, default_root_dir=root, limit_val_batches=0, callbacks=callbacks)
    trainer.fit(module, ShardDataModule(shards=DATA, batch_size=8, num_workers=0))
    return trainer
