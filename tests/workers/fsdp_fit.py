"""Sharded-training worker for tests/training/test_sharding.py (run as a script, never collected).

    PYTHONPATH=<repository root> python tests/workers/fsdp_fit.py OUT_DIR fsdp|ddp [--steps K] [--power-ema]
                                                                  [--resume CKPT]

Fits a tiny class-conditional DiT for K optimizer steps on 2 CPU processes (gloo), under Lightning's
FSDPStrategy with diffusion_pl.training.sharding.BlockWrapPolicy (through tests/support/sharding.py) or under
DDP, with plain SGD so that the two runs agree to float rounding. Writes OUT_DIR/last.ckpt
(`trainer.save_checkpoint`, the full state dict by default) and OUT_DIR/rank<R>.json: each step's logged
train/grad_norm and, per parameter of this rank's `ema`, its local shape. With --power-ema the run also has a
PowerEMA (sigma_rels 0.05 and 0.10, snapshots every 2 steps into OUT_DIR/phema) and a ModelCheckpoint every 2
steps (OUT_DIR/checkpoints), SGD has momentum 0.5, and the record lists the local shapes of PowerEMA's
averages; --resume continues from a checkpoint (`trainer.fit(..., ckpt_path=CKPT)`).
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from diffusion_pl.losses import DenoisingLoss
from diffusion_pl.networks.dit import dit_tiny
from diffusion_pl.processes.variance_preserving import VPLinear
from diffusion_pl.training.callbacks.power_ema import PowerEMA
from diffusion_pl.training.module import DiffusionModule
from diffusion_pl.training.sharding import BlockWrapPolicy
from tests.support.sharding import CPUFSDPStrategy
from tests.support.training import IMAGE_SIZE, make_datamodule


class GradNorms(L.Callback):
    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.norms.append(float(trainer.callback_metrics["train/grad_norm"]))


def make_module(momentum: float = 0.0) -> DiffusionModule:
    net = dit_tiny(img_resolution=IMAGE_SIZE, num_classes=5)  # the five classes of builtin:shapes
    return DiffusionModule(net, VPLinear(), loss=DenoisingLoss(p_uncond=0.0), ema_decay=0.5,
                           optimizer=functools.partial(torch.optim.SGD, lr=0.5, momentum=momentum))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("strategy", choices=("fsdp", "ddp"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--power-ema", action="store_true")
    parser.add_argument("--resume", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    # momentum gives the optimizer a state: Lightning 2.6's FSDPStrategy cannot resume an empty one (IndexError)
    module = make_module(momentum=0.5 if args.power_ema else 0.0)
    strategy = CPUFSDPStrategy(auto_wrap_policy=BlockWrapPolicy()) if args.strategy == "fsdp" else "ddp"
    norms = GradNorms()
    callbacks: list[L.Callback] = [norms]
    if args.power_ema:
        power = PowerEMA(sigma_rels=(0.05, 0.10), snapshot_every_n_steps=2, dirpath=str(args.out / "phema"))
        callbacks += [power, ModelCheckpoint(dirpath=args.out / "checkpoints", every_n_train_steps=2, save_top_k=-1)]
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=args.steps, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=args.power_ema,
                        default_root_dir=args.out, limit_val_batches=0, callbacks=callbacks)
    trainer.fit(module, make_datamodule(batch_size=4), ckpt_path=args.resume)
    trainer.save_checkpoint(args.out / "last.ckpt")  # every rank calls it: FSDP gathers the full state
    record = {"grad_norms": norms.norms, "net_type": type(module.net).__name__,
              "ema_shapes": [list(p.shape) for p in module.ema.parameters()]}
    if args.power_ema:
        record["power_ema_shapes"] = [[list(a.shape) for a in averages] for averages in power.ema.averages]
    Path(args.out, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
