"""`diffusion-pl prepare`: write webdataset shards + manifest.json from CIFAR-10 or an image folder.

The writer and its checks are diffusion_pl.data.writer; the sources diffusion_pl.data.sources; ADM's
centre crop (``folder --center_crop N``) diffusion_pl.data.crop; latent shards (``--encode VAE``)
diffusion_pl.data.latents.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from diffusion_pl.data.crop import center_crop_source
from diffusion_pl.data.latents import LatentEncoder, load_autoencoder
from diffusion_pl.data.sources import cifar10_batches, cifar10_torchvision, image_folder
from diffusion_pl.data.writer import PrepareError, Source, Unreadable, _preflight, prepare
from diffusion_pl.cli.common import CommandParser
from diffusion_pl.utils.errors import run_command

__all__ = ["main"]
SKIPPED_SHOWN = 5  # skipped files named in the summary line of --skip_bad


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, help="output directory for shards and manifest.json")
    common.add_argument("--split", default=None, help="split subfolder (image folders) or train/test (CIFAR)")
    common.add_argument("--max_samples", type=int, default=None, help="keep only this many (for tests)")
    common.add_argument("--shard_size", type=int, default=1000, help="samples per shard (default 1000)")
    common.add_argument("--overwrite", action="store_true",
                        help="replace an earlier prepare output in --out (a manifest.json and its shards, nothing "
                        "else); any other non-empty directory is refused, even with this flag")
    latent = common.add_argument_group("latent shards")
    latent.add_argument("--encode", metavar="VAE", default=None,
                        help="store the posterior mean and std of this frozen autoencoder (float16) instead of the "
                        "images: a hub id (stabilityai/sd-vae-ft-ema), a local diffusers folder, or the arguments of "
                        'diffusion_pl.codecs.autoencoder.Autoencoder as JSON, inline or in a .json file ({"pretrained": '
                        '"DIR", "subfolder": "vae"}, or {"config": {...AutoencoderKL arguments...}, "seed": 0} for '
                        "random weights)")
    latent.add_argument("--batch_size", type=int, default=64, help="with --encode: images encoded at once (64)")
    latent.add_argument("--accelerator", dest="device", default=None,
                        help="with --encode: where the autoencoder runs (cpu, cuda or gpu, cuda:N; default cuda if "
                        "present), as the other commands' --accelerator")
    latent.add_argument("--no_flips", action="store_true",
                        help="with --encode: do not also encode the horizontally flipped images (half the work; "
                        "training on these shards then needs random_flip: false)")
    latent.add_argument("--keep_images", action="store_true",
                        help="with --encode: also store each image (as given; the centre crop with --center_crop) "
                        "beside its latents, for REPA's encoder without a VAE decode per step (data latent_images: "
                        "true)")
    parser = CommandParser(
        prog="diffusion-pl prepare", description="Write reproducible webdataset tar shards + manifest.json from "
        "CIFAR-10 or an image folder. Temporary folders (.OUT.partial-*, .OUT.old-*) left beside --out by a "
        "killed prepare are removed by the next run into --out.")
    sub = parser.add_subparsers(dest="kind", required=True)
    renamed = {"flag_aliases": {"--device": "--accelerator"}}  # the old name of --accelerator
    p = sub.add_parser("cifar10", parents=[common], **renamed, help="CIFAR-10 downloaded through torchvision")
    p.add_argument("--root", default=None, help="download folder (default: <cache>/torchvision)")
    p.set_defaults(source=lambda a: cifar10_torchvision(a.root, a.split or "train"))
    p = sub.add_parser("cifar10-batches", parents=[common], **renamed, help="a local cifar-10-batches-py folder")
    p.add_argument("path")
    p.set_defaults(source=lambda a: cifar10_batches(a.path, a.split or "train"))
    p = sub.add_parser("folder", parents=[common], **renamed, help="an image-folder tree or a .tar/.tar.gz of one",
                       description="An image folder <root>/[<split>/]<class>/<image> or a .tar/.tar.gz of one. "
                       "A zero-byte, non-image or truncated file and images of different sizes stop the run "
                       "with one line naming the files, unless --skip_bad / --mixed_sizes.")
    p.add_argument("path")
    p.add_argument("--skip_bad", action="store_true",
                   help="leave out files that are not readable images (zero bytes, not an image, truncated) "
                   "instead of stopping; their count is printed and recorded as 'skipped' in manifest.json")
    p.add_argument("--mixed_sizes", action="store_true",
                   help="accept images of different sizes: written as they are, manifest.json gets "
                   '"image_size": null, "mixed_sizes": true, and training needs an explicit image_size')
    p.add_argument("--center_crop", type=int, default=None, metavar="N",
                   help="bring every image to N x N with ADM's centre crop (openai/guided-diffusion center_crop_arr: "
                   "BOX halvings while the short side >= 2N, BICUBIC to short side N, centre N x N crop), stored as "
                   "PNG; the ImageNet protocol of ADM and DiT")
    p.set_defaults(source=_folder_source)
    return parser


def _folder_source(args: argparse.Namespace) -> Source:
    src = image_folder(args.path, args.split)
    return src if args.center_crop is None else center_crop_source(src, args.center_crop)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``diffusion-pl prepare``; returns a process exit code."""
    args = _parser().parse_args(argv)
    return run_command("prepare", lambda: _run(args))


