"""Subprocess entry for tests/training/test_training.py: a tiny fit, optionally under CPU DDP.

Running strategy="ddp" inside pytest would re-launch the whole test session in the child
processes, so multi-process runs go through this script.

usage: PYTHONPATH=<repository root> python tests/workers/train.py OUT_DIR --devices N --max-steps K
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import torch

from tests.support.training import make_datamodule, make_module


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=3)
    args = parser.parse_args()
    L.seed_everything(0, verbose=False)
    module = make_module()
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
        max_steps=args.max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, default_root_dir=args.out, limit_val_batches=0,
    )
    trainer.fit(module, make_datamodule())
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save({"net": module.net.state_dict(), "ema": module.ema.state_dict(),
                "times": torch.cat(module.loss_fn.times), "step": trainer.global_step},
               args.out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main()
