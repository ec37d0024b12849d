"""`diffusion-pl export`: a checkpoint's EMA (or raw) network as safetensors weights plus the config that samples it.

    diffusion-pl export --ckpt_path RUN/checkpoints/last.ckpt --out exported/

    OUT/model.safetensors   the network's state_dict; metadata: net / process / prediction class_path and
                            init_args (JSON), weights (ema / raw), framework version, source checkpoint sha256
    OUT/config.json         the same metadata, for people

Loading needs no pickle and no training code: `safetensors.torch.load_file` and the metadata JSON, or
`diffusion_pl.interop.safetensors.load_exported(OUT)`, which rebuilds the network, process and prediction (see
diffusion_pl/interop/safetensors.py for the format).

    diffusion-pl export --ckpt_path RUN/checkpoints/last.ckpt --out exported_diffusers/ --format diffusers

    OUT/config.json, OUT/diffusion_pytorch_model.safetensors   a UNet2DModel / DiTTransformer2DModel folder
    OUT/scheduler_config.json                                  DDPMScheduler, for DDPMDiscrete processes

for the networks diffusers represents (diffusion_pl/interop/diffusers/export.py says which, and
refuses the others in one line).
"""

from __future__ import annotations

import argparse
import sys

from diffusion_pl.cli.common import CommandParser, add_trust_option
from diffusion_pl.utils.errors import run_command
from diffusion_pl.interop.safetensors import CONFIG_FILE, WEIGHTS_FILE, export_checkpoint

__all__ = ["main", "parser", "run"]


def parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="diffusion-pl export", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter, flag_aliases={"--ckpt": "--ckpt_path"})
    p.add_argument("--ckpt_path", dest="ckpt", metavar="PATH", required=True, help="checkpoint written by `diffusion-pl fit`")
    p.add_argument("--out", required=True, help=f"output folder: {WEIGHTS_FILE} and {CONFIG_FILE} are written there")
    p.add_argument("--format", choices=["safetensors", "diffusers"], default="safetensors",
                   help="safetensors: model.safetensors with the config as metadata; diffusers: a diffusers model "
                        "folder (UNet2DModel / DiTTransformer2DModel) + DDPMScheduler config")
    p.add_argument("--no_ema", action="store_true", help="export the raw network instead of the EMA weights")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an export of another checkpoint (or of the other weights) in --out")
    add_trust_option(p)
    return p


def run(args: argparse.Namespace):
    """Write the export; returns the path of the weights file."""
    if args.format == "diffusers":
        from diffusion_pl.interop.diffusers.export import export_diffusers

        path, notes = export_diffusers(args.ckpt, args.out, ema=not args.no_ema, trust_config=args.trust_config,
                                       overwrite=args.overwrite)
        print(f"wrote {path.parent}: {'; '.join(notes)}", file=sys.stderr)
        return path
    path = export_checkpoint(args.ckpt, args.out, ema=not args.no_ema, trust_config=args.trust_config,
                             overwrite=args.overwrite)
    print(f"wrote {path} ({'raw' if args.no_ema else 'EMA'} weights) and {path.with_name(CONFIG_FILE)}",
          file=sys.stderr)
    return path


def main(argv: list[str] | None = None) -> int:
    """Entry point of `diffusion-pl export`; returns a process exit code."""
    args = parser().parse_args(argv)
    return run_command("export", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