def _run(args: argparse.Namespace) -> None:
    if args.max_samples is not None and args.max_samples < 1:
        raise PrepareError(f"--max_samples {args.max_samples} is invalid: expected a positive integer")
    if getattr(args, "center_crop", None) is not None and args.center_crop < 1:
        raise PrepareError(f"--center_crop {args.center_crop} is invalid: expected a positive integer side in pixels")
    latent_only = [flag for flag, given in (("no_flips", args.no_flips), ("accelerator", args.device is not None),
                                            ("keep_images", args.keep_images)) if given]
    if args.encode is None and latent_only:
        raise PrepareError(f"--{latent_only[0]} is given without --encode: expected --encode VAE (these options apply "
                           "to latent shards only)")
    if args.encode is not None and getattr(args, "mixed_sizes", False):
        raise PrepareError("--mixed_sizes is given with --encode: expected one image size to encode (use "
                           "--center_crop N to bring a folder's images to N x N)")
    _preflight(Path(args.out), args.overwrite)  # refuse before reading a large source
    encoder = None
    if args.encode is not None:  # loaded (or refused) before the source is read
        encoder = LatentEncoder(load_autoencoder(args.encode), batch_size=args.batch_size,
                                device={"auto": None, "gpu": "cuda"}.get(args.device, args.device),
                                flips=not args.no_flips, images=args.keep_images)
    skipped: list[Unreadable] = []
    extra = {} if encoder is None else {"records": encoder.records, "meta": encoder.manifest_fields}
    m = prepare(args.source(args), args.out, split=args.split, max_samples=args.max_samples,
                shard_size=args.shard_size, overwrite=args.overwrite, skip_bad=getattr(args, "skip_bad", False),
                mixed_sizes=getattr(args, "mixed_sizes", False), on_skip=skipped.append, **extra)
    what = "images" if encoder is None else "latents " + "x".join(map(str, m["latent"]["shape"])) + \
        (" (+ flipped)" if encoder.flips else "")
    labels = f"{m['num_classes']} classes" if m['num_classes'] else "unlabelled"
    unsafe = m.get("unsafe_tar_members")
    left_out = "" if not unsafe else (
        f"; left out {unsafe['count']} tar member{'s' if unsafe['count'] > 1 else ''} whose path leads outside the "
        f"archive ({', '.join(unsafe['names'])}{', ...' if unsafe['count'] > len(unsafe['names']) else ''})")
    print(f"wrote {m['count']} {what} ({labels}) in {len(m['shards'])} shards to {args.out}{left_out}")
    if skipped:
        shown = "; ".join(f"{u.origin} ({u.reason})" for u in skipped[:SKIPPED_SHOWN])
        more = f"; and {len(skipped) - SKIPPED_SHOWN} more" if len(skipped) > SKIPPED_SHOWN else ""
        print(f"skipped {len(skipped)} unreadable image file{'s' if len(skipped) > 1 else ''} (--skip_bad): "
              f"{shown}{more}")


if __name__ == "__main__":
    sys.exit(main())
