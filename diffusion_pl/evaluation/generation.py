"""Seeded sample generation: what sample grids, `diffusion-pl sample` and the FID evaluation all draw.

Sample i is drawn with seed `seed + i` (and class i % num_classes when conditional, or a uniformly random
class drawn from seed + i with label_sampling="random"), so the images depend neither on the batch size
nor on how the indices are split over ranks; rank r takes the contiguous block `rank_indices(n, r, world)`. Images leave as uint8 by the evaluation protocol
(`to_uint8`). This module needs no torchmetrics or torch-fidelity (diffusion_pl.evaluation.metrics does).
"""

from __future__ import annotations

import json
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from tqdm import tqdm

from diffusion_pl import sampling
from diffusion_pl.guidance import Guidance
from diffusion_pl.data.pixels import to_uint8
from diffusion_pl.sampling.api import sample
from diffusion_pl.sampling.base import Sampler
from diffusion_pl.training.shapes import network_mismatch
from diffusion_pl.utils.classes import import_submodules, public_subclasses
from diffusion_pl.utils.errors import UserValueError

__all__ = ["FULL_PROTOCOL_SAMPLES", "LABEL_SAMPLINGS", "metric_prefix", "sampler_label", "class_labels_for", "generate",
           "rank_world", "rank_indices", "guide_mismatch", "sampler_mismatch", "check_sampler"]

FULL_PROTOCOL_SAMPLES = 50_000
# how a conditional model's evaluation samples get their classes (see class_labels_for)
LABEL_SAMPLINGS = {
    "balanced": "i % num_classes (balanced): every class N // num_classes samples, the first N % num_classes "
                "classes one more",
    "random": "uniformly random classes, sample i's drawn from seed + i (ADM, DiT and EDM2 draw random labels)",
}
_LABEL_STREAM = 0x1abe1  # keeps the label draw of seed + i apart from the noise drawn from the same seed


def metric_prefix(name: str, n: int) -> str:
    """`fid` for the full 50k protocol, else the sample count in the name (`fid10k`, `fid500`; a name ending in a
    digit takes an underscore: `fd_dinov2_10k`)."""
    if n >= FULL_PROTOCOL_SAMPLES:
        return name
    name = f"{name}_" if name[-1].isdigit() else name
    return f"{name}{n // 1000}k" if n % 1000 == 0 else f"{name}{n}"


