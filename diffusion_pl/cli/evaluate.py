"""`diffusion-pl evaluate`: FID (+ KID, IS) against cached reference statistics, and bits/dim.

    diffusion-pl evaluate --ckpt last.ckpt --data shards/cifar10-train [--sampler heunode --steps 17] [--bpd]
    diffusion-pl evaluate --ckpt last.ckpt --data shards/cifar10-train \
        --sampler ddim '{"class_path": "diffusion_pl.sampling.posterior.DDIM", "init_args": {"steps": 50, "eta": 1.0}}'
    diffusion-pl evaluate --samples OUT_or_samples.npz --data shards/cifar10-train
    diffusion-pl evaluate --ckpt last.ckpt --ref-stats VIRTUAL_imagenet256_labeled.npz  # published mu / sigma

Each --sampler is a short name or a class_path / init_args spec (JSON, YAML or a .yaml / .json
file; see `diffusion-pl sample`); all are checked before any slow work. Prints a table and writes
a JSON report with the protocol (sample count, reference set, extractor, resize, each sampler's
resolved spec, steps, NFE, seed range, checkpoint sha256, EMA or not). A row is named by class and
steps (`ddim_50`); samplers that share both are told apart as `ddim_50#2`, ... in the given order.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from diffusion_pl.cli.common import (CommandError, add_model_options, guidance_config, image_shape, load_checkpoint,
                                     load_guide, make_fabric, read_rgb)
from diffusion_pl.cli.sampler_spec import SAMPLER_STEPS_HELP, resolve_sampler, sampler_help
from diffusion_pl.data.reference import reference_images
from diffusion_pl.utils.errors import run_command
from diffusion_pl.utils.fileio import atomic_path, sha256_file
from diffusion_pl.evaluation.generation import generate, metric_prefix, rank_indices, sampler_label
from diffusion_pl.evaluation.metrics.inception import InceptionFeatures, load_inception
from diffusion_pl.evaluation.metrics.statistics import PROTOCOL, SampleMetrics, extract, fingerprint, reference_stats
from diffusion_pl.sampling.base import Sampler

__all__ = ["main", "parser", "run", "run_checkpoints", "check_args", "dataset_bits_per_dim", "read_samples", "inspect_samples"]

INCEPTION_PROTOCOL = ("torch-fidelity InceptionV3 (TF FID graph weights), pool3 2048 features; "
                      "bilinear resize to 299x299 as TF1 (no antialias)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffusion-pl evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="checkpoint written by `diffusion-pl fit`: generate and score its samples")
    src.add_argument("--samples", help="score existing samples: a folder of PNGs or an .npz (arr_0 uint8 NHWC)")
    p.add_argument("--data", default=None,
                   help="reference shard set (e.g. the CIFAR-10 training shards); or give --ref-stats")
    p.add_argument("--ref-stats", default=None, metavar="NPZ",
                   help="published reference statistics instead of --data: an npz with mu (D,) and sigma (D, D) of "
                        "the extractor's features (ADM's reference batches, e.g. VIRTUAL_imagenet256_labeled.npz)")
    p.add_argument("--num-samples", type=int, default=50_000, help="generated samples per sampler")
    p.add_argument("--sampler", nargs="+", default=["heunode"],
                   help="one or more samplers (with --ckpt), each " + sampler_help())
    p.add_argument("--steps", type=int, nargs="+", default=None,
                   help="one value for every sampler or one each: " + SAMPLER_STEPS_HELP)
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance weight w")
    add_model_options(p)
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    p.add_argument("--no-ema", action="store_true", help="use the raw network instead of the EMA weights")
    p.add_argument("--kid", action="store_true", help="also report KID (caches the reference features)")
    p.add_argument("--isc", action="store_true", help="also report the Inception Score")
    p.add_argument("--bpd", action="store_true", help="also report bits/dim by the probability-flow ODE")
    p.add_argument("--bpd-samples", type=int, default=1000, help="images of --bpd-data for bits/dim")
    p.add_argument("--bpd-data", default=None, help="shard set for bits/dim (default: --data)")
    p.add_argument("--batch-size", type=int, default=250, help="images per batch, per device")
    p.add_argument("--devices", type=int, default=1, help="processes (GPUs, or CPU processes) to split over")
    p.add_argument("--accelerator", default="auto", help="Lightning accelerator (auto, cpu, gpu, ...)")
    p.add_argument("--inception-weights", default=None,
                   help="local InceptionV3 weights (else $DIFFUSION_PL_INCEPTION_WEIGHTS, else torch hub's cache)")
    p.add_argument("--feature-extractor", default=None,
                   help="import path of an nn.Module class (no arguments) to use instead of InceptionV3")
    p.add_argument("--report", default=None, help="JSON report path (default: beside --ckpt / --samples)")
    return p


def run(args: argparse.Namespace) -> dict:
    """Score, print and write the report (rank 0); returns the report."""
    return run_checkpoints(args)[0]


def run_checkpoints(args: argparse.Namespace, checkpoints: list[str] | None = None) -> list[dict]:
    """`run` for each of `checkpoints` in turn (default: --ckpt, or --samples alone) with one device launch, one
    feature extractor and one reference (the sweep of `reconstruct-ema --fid-data`); one report each, beside its
    checkpoint."""
    samplers = check_args(args)  # a bad spec fails before any slow work
    fabric = make_fabric(args.devices, args.accelerator)
    extractor = _extractor(args, fabric.device)  # preflight: the weights are checked before any slow work
    reference, reports = None, []
    for ckpt in checkpoints or [args.ckpt]:
        start = time.time()
        args = argparse.Namespace(**{**vars(args), "ckpt": ckpt})
        module, (n, height, width) = _open_source(args, fabric)
        guide = load_guide(args, module, fabric.device) if module is not None else None  # before the slow reference
        if reference is None:
            reference, data_info = _reference(args, fabric, extractor, height, width)
        if module is None:
            points, info = _score_samples(args, fabric, n, extractor, reference)
        else:
            points, info = _score_checkpoint(args, fabric, module, samplers, extractor, reference, guide)
        reports.append(_report(args, fabric, extractor, reference, data_info, points, info, time.time() - start))
        if fabric.global_rank == 0:
            _publish(args, reports[-1])
    return reports


def main(argv: list[str] | None = None) -> int:
    """Entry point of `diffusion-pl evaluate`; returns a process exit code."""
    args = parser().parse_args(argv)
    return run_command("evaluate", lambda: run(args))


def check_args(args: argparse.Namespace) -> list[tuple[Sampler, dict]]:
    """Refuse bad arguments in one line before any slow work; returns the resolved samplers (none for --samples)."""
    _check_args(args)
    return _samplers(args) if args.ckpt is not None else []


def _check_args(args: argparse.Namespace) -> None:
    for name in ("num_samples", "batch_size", "bpd_samples"):
        if getattr(args, name) < 1:
            flag = "--" + name.replace("_", "-")
            raise CommandError(f"{flag} {getattr(args, name)} is invalid: expected a positive integer")
    if args.steps is not None and len(args.steps) not in (1, len(args.sampler)):
        raise CommandError(f"--steps {args.steps} does not match --sampler {args.sampler}: expected one value "
                           "or one per sampler")
    if args.samples is not None and not Path(args.samples).exists():
        raise CommandError(f"--samples {args.samples} does not exist: expected a folder of PNGs or an .npz file")
    if args.bpd and args.ckpt is None:
        raise CommandError("--bpd needs --ckpt: expected a model to evaluate the likelihood of")
    if (args.data is None) == (getattr(args, "ref_stats", None) is None):
        raise CommandError("give one reference: expected --data SHARDS or --ref-stats NPZ (not both, not neither)")
    if getattr(args, "ref_stats", None) is not None and args.kid:
        raise CommandError("--kid with --ref-stats: expected --data (KID needs the reference features, an npz holds "
                           "only their mean and covariance)")
    if args.bpd and args.data is None and args.bpd_data is None:
        raise CommandError("--bpd with --ref-stats needs --bpd-data: expected the shard set to score bits/dim on")
    if args.ckpt is None and any(v is not None for v in (args.guide_ckpt, args.guidance_interval,
                                                         args.guidance_channels)):
        raise CommandError("--guide-ckpt / --guidance-interval / --guidance-channels need --ckpt: expected a model "
                           "to sample from")


def _samplers(args: argparse.Namespace) -> list[tuple[Sampler, dict]]:
    """(sampler, resolved spec) for each --sampler, with its --steps (one value for all, or one each)."""
    steps = args.steps or [None]
    return [resolve_sampler(text, steps[j] if len(steps) > 1 else steps[0]) for j, text in enumerate(args.sampler)]


def _extractor(args: argparse.Namespace, device: torch.device):
    if args.feature_extractor is None:
        return load_inception(args.inception_weights, device=device)
    module_name, _, cls_name = args.feature_extractor.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError, ValueError) as err:
        raise CommandError(f"--feature-extractor {args.feature_extractor!r} cannot be imported ({err}): expected "
                           "a dotted path to an nn.Module class") from err
    return cls().to(device).eval()


def _open_source(args: argparse.Namespace, fabric) -> tuple[object, tuple[int | None, int, int]]:
    """(the checkpoint's module or None, (sample count or None, height, width)) of --ckpt or --samples."""
    if args.samples is not None:
        return None, inspect_samples(args.samples)
    module = load_checkpoint(args.ckpt, fabric.device, trust_config=args.trust_config)
    if args.bpd:
        module.codec.check_pixel_likelihood(f"--bpd with --ckpt {args.ckpt}")
    _, height, width = module.codec.pixel_shape(image_shape(module))  # FID in pixel space, at the decoded size
    return module, (None, height, width)


def _reference(args: argparse.Namespace, fabric, extractor, height: int, width: int):
    """(reference statistics, data info) of --data at the samples' size (cached on disk), or of --ref-stats."""
    if getattr(args, "ref_stats", None) is not None:
        return _published(args, fabric, extractor, height, width)
    # the reference is scored at the samples' size: resized as training resizes it when stored at another size
    images, data_key, data_info = reference_images(args.data, batch_size=args.batch_size,
                                                   image_size=height if height == width else None)
    if data_info["image_size"] != [height, width]:
        size = "x".join(map(str, data_info["image_size"]))
        raise CommandError(f"samples are {height}x{width} but the reference images of --data {args.data} are "
                           f"{size}: expected the same size (square samples get the reference resized to them)")
    if data_info["stored_size"] != data_info["image_size"] and fabric.global_rank == 0:
        stored = "x".join(map(str, data_info["stored_size"])) if data_info["stored_size"] else "mixed sizes"
        print(f"reference images resized from {stored} to {height}x{width} (resize + centre crop, as in training)",
              file=sys.stderr)
    reference = reference_stats(images, data_key, extractor, with_features=args.kid, device=fabric.device,
                                total=data_info["count"], progress=fabric.global_rank == 0)
    return reference, data_info


def _published(args: argparse.Namespace, fabric, extractor, height: int, width: int):
    """(reference statistics, data info) of a published npz, checked against the extractor's feature dimension."""
    from diffusion_pl.evaluation.metrics.published import ADM_PROTOCOL, published_reference

    dim = extract(extractor, torch.zeros(2, 3, height, width, dtype=torch.uint8, device=fabric.device))[0].shape[1]
    reference, info = published_reference(args.ref_stats, dim)
    note = ADM_PROTOCOL if isinstance(extractor, InceptionFeatures) else (
        "published statistics: comparable only if computed with this same feature extractor")
    return reference, {"split": None, "source": "published statistics (--ref-stats)", "image_size": [height, width],
                       "stored_size": None, "count": None, **info, "protocol_note": note}


def _score_samples(args, fabric, n, extractor, reference) -> tuple[list[dict], dict]:
    metrics = SampleMetrics(extractor, reference, kid=args.kid, isc=args.isc, seed=args.seed)
    for images in read_samples(args.samples, rank_indices(n, fabric.global_rank, fabric.world_size), args.batch_size):
        metrics.update(images.to(fabric.device))
    return [{"name": Path(args.samples).name, **metrics.compute()}], {"samples": str(args.samples)}


def _score_checkpoint(args, fabric, module, samplers, extractor, reference, guide=None) -> tuple[list[dict], dict]:
    shape, rank, world = image_shape(module), fabric.global_rank, fabric.world_size
    points = []
    for sampler, spec in samplers:
        metrics = SampleMetrics(extractor, reference, kid=args.kid, isc=args.isc, seed=args.seed)
        nfe = []
        for _, images, _, batch_nfe in generate(module, sampler, rank_indices(args.num_samples, rank, world), shape,
                                                seed=args.seed, guidance=args.guidance, clip_x0=args.clip_x0,
                                                ema=not args.no_ema, guide_module=guide,
                                                guidance_interval=args.guidance_interval,
                                                guidance_channels=args.guidance_channels,
                                                batch_size=args.batch_size, device=fabric.device, progress=rank == 0):
            metrics.update(images)
            nfe.append(batch_nfe)
        name = sampler_label(sampler)  # the class and steps; a repeat (another eta, grid, ...) gets #2, #3, ...
        repeats = sum(p["name"].split("#")[0] == name for p in points)
        points.append({"name": f"{name}#{repeats + 1}" if repeats else name, "sampler": spec, "steps": sampler.steps,
                       "nfe": float(np.mean(nfe)) if nfe else None, **metrics.compute()})
    info = {"checkpoint": str(args.ckpt), "checkpoint_sha256": sha256_file(args.ckpt), "ema": not args.no_ema,
            "guidance": args.guidance, "clip_x0": args.clip_x0, "seed_range": [args.seed, args.seed + args.num_samples - 1],
            "class_labels": "i % num_classes (balanced)" if module.num_classes else None, **guidance_config(args)}
    if args.bpd:
        images = _first_images(args.bpd_data or args.data, args.bpd_samples, args.batch_size)
        info["bits_per_dim"] = {"data": args.bpd_data or args.data, "dequantization": "uniform",
                                "divergence": "hutchinson-rademacher", "class_label": "null (unconditional)",
                                **dataset_bits_per_dim(module.model(ema=not args.no_ema), module.process,
                                                       module.prediction, images, batch_size=args.batch_size,
                                                       seed=args.seed, null_label=module.null_label,
                                                       device=fabric.device, progress=rank == 0)}
    return points, info


def _first_images(data: str, n: int, batch_size: int) -> torch.Tensor:
    batches, kept = reference_images(data, batch_size=batch_size)[0], []
    for batch in batches:
        kept.append(batch[: n - sum(len(b) for b in kept)])
        if sum(len(b) for b in kept) >= n:
            break
    return torch.cat(kept)


def dataset_bits_per_dim(model, process, prediction, images: torch.Tensor, *, batch_size: int = 64, seed: int = 0,
                         null_label: int | None = None, device=None, progress: bool = False, **kwargs) -> dict:
    """Mean bits/dim of uint8 images (N, C, H, W), chunk k with generator seed + k, chunks split over ranks.

    kwargs go to `diffusion_pl.likelihood.bits_per_dim` (dequantize, divergence, rtol, atol, ...).
    """
    from tqdm import tqdm

    from diffusion_pl.likelihood import bits_per_dim

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    chunks = range(0, images.shape[0], batch_size)
    total = torch.zeros(3, dtype=torch.float64, device=device)  # sum bpd, sum bpd^2, count
    nfe = []
    for k in tqdm(list(chunks)[rank::world], desc="bits/dim", unit="batch", disable=not progress):
        x = images[k:k + batch_size].to(device)
        labels = torch.full((x.shape[0],), null_label, device=device) if null_label is not None else None
        out = bits_per_dim(model, process, prediction, x, generator=torch.Generator().manual_seed(seed + k),
                           class_labels=labels, **kwargs)
        bpd = out.bpd.double()
        total += torch.stack([bpd.sum(), bpd.square().sum(), torch.tensor(float(len(bpd)), device=bpd.device)])
        nfe.append(out.nfe)
    if world > 1:
        dist.all_reduce(total)
    n = int(total[2])
    mean = float(total[0] / n)
    var = max(float(total[1] / n) - mean**2, 0.0)
    return {"bpd": mean, "bpd_stderr": math.sqrt(var / max(n - 1, 1)), "n": n,
            "nfe_mean": float(np.mean(nfe)) if nfe else None}


def _report(args, fabric, extractor, reference, data_info: dict, points: list[dict], info: dict,
            seconds: float) -> dict:
    """The JSON report: the protocol (what the numbers depend on), the source's info, one row per sampler."""
    n, inception = points[0]["n"], isinstance(extractor, InceptionFeatures)
    protocol = {"n": n, "full_protocol": n >= 50_000,
                "reference": {"data": args.data, "n": data_info.get("n", reference.n), "split": data_info["split"],
                              "source": data_info["source"], "image_size": data_info["image_size"],
                              "stored_size": data_info["stored_size"],
                              **{k: data_info[k] for k in ("ref_stats", "ref_stats_sha256", "protocol_note")
                                 if k in data_info}},
                "extractor": INCEPTION_PROTOCOL if inception
                else f"{type(extractor).__module__}.{type(extractor).__qualname__}",
                "resize": "bilinear to 299x299, TF1-compatible (antialias=False)" if inception
                else "none (extractor's own)",
                "extractor_sha256": fingerprint(extractor), "quantisation": PROTOCOL,
                "world_size": fabric.world_size, "batch_size": args.batch_size}
    return {"protocol": protocol, **info, "results": points, "seconds": round(seconds, 2)}


def _publish(args: argparse.Namespace, report: dict) -> None:
    """Print the table (and bits/dim) and write the report atomically beside the source, or at --report."""
    print(_table(report["results"]))
    if "bits_per_dim" in report:
        b = report["bits_per_dim"]
        print(f"bits/dim {b['bpd']:.4f} +- {b['bpd_stderr']:.4f} ({b['n']} images of {b['data']})")
    source = Path(args.ckpt or args.samples)
    default = source / "eval.json" if source.is_dir() else source.with_suffix(".eval.json")
    path = Path(args.report) if args.report else default
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(report, indent=1) + "\n")
    print(f"report: {path}", file=sys.stderr)


