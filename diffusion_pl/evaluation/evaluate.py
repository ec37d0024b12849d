"""Evaluation as a function: FID (+ KID, IS, precision / recall, FD_DINOv2) and bits/dim, returning a report.

    from diffusion_pl.evaluation.evaluate import EvalOptions, evaluate
    from diffusion_pl.sampling.posterior import DDIM

    options = EvalOptions(data="shards/cifar10-train", samplers=[DDIM(steps=50)], num_samples=10_000)
    report = evaluate(options, ckpt="last.ckpt")             # or ckpt=<a DiffusionModule>, or samples="s.npz"
    report.results[0]["fid"], report.values()                # {'fid10k/ddim_50': ...}
    report.write_json("last.eval.json")

`evaluate_checkpoints(options, [a, b, ...])` scores several checkpoints with one device launch, one
feature extractor and one reference (the post-hoc EMA sweep, diffusion_pl/evaluation/ema_sweep.py).
`diffusion-pl evaluate` (diffusion_pl/cli/evaluate.py) is this function behind a command line.

The protocol: sample i uses seed + i (and class i % num_classes, or a random class with
label_sampling="random"), split over ranks in contiguous blocks,
so the numbers depend neither on the batch size nor on the device count; reference statistics are
computed once per (data, extractor, protocol) and cached on disk (diffusion_pl/evaluation/metrics/), or
read from a published mu / sigma npz (ADM's reference batches). FID follows Heusel et al. 2017 with the
torch-fidelity port of the TF Inception graph, KID Binkowski et al. 2018, IS Salimans et al. 2016,
precision / recall Kynkaanniemi et al. 2019 (ADM's evaluator), FD_DINOv2 EDM2's (metrics/dinov2.py).
"""

from __future__ import annotations

import importlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from diffusion_pl.guidance import Guidance
from diffusion_pl.utils.errors import MissingFileError, UserError, UserValueError, one_line
from diffusion_pl.utils.checkpoint import read_checkpoint
from diffusion_pl.utils.fileio import sha256_file
from diffusion_pl.sampling.base import Sampler
from diffusion_pl.sampling.ode import HeunODE
from diffusion_pl.data.reference import reference_images
from diffusion_pl.data.shards import resolve_shards
from diffusion_pl.evaluation.bits_per_dim import dataset_bits_per_dim, first_images
from diffusion_pl.evaluation.generation import LABEL_SAMPLINGS, check_sampler, generate, rank_indices, sampler_label
from diffusion_pl.evaluation.loading import (Names, argument_name, guidance_config, load_checkpoint, load_guide,
                                             make_fabric)
from diffusion_pl.evaluation.metrics.dinov2 import load_dinov2
from diffusion_pl.evaluation.metrics.inception import InceptionFeatures, load_inception
from diffusion_pl.evaluation.metrics.precision_recall import PR_REFERENCE
from diffusion_pl.evaluation.metrics.statistics import SampleMetrics, extract, reference_stats
from diffusion_pl.evaluation.report import EvalReport, protocol_of
from diffusion_pl.evaluation.samples import inspect_samples, read_samples

__all__ = ["EvalOptions", "evaluate", "evaluate_checkpoints", "load_extractor"]

Checkpoint = Any  # a path (str or Path) to a `diffusion-pl fit` checkpoint, or a loaded DiffusionModule


