"""`diffusion-pl import`: a published model (diffusers folder or hub id, facebookresearch/DiT .pt) as a checkpoint.

    diffusion-pl import google/ddpm-cifar10-32 --out imported/ddpm_cifar10.ckpt
    diffusion-pl import DiT-XL-2-256x256.pt --out imported/dit_xl_2_256.ckpt         # --arch DiT-XL/2 implied
    diffusion-pl import path/to/DiT-B-2.pt --arch DiT-B/2 --image_size 256 --out imported/dit_b_2.ckpt
    diffusion-pl import runs/cifar10_edm/checkpoints/last.ckpt --out imported/edm_cifar10.ckpt   # its EMA network

The checkpoint holds the network (as the net and its EMA), the process and the parameterization
that the scheduler config gives, so `sample`, `evaluate`, `export` and `fit --ckpt_path` (fine-tuning:
the recipe's loss, optimizer, EMA and data, the checkpoint's network, process and prediction) take
it. See diffusion_pl/interop/importer.py for the sources and the format.
"""

from __future__ import annotations

import argparse
import json
import sys

from diffusion_pl.cli.common import CommandParser
from diffusion_pl.utils.checkpoint import read_checkpoint
from diffusion_pl.utils.errors import run_command
from diffusion_pl.interop.dit_reference import ARCHS
from diffusion_pl.interop.importer import SD_VAE, import_pretrained

__all__ = ["main", "parser", "run"]


def parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="diffusion-pl import", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("source", help="a checkpoint of `diffusion-pl fit` (.ckpt: its EMA network as a starting point, "
                                  "e.g. ECT's tuning from an EDM run), a diffusers model or pipeline folder, a hub id (owner/name: the Hugging Face cache "
                                  "first, else downloaded), a facebookresearch/DiT .pt file, or DiT-XL-2-256x256.pt / "
                                  "DiT-XL-2-512x512.pt (torch hub's cache, else downloaded)")
    p.add_argument("--out", required=True, help="the checkpoint file to write (e.g. imported/model.ckpt)")
    p.add_argument("--arch", choices=list(ARCHS), default=None,
                   help="architecture of a facebookresearch/DiT .pt (the file does not say); default: the published "
                        "files' DiT-XL/2, or a train.py checkpoint's args")
    p.add_argument("--image_size", type=int, default=None,
                   help="pixel size a DiT .pt generates (latents are 1/8 of it); default: from its position table")
    p.add_argument("--vae", default="auto",
                   help=f"autoencoder a latent DiT's config records: auto (a pipeline's own vae/, else {SD_VAE} at "
                        "scale 0.18215), a hub id or folder, or none (the checkpoint then generates latents)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--download_timeout", type=float, default=10.0, help="seconds to wait for a download server")
    return p


def run(args: argparse.Namespace):
    """Write the checkpoint; returns its path."""
    out = import_pretrained(args.source, args.out, arch=args.arch, image_size=args.image_size,
                            vae=None if args.vae.lower() == "none" else args.vae, overwrite=args.overwrite,
                            download_timeout=args.download_timeout)
    written = read_checkpoint(out)
    hparams, imported = written.config, written.raw["diffusion_pl_import"]
    net = hparams["net"]
    print(f"wrote {out}: {imported['format']} as {net['class_path'].rsplit('.', 1)[-1]}, process "
          f"{json.dumps(hparams['process']['init_args'])}, {hparams['prediction']['class_path'].rsplit('.', 1)[-1]}",
          file=sys.stderr)
    if imported.get("sampler") is not None:
        clip = f" --clip_x0 {imported['clip_x0']:g}" if imported.get("clip_x0") is not None else ""
        print(f"sample as its scheduler config says: diffusion-pl sample --ckpt_path {out} --sampler "
              f"'{json.dumps(imported['sampler'])}'{clip} --out samples/", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point of `diffusion-pl import`; returns a process exit code."""
    args = parser().parse_args(argv)
    return run_command("import", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
