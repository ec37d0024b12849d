"""Subprocess entry for tests/training/test_scm_ddp.py: one sCT training step of DiffusionModule on 2 CPU ranks.

Lightning runs the step (accelerator cpu, devices 2, DDP with gloo): its DDP wrapper's forward runs
DiffusionModule.training_step, whose SCMLoss takes the JVP of the network and holds the adaptive weight's
parameters. Each rank saves, before the optimizer step, the gradient of every trained parameter (net.* and
loss_fn.*), the images its sampler gave it, and the random state the loss drew its times and noise from; the
test recomputes the step in one process on the same global batch with those draws.

usage: PYTHONPATH=<repository root> python tests/workers/scm_ddp.py OUT_DIR
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, TensorDataset

from diffusion_pl.networks.unet import UNet
from diffusion_pl.prediction import VPrediction
from diffusion_pl.processes.interpolants import Trigonometric
from diffusion_pl.scm import SCMLoss
from diffusion_pl.training.module import DiffusionModule

GLOBAL_BATCH = 8


def make_module() -> DiffusionModule:
    """A tiny U-Net under sCT on TrigFlow; r = 1 from step 0 (warmup_steps 0) so the JVP's term is in the target."""
    torch.manual_seed(0)
    net = UNet(img_resolution=8, in_channels=1, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
               attn_resolutions=(4,), dropout=0.0)
    with torch.no_grad():  # the output convolution starts at zero: give it weights so every gradient is non-trivial
        net.conv_out.weight.normal_(0.0, 0.1)
    return DiffusionModule(net, Trigonometric(), VPrediction(), SCMLoss(warmup_steps=0))


def global_batch() -> torch.Tensor:
    return torch.randn(GLOBAL_BATCH, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def trained_grads(module: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    return {k: None if p.grad is None else p.grad.detach().clone()
            for k, p in module.named_parameters() if p.requires_grad}


class SaveStep(L.Callback):
    """Save this rank's gradients after the backward (all-reduced by DDP) and before the optimizer step."""

    def __init__(self, out: Path, record: dict) -> None:
        self.out, self.record = out, record

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        torch.save({"grads": trained_grads(pl_module), **self.record},
                   self.out / f"rank{trainer.global_rank}.pt")


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    module = make_module()
    record: dict = {}
    forward = module.loss_fn.forward

    @functools.wraps(forward)
    def recording_forward(model, x0, *args, **kwargs):  # the draws' random state and the rank's images
        record.setdefault("rng_state", torch.get_rng_state())
        record.setdefault("x0", x0.detach().clone())
        return forward(model, x0, *args, **kwargs)

    module.loss_fn.forward = recording_forward
    images = global_batch()
    loader = DataLoader(TensorDataset(images, torch.zeros(GLOBAL_BATCH, dtype=torch.long)),
                        batch_size=GLOBAL_BATCH // 2, shuffle=False)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=DDPStrategy(process_group_backend="gloo"),
                        max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, default_root_dir=out, limit_val_batches=0,
                        callbacks=[SaveStep(out, record)])
    trainer.fit(module, train_dataloaders=loader)


if __name__ == "__main__":
    main()