@dataclass(frozen=True)
class EvalOptions:
    """How to evaluate: samplers, sample count, reference, metrics, devices, guidance; checked when built.

    Args:
        samplers: the diffusion_pl.sampling Sampler instances to score, one result row each.
        sampler_specs: how the report records each sampler (`diffusion-pl evaluate` passes the class_path /
            init_args specs diffusion_pl/cli/sampler_spec.py resolved); None records repr(sampler).
        data: reference shard set (e.g. the CIFAR-10 training shards), resized to the samples' size when stored
            at another size, as training resizes it; or give `ref_stats`.
        ref_stats: published reference statistics instead of `data`: an npz with mu (D,) and sigma (D, D) of the
            extractor's features (ADM's reference batches, e.g. VIRTUAL_imagenet256_labeled.npz).
        num_samples: generated samples per sampler; 50000 is the published protocol.
        seed: sample i uses seed + i.
        batch_size: images per batch, per device.
        kid, isc: also report KID (caches the reference features) and the Inception Score.
        pr: also report precision and recall (Kynkaanniemi et al. 2019, k = 3, ADM's evaluator) in the FID
            extractor's features, against a fixed random subset of `pr_reference` reference images (10,000, ADM's
            reference batch size; their features are cached with the reference statistics) and every sample.
        fd_dinov2: also report FD_DINOv2 (EDM2's protocol): the Frechet distance in DINOv2 ViT-L/14 features.
        dinov2_weights: local DINOv2 weights, torch hub's dinov2_vitl14_pretrain.pth (else
            $DIFFUSION_PL_DINOV2_WEIGHTS, else torch hub's cache), or an nn.Module to use as that extractor.
        label_sampling: the classes of a conditional model's samples: "balanced" (class i % num_classes, every
            class N // num_classes samples and the first N % num_classes one more) or "random" (uniform, as ADM,
            DiT and EDM2 sample; RAE, Zheng et al. 2025, Table 14, reports FID about 0.1 lower when balanced).
        bpd: also report bits/dim by the probability-flow ODE, on the first `bpd_samples` images of
            `bpd_data` (default: `data`); pixel-space models only.
        guidance: every guidance option in one value (diffusion_pl/guidance.py): the weight w, a guide checkpoint
            path (autoguidance, Karras et al. 2024: a weaker checkpoint of the same process, prediction and image
            shape), the noise-level interval, the guided channels and x0 clipping.
        ema: sample the EMA weights (False: the raw network).
        trust_config: allow checkpoints whose saved config imports from other packages (see load_module).
        devices: processes (GPUs, or CPU processes) to split over; more than one launches DDP with Lightning Fabric,
            which re-runs the calling program in devices - 1 child processes (every rank gets the same report).
        accelerator: Lightning accelerator (auto, cpu, gpu, ...).
        inception_weights: local InceptionV3 weights (else $DIFFUSION_PL_INCEPTION_WEIGHTS, else torch hub's cache).
        feature_extractor: an nn.Module, or the import path of an nn.Module class built without arguments, to use
            instead of InceptionV3: uint8 (B, 3, H, W) -> features (B, D) (or (features, logits)).
        progress: progress bars and notes on stderr (global rank 0).
        names: how one-line errors name an argument (`diffusion-pl evaluate` names its flags).
    """

    samplers: Sequence[Sampler] = field(default_factory=lambda: (HeunODE(),))
    sampler_specs: Sequence[Any] | None = None
    data: str | None = None
    ref_stats: str | Path | None = None
    num_samples: int = 50_000
    seed: int = 0
    batch_size: int = 250
    kid: bool = False
    isc: bool = False
    pr: bool = False
    pr_reference: int = PR_REFERENCE
    fd_dinov2: bool = False
    dinov2_weights: str | Path | nn.Module | None = None
    label_sampling: str = "balanced"
    bpd: bool = False
    bpd_samples: int = 1000
    bpd_data: str | None = None
    guidance: Guidance = field(default_factory=Guidance)
    ema: bool = True
    trust_config: bool = False
    devices: int = 1
    accelerator: str = "auto"
    inception_weights: str | Path | None = None
    feature_extractor: str | nn.Module | None = None
    progress: bool = True
    names: Names = field(default=argument_name, compare=False, repr=False)

    def __post_init__(self) -> None:
        name = self.names
        for key in ("num_samples", "batch_size", "bpd_samples", "devices", "pr_reference"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserValueError(f"{name(key)} {value} is invalid: expected a positive integer")
        samplers = tuple(self.samplers) if isinstance(self.samplers, (list, tuple)) else (self.samplers,)
        if not samplers:
            raise UserValueError(f"{name('samplers')} is empty: expected at least one diffusion_pl.sampling Sampler")
        for sampler in samplers:
            if not isinstance(sampler, Sampler):
                raise UserValueError(f"{name('samplers')} holds a {type(sampler).__name__}: expected "
                                     "diffusion_pl.sampling Sampler instances")
        object.__setattr__(self, "samplers", samplers)
        if self.sampler_specs is not None:
            if len(self.sampler_specs) != len(samplers):
                raise UserValueError(f"sampler_specs holds {len(self.sampler_specs)} specs for {len(samplers)} "
                                     "samplers: expected one each (or None)")
            object.__setattr__(self, "sampler_specs", tuple(self.sampler_specs))
        self._check_reference()
        if not isinstance(self.guidance, Guidance):
            raise UserValueError(f"{name('guidance')} is a {type(self.guidance).__name__}: expected a "
                                 "diffusion_pl.guidance.Guidance")

    def _check_reference(self) -> None:
        name = self.names
        if (self.data is None) == (self.ref_stats is None):
            raise UserValueError(f"give one reference: expected {name('data')} SHARDS or {name('ref_stats')} NPZ "
                                 "(not both, not neither)")
        if self.ref_stats is not None and (self.kid or self.pr):
            metric = name("kid") if self.kid else name("pr")
            raise UserValueError(f"{metric} with {name('ref_stats')}: expected {name('data')} ({metric} needs the "
                                 "reference features, an npz holds only their mean and covariance)")
        if self.ref_stats is not None and self.fd_dinov2:
            raise UserValueError(f"{name('fd_dinov2')} with {name('ref_stats')}: expected {name('data')} (the npz "
                                 "holds statistics of one extractor's features, not DINOv2's)")
        if self.label_sampling not in LABEL_SAMPLINGS:
            raise UserValueError(f"{name('label_sampling')} {self.label_sampling!r} is unknown: expected one of "
                                 f"{', '.join(sorted(LABEL_SAMPLINGS))}")
        if self.bpd and self.data is None and self.bpd_data is None:
            raise UserValueError(f"{name('bpd')} with {name('ref_stats')} needs {name('bpd_data')}: expected the "
                                 "shard set to score bits/dim on")

    def sampler_spec(self, j: int) -> Any:
        """How the report records sampler j."""
        return self.sampler_specs[j] if self.sampler_specs is not None else repr(self.samplers[j])


def evaluate(options: EvalOptions, *, ckpt: Checkpoint | None = None, samples: str | Path | None = None,
             on_report: Callable[[EvalReport], None] | None = None) -> EvalReport:
    """Score a checkpoint's samples (`ckpt`: a path or a loaded DiffusionModule, moved to the device and put in
    eval mode) with every sampler of `options`, or existing `samples` (a folder of PNGs or an .npz, arr_0 uint8
    NHWC); returns the report on every rank. `on_report` is called with it on global rank 0 (printing, writing)."""
    if (ckpt is None) == (samples is None):
        raise UserValueError(f"give one source: expected {options.names('ckpt')} or {options.names('samples')} "
                             "(not both, not neither)")
    return _run(options, [ckpt] if ckpt is not None else [], samples, on_report)[0]


def evaluate_checkpoints(options: EvalOptions, checkpoints: Sequence[Checkpoint],
                         on_report: Callable[[EvalReport], None] | None = None) -> list[EvalReport]:
    """`evaluate` of each checkpoint in turn with one device launch, one feature extractor and one reference
    (computed at the first checkpoint's image size; every checkpoint must generate that size); one report each,
    passed to `on_report` on global rank 0 as soon as it is complete."""
    if not checkpoints:
        raise UserValueError(f"{options.names('ckpt')} is empty: expected at least one checkpoint")
    return _run(options, list(checkpoints), None, on_report)


def _run(options: EvalOptions, checkpoints: list, samples, on_report) -> list[EvalReport]:
    _check_source(options, checkpoints, samples)  # before any slow work
    fabric = make_fabric(options.devices, options.accelerator, what=options.names("devices"))
    extractor = load_extractor(options.feature_extractor, options.inception_weights, fabric.device,
                               what=options.names("feature_extractor"))  # preflight: before any slow work
    dinov2 = _load_dinov2(options.dinov2_weights, fabric.device) if options.fd_dinov2 else None
    reference, data_info, reports = None, None, []
    for ckpt in checkpoints or [None]:
        start = time.time()
        module, (count, height, width) = _open_source(options, fabric, ckpt, samples)
        if module is not None:  # checked before the slow reference
            check_sampler(module, options.samplers, f"{options.names('ckpt')} {_label(ckpt)}")
        guidance = None if module is None else load_guide(
            module, options.guidance, fabric.device, names=options.names)
        if reference is None:
            reference, data_info = _reference(options, fabric, extractor, height, width)
            others = [] if dinov2 is None else [
                ("fd_dinov2", dinov2, _reference(options, fabric, dinov2, height, width, features=False)[0])]
        elif data_info["image_size"] != [height, width]:
            raise UserValueError(f"{options.names('ckpt')} {_label(ckpt)} generates {height}x{width} images but the "
                                 f"shared reference is {'x'.join(map(str, data_info['image_size']))}: expected "
                                 "checkpoints of one image size")
        if module is None:
            points, info = _score_samples(options, fabric, samples, count, extractor, reference, others)
        else:
            points, info = _score_checkpoint(options, fabric, module, ckpt, extractor, reference, others, guidance)
        protocol = protocol_of(extractor, reference, options.data, data_info, points[0]["n"], fabric.world_size,
                               options.batch_size, dinov2=dinov2, pr_reference=options.pr_reference if options.pr
                               else None)
        reports.append(EvalReport(protocol, info, points, round(time.time() - start, 2)))
        if on_report is not None and fabric.global_rank == 0:
            on_report(reports[-1])
    return reports


def _check_source(options: EvalOptions, checkpoints: list, samples) -> None:
    name = options.names
    for ckpt in checkpoints:
        if not isinstance(ckpt, (str, Path, nn.Module)):
            raise UserValueError(f"{name('ckpt')} {ckpt!r} is a {type(ckpt).__name__}: expected a checkpoint path "
                                 "or a DiffusionModule")
    if samples is not None and not Path(samples).exists():
        raise MissingFileError(f"{name('samples')} {samples} does not exist: expected a folder of PNGs or an .npz "
                               "file")
    # every input the user named, before the feature extractor (maybe a download) and the model load
    for ckpt in checkpoints:
        if isinstance(ckpt, (str, Path)) and not Path(ckpt).is_file():
            read_checkpoint(ckpt)  # its one "does not exist" line, as every command reading a checkpoint says it
    guide = options.guidance.guide_path
    if guide is not None and not Path(guide).is_file():
        raise MissingFileError(f"{name('guide_ckpt')} {guide} does not exist: expected a checkpoint written by "
                               "`diffusion-pl fit`")
    if options.ref_stats is not None and not Path(options.ref_stats).is_file():
        from diffusion_pl.evaluation.metrics.published import published_reference

        published_reference(options.ref_stats, what=name("ref_stats"))  # its one-line "does not exist"
    for key in ("data", "bpd_data"):
        value = getattr(options, key)
        if value is not None and not str(value).startswith("builtin:"):
            try:
                resolve_shards(str(value))
            except UserError as err:
                raise type(err)(f"{name(key)}: {one_line(err)}") from None
    if options.bpd and not checkpoints:
        raise UserValueError(f"{name('bpd')} needs {name('ckpt')}: expected a model to evaluate the likelihood of")
    guidance = options.guidance
    if not checkpoints and any(v is not None for v in (guidance.guide, guidance.interval, guidance.channels)):
        raise UserValueError(f"{name('guide_ckpt')} / {name('guidance_interval')} / {name('guidance_channels')} "
                             f"need {name('ckpt')}: expected a model to sample from")


def _label(ckpt: Checkpoint) -> str:
    """A checkpoint as one-line messages show it: its path, or the class of a module given as an object."""
    return str(ckpt) if isinstance(ckpt, (str, Path)) else f"<{type(ckpt).__name__} object>"


def load_extractor(feature_extractor: str | nn.Module | None, inception_weights: str | Path | None = None,
                   device: torch.device | str | None = None, what: str = "feature_extractor") -> nn.Module:
    """The feature extractor on `device` in eval mode: InceptionV3 (weights checked, one-line error when they
    cannot be had), the given module, or an instance of the nn.Module class at the import path given."""
    if feature_extractor is None:
        return load_inception(str(inception_weights) if inception_weights is not None else None, device=device)
    if isinstance(feature_extractor, nn.Module):
        return feature_extractor.to(device).eval()
    module_name, _, cls_name = str(feature_extractor).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError, ValueError) as err:
        raise UserValueError(f"{what} {feature_extractor!r} cannot be imported ({err}): expected a dotted path to "
                             "an nn.Module class") from err
    return cls().to(device).eval()