def _table(points: list[dict]) -> str:
    """Aligned text table; metric columns are named with the sample count below 50k (fid10k)."""
    cols = [c for c in ("name", "steps", "nfe", "n", "fid", "kid", "kid_std", "is", "is_std")
            if any(c in p for p in points)]
    n = points[0]["n"]
    heads = [metric_prefix(c, n) if c in ("fid", "kid", "is") else c for c in cols]
    rows = [[f"{p[c]:.4g}" if isinstance(p.get(c), float) else str(p.get(c, "")) for c in cols] for p in points]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(heads)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(heads, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def read_samples(path: str | Path, indices: range, batch_size: int) -> Iterator[torch.Tensor]:
    """uint8 (B, 3, H, W) batches of the given sample indices of a PNG folder (sorted) or an .npz arr_0."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.png"))
        for a in range(indices.start, indices.stop, batch_size):
            batch = np.stack([read_rgb(f) for f in files[a:min(a + batch_size, indices.stop)]])
            yield torch.from_numpy(batch).permute(0, 3, 1, 2)  # NHWC -> NCHW
        return
    images = np.load(path, mmap_mode="r")["arr_0"]
    for a in range(indices.start, indices.stop, batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(images[a:min(a + batch_size, indices.stop)]))
        yield batch.permute(0, 3, 1, 2).expand(-1, 3, -1, -1)  # NHWC -> NCHW


def inspect_samples(path: str | Path) -> tuple[int, int, int]:
    """(N, H, W) of a PNG folder (all of one size) or an .npz (checking arr_0 is uint8 (N, H, W, C))."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.png"))
        if len(files) < 2:
            raise CommandError(f"--samples {path} holds {len(files)} PNG files: expected at least 2")
        sizes = {}
        for file in files:  # headers only, on every rank: a bad folder fails before any collective
            try:
                with Image.open(file) as im:
                    sizes.setdefault(im.size, file)
            except OSError as err:
                raise CommandError(f"--samples {file} cannot be read ({type(err).__name__}): expected a PNG "
                                   "image") from err
            if len(sizes) > 1:
                (w0, h0), (w1, h1) = sizes
                raise CommandError(f"--samples {file} is {h1}x{w1} but {sizes[w0, h0].name} is {h0}x{w0}: "
                                   "expected PNGs of one size")
        ((width, height),) = sizes
        return len(files), height, width
    try:
        with np.load(path) as npz:
            arr = npz["arr_0"]
    except (OSError, ValueError, KeyError) as err:
        raise CommandError(f"--samples {path} is not an .npz with arr_0 ({type(err).__name__}): expected the "
                           "ADM/EDM sample format") from err
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] not in (1, 3) or arr.shape[0] < 2:
        raise CommandError(f"--samples {path} arr_0 is {arr.dtype} {arr.shape}: expected uint8 (N >= 2, H, W, 3)")
    return arr.shape[0], arr.shape[1], arr.shape[2]


if __name__ == "__main__":
    sys.exit(main())
