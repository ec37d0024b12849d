"""Bits/dim of a data set by the probability-flow ODE (Song et al. 2021, App. D.2), split over ranks.

What `evaluate(..., EvalOptions(bpd=True))` reports: the mean and standard error over the first
`bpd_samples` images of a shard set, each chunk k of images with its own generator seed + k, so the
value does not depend on the number of ranks (diffusion_pl/likelihood.py computes each image's bits/dim).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist

from diffusion_pl.data.reference import reference_images

__all__ = ["first_images", "dataset_bits_per_dim"]


def first_images(data: str, n: int, batch_size: int) -> torch.Tensor:
    """The first `n` uint8 images (N, C, H, W) of a shard set, in stored order."""
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