def _load_dinov2(weights, device) -> nn.Module:
    """The FD_DINOv2 extractor: the module given, or DINOv2 ViT-L/14 from the weights file (one-line error)."""
    if isinstance(weights, nn.Module):
        return weights.to(device).eval()
    return load_dinov2(weights, device=device).eval()


def _metrics(options: EvalOptions, extractor, reference, others) -> SampleMetrics:
    return SampleMetrics(extractor, reference, kid=options.kid, isc=options.isc, pr=options.pr,
                         pr_reference=options.pr_reference, seed=options.seed, others=others)


def _open_source(options: EvalOptions, fabric, ckpt, samples) -> tuple[object, tuple[int | None, int, int]]:
    """(the checkpoint's module or None, (sample count or None, height, width)) of `ckpt` or `samples`."""
    name = options.names
    if samples is not None:
        return None, inspect_samples(samples, what=name("samples"))
    if isinstance(ckpt, nn.Module):
        module = ckpt.to(fabric.device).eval()
    else:
        module = load_checkpoint(ckpt, fabric.device, trust_config=options.trust_config)
    if options.bpd:
        module.codec.check_pixel_likelihood(f"{name('bpd')} with {name('ckpt')} {_label(ckpt)}")
    _, height, width = module.codec.pixel_shape(module.net.image_shape)  # FID in pixel space, at the decoded size
    return module, (None, height, width)


