"""`diffusion-pl sample`: images from a checkpoint as PNGs and/or one .npz in the ADM/EDM evaluators' format.

    OUT/000000.png ...                 sample i, drawn with seed + i (class i % num_classes, or --class_labels)
    OUT/samples_<N>x<H>x<W>x3.npz      arr_0 uint8 (N, H, W, 3); arr_1 int64 (N,) labels (class-conditional)
    OUT/sample_config.json             what the samples depend on (checkpoint sha256, sampler spec, seed, ...)
    --grid PATH                        also one PNG of samples 0..N-1 side by side (--grid_nrow per row)

`--sampler` is a short name (`ddim`, with `--steps 20`) or a class_path / init_args spec as the
recipes write it, in JSON or YAML or as a .yaml / .json file, nested objects (a grid) included:

    --sampler '{"class_path": "diffusion_pl.sampling.posterior.DDIM", "init_args": {"steps": 50, "eta": 0.5}}'

jsonargparse parses and checks it against the Sampler base type; class paths are limited to the
packages diffusion_pl and torch. sample_config.json records the resolved spec (class_path and
every init_arg, defaults and nested objects included).

PNGs are the resumable unit: a rerun with the same settings skips the indices already written
(each PNG is renamed into place when complete), then assembles the npz. A different run into a
non-empty OUT is refused unless --overwrite.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid, save_image

from diffusion_pl.cli.common import CommandError, CommandParser, add_model_options, flag, guidance_from_args
from diffusion_pl.cli.sampler_spec import SAMPLER_STEPS_HELP, resolve_sampler, sampler_help
from diffusion_pl.utils.errors import run_command
from diffusion_pl.utils.fileio import atomic_path, sha256_file, writable_folder
from diffusion_pl.evaluation.generation import check_sampler, class_labels_for, generate, rank_indices
from diffusion_pl.evaluation.loading import guidance_config, load_checkpoint, load_guide, make_fabric
from diffusion_pl.evaluation.samples import read_rgb
from diffusion_pl.guidance import Guidance

__all__ = ["main", "parser", "run"]

CONFIG = "sample_config.json"
PNG = re.compile(r"^(\d{6,})\.png$")


def parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="diffusion-pl sample", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter, flag_aliases={"--ckpt": "--ckpt_path"})
    p.add_argument("--ckpt_path", dest="ckpt", metavar="PATH", required=True, help="checkpoint written by `diffusion-pl fit`")
    p.add_argument("--num_samples", type=int, required=True, help="number of images N (indices 0..N-1)")
    p.add_argument("--sampler", default="heunode", help=sampler_help())
    p.add_argument("--steps", type=int, default=None, help=SAMPLER_STEPS_HELP)
    add_model_options(p)
    p.add_argument("--class_labels", type=int, nargs="+", default=None,
                   help="labels cycled over the samples (default: balanced, i %% num_classes)")
    p.add_argument("--batch_size", type=int, default=64, help="samples per network batch, per device")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--png", action="store_true", help="keep PNGs (default: PNGs and npz)")
    p.add_argument("--npz", action="store_true", help="write the npz (default: PNGs and npz)")
    p.add_argument("--grid", default=None, metavar="PATH",
                   help="also write the N samples as one grid PNG at PATH (torchvision make_grid; for small N)")
    p.add_argument("--grid_nrow", type=int, default=None, metavar="K",
                   help="images per row of --grid (default: ceil(sqrt(N)))")
    p.add_argument("--overwrite", action="store_true", help="replace samples of a different run in --out")
    p.add_argument("--no_ema", action="store_true", help="use the raw network instead of the EMA weights")
    p.add_argument("--devices", type=int, default=1, help="processes (GPUs, or CPU processes) to split over")
    p.add_argument("--accelerator", default="auto", help="Lightning accelerator (auto, cpu, gpu, ...)")
    return p


def _check_args(args: argparse.Namespace) -> None:
    if args.num_samples < 1:
        raise CommandError(f"--num_samples {args.num_samples} is invalid: expected a positive integer")
    if args.batch_size < 1:
        raise CommandError(f"--batch_size {args.batch_size} is invalid: expected a positive integer")
    if args.seed < 0:
        raise CommandError(f"--seed {args.seed} is invalid: expected an integer >= 0")
    if args.grid_nrow is not None and args.grid_nrow < 1:
        raise CommandError(f"--grid_nrow {args.grid_nrow} is invalid: expected a positive integer")
    if args.grid_nrow is not None and args.grid is None:
        raise CommandError("--grid_nrow given without --grid: expected --grid PATH as well")
    if args.grid is not None and (Path(args.grid).suffix.lower() != ".png" or Path(args.grid).is_dir()):
        raise CommandError(f"--grid {args.grid} is invalid: expected a path ending in .png")
    out = Path(args.out)
    if args.grid is not None and Path(args.grid).resolve().parent == out.resolve():
        raise CommandError(f"--grid {args.grid} is in --out {out}: expected a path outside it (its PNGs are the "
                           "samples, which `evaluate` reads)")
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {out} is a file: expected a folder")
    writable_folder(out, "--out")


def png_path(out: Path, i: int) -> Path:
    return out / f"{i:06d}.png"


def npz_path(out: Path, n: int, shape: tuple[int, int, int]) -> Path:
    return out / f"samples_{n}x{shape[1]}x{shape[2]}x3.npz"


def _config(args: argparse.Namespace, module, sampler_spec: dict, guidance: Guidance) -> dict:
    """Everything sample i depends on (not N: a run can be extended to more samples); the sampler as its
    resolved spec, so the same spec resumes and any other init_arg (eta, a grid, ...) is another run."""
    labels = args.class_labels
    if labels and module.num_classes is None:
        raise CommandError(f"--class_labels {labels} given but the model is unconditional: expected no labels")
    if labels and any(not 0 <= y < module.num_classes for y in labels):
        raise CommandError(f"--class_labels {labels} is invalid: expected labels in 0..{module.num_classes - 1}")
    return {"checkpoint_sha256": sha256_file(args.ckpt), "sampler": sampler_spec, "guidance": guidance.weight,
            "class_labels": labels or ("balanced" if module.num_classes else None), "seed": args.seed,
            "ema": not args.no_ema, "image_shape": list(module.net.image_shape),
            **({"clip_x0": guidance.clip_x0} if guidance.clip_x0 is not None else {}),  # absent: as before it
            **guidance_config(guidance)}


def _check_out(out: Path, config: dict, overwrite: bool, sampler_repr: str | None = None) -> bool:
    """True when OUT holds samples of this same run (resume); raises on another run unless overwrite.

    A config written before samplers were recorded as specs holds `repr(sampler)`: it is the same run
    when that equals `sampler_repr` and all else is equal (the rerun then records the spec).
    """
    if not out.is_dir() or not any(out.iterdir()):
        return False
    file = out / CONFIG
    old = json.loads(file.read_text()) if file.is_file() else None
    if old == config:
        return True
    if (isinstance(old, dict) and sampler_repr is not None and old.get("sampler") == sampler_repr
            and {**old, "sampler": config["sampler"]} == config):
        return True
    if overwrite:
        return False
    if old is None:
        raise CommandError(f"--out {out} is not empty and holds no {CONFIG}: pass --overwrite to write into it "
                           "or choose an empty folder")
    differs = ", ".join(k for k in config if old.get(k) != config[k])
    raise CommandError(f"--out {out} holds samples of a different run (differs in {differs}): pass --overwrite "
                       "to replace them or choose another folder")


def _clear(out: Path) -> None:
    """Remove this command's outputs of a previous run (PNGs by index, npz files, config)."""
    for path in out.iterdir():
        if PNG.match(path.name) or (path.name.startswith("samples_") and path.suffix == ".npz") or path.name == CONFIG:
            path.unlink()


