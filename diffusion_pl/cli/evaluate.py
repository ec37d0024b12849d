"""`diffusion-pl evaluate`: FID (+ KID, IS, precision / recall, FD_DINOv2) against reference statistics, and bits/dim.

    diffusion-pl evaluate --ckpt_path last.ckpt --data shards/cifar10-train [--sampler heunode --steps 17] [--bpd]
    diffusion-pl evaluate --ckpt_path last.ckpt --data shards/cifar10-train \
        --sampler ddim '{"class_path": "diffusion_pl.sampling.posterior.DDIM", "init_args": {"steps": 50, "eta": 1.0}}'
    diffusion-pl evaluate --samples OUT_or_samples.npz --data shards/cifar10-train
    diffusion-pl evaluate --ckpt_path last.ckpt --ref_stats VIRTUAL_imagenet256_labeled.npz  # published mu / sigma
    diffusion-pl evaluate --ckpt_path last.ckpt --data shards/imagenet-train --fd_dinov2 --pr --label_sampling random

Each --sampler is a short name or a class_path / init_args spec (JSON, YAML or a .yaml / .json
file; see `diffusion-pl sample`); all are checked before any slow work. Prints a table and writes
a JSON report with the protocol (sample count, reference set, extractor, resize, each sampler's
resolved spec, steps, NFE, seed range, checkpoint sha256, EMA or not). A row is named by class and
steps (`ddim_50`); samplers that share both are told apart as `ddim_50#2`, ... in the given order.

This module only parses: the evaluation is `diffusion_pl.evaluation.evaluate.evaluate`, whose report
(diffusion_pl/evaluation/report.py) is printed and written here.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from diffusion_pl.cli.common import CommandError, CommandParser, add_model_options, flag, guidance_from_args
from diffusion_pl.cli.sampler_spec import SAMPLER_STEPS_HELP, resolve_sampler, sampler_help
from diffusion_pl.utils.errors import run_command
from diffusion_pl.evaluation.evaluate import EvalOptions, evaluate
from diffusion_pl.evaluation.generation import LABEL_SAMPLINGS
from diffusion_pl.evaluation.metrics.precision_recall import PR_REFERENCE
from diffusion_pl.evaluation.report import EvalReport, default_report_path

__all__ = ["main", "parser", "run", "options_from_args", "print_report"]


def parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="diffusion-pl evaluate", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter, flag_aliases={"--ckpt": "--ckpt_path"})
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt_path", dest="ckpt", metavar="PATH", help="checkpoint written by `diffusion-pl fit`: generate and score its samples")
    src.add_argument("--samples", help="score existing samples: a folder of PNGs or an .npz (arr_0 uint8 NHWC)")
    p.add_argument("--data", default=None,
                   help="reference shard set (e.g. the CIFAR-10 training shards); or give --ref_stats")
    p.add_argument("--ref_stats", default=None, metavar="NPZ",
                   help="published reference statistics instead of --data: an npz with mu (D,) and sigma (D, D) of "
                        "the extractor's features (ADM's reference batches, e.g. VIRTUAL_imagenet256_labeled.npz)")
    p.add_argument("--num_samples", type=int, default=50_000, help="generated samples per sampler")
    p.add_argument("--sampler", nargs="+", default=["heunode"],
                   help="one or more samplers (with --ckpt_path), each " + sampler_help())
    p.add_argument("--steps", type=int, nargs="+", default=None,
                   help="one value for every sampler or one each: " + SAMPLER_STEPS_HELP)
    add_model_options(p)
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    p.add_argument("--no_ema", action="store_true", help="use the raw network instead of the EMA weights")
    p.add_argument("--kid", action="store_true", help="also report KID (caches the reference features)")
    p.add_argument("--isc", action="store_true", help="also report the Inception Score")
    p.add_argument("--pr", action="store_true",
                   help="also report precision and recall (Kynkaanniemi et al. 2019, k = 3, ADM's evaluator)")
    p.add_argument("--pr_reference", type=int, default=PR_REFERENCE,
                   help="reference images (a fixed random subset) whose features precision / recall compare with")
    p.add_argument("--fd_dinov2", action="store_true",
                   help="also report FD_DINOv2 (EDM2's: Frechet distance in DINOv2 ViT-L/14 features)")
    p.add_argument("--dinov2_weights", default=None,
                   help="local DINOv2 weights, torch hub's dinov2_vitl14_pretrain.pth (else "
                        "$DIFFUSION_PL_DINOV2_WEIGHTS, else torch hub's cache)")
    p.add_argument("--label_sampling", choices=sorted(LABEL_SAMPLINGS), default="balanced",
                   help="classes of a conditional model's samples: balanced (i %% num_classes) or random (uniform)")
    p.add_argument("--bpd", action="store_true", help="also report bits/dim by the probability-flow ODE")
    p.add_argument("--bpd_samples", type=int, default=1000, help="images of --bpd_data for bits/dim")
    p.add_argument("--bpd_data", default=None, help="shard set for bits/dim (default: --data)")
    p.add_argument("--batch_size", type=int, default=250, help="images per batch, per device")
    p.add_argument("--devices", type=int, default=1, help="processes (GPUs, or CPU processes) to split over")
    p.add_argument("--accelerator", default="auto", help="Lightning accelerator (auto, cpu, gpu, ...)")
    p.add_argument("--inception_weights", default=None,
                   help="local InceptionV3 weights (else $DIFFUSION_PL_INCEPTION_WEIGHTS, else torch hub's cache)")
    p.add_argument("--feature_extractor", default=None,
                   help="import path of an nn.Module class (no arguments) to use instead of InceptionV3")
    p.add_argument("--report", default=None, help="JSON report path (default: beside --ckpt_path / --samples)")
    return p


def options_from_args(args: argparse.Namespace) -> EvalOptions:
    """The library options of parsed arguments, refused in one line naming the flag before any slow work; each
    --sampler (with --ckpt_path) resolved with its --steps (one value for all, or one each)."""
    if args.steps is not None and len(args.steps) not in (1, len(args.sampler)):
        raise CommandError(f"--steps {args.steps} does not match --sampler {args.sampler}: expected one value "
                           "or one per sampler")
    options = EvalOptions(
        data=args.data, ref_stats=args.ref_stats, num_samples=args.num_samples, seed=args.seed,
        batch_size=args.batch_size, kid=args.kid, isc=args.isc, pr=args.pr, pr_reference=args.pr_reference,
        fd_dinov2=args.fd_dinov2, dinov2_weights=args.dinov2_weights, label_sampling=args.label_sampling,
        bpd=args.bpd, bpd_samples=args.bpd_samples,
        bpd_data=args.bpd_data, guidance=guidance_from_args(args), ema=not args.no_ema,
        trust_config=args.trust_config, devices=args.devices,
        accelerator=args.accelerator, inception_weights=args.inception_weights,
        feature_extractor=args.feature_extractor, names=flag)
    if args.ckpt is None:  # --samples: no sampler is used, none is resolved
        return options
    steps = args.steps or [None]
    resolved = [resolve_sampler(text, steps[j] if len(steps) > 1 else steps[0]) for j, text in enumerate(args.sampler)]
    return dataclasses.replace(options, samplers=[s for s, _ in resolved], sampler_specs=[spec for _, spec in resolved])


def run(args: argparse.Namespace) -> EvalReport:
    """Score, print and write the report (global rank 0); returns the report."""
    options = options_from_args(args)
    path = Path(args.report) if args.report else default_report_path(args.ckpt or args.samples)
    return evaluate(options, ckpt=args.ckpt, samples=args.samples, on_report=lambda report: _publish(report, path))


def main(argv: list[str] | None = None) -> int:
    """Entry point of `diffusion-pl evaluate`; returns a process exit code."""
    args = parser().parse_args(argv)
    return run_command("evaluate", lambda: run(args))


def print_report(report: EvalReport) -> None:
    """The results table (and bits/dim) on stdout."""
    print(report.table())
    if report.bits_per_dim is not None:
        b = report.bits_per_dim
        print(f"bits/dim {b['bpd']:.4f} +- {b['bpd_stderr']:.4f} ({b['n']} images of {b['data']})")


def _publish(report: EvalReport, path: Path) -> None:
    """Print the report and write it atomically (beside the source, or at --report)."""
    print_report(report)
    report.write_json(path)
    print(f"report: {path}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