def sampler_label(sampler) -> str:
    """Name of a (sampler, steps) point in logged metrics: class name and steps, e.g. `heunode_17`."""
    return f"{type(sampler).__name__.lower()}_{sampler.steps}"


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) outside one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_indices(n: int, rank: int, world: int) -> range:
    """This rank's contiguous block of sample indices 0..n-1 (blocks in rank order cover them in order)."""
    return range(rank * n // world, (rank + 1) * n // world)


def class_labels_for(indices: Sequence[int], num_classes: int | None, choices: Sequence[int] | None = None,
                     device: str | torch.device | None = None, label_sampling: str = "balanced",
                     seed: int = 0) -> Tensor | None:
    """Label of sample i: choices[i % len(choices)], else i % num_classes ("balanced"), or a class drawn uniformly
    from seed + i ("random"); None if unconditional. Both depend on i alone, not on batches or ranks."""
    if label_sampling not in LABEL_SAMPLINGS:
        raise ValueError(f"label_sampling {label_sampling!r} is unknown: expected one of {sorted(LABEL_SAMPLINGS)}")
    if num_classes is None:
        return None
    if choices:
        labels = [choices[i % len(choices)] for i in indices]
    elif label_sampling == "random":
        labels = [int(np.random.default_rng([(seed + i) % 2**64, _LABEL_STREAM]).integers(num_classes)) for i in indices]
    else:
        labels = [i % num_classes for i in indices]
    return torch.tensor(labels, dtype=torch.long, device=device)


def _saved_component(module, name: str) -> dict | None:
    """The class_path / init_args of `name` in the module's saved config, or None (a module built from Python)."""
    config = getattr(module, "saved_config", None) or getattr(module, "hparams", {})  # load_module sets saved_config
    saved = config.get(name)
    return saved if isinstance(saved, dict) else None


def guide_mismatch(module, guide) -> str | None:
    """Why `guide` cannot guide `module` ("has process X but the model has Y"), or None when it can.

    Mixing raw network outputs equals mixing denoised images only when both models share the generated
    shape and the classes (the networks' declared ones, `shapes.network_mismatch`), the process and the
    prediction. The process and prediction are compared by their saved configs (every argument, where a
    repr may leave some out, e.g. VPLinear's betas) when both modules have one, else by repr.
    """
    difference = network_mismatch(module.net, guide.net)
    checks = [] if difference is None else [difference]
    for name in ("process", "prediction"):
        own, other = _saved_component(module, name), _saved_component(guide, name)
        if own is None or other is None:
            own, other = repr(getattr(module, name)), repr(getattr(guide, name))
        else:
            own, other = (json.dumps(c, sort_keys=True, default=str) for c in (own, other))
        checks.append((name, own, other))
    checks.append(("latent space (autoencoder, scale, shift)", module.codec.space, guide.codec.space))
    for what, own, other in checks:
        if own != other:
            return f"has {what} {other} but the model has {own}"
    return None


def sampler_mismatch(module, sampler) -> str | None:
    """Why `sampler` cannot sample `module` (a sentence to follow the model's name), or None when it can.

    A model trained with a loss whose network is no denoiser (`TrainingLoss.denoiser` False: ConsistencyLoss, SCMLoss)
    samples only with a sampler that needs none (`Sampler.needs_denoiser` False: Consistency). Every other pair
    is allowed, a diffusion model with the Consistency sampler and a MeanFlow model (a velocity model at r = t)
    with every sampler included.
    """
    loss = getattr(module, "loss_fn", None)
    if getattr(loss, "denoiser", True) or not getattr(sampler, "needs_denoiser", True):
        return None
    import_submodules(sampling)  # every sampler class known, for the list of those that fit
    fits = ", ".join(cls.__name__ for cls in public_subclasses(Sampler) if not cls.needs_denoiser)
    return (f"was trained with {type(loss).__name__}, whose network is a consistency function (its x0 output is the "
            f"end of the ODE trajectory), not the denoiser that {type(sampler).__name__} needs at every step: "
            f"expected a consistency sampler ({fits}; e.g. --sampler consistency)")


def check_sampler(module, samplers, what: str = "the model") -> None:
    """Refuse, in one line (UserValueError), the first of `samplers` (one or a list) that cannot sample `module`."""
    for sampler in samplers if isinstance(samplers, (list, tuple)) else [samplers]:
        problem = sampler_mismatch(module, sampler)
        if problem is not None:
            raise UserValueError(f"{what} {problem}")


def generate(module, sampler, indices: Sequence[int], image_shape: Sequence[int], *, seed: int = 0,
             guidance: Guidance = Guidance(), ema: bool = True, class_choices: Sequence[int] | None = None,
             label_sampling: str = "balanced", batch_size: int = 64, device: str | torch.device | None = None,
             progress: bool = False) -> Iterator[tuple[list[int], Tensor, Tensor | None, int]]:
    """(indices, uint8 images, labels, nfe) per batch; sample i uses seed + i, so batches do not matter.

    label_sampling: how a conditional model's classes are drawn when `class_choices` is not given
    (LABEL_SAMPLINGS: "balanced", i % num_classes, or "random").
    image_shape: what the network samples (a latent module's latent (C, h, w)); samples are yielded decoded to
    pixels by the module's codec (`module.codec.pixel_shape(image_shape)` is their shape).
    guidance: every guidance option (diffusion_pl/guidance.py); its null label defaults to the module's, and its
    guide, when set, is a loaded DiffusionModule (same process and prediction; its EMA weights when `ema`;
    `diffusion_pl.evaluation.loading.load_guide` loads a checkpoint path).
    """
    check_sampler(module, sampler)
    guide_module = guidance.guide
    if guidance.guide_path is not None:
        raise ValueError(f"guidance guide {guidance.guide_path} is a checkpoint path: expected the loaded module "
                         "(diffusion_pl.evaluation.loading.load_guide)")
    guidance.check_channels(image_shape[0])
    indices = list(indices)
    model, net = module.model(ema=ema), module.ema if ema else module.net
    guide = guide_module.model(ema=ema) if guide_module is not None else None
    denoising = guidance.replace(guide=guide).for_model(module.null_label)
    guide_net = (guide_module.ema if ema else guide_module.net) if guide_module is not None else None
    training, guide_training = net.training, guide_net is not None and guide_net.training
    net.eval()  # Lightning's model.train() also flips the EMA copy; sampling needs eval (no dropout)
    if guide_net is not None:
        guide_net.eval()
    try:
        with tqdm(total=len(indices), desc=f"sampling {sampler_label(sampler)}", unit="img",
                  disable=not progress) as bar:
            for start in range(0, len(indices), batch_size):
                idx = indices[start:start + batch_size]
                labels = class_labels_for(idx, module.num_classes, class_choices, device, label_sampling, seed)
                out = sample(model, module.process, module.prediction, sampler, (len(idx), *image_shape),
                             class_labels=labels, guidance=denoising, seeds=[seed + i for i in idx], device=device)
                bar.update(len(idx))
                yield idx, to_uint8(module.codec.decode(out.x)), labels, out.nfe  # latents: decoded to pixels
    finally:
        net.train(training)
        if guide_net is not None:
            guide_net.train(guide_training)