def _write_png(image: torch.Tensor, path: Path) -> None:
    with atomic_path(path) as tmp:  # a PNG under its final name is always complete: resume may trust it
        Image.fromarray(image.permute(1, 2, 0).cpu().numpy()).save(tmp, format="PNG")


def assemble_npz(out: Path, n: int, shape: tuple[int, int, int], num_classes: int | None,
                 class_labels: list[int] | None) -> Path:
    """Stack PNGs 0..n-1 into arr_0 (N, H, W, 3) uint8 (+ arr_1 labels), written atomically."""
    images = np.empty((n, shape[1], shape[2], 3), np.uint8)
    for i in range(n):
        images[i] = read_rgb(png_path(out, i))
    arrays = {"arr_0": images}
    labels = class_labels_for(range(n), num_classes, class_labels)
    if labels is not None:
        arrays["arr_1"] = labels.numpy()
    path = npz_path(out, n, shape)
    with atomic_path(path) as tmp:
        np.savez(tmp, **arrays)
    return path


def write_grid(out: Path, n: int, shape: tuple[int, int, int], path: Path, nrow: int | None = None) -> Path:
    """Samples 0..n-1 (their PNGs, else the npz of a finished run) as one grid PNG at `path`, written atomically."""
    if all(png_path(out, i).is_file() for i in range(n)):
        images = np.stack([read_rgb(png_path(out, i)) for i in range(n)])
    else:
        with np.load(npz_path(out, n, shape)) as data:
            images = data["arr_0"][:n]
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2)  # uint8 (N, 3, H, W)
    grid = make_grid(tensor, nrow=nrow or max(1, math.ceil(math.sqrt(n))), padding=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_image(grid.float() / 255.0, tmp, format="png")
    return path


def run(args: argparse.Namespace) -> Path:
    """Generate (resuming) the samples; returns the output folder."""
    _check_args(args)
    keep_png, want_npz = (args.png, args.npz) if (args.png or args.npz) else (True, True)
    sampler, spec = resolve_sampler(args.sampler, args.steps)
    guidance = guidance_from_args(args)
    fabric = make_fabric(args.devices, args.accelerator, what="--devices")
    rank, world = fabric.global_rank, fabric.world_size
    module = load_checkpoint(args.ckpt, fabric.device, trust_config=args.trust_config)
    check_sampler(module, sampler, f"--ckpt_path {args.ckpt}")  # a consistency model with a diffusion sampler
    loaded = load_guide(module, guidance, fabric.device, names=flag)  # the guide checkpoint checked and loaded
    config, out, shape = _config(args, module, spec, guidance), Path(args.out), module.net.image_shape
    guidance = loaded
    pixels = module.codec.pixel_shape(shape)  # what the images are: decoded pixels of a latent module
    labels = config["class_labels"] if isinstance(config["class_labels"], list) else None
    resume = _check_out(out, config, args.overwrite, repr(sampler))  # every rank checks before anyone writes
    done = resume and npz_path(out, args.num_samples, pixels).is_file()
    fabric.barrier()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if not resume:
            _clear(out)
        (out / CONFIG).write_text(json.dumps(config, indent=1) + "\n")
    fabric.barrier()
    missing = [] if done else [i for i in range(args.num_samples) if not png_path(out, i).is_file()]
    fabric.barrier()  # everyone has listed before anyone writes, so all ranks split the same list
    if rank == 0 and args.num_samples - len(missing) and not done:
        print(f"resuming: {args.num_samples - len(missing)} of {args.num_samples} samples already in {out}",
              file=sys.stderr)
    mine = [missing[j] for j in rank_indices(len(missing), rank, world)]
    for idx, images, _, _ in generate(module, sampler, mine, shape, seed=args.seed, guidance=guidance,
                                      ema=not args.no_ema, class_choices=labels, batch_size=args.batch_size,
                                      device=fabric.device, progress=rank == 0):
        for i, image in zip(idx, images):
            _write_png(image, png_path(out, i))
    fabric.barrier()
    if rank == 0 and want_npz and not done:
        path = assemble_npz(out, args.num_samples, pixels, module.num_classes, labels)
        print(f"wrote {path}", file=sys.stderr)
    if rank == 0 and args.grid is not None:
        write_grid(out, args.num_samples, pixels, Path(args.grid), args.grid_nrow)
        print(f"wrote {args.grid}", file=sys.stderr)
    if rank == 0 and not keep_png and npz_path(out, args.num_samples, pixels).is_file():
        for i in range(args.num_samples):
            png_path(out, i).unlink(missing_ok=True)
    fabric.barrier()
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point of `diffusion-pl sample`; returns a process exit code."""
    args = parser().parse_args(argv)
    return run_command("sample", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
