"""The `diffusion-pl` command: LightningCLI's fit / validate / test / predict plus prepare, sample, evaluate.

Training subcommands are LightningCLI (components picked by `class_path` in YAML, `--print_config`,
the resolved config saved in every run folder). The project's own subcommands have their own
argparse front ends and are dispatched before LightningCLI sees the arguments.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO

from diffusion_pl.callbacks.checkpointing import AtomicCheckpointIO, PreemptionCheckpoint, find_resume_checkpoint
from diffusion_pl.metrics import InceptionWeightsError
from diffusion_pl.module import DiffusionModule

__all__ = ["DiffusionCLI", "main"]

# name -> (module with `main(argv) -> int`, one-line description)
PROJECT_COMMANDS = {
    "prepare": ("diffusion_pl.data.prepare", "write webdataset shards (+ manifest) from CIFAR-10 or an image folder"),
    "sample": ("diffusion_pl.commands.sample", "generate images from a checkpoint (PNGs and/or an ADM/EDM .npz)"),
    "evaluate": ("diffusion_pl.commands.evaluate", "FID / KID / IS against cached reference statistics, bits/dim"),
}
LIGHTNING_COMMANDS = {
    "fit": "train a model (resume with --ckpt_path last)",
    "validate": "run the validation loop (deterministic denoising loss, EMA weights)",
    "test": "run the test loop",
    "predict": "run the predict loop",
}


class DiffusionCLI(LightningCLI):
    """LightningCLI for DiffusionModule and any LightningDataModule, with crash-safe checkpointing."""

    def __init__(self, args: Any = None, run: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(
            DiffusionModule,
            None,
            subclass_mode_data=True,
            auto_configure_optimizers=False,  # the module takes `optimizer:` itself
            args=args,
            run=run,
            **kwargs,
        )

    def instantiate_trainer(self, **kwargs: Any):
        trainer = super().instantiate_trainer(**kwargs)
        # Always checkpoint atomically and save on SIGTERM, whatever the recipe lists.
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if not any(isinstance(cb, PreemptionCheckpoint) for cb in trainer.callbacks):
            trainer.callbacks.append(PreemptionCheckpoint())
        return trainer

    def before_fit(self) -> None:
        self._resolve_last("fit")

    def _resolve_last(self, subcommand: str) -> None:
        """`--ckpt_path last`: the newest checkpoint under the run folder by stored global step."""
        config = self.config[subcommand]
        if config.get("ckpt_path") != "last":
            return
        folders = [self.trainer.default_root_dir]
        ckpt_cb = self.trainer.checkpoint_callback
        if ckpt_cb is not None and getattr(ckpt_cb, "dirpath", None):
            folders.append(ckpt_cb.dirpath)
        path = find_resume_checkpoint(*folders)
        if path is None:
            print(f"diffusion-pl: --ckpt_path last: no checkpoint under {', '.join(map(str, folders))}; "
                  "starting from scratch", file=sys.stderr)
        else:
            print(f"diffusion-pl: resuming from {path}", file=sys.stderr)
        config["ckpt_path"] = path


def _print_help() -> None:
    print("usage: diffusion-pl <command> [options]\n")
    print("Train and evaluate image diffusion models with PyTorch Lightning.\n")
    print("training (LightningCLI; `diffusion-pl fit --help`, `--config FILE`, `--print_config`):")
    for name, text in LIGHTNING_COMMANDS.items():
        print(f"  {name:<10} {text}")
    print("\nproject commands (`diffusion-pl <command> --help`):")
    for name, (_, text) in PROJECT_COMMANDS.items():
        print(f"  {name:<10} {text}")
    print("\nexample: diffusion-pl fit --config configs/quickstart.yaml")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `diffusion-pl` console script and of `python -m diffusion_pl`."""
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        _print_help()
        return 0 if argv else 2
    if argv[0] in PROJECT_COMMANDS:
        module_name = PROJECT_COMMANDS[argv[0]][0]
        return int(importlib.import_module(module_name).main(argv[1:]) or 0)
    if argv[0] not in LIGHTNING_COMMANDS and not argv[0].startswith("-"):
        print(f"diffusion-pl: unknown command {argv[0]!r}; expected one of "
              f"{', '.join([*LIGHTNING_COMMANDS, *PROJECT_COMMANDS])}", file=sys.stderr)
        return 2
    try:
        # from the shell LightningCLI reads sys.argv itself (passing both makes it warn)
        DiffusionCLI(args=None if from_command_line else argv)
    except InceptionWeightsError as err:  # the FID preflight: one line, no traceback
        print(f"diffusion-pl: error: {err}", file=sys.stderr)
        return 2
    return 0