def _reference(options: EvalOptions, fabric, extractor, height: int, width: int, features: bool = True):
    """(reference statistics, data info) of `data` at the samples' size (cached on disk), or of `ref_stats`; with
    the features KID (all) or precision / recall (a subset) need unless `features` is False."""
    if options.ref_stats is not None:
        return _published(options, fabric, extractor, height, width)
    # the reference is scored at the samples' size: resized as training resizes it when stored at another size
    images, data_key, data_info = reference_images(options.data, batch_size=options.batch_size,
                                                   image_size=height if height == width else None)
    if data_info["image_size"] != [height, width]:
        size = "x".join(map(str, data_info["image_size"]))
        raise UserValueError(f"samples are {height}x{width} but the reference images of {options.names('data')} "
                             f"{options.data} are {size}: expected the same size (square samples get the reference "
                             "resized to them)")
    progress = options.progress and fabric.global_rank == 0
    if data_info["stored_size"] != data_info["image_size"] and progress:
        stored = "x".join(map(str, data_info["stored_size"])) if data_info["stored_size"] else "mixed sizes"
        print(f"reference images resized from {stored} to {height}x{width} (resize + centre crop, as in training)",
              file=sys.stderr)
    keep = (True if options.kid else options.pr_reference if options.pr else False) if features else False
    reference = reference_stats(images, data_key, extractor, with_features=keep, device=fabric.device,
                                total=data_info["count"], progress=progress)
    return reference, data_info


