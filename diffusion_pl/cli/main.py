"""The `diffusion-pl` command: dispatches to LightningCLI (fit / validate / test / predict) or a project command.

The training subcommands are LightningCLI (diffusion_pl.cli.fit); the project's own subcommands have
their own argparse front ends (one module each in this package) and are dispatched before LightningCLI
sees the arguments. Nothing heavy is imported before a command is chosen.
"""

from __future__ import annotations

import importlib
import sys

from diffusion_pl.utils.errors import run_command

__all__ = ["main"]

# name -> (module with `main(argv) -> int`, one-line description)
PROJECT_COMMANDS = {
    "list": ("diffusion_pl.cli.catalogue", "the recipes, and what a recipe can name: networks, processes, samplers, ..."),
    "prepare": ("diffusion_pl.cli.prepare", "write webdataset shards (+ manifest) from CIFAR-10 or an image folder"),
    "sample": ("diffusion_pl.cli.sample", "generate images from a checkpoint (PNGs and/or an ADM/EDM .npz)"),
    "evaluate": ("diffusion_pl.cli.evaluate", "FID / KID / IS against cached reference statistics, bits/dim"),
    "reconstruct-ema": ("diffusion_pl.cli.reconstruct_ema",
                        "post-hoc EMA: a checkpoint of any EMA length from a run's PowerEMA snapshots"),
    "export": ("diffusion_pl.cli.export", "a checkpoint's EMA (or raw) weights as safetensors + config, or a diffusers folder"),
    "import": ("diffusion_pl.cli.import_model", "a published model (diffusers, hub id, DiT .pt) as a checkpoint"),
}
# LightningCLI's `test` and `predict` are not offered: generation is `sample` (seeded per sample, so independent
# of devices and batch size, PNGs or an .npz) and evaluation is `evaluate` (FID / KID / IS, bits/dim); a test
# loop would repeat `validate` on another split and a predict loop would be a second, weaker `sample`.
LIGHTNING_COMMANDS = {
    "fit": "train a model (resume with --ckpt_path last)",
    "validate": "run the validation loop (deterministic denoising loss, EMA weights)",
}


def _print_help() -> None:
    print("usage: diffusion-pl <command> [options]    (diffusion-pl --version)\n")
    print("Train and evaluate image diffusion models with PyTorch Lightning.\n")
    print("training (LightningCLI; `diffusion-pl fit --help`, `--config FILE|RECIPE`, `--print_config`):")
    for name, text in LIGHTNING_COMMANDS.items():
        print(f"  {name:<15} {text}")
    print("\nproject commands (`diffusion-pl <command> --help`):")
    for name, (_, text) in PROJECT_COMMANDS.items():
        print(f"  {name:<15} {text}")
    print("\nexample: diffusion-pl fit --config quickstart    (a packaged recipe by name, or a YAML file; "
          "`diffusion-pl list recipes`)")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `diffusion-pl` console script and of `python -m diffusion_pl`."""
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        _print_help()
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from diffusion_pl import __version__

        print(f"diffusion-pl {__version__}")
        return 0
    if argv[0] in PROJECT_COMMANDS:  # each prints its UserErrors in one line itself (run_command)
        module_name = PROJECT_COMMANDS[argv[0]][0]
        return int(importlib.import_module(module_name).main(argv[1:]) or 0)
    if argv[0] in ("test", "predict"):
        print(f"diffusion-pl: {argv[0]!r} is not a command here: generate images with `diffusion-pl sample` and "
              "score them with `diffusion-pl evaluate`", file=sys.stderr)
        return 2
    if argv[0] not in LIGHTNING_COMMANDS and not argv[0].startswith("-"):
        print(f"diffusion-pl: unknown command {argv[0]!r}; expected one of "
              f"{', '.join([*LIGHTNING_COMMANDS, *PROJECT_COMMANDS])}", file=sys.stderr)
        return 2
    # from the shell LightningCLI reads sys.argv itself (passing both makes it warn)
    from diffusion_pl.cli.fit import DiffusionCLI  # Lightning is imported only for its commands

    return run_command(argv[0], lambda: DiffusionCLI(args=None if from_command_line else argv))


if __name__ == "__main__":
    sys.exit(main())