def _published(options: EvalOptions, fabric, extractor, height: int, width: int):
    """(reference statistics, data info) of a published npz, checked against the extractor's feature dimension."""
    from diffusion_pl.evaluation.metrics.published import ADM_PROTOCOL, published_reference

    dim = extract(extractor, torch.zeros(2, 3, height, width, dtype=torch.uint8, device=fabric.device))[0].shape[1]
    reference, info = published_reference(options.ref_stats, dim, what=options.names("ref_stats"))
    note = ADM_PROTOCOL if isinstance(extractor, InceptionFeatures) else (
        "published statistics: comparable only if computed with this same feature extractor")
    return reference, {"split": None, "source": "published statistics (--ref_stats)", "image_size": [height, width],
                       "stored_size": None, "count": None, **info, "protocol_note": note}


def _score_samples(options: EvalOptions, fabric, samples, n: int, extractor, reference,
                   others) -> tuple[list[dict], dict]:
    metrics = _metrics(options, extractor, reference, others)
    indices = rank_indices(n, fabric.global_rank, fabric.world_size)
    for images in read_samples(samples, indices, options.batch_size):
        metrics.update(images.to(fabric.device))
    return [{"name": Path(samples).name, **metrics.compute()}], {"samples": str(samples)}


def _score_checkpoint(options: EvalOptions, fabric, module, ckpt, extractor, reference, others,
                      guidance: Guidance) -> tuple[list[dict], dict]:
    shape, rank, world = module.net.image_shape, fabric.global_rank, fabric.world_size
    points = []
    for j, sampler in enumerate(options.samplers):
        metrics = _metrics(options, extractor, reference, others)
        nfe = []
        for _, images, _, batch_nfe in generate(module, sampler, rank_indices(options.num_samples, rank, world), shape,
                                                seed=options.seed, guidance=guidance, ema=options.ema,
                                                label_sampling=options.label_sampling,
                                                batch_size=options.batch_size, device=fabric.device,
                                                progress=options.progress and rank == 0):
            metrics.update(images)
            nfe.append(batch_nfe)
        name = sampler_label(sampler)  # the class and steps; a repeat (another eta, grid, ...) gets #2, #3, ...
        repeats = sum(p["name"].split("#")[0] == name for p in points)
        points.append({"name": f"{name}#{repeats + 1}" if repeats else name, "sampler": options.sampler_spec(j),
                       "steps": sampler.steps, "nfe": float(np.mean(nfe)) if nfe else None, **metrics.compute()})
    info = _checkpoint_info(options, module, ckpt)
    if options.bpd:
        data = options.bpd_data or options.data
        images = first_images(data, options.bpd_samples, options.batch_size)
        info["bits_per_dim"] = {"data": data, "dequantization": "uniform", "divergence": "hutchinson-rademacher",
                                "class_label": "null (unconditional)",
                                **dataset_bits_per_dim(module.model(ema=options.ema), module.process,
                                                       module.prediction, images, batch_size=options.batch_size,
                                                       seed=options.seed, null_label=module.null_label,
                                                       device=fabric.device, progress=options.progress and rank == 0)}
    return points, info


def _checkpoint_info(options: EvalOptions, module, ckpt) -> dict:
    """What the report records of a checkpoint and how it was sampled."""
    path = str(ckpt) if isinstance(ckpt, (str, Path)) else None
    return {"checkpoint": path, "checkpoint_sha256": sha256_file(path) if path is not None else None,
            "ema": options.ema, "guidance": options.guidance.weight, "clip_x0": options.guidance.clip_x0,
            "seed_range": [options.seed, options.seed + options.num_samples - 1],
            "class_labels": LABEL_SAMPLINGS[options.label_sampling] if module.num_classes else None,
            "label_sampling": options.label_sampling if module.num_classes else None,
            **guidance_config(options.guidance)}
